"""CapsNet with dynamic routing, trained on MNIST, MultiMNIST, other data sets or your own images, in one script.

Sabour, Frosst & Hinton, "Dynamic Routing Between Capsules", NIPS 2017 (arXiv:1710.09829):
Conv1 -> PrimaryCaps -> DigitCaps with routing-by-agreement (Procedure 1), margin loss (eq. 4)
and a reconstruction decoder. Built on torch, torchvision, torchnet (Engine, meters, Visdom
loggers), tqdm and Visdom.

    python -m visdom.server -port 8097 -bind_local &   # optional: live plots at http://localhost:8097
    python capsule_network.py                          # train with the constants below
    python capsule_network.py --help                   # every constant as a flag, with its default

The file, top to bottom:
    constants      every tunable, grouped: data, model and loss (as in the paper), training,
                   speed, logging; each one is also a flag
    model          squash, dynamic_routing (Procedure 1 as written), capsule_layer (the same
                   routing, factored: what CapsuleNet runs), CapsuleNet
    PrimaryCaps    the CPU's faster ways to compute the same convolution (GEMM gradient, DFTs)
    loss           CapsuleLoss: margin loss + 0.0005 x summed squared reconstruction error;
                   the two-digit scores
    data           the readers (torchvision's MNIST-format sets, CIFAR-10, SVHN, smallNORB, image
                   folders), DeviceBatches, shifts, crops and flips; MultiMNIST (sec. 6):
                   multimnist_pairs, PairBatches; load_data (the model follows the data)
    one step       Stepper (what torchnet's Engine calls per batch), CompileChoice, meters, PassStats
    epoch loop     Trainer (Engine hooks: train pass, test pass, metrics, checkpoints), run_training
    other modes    run_eval (--eval-only, ensembles), run_visualize (--visualize), run_predict
                   (--predict), export_weights
    Visdom         VisdomPlots: per-epoch and live windows
    figures        Fig. 4, class masks, couplings, Fig. 5 (MultiMNIST), curves
    checkpoints    atomic writes, one-line errors
    many processes Distributed: torchrun's process group (DistributedDataParallel in Trainer)
    devices        device choice, bf16, allocator, RNG state, Ctrl-C
    command line   flags from the constants, main()
The speed benchmark is bench.py, beside this file. Measured results and the commands behind them
are in README.md; the lab notes in results/README.md.
"""

import argparse
import contextlib
import copy
import ctypes
import functools
import importlib.util
import io
import json
import logging
import math
import os
import re
import signal
import socket
import sys
import threading
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---- constants (each one is also a command-line flag: FOO_BAR -> --foo-bar) ----
# data
DATASET = "mnist"  # mnist, fashion-mnist, kmnist, emnist-balanced, emnist-letters, cifar10, svhn, smallnorb, folder, multimnist
DATA_DIR = "data"  # where the data set's files are, in torchvision's layouts: DATA_DIR/MNIST/raw, ... (README)
TRAIN_SIZE = 0  # use the first N training images; 0 = all 60,000
TEST_SIZE = 0  # use the first N test images; 0 = all 10,000
IMAGE_SIZE = 0  # images resized to IMAGE_SIZE x IMAGE_SIZE before any crop; 0 = as stored (folder: 28)
IMAGE_CHANNELS = 0  # folder: 1 or 3; 0 = the data set's (folder: 3 if any training image has colour, else 1)
CROP_SIZE = 0  # random CROP_SIZE crops of training images, the central one at test; 0 = none (cifar10: 24)
FLIP = False  # random left-right flips of training images (cifar10)
MAX_SHIFT = 2  # random shift of up to this many pixels per image, training only (paper, sec. 5; not multimnist)
MULTIMNIST_SHIFT = 4  # multimnist: each digit of a pair shifted by up to this many pixels in the 36x36 image
MULTIMNIST_TEST_PAIRS = 1  # multimnist: fixed test images per MNIST test digit (the paper made 1,000)
# model, as in the paper (sec. 4, Fig. 1 and 2)
CONV1_CHANNELS = 256  # Conv1 filters, 9x9, stride 1 (paper, sec. 4)
PRIMARY_CAPS = 32  # primary capsule types (channels of 8-D capsules) on the 6x6 grid
PRIMARY_DIM = 8  # dimension of a primary capsule
DIGIT_DIM = 16  # dimension of a digit capsule
NUM_CLASSES = 0  # digit capsules, one per class; 0 = as many as the data set has (MNIST: 10)
KERNEL_SIZE = 9  # kernel of Conv1 and PrimaryCaps
ROUTING_ITERATIONS = 3  # routing-by-agreement iterations (paper: 3, sec. 4 and Procedure 1)
ROUTING_LEAKY = False  # an extra "none-of-the-above" parent with logit 0 in each child's softmax (CIFAR10, sec. 7)
W_INIT_STD = 0.01  # standard deviation of the normal initialisation of the W_ij matrices (INIT torch)
# where the authors' released code (Sarasra/models, research/capsules) differs from the paper's text;
# off by default, all on with --preset authors (README: "The authors' code")
INIT = "torch"  # torch: PyTorch's layer defaults, W_ij ~ N(0, W_INIT_STD); authors: truncated normals (Conv1 0.05, the rest 0.1), biases 0.1
PRIMARY_SCALE = 1.0  # PrimaryCaps pre-activation = this x convolution + bias; authors: 0.03125 (one routing pass over 32 types, zero logits)
DIGIT_CAPS_BIAS = False  # a learned bias (J, E), starting at 0.1, added to s_j before the squash (authors' code; not in the paper)
DECODER_HIDDEN1 = 512  # first decoder layer width (Fig. 2)
DECODER_HIDDEN2 = 1024  # second decoder layer width (Fig. 2)
# loss, as in the paper (eq. 4, sec. 4.1)
M_PLUS = 0.9  # margin loss m+ (eq. 4)
M_MINUS = 0.1  # margin loss m- (eq. 4)
LAMBDA_ABSENT = 0.5  # margin loss weight lambda for absent classes (eq. 4)
RECON_WEIGHT = 0.0005  # reconstruction loss = this x sum of squared pixel errors (sec. 4.1)
MARGIN_REDUCTION = "sum"  # sum: eq. 4 summed over the classes; half-mean: the authors' code, 0.5 x the mean over the classes
# training
PRESET = ""  # named recipes from PRESETS below, comma-separated (e.g. mnist-2h,authors); their values, then the explicit flags
RUN_DIR = "runs/capsnet"  # metrics.jsonl, last.pt, best.pt, eval.json and PNG figures go here
DEVICE = "auto"  # auto (CUDA, then MPS, then CPU), cpu, cuda or mps
SEED = 0  # seeds torch's generators; all randomness comes from torch
EPOCHS = 50  # total training epochs (a resumed run continues up to this number)
BATCH_SIZE = 100  # training batch size (the paper does not give one; 100 is the common choice)
EVAL_BATCH_SIZE = 100  # test batch size (on the 2-core CPU, 100 evaluated faster than 250 or 500)
LR = 1e-3  # Adam learning rate (paper: TensorFlow's Adam defaults)
LR_DECAY = 0.96  # exponential decay of the learning rate per epoch (see lr_decay_note below)
# speed: the same mathematics, computed faster (results/README.md)
AMP = True  # bf16 autocast for the convolutions and decoder where the device supports bf16
COMPILE = "auto"  # torch.compile the capsule part: auto (keep it if it trains faster here), on, off
CHANNELS_LAST = False  # channels_last memory format for the convolutions (slower on the CPU: results/README.md)
CPU_MALLOC_TUNING = True  # keep glibc from returning big activations to the OS each step (CPU)
CPU_DFT_CONV = True  # CPU: PrimaryCaps convolution through small DFTs (same math, ~3x fewer FLOPs)
CPU_GEMM_WEIGHT_GRAD = True  # CPU, CPU_DFT_CONV off: PrimaryCaps weight gradient as one im2col GEMM
# logging: terminal, Visdom, figures
PROGRESS_EVERY = 25  # every N batches: running loss/accuracy in the tqdm bar, a point in Visdom's live windows
RECON_IMAGES = 16  # test images shown next to their reconstructions in Visdom
VISUALIZE_EVERY_EPOCH = True  # capsule visualisations (Fig. 4, class masks, couplings) in Visdom
VISDOM = True  # log to a Visdom server (training goes on without one)
VISDOM_SERVER = "localhost"  # Visdom host name (torchnet adds http://)
VISDOM_PORT = 8097  # Visdom port
VISDOM_ENV = "capsnet"  # Visdom environment the plots go to
# ---- end of constants ----

# Named recipes: --preset NAME sets these constants (printed at start, saved in the checkpoint);
# any flag given explicitly still wins. The paper's architecture and routing in all of them.
PRESETS = {
    # A complete, annealed MNIST run that ends in about 2 to 2.5 hours on a 2-core CPU (about
    # 4.2 minutes an epoch): 30 epochs, the learning rate x0.88 per epoch, so the last epoch
    # trains at 2.5% of it. The defaults (50 epochs at x0.96, 13% at the end) take 3.5 hours there.
    # Chosen from the 10-epoch curve in results/ (the test accuracy still moved by +-0.1 point
    # between epochs at 69% of the rate) and from XifengGuo's x0.9 per epoch over 50 epochs.
    "mnist-2h": {"EPOCHS": 30, "LR_DECAY": 0.88},
    # The model and loss of the authors' released code where it differs from the paper's text
    # (Sarasra/models, research/capsules: layers.py, capsule_model.py, variables.py): their margin
    # loss is 0.5 x the mean over classes (so reconstruction weighs 20x more against it with 10
    # classes), DigitCaps adds a bias to s_j, PrimaryCaps is a one-iteration routing over the 32
    # types with zero logits (the convolution x 1/32, plus a bias), and truncated-normal weights
    # with biases of 0.1. Training stays as set: combine with a schedule, --preset mnist-2h,authors.
    "authors": {"MARGIN_REDUCTION": "half-mean", "DIGIT_CAPS_BIAS": True, "PRIMARY_SCALE": 1 / 32, "INIT": "authors"},
}

MULTIMNIST_CANVAS = 36  # paper, sec. 6: a 28x28 digit shifted by up to 4 px in a 36x36 image

# What each data set is, and the paper's settings for it: they replace the constants above when
# that data set is chosen (printed at start; a flag given explicitly still wins). `reader` says
# how its files are read (load_split), `digits` how many objects an image holds, `shape` its
# (channels, image size, classes) as stored, for synthetic data (bench.py; folder: a typical one).
DATASETS = {
    "mnist": {"shape": (1, 28, 10), "reader": "MNIST", "digits": 1, "settings": {}},
    "fashion-mnist": {"shape": (1, 28, 10), "reader": "FashionMNIST", "digits": 1, "settings": {}},
    "kmnist": {"shape": (1, 28, 10), "reader": "KMNIST", "digits": 1, "settings": {}},
    # torchvision's EMNIST images stand transposed (load_split turns them upright); the letters'
    # labels start at 1 (load_split makes them 0..25)
    "emnist-balanced": {"shape": (1, 28, 47), "reader": "EMNIST", "split": "balanced", "digits": 1, "settings": {}},
    "emnist-letters": {"shape": (1, 28, 26), "reader": "EMNIST", "split": "letters", "digits": 1, "settings": {}},
    # sec. 7: three colour channels, 64 primary capsule types, 24x24 patches (random crops in training,
    # the central one at test) and a "none-of-the-above" routing option. Left-right flips are the
    # usual CIFAR10 augmentation; the paper names only the patches. The crops replace MNIST's shift.
    "cifar10": {"shape": (3, 32, 10), "reader": "cifar10", "digits": 1, "settings": {"PRIMARY_CAPS": 64, "CROP_SIZE": 24, "FLIP": True,
                                                               "ROUTING_LEAKY": True, "MAX_SHIFT": 0}},
    # sec. 7: the smaller network the paper trained on SVHN (64 Conv1 channels, 16 primary capsule
    # types of 6 dimensions, 8-dimensional class capsules); 32x32 colour images
    "svhn": {"shape": (3, 32, 10), "reader": "svhn", "digits": 1, "settings": {"CONV1_CHANNELS": 64, "PRIMARY_CAPS": 16, "PRIMARY_DIM": 6,
                                                         "DIGIT_DIM": 8}},
    # sec. 7: 5 classes, the stereo pair as two channels, 96x96 downsampled to 48x48, random 32x32
    # crops in training, the central crop at test (see the README for what is not done here)
    "smallnorb": {"shape": (2, 96, 5), "reader": "smallnorb", "digits": 1, "settings": {"IMAGE_SIZE": 48, "CROP_SIZE": 32,
                                                                   "MAX_SHIFT": 0}},
    "folder": {"shape": (3, 28, 10), "reader": "folder", "digits": 1, "settings": {"IMAGE_SIZE": 28}},
    # MultiMNIST (sec. 6): 36x36 images of two digits, so Conv1 is 28x28 and PrimaryCaps a 10x10 grid
    # of 3,200 capsules. The paper decays the learning rate with a 10x longer period because its
    # set is larger: here an epoch is one pair per MNIST training digit, so 0.96 per epoch becomes
    # 0.96 ** 0.1 = 0.996 per epoch. No extra shift: the pairs' own shifts are the augmentation.
    "multimnist": {"shape": (1, 36, 10), "reader": "MNIST", "digits": 2, "settings": {"LR_DECAY": 0.996, "MAX_SHIFT": 0}},
}
MULTIMNIST_TEST_SEED = 20171026  # the fixed test pairs are drawn from this seed, whatever SEED is

# lr_decay_note: the paper only says "exponentially decaying learning rate". The authors'
# released code multiplies it by 0.96 every 2000 steps (about 0.988 per epoch at batch 100),
# which barely anneals a 50-epoch run; 0.96 per epoch ends a 50-epoch run at 13% of LR, so the
# final epochs are stable enough to report the final epoch rather than the best one.

MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

DEVICES = ("auto", "cpu", "cuda", "mps")


class UsageError(Exception):
    """A bad constant, flag or input: reported as one line, exit code 2."""


# ---- model: squash (eq. 1), routing (Procedure 1), CapsuleNet (Fig. 1 and 2) ----
def squash(s, dim=-1, eps=1e-12):
    """Eq. 1: v = ||s||^2 / (1 + ||s||^2) * s / ||s||, written as s * ||s|| / (1 + ||s||^2).
    eps inside the root keeps the value and the gradient finite at s = 0."""
    sq_norm = (s * s).sum(dim=dim, keepdim=True)
    return s * (torch.sqrt(sq_norm + eps) / (1.0 + sq_norm))


def parent_softmax(b, dim, leaky=False):
    """c_ij = softmax of the logits b_ij over the parents (dimension `dim`). `leaky` adds a parent
    whose logit is always 0 and drops it after the softmax (the paper's "none-of-the-above" option
    for CIFAR10, sec. 7; "leaky routing" in the authors' code): a child may then send part of its
    output nowhere, and its couplings to the real parents sum to less than 1."""
    if not leaky:
        return b.softmax(dim=dim)
    zero = torch.zeros_like(b.narrow(dim, 0, 1))
    return torch.cat([b, zero], dim).softmax(dim=dim).narrow(dim, 0, b.shape[dim])


def dynamic_routing(u_hat, iterations, logit_changes=None, leaky=False, bias=None):
    """Procedure 1. u_hat (B, I, J, E) predictions of child i for parent j -> v (B, J, E), c (B, I, J).

    b_ij starts at 0 for every example; c_i = softmax over the parents j, so sum_j c_ij = 1
    (less than 1 with `leaky`, see parent_softmax). `bias` (J, E), the authors' code's DigitCaps
    bias (DIGIT_CAPS_BIAS; not in the paper), is added to every s_j before the squash.
    If `logit_changes` is a list, the mean |change of b_ij| of every iteration is appended to it
    (detached tensors; Appendix A's measure), including the last, unused, update.
    The model runs the same computation factored (capsule_layer); this is the plain reference.
    """
    b = u_hat.new_zeros(u_hat.shape[:3])  # (B, I, J)
    for r in range(iterations):
        c = parent_softmax(b, 2, leaky)  # (B, I, J), softmax over parents j
        s = torch.einsum("bij,bije->bje", c, u_hat)  # (B, J, E) = sum_i c_ij u_hat_j|i
        if bias is not None:
            s = s + bias  # (B, J, E)
        v = squash(s)  # (B, J, E)
        if r < iterations - 1 or logit_changes is not None:
            agreement = torch.einsum("bije,bje->bij", u_hat, v)  # (B, I, J) = u_hat_j|i . v_j
            if logit_changes is not None:
                logit_changes.append(agreement.detach().abs().mean())
            b = b + agreement
    return v, c


def capsule_layer(W, u, iterations, record, children_last=False, leaky=False, bias=None):
    """DigitCaps with routing: W (J, I, E, D), primary capsules u (B, I, D) -> v (B, J, E),
    c (B, I, J) and, if `record`, the mean |change of b_ij| per iteration (iterations,), else None.
    `bias` (J, E) is added to s_j before the squash, as in dynamic_routing.

    The same computation as dynamic_routing(u_hat) with u_hat_j|i = W_ij u_i (tests check this),
    factored so that u_hat, 1152 x 10 x 16 numbers per image, is never built:
      s_j = sum_i c_ij W_ij u_i            = one GEMM per class over k, K = I * D = 9216
      u_hat_j|i . v_j = u_i . (W_ij^T v_j) = one GEMM per class, then a dot over d.
    In the first iteration c_ij = 1/J for all i, j (1/(J+1) with `leaky`, see parent_softmax), so s
    is a single GEMM of u with all of W.

    `children_last` orders k as (d, i) instead of (i, d), so that the element-wise work runs along
    the 1152 children rather than the 8 capsule dimensions: the layout the compiled version uses
    (inductor's loops then fill whole vector registers; torch 2.14's inductor also parallelised
    an 8-wide loop badly, results/README.md), while eager broadcasting is faster with (i, d)."""
    J, I, E, D = W.shape
    B = u.shape[0]
    if children_last:
        Wk = W.permute(0, 2, 3, 1).reshape(J, E, D * I)  # (J, E, K): row e of W_ij for every k = (d, i)
        uk = u.transpose(1, 2).unsqueeze(0)  # (1, B, D, I)
        dim_d = 2  # where d sits in the (J, B, ., .) products
    else:
        Wk = W.permute(0, 2, 1, 3).reshape(J, E, I * D)  # (J, E, K): row e of W_ij for every k = (i, d)
        uk = u.unsqueeze(0)  # (1, B, I, D)
        dim_d = 3
    changes = []
    b = None  # routing logits, (J, B, I); b_ij = 0 before the first iteration
    for r in range(iterations):
        if b is None:
            parents = J + 1 if leaky else J  # softmax of zeros over the parents
            c = u.new_full((J, B, I), 1.0 / parents)
            s = (uk.reshape(B, I * D) @ Wk.reshape(J * E, I * D).t()).reshape(B, J, E).transpose(0, 1) / parents
        else:
            c = parent_softmax(b, 0, leaky)  # (J, B, I), softmax over parents j
            x = (c.unsqueeze(dim_d) * uk).reshape(J, B, I * D)  # (J, B, K): c_ij u_i
            s = torch.bmm(x, Wk.transpose(1, 2))  # (J, B, E) = sum_i c_ij W_ij u_i
        if bias is not None:
            s = s + bias.unsqueeze(1)  # (J, B, E)
        v = squash(s)  # (J, B, E)
        if r < iterations - 1 or record:
            wv = torch.bmm(v, Wk).reshape(J, *uk.shape[1:])  # W_ij^T v_j
            agreement = (wv * uk).sum(dim_d)  # (J, B, I) = u_hat_j|i . v_j
            if record:
                changes.append(agreement.detach().abs().mean())
            b = agreement if b is None else b + agreement
    return v.transpose(0, 1), c.permute(1, 2, 0), (torch.stack(changes) if record else None)


class CompiledOrEager:
    """torch.compile(fn), falling back to fn with one warning if compiling fails (no compiler,
    unsupported platform). Compilation happens at the first call of each new input kind."""

    def __init__(self, fn):
        # On machines without CUDA, torch's C++ extension helper says "No CUDA runtime is found"
        # when inductor first imports it (a log warning; a print up to torch 2.7): noise for a CPU
        # user. Imported here quietly; its errors still show.
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        with contextlib.redirect_stderr(io.StringIO()):
            try:
                import torch.utils.cpp_extension  # noqa: F401
            except Exception:  # then inductor meets the same error later and CompiledOrEager reports it
                pass
        self.eager = fn
        self.fn = torch.compile(fn)

    @property
    def failed(self):
        return self.fn is self.eager

    def __call__(self, *args, **kwargs):
        if self.failed:
            return self.eager(*args, **kwargs)
        try:
            return self.fn(*args, **kwargs)
        except Exception as e:  # torch._dynamo / inductor raise many types
            first = (str(e).strip().splitlines() or [""])[0][:160]
            print(f"warning: torch.compile failed ({type(e).__name__}: {first}); running eagerly",
                  file=sys.stderr)
            self.fn = self.eager
            return self.eager(*args, **kwargs)


class CapsuleNet(nn.Module):
    """Conv1 -> PrimaryCaps -> DigitCaps (routing) -> lengths, plus the masked decoder (Fig. 1, 2)."""

    def __init__(self, conv1_channels=CONV1_CHANNELS, primary_caps=PRIMARY_CAPS, primary_dim=PRIMARY_DIM,
                 digit_dim=DIGIT_DIM, num_classes=10, kernel_size=KERNEL_SIZE,
                 routing_iterations=ROUTING_ITERATIONS, w_init_std=W_INIT_STD, routing_leaky=False,
                 decoder_hidden=(DECODER_HIDDEN1, DECODER_HIDDEN2), image_size=28,
                 dft_conv=CPU_DFT_CONV, gemm_weight_grad=CPU_GEMM_WEIGHT_GRAD, cpu_malloc_tuning=CPU_MALLOC_TUNING,
                 in_channels=1, init=INIT, primary_scale=PRIMARY_SCALE, digit_caps_bias=DIGIT_CAPS_BIAS):
        super().__init__()
        if image_size < smallest_input(kernel_size):
            raise ValueError(f"{image_size}x{image_size} images are too small for {kernel_size}x{kernel_size} "
                             f"Conv1 and PrimaryCaps: the smallest is {smallest_input(kernel_size)}")
        self.primary_caps, self.primary_dim = primary_caps, primary_dim
        self.num_classes, self.digit_dim = num_classes, digit_dim
        self.routing_iterations, self.routing_leaky = routing_iterations, routing_leaky
        self.image_size, self.in_channels = image_size, in_channels
        self.conv1 = nn.Conv2d(in_channels, conv1_channels, kernel_size)
        # One conv for all 32 capsule types: output channel t * 8 + d is dimension d of type t.
        self.primary = nn.Conv2d(conv1_channels, primary_caps * primary_dim, kernel_size, stride=2)
        grid = ((image_size - kernel_size + 1) - kernel_size) // 2 + 1  # 6 for MNIST
        self.grid = grid
        self.num_primary = primary_caps * grid * grid  # I = 1152
        # W_ij (E x D) for every parent j and child i: (J, I, E, D); small initialisation.
        self.W = nn.Parameter(w_init_std * torch.randn(num_classes, self.num_primary, digit_dim, primary_dim))
        self.decoder = nn.Sequential(
            nn.Linear(digit_dim * num_classes, decoder_hidden[0]), nn.ReLU(inplace=True),
            nn.Linear(decoder_hidden[0], decoder_hidden[1]), nn.ReLU(inplace=True),
            nn.Linear(decoder_hidden[1], in_channels * image_size * image_size), nn.Sigmoid(),
        )
        self.primary_scale = primary_scale
        # the authors' code adds a bias to s_j, starting at 0.1 (its bias_variable)
        self.digit_bias = nn.Parameter(torch.full((num_classes, digit_dim), 0.1)) if digit_caps_bias else None
        if init == "authors":
            self.init_as_authors()
        self.record_routing = False  # when True, capsules() appends Appendix A's logit changes
        self.logit_changes = []
        self.capsule_layer = capsule_layer  # replaced by a compiled version by use_compile()
        self.compiled = None  # the CompiledOrEager capsule layer, once use_compile() made it
        self.dft_conv = dft_conv  # on CPU tensors only (conv2d_dft)
        self.gemm_weight_grad = gemm_weight_grad  # on CPU tensors only, without dft_conv (StridedConvGemmGrad)
        self._weight_f = None  # (weight, dtype, its values, dft_weight) kept between evaluation batches
        self.cpu_malloc_tuning = cpu_malloc_tuning  # tune_cpu_malloc() at the first CPU forward

    @torch.no_grad()
    def init_as_authors(self):
        """The authors' code's initialisation: truncated normals cut at 2 standard deviations
        (TensorFlow's truncated_normal_initializer), std 0.05 for Conv1 and 0.1 for PrimaryCaps,
        W_ij and the decoder; every bias 0.1. The paper states none of these."""
        def truncated(w, std):
            nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)

        truncated(self.conv1.weight, 0.05)
        truncated(self.primary.weight, 0.1)
        truncated(self.W, 0.1)
        for layer in self.decoder:
            if isinstance(layer, nn.Linear):
                truncated(layer.weight, 0.1)
        for bias in (self.conv1.bias, self.primary.bias, *(m.bias for m in self.decoder if isinstance(m, nn.Linear))):
            bias.fill_(0.1)

    def primary_weight(self):
        """The PrimaryCaps kernel as it acts: x PRIMARY_SCALE (1/32 in the authors' code), the bias apart."""
        w = self.primary.weight
        return w if self.primary_scale == 1 else w * self.primary_scale

    def use_compile(self, compiled=True):
        """torch.compile the capsule part only: it fuses the memory-bound routing ops, while the
        convolutions stay on the vendor kernels (compiling them made CPU training slower).
        use_compile(False) switches back to the eager capsule layer (the compiled one is kept)."""
        if compiled and self.compiled is None:
            self.compiled = CompiledOrEager(functools.partial(capsule_layer, children_last=True))
        self.capsule_layer = self.compiled if compiled else capsule_layer

    def primary_capsules(self, images):
        """images (B, C, H, W) -> squashed primary capsules (B, I, D) (MNIST: I = 1152, D = 8)."""
        if self.dft_conv and images.device.type == "cpu":
            # Given channels-last input (for one channel: the same memory, with channels-last
            # strides), Conv1 writes channels-last: the layout conv2d_dft reads without a transpose.
            B, C, H, W = images.shape
            if C == 1:
                images = images.contiguous().as_strided(images.shape, (H * W, 1, W, 1))
            else:
                images = images.contiguous(memory_format=torch.channels_last)
            x = F.relu(self.conv1(images), inplace=True).permute(0, 2, 3, 1)  # (B, 20, 20, 256)
            x = conv2d_dft(x, self.primary_weight(), self.primary.bias, self.primary.stride[0], x.dtype,
                           self.cached_weight_f(x.dtype))  # (B, 32*8, 6, 6)
        else:
            x = F.relu(self.conv1(images), inplace=True)  # (B, 256, 20, 20)
            if (self.gemm_weight_grad and x.device.type == "cpu" and torch.is_grad_enabled()
                    and self.primary.weight.requires_grad):
                dtype = x.dtype  # bf16 under autocast
                x = StridedConvGemmGrad.apply(x, self.primary_weight().to(dtype), self.primary.bias.to(dtype),
                                              self.primary.stride[0])  # (B, 32*8, 6, 6)
            else:
                x = F.conv2d(x, self.primary_weight(), self.primary.bias, self.primary.stride)  # (B, 32*8, 6, 6)
        B = x.shape[0]
        # Each capsule is the 8 channels of one type at one pixel, never neighbouring pixels.
        x = x.reshape(B, self.primary_caps, self.primary_dim, self.grid, self.grid)  # (B, T, D, 6, 6)
        u = x.permute(0, 1, 3, 4, 2).reshape(B, self.num_primary, self.primary_dim)  # (B, I, D)
        return squash(u.float())

    def cached_weight_f(self, dtype):
        """dft_weight of the PrimaryCaps weights when no gradient flows to them (evaluation), kept
        while the weights hold the same values (compared with a copy: fused optimizers update
        them in place without a version bump); None when it must be part of the graph."""
        w = self.primary.weight
        if torch.is_grad_enabled() and w.requires_grad:
            return None
        with torch.no_grad():
            cached = self._weight_f
            if cached is None or cached[0] is not w or cached[1] != dtype or not torch.equal(cached[2], w):
                self._weight_f = cached = (w, dtype, w.detach().clone(),
                                           dft_weight(self.primary_weight(), self.primary.stride[0], self.grid, dtype))
        return cached[3]

    def capsules(self, images):
        """images (B, 1, H, W) -> digit capsules v (B, J, E) and couplings c (B, I, J), in fp32."""
        if self.cpu_malloc_tuning and images.device.type == "cpu":
            tune_cpu_malloc()  # once per process; without it CPU steps ran up to 1.5x slower (results/README.md)
        u = self.primary_capsules(images)  # (B, I, D)
        with torch.autocast(device_type=u.device.type, enabled=False):
            bias = None if self.digit_bias is None else self.digit_bias.float()
            v, c, changes = self.capsule_layer(self.W.float(), u, self.routing_iterations, self.record_routing,
                                               leaky=self.routing_leaky, bias=bias)
        if changes is not None:
            self.logit_changes.append(changes)
        return v, c

    def decode(self, v, classes):
        """Reconstruct from the capsule of `classes` (B,) alone: v (B, J, E) -> (B, 1, H, W)."""
        mask = F.one_hot(classes, self.num_classes).to(v.dtype)  # (B, J)
        masked = (v * mask.unsqueeze(-1)).flatten(1)  # (B, J*E)
        out = self.decoder(masked)
        return out.reshape(-1, self.in_channels, self.image_size, self.image_size)

    def forward(self, images, labels=None, digits=1):
        """images (B, 1, 28, 28) in [0, 1] -> (lengths (B, J), reconstructions (B, 1, 28, 28)).

        The decoder sees the capsule of `labels` when given (training), else the longest one.
        Images of several digits (MultiMNIST, sec. 6): `labels` (B, K), one class per digit, or
        without labels the `digits` longest capsules; the decoder then runs once per digit, masked
        by that digit's capsule alone, and the reconstructions are (B, K, 1, H, W)."""
        v, _ = self.capsules(images)
        lengths = torch.sqrt((v * v).sum(-1) + 1e-12)  # (B, J): class scores, no softmax
        if labels is not None:
            classes = labels
        else:
            classes = lengths.argmax(dim=1) if digits == 1 else lengths.topk(digits, dim=1).indices
        if classes.dim() == 1:
            return lengths, self.decode(v, classes)
        return lengths, torch.stack([self.decode(v, classes[:, k]) for k in range(classes.shape[1])], 1)


# ---- the PrimaryCaps convolution on the CPU: the same function, computed faster ----
class StridedConvGemmGrad(torch.autograd.Function):
    """conv2d (no padding) whose weight gradient is computed as one im2col GEMM.

    Same mathematics as F.conv2d; on CPUs oneDNN's weight-gradient kernel for the 256->256 9x9
    stride-2 PrimaryCaps convolution runs far below the matrix units' speed, and this is the
    largest single cost of a training step (measured in results/README.md)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride):
        ctx.save_for_backward(x, weight)
        ctx.stride = stride
        return F.conv2d(x, weight, bias, stride)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        s = ctx.stride
        O, C, K, _ = weight.shape
        B, _, H, W = x.shape
        OH, OW = grad.shape[2:]
        grad_input = None
        if ctx.needs_input_grad[0]:
            grad_input = torch.ops.aten.convolution_backward(
                grad, x, weight, None, [s, s], [0, 0], [1, 1], False, [0, 0], 1, [True, False, False])[0]
        xs = x.permute(0, 2, 3, 1).contiguous()  # (B, H, W, C); a copy unless x is channels_last
        # every K x K x C input patch as one row: (B*OH*OW, K*K*C), ordered like a channels_last weight
        patches = xs.as_strided((B, OH, OW, K, K, C), (H * W * C, s * W * C, s * C, W * C, C, 1))
        patches = patches.reshape(B * OH * OW, K * K * C)
        g = grad.permute(1, 0, 2, 3).reshape(O, B * OH * OW)  # (O, B*OH*OW)
        grad_weight = (g @ patches).view(O, K, K, C).permute(0, 3, 1, 2)  # (O, C, K, K)
        grad_bias = grad.sum((0, 2, 3))
        return grad_input, grad_weight.to(weight.dtype), grad_bias.to(weight.dtype), None


@functools.lru_cache(maxsize=None)
def dft_matrices(kernel, stride, out, device, dtype):
    """The real matrices conv2d_dft multiplies by, computed in fp64, returned in `dtype`.

    n = stride * (out - 1) + kernel is the smallest DFT size whose circular correlation has no
    wrap-around at the outputs used. Frequencies: k1 in 0..n-1 along rows, k2 in 0..n//2 along
    columns (the input is real, so the other half of k2 follows by conjugate symmetry); a complex
    value is stored as (real, imaginary), index `reim` below; w = exp(-2 pi i / n).
      d1 (k2 reim, col):         X1[row, k2] = sum_col x[row, col] w^(k2 col)   (along columns)
      d2 (k1 reim, reim row):    X[k1, k2] = sum_row X1[row, k2] w^(k1 row)     (along rows)
      ew (k2 k1 reim, K*K):      Wf[k1, k2] = sum_ij weight[i, j] w^(k1 i + k2 j)
      inv_rows (reim p, k1 reim): Y1[p, k2] = sum_k1 Z[k1, k2] w^(-k1 stride p)  (only the rows used)
      inv_cols (q, k2 reim):     y[p, q] = Re sum_k2 a_k2 Y1[p, k2] w^(-k2 stride q) / n^2,
    with a_k2 = 2 for the k2 whose conjugates were left out, else 1.
    """
    f64 = torch.float64
    n = stride * (out - 1) + kernel
    half = n // 2 + 1
    t = torch.arange(n, dtype=f64)
    k2 = torch.arange(half, dtype=f64)
    angle = 2 * math.pi * k2[:, None] * t / n  # (k2, column)
    d1 = torch.stack([angle.cos(), -angle.sin()], 1).reshape(2 * half, n)
    angle = 2 * math.pi * t[:, None] * t / n  # (k1, row)
    cos, sin = angle.cos(), angle.sin()
    d2 = torch.stack([torch.cat([cos, sin], 1), torch.cat([-sin, cos], 1)], 1).reshape(2 * n, 2 * n)
    tap = torch.arange(kernel, dtype=f64)
    angle = 2 * math.pi * (k2[:, None, None, None] * tap + t[:, None, None] * tap[:, None]) / n  # (k2, k1, i, j)
    ew = torch.stack([angle.cos(), -angle.sin()], 2).reshape(2 * half * n, kernel * kernel)
    used = torch.arange(out, dtype=f64) * stride
    angle = 2 * math.pi * used[:, None] * t / n  # (p, k1)
    cos, sin = angle.cos(), angle.sin()
    inv_rows = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)]).reshape(2 * out, 2 * n)
    a = torch.full((half,), 2.0, dtype=f64)
    a[0] = 1.0
    if n % 2 == 0:
        a[-1] = 1.0  # the Nyquist column is its own conjugate
    angle = 2 * math.pi * used[:, None] * k2 / n  # (q, k2)
    inv_cols = (torch.stack([angle.cos(), -angle.sin()], -1) * a[:, None]).reshape(out, 2 * half) / n ** 2
    return tuple(m.to(device, dtype) for m in (d1, d2, ew, inv_rows, inv_cols))


def dft_weight(weight, stride, out, dtype):
    """The weights' DFTs for conv2d_dft: (O, C, K, K) -> (frequencies, 2 O, C), rows (reim, o)."""
    O, C, K, _ = weight.shape
    ew = dft_matrices(K, stride, out, weight.device, dtype)[2]
    return (ew @ weight.reshape(O * C, K * K).to(dtype).t()).reshape(ew.shape[0] // 2, 2 * O, C)


def conv2d_dft(x, weight, bias, stride, dtype, weight_f=None):
    """F.conv2d(x, weight, bias, stride), no padding, computed in the frequency domain.

    x is given channels-last, (B, H, W, C); returns (B, O, OH, OW) as a permuted view. The same
    mathematics as the direct convolution (tests compare them in fp64 and fp32): by the correlation
    theorem each output is the inverse DFT of X * conj(Wf), summed over input channels. On the CPU
    the 256->256 9x9 stride-2 PrimaryCaps convolution then costs, per frequency, one (2 O x C) by
    (C x 2 B) matrix product: about 3.3x fewer multiply-adds than the direct convolution. All
    transforms are small real matrix products, in `dtype` (bf16 under autocast, else fp32), in
    layouts that need no transposes; only the stride-th outputs are transformed back. `weight_f`
    is dft_weight(weight, ...) when the caller has it cached (evaluation).
    """
    B, H, _, C = x.shape
    O, _, K, _ = weight.shape
    out = (H - K) // stride + 1
    n = stride * (out - 1) + K
    half = n // 2 + 1
    d1, d2, _, inv_rows, inv_cols = dft_matrices(K, stride, out, x.device, dtype)
    with torch.autocast(device_type=x.device.type, enabled=False):
        xt = x[:, :n, :n].permute(2, 1, 0, 3).to(dtype).reshape(n, n * B * C)  # (column, row, b, c)
        x1 = (d1 @ xt).reshape(half, 2 * n, B * C)  # (k2, (reim, row), (b, c))
        xf = (d2 @ x1).reshape(half * n, 2 * B, C)  # (frequency (k2, k1), (reim, b), c)
        if weight_f is None:
            weight_f = dft_weight(weight, stride, out, dtype)  # (frequency, (reim, o), c)
        # per frequency, every product of a real or imaginary part of Wf with one of X
        p = torch.bmm(weight_f, xf.transpose(1, 2)).reshape(half * n, 2, O, 2, B)
        z_re = p[:, 0, :, 0] + p[:, 1, :, 1]  # Re(X conj(Wf)) = Xr Wr + Xi Wi, (frequency, o, b)
        z_im = p[:, 0, :, 1] - p[:, 1, :, 0]  # Im(X conj(Wf)) = Xi Wr - Xr Wi
        z = torch.stack([z_re, z_im], 1).reshape(half, 2 * n, O * B)  # (k2, (k1, reim), (o, b))
        y1 = (inv_rows @ z).reshape(2 * half, out * O * B)  # ((k2, reim), (p, o, b))
        y = (inv_cols @ y1).reshape(out, out, O, B) + bias.to(dtype)[:, None]  # (q, p, o, b)
    return y.permute(3, 2, 1, 0)


# ---- loss (eq. 4, sec. 4.1); model, loss and optimizer built from the constants ----
class CapsuleLoss(nn.Module):
    """Margin loss (eq. 4) summed over classes + RECON_WEIGHT x summed squared error, batch mean.

    `labels` are class indices (B,), or multi-hot targets (B, J) for images with several digits
    (MultiMNIST, sec. 6: every class present gets the m+ term). The squared error is summed over
    everything but the batch dimension, so reconstructions (B, K, ...) against images (B, K, ...),
    one per digit, add the K digits' errors."""

    def __init__(self, m_plus=M_PLUS, m_minus=M_MINUS, lambda_absent=LAMBDA_ABSENT, recon_weight=RECON_WEIGHT,
                 margin_reduction=MARGIN_REDUCTION):
        super().__init__()
        self.m_plus, self.m_minus = m_plus, m_minus
        self.lambda_absent, self.recon_weight = lambda_absent, recon_weight
        # "half-mean": the authors' code halves the margin terms and averages them over the classes
        # instead of summing (1/20 of eq. 4 for 10 classes); the reconstruction term is unchanged
        self.margin_reduction = margin_reduction

    def forward(self, images, labels, lengths, reconstructions):
        lengths = lengths.float()
        if labels.dim() == 1:
            present = F.one_hot(labels, lengths.shape[1]).to(lengths.dtype)  # (B, J)
        else:
            present = labels.to(lengths.dtype)  # (B, J), 1 for every class in the image
        margin = (present * F.relu(self.m_plus - lengths) ** 2
                  + self.lambda_absent * (1 - present) * F.relu(lengths - self.m_minus) ** 2).sum(1)
        if self.margin_reduction == "half-mean":
            margin = margin / (2 * lengths.shape[1])
        error = (reconstructions.float() - images.float()).flatten(1)  # (B, 784), or (B, K * pixels)
        return (margin + self.recon_weight * (error * error).sum(1)).mean()


def matched_predictions(lengths, pair_labels):
    """The two longest capsules (B, 2), ordered to match pair_labels (B, 2): position k holds label k
    where that label is among the two, else the other predicted class -> (classes (B, 2), swapped
    (B,) bool: the order is the reverse of the lengths' order)."""
    top = lengths.topk(2, dim=1).indices  # (B, 2), longest first
    swapped = (top[:, 0] == pair_labels[:, 1]) | (top[:, 1] == pair_labels[:, 0])
    return torch.where(swapped[:, None], top.flip(1), top), swapped


def two_digit_scores(lengths, pair_labels):
    """MultiMNIST's measures (sec. 6) from lengths (B, J) and the two labels (B, 2) of each image ->
    (both, any) boolean (B,): the two longest capsules are exactly the two labels (the paper's
    score), or at least one of the two labels is among them."""
    top = lengths.topk(2, dim=1).indices  # (B, 2)
    hits = (top[:, :, None] == pair_labels[:, None, :]).any(1)  # (B, 2): label found among the top two
    return hits.all(1), hits.any(1)


def build_model(cfg):
    """CapsuleNet from the constants and what the data decided (load_data: classes, channels, size);
    where nothing is decided yet (the constants alone), the data set's usual shape (MNIST's)."""
    if not cfg["IMAGE_SIZE"] or not cfg["IMAGE_CHANNELS"] or not cfg["NUM_CLASSES"]:
        cfg = nominal_data_settings(dict(cfg))
    return CapsuleNet(cfg["CONV1_CHANNELS"], cfg["PRIMARY_CAPS"], cfg["PRIMARY_DIM"], cfg["DIGIT_DIM"],
                      cfg["NUM_CLASSES"], cfg["KERNEL_SIZE"], cfg["ROUTING_ITERATIONS"], cfg["W_INIT_STD"],
                      cfg["ROUTING_LEAKY"], (cfg["DECODER_HIDDEN1"], cfg["DECODER_HIDDEN2"]),
                      image_size=input_size(cfg), in_channels=cfg["IMAGE_CHANNELS"],
                      dft_conv=cfg["CPU_DFT_CONV"], gemm_weight_grad=cfg["CPU_GEMM_WEIGHT_GRAD"],
                      cpu_malloc_tuning=cfg["CPU_MALLOC_TUNING"], init=cfg["INIT"],
                      primary_scale=cfg["PRIMARY_SCALE"], digit_caps_bias=cfg["DIGIT_CAPS_BIAS"])


def build_optimizer(model, cfg):
    """Adam (TensorFlow's defaults but the learning rate, as in the paper), as one fused kernel
    where this torch has it: the same update, about 3x faster than the per-parameter loop on the CPU."""
    try:
        return torch.optim.Adam(model.parameters(), lr=cfg["LR"], fused=True)
    except (RuntimeError, TypeError, ValueError):  # older torch, or a device without the kernel
        return torch.optim.Adam(model.parameters(), lr=cfg["LR"])


def build_loss(cfg):
    return CapsuleLoss(cfg["M_PLUS"], cfg["M_MINUS"], cfg["LAMBDA_ABSENT"], cfg["RECON_WEIGHT"],
                       cfg["MARGIN_REDUCTION"])


# ---- data: MNIST on the device as uint8, batches by index, a shift per training image (sec. 5) ----
def load_idx(kind, data_dir, train, limit=0, split=None):
    """An MNIST-format data set through torchvision (MNIST, FashionMNIST, KMNIST, EMNIST with
    `split`), from its IDX files in DATA_DIR/<kind>/raw -> (images uint8 (N, 28, 28), labels
    int64 (N,), class names), on the CPU, as torchvision stores them. Raises UsageError (one
    line) if the files are missing, cannot be downloaded, or are corrupt."""
    import torchvision.datasets

    raw = os.path.join(data_dir, kind, "raw")
    if kind == "EMNIST":
        expected = [f"emnist-{split}-{part}-{kind_}-ubyte" for part in ("train", "test")
                    for kind_ in ("images-idx3", "labels-idx1")]
    else:
        expected = list(MNIST_FILES)
    chatter = io.StringIO()  # torchvision prints its download attempts; we report one line
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            dataset = getattr(torchvision.datasets, kind)(data_dir, train=train, download=True,
                                                          **({"split": split} if split else {}))
        images, labels, classes = dataset.data, dataset.targets, list(dataset.classes)
        if images.dim() != 3 or tuple(images.shape[1:]) != (28, 28) or images.dtype != torch.uint8:
            raise ValueError(f"images have shape {tuple(images.shape)}, expected (N, 28, 28) uint8")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"{len(labels)} labels for {len(images)} images")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
            raise ValueError(f"labels outside 0..{len(classes) - 1}")
    except Exception as e:  # torchvision raises many types here; all mean "no usable data"
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        reason = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"  # e.g. which file, and why
        raise UsageError(f"cannot load {kind} from {raw} (expected {', '.join(expected)}, or .gz of them, "
                         f"or a network connection to download them): {type(e).__name__}: {reason}") from None
    if limit:
        images, labels = images[:limit], labels[:limit]
    return images, labels.long(), classes


def load_mnist(data_dir, train, limit=0):
    """MNIST through torchvision -> (images uint8 (N, 28, 28), labels int64 (N,)), on the CPU."""
    return load_idx("MNIST", data_dir, train, limit)[:2]


def read_cifar10(data_dir, train):
    """CIFAR-10's python batches in DATA_DIR/cifar-10-batches-py (data_batch_1..5, test_batch: pickled
    dicts of b"data" (N, 3072) uint8 and b"labels"), as torchvision keeps them -> images uint8
    (N, 3, 32, 32), labels, class names. Read here rather than through torchvision, whose loader
    insists on the MD5 sums of the real files."""
    import pickle

    import numpy as np

    folder = os.path.join(data_dir, "cifar-10-batches-py")
    names = [f"data_batch_{k}" for k in range(1, 6)] if train else ["test_batch"]
    images, labels = [], []
    for name in names:
        path = os.path.join(folder, name)
        try:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            batch_labels = np.asarray(batch[b"labels"], dtype=np.int64)
            if len(batch_labels) != len(data):
                raise ValueError(f"{len(batch_labels)} labels for {len(data)} images")
        except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError) as e:
            raise UsageError(f"cannot load CIFAR-10 from {folder} (expected data_batch_1 ... data_batch_5 and "
                             f"test_batch, the python version): {os.path.basename(path)}: "
                             f"{type(e).__name__}: {e}") from None
        images.append(data)
        labels.append(batch_labels)
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)), classes


def read_svhn(data_dir, train):
    """SVHN's cropped digits, DATA_DIR/train_32x32.mat and test_32x32.mat as torchvision keeps them
    (MATLAB files, read with scipy: X (32, 32, 3, N) uint8, y (N, 1) with 10 for the digit 0) ->
    images uint8 (N, 3, 32, 32), labels 0..9, class names. Read here rather than through
    torchvision, whose loader insists on the MD5 sums of the real files."""
    path = os.path.join(data_dir, f"{'train' if train else 'test'}_32x32.mat")
    try:
        import scipy.io
    except ImportError:
        raise UsageError("svhn needs scipy to read its .mat files: pip install scipy") from None
    try:
        mat = scipy.io.loadmat(path)
        images = torch.from_numpy(mat["X"]).permute(3, 2, 0, 1).contiguous()  # (N, 3, 32, 32)
        labels = torch.from_numpy(mat["y"].astype("int64")).flatten() % 10
        if images.dtype != torch.uint8 or tuple(images.shape[1:]) != (3, 32, 32) or len(labels) != len(images):
            raise ValueError(f"X {tuple(mat['X'].shape)} {mat['X'].dtype}, y {tuple(mat['y'].shape)}: expected "
                             f"X (32, 32, 3, N) uint8 and y (N, 1)")
    except (OSError, ValueError, KeyError, TypeError, NotImplementedError) as e:
        raise UsageError(f"cannot load SVHN from {path} (expected train_32x32.mat and test_32x32.mat in "
                         f"{data_dir}): {type(e).__name__}: {e}") from None
    return images, labels, [str(k) for k in range(10)]


SMALLNORB_FILES = {True: "smallnorb-5x46789x9x18x6x2x96x96-training", False: "smallnorb-5x01235x9x18x6x2x96x96-testing"}


def read_smallnorb(data_dir, train):
    """smallNORB from DATA_DIR/smallnorb: the -dat.mat (N, 2, 96, 96) stereo pairs and -cat.mat (N,)
    classes of the split (or their .gz) -> images uint8 (N, 2, 96, 96), labels, class names."""
    stem = os.path.join(data_dir, "smallnorb", SMALLNORB_FILES[train])
    images, labels = read_norb_matrix(stem + "-dat.mat"), read_norb_matrix(stem + "-cat.mat")
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 2 or labels.shape != images.shape[:1]:
        raise UsageError(f"{stem}-dat.mat / -cat.mat: expected (N, 2, H, W) uint8 images and (N,) classes, got "
                         f"{tuple(images.shape)} {images.dtype} and {tuple(labels.shape)}")
    if len(labels) and (labels.min() < 0 or labels.max() > 4):
        raise UsageError(f"{stem}-cat.mat: classes outside 0..4")
    return images, labels.long(), ["animal", "human", "airplane", "truck", "car"]


NORB_TYPES = {0x1E3D4C55: "uint8", 0x1E3D4C54: "<i4", 0x1E3D4C56: "<i2", 0x1E3D4C51: "<f4",
              0x1E3D4C53: "<f8"}  # magic number -> element type of a NORB binary matrix


def read_norb_matrix(path):
    """A NORB "binary matrix" file (smallNORB's -dat.mat, -cat.mat, -info.mat), or its .gz, as a
    tensor. The format (little-endian int32s): magic number (element type), ndim, then
    max(3, ndim) sizes (the unused ones are 1), then the elements in row-major order.
    Raises UsageError naming the file if it is missing, cut short or not such a file."""
    import gzip

    import numpy as np

    name = path if os.path.exists(path) or not os.path.exists(path + ".gz") else path + ".gz"
    try:
        with (gzip.open if name.endswith(".gz") else open)(name, "rb") as f:
            raw = f.read()
        if len(raw) < 20:
            raise ValueError(f"not a NORB binary matrix (only {len(raw)} bytes)")
        magic, ndim = np.frombuffer(raw[:8], "<i4")
        if int(magic) & 0xFFFFFFFF not in NORB_TYPES or not 0 < ndim <= 16:
            raise ValueError(f"not a NORB binary matrix (magic number {int(magic) & 0xFFFFFFFF:#x})")
        header = 8 + 4 * max(3, int(ndim))
        shape = tuple(int(d) for d in np.frombuffer(raw[8:header], "<i4")[:ndim])
        dtype = np.dtype(NORB_TYPES[int(magic) & 0xFFFFFFFF])
        count = math.prod(shape)
        if len(raw) - header != count * dtype.itemsize:
            raise ValueError(f"{len(raw) - header} bytes of data for a {'x'.join(map(str, shape))} "
                             f"{dtype.name} matrix ({count * dtype.itemsize} bytes)")
        return torch.from_numpy(np.frombuffer(raw, dtype, count, header).reshape(shape).copy())
    except (OSError, EOFError, ValueError) as e:
        raise UsageError(f"cannot read {name}: {e}") from None


def read_folder(data_dir, train, size, classes=None):
    """Your own images: torchvision's ImageFolder over DATA_DIR/train/<class>/* (or test), every
    file PIL reads, converted to RGB and resized to size x size -> images uint8 (N, 3, size, size),
    labels, class names (sorted folder names; a test set takes the training set's `classes`).
    Each problem is one UsageError naming the folder or the file."""
    import numpy as np
    from PIL import Image
    from torchvision.datasets import ImageFolder

    root = os.path.join(data_dir, "train" if train else "test")
    layout = f"{os.path.join(data_dir, 'train')}/<class>/<image> and {os.path.join(data_dir, 'test')}/<class>/<image>"
    if not os.path.isdir(root):
        raise UsageError(f"folder: no directory {root} (expected {layout})")
    try:
        found = ImageFolder(root, is_valid_file=lambda path: not os.path.basename(path).startswith("."))
    except FileNotFoundError as e:
        text = str(e)
        if "class folder" in text:
            raise UsageError(f"folder: {root} has no class subfolders (expected {layout})") from None
        empty = text.split("classes", 1)[-1].split(".")[0].strip() if "classes" in text else "?"
        raise UsageError(f"folder: class {empty} in {root} has no images") from None
    if classes is None:
        classes = found.classes
    unknown = sorted(set(found.classes) - set(classes))
    if unknown:
        raise UsageError(f"folder: {root} has classes the training set does not have: {', '.join(unknown)}")
    images, labels = [], []
    for path, index in found.samples:
        try:
            with Image.open(path) as image:
                image = image.convert("RGB").resize((size, size), Image.BILINEAR)
                images.append(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))
        except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
            raise UsageError(f"folder: cannot read image {path}: {type(e).__name__}: {e}") from None
        labels.append(classes.index(found.classes[index]))
    return torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.long), list(classes)


def resize_images(images, size, chunk=2048):
    """uint8 (N, C, H, W) -> uint8 (N, C, size, size): box averages where H and W are multiples of
    size (smallNORB's 96 -> 48), else antialiased bilinear."""
    N, C, H, W = images.shape
    if (H, W) == (size, size):
        return images
    mode = {"mode": "area"} if H % size == 0 and W % size == 0 else {"mode": "bilinear", "antialias": True,
                                                                         "align_corners": False}
    out = torch.empty((N, C, size, size), dtype=torch.uint8)
    for k in range(0, N, chunk):
        part = F.interpolate(images[k:k + chunk].float(), size=(size, size), **mode)
        out[k:k + chunk] = part.round_().clamp_(0, 255).to(torch.uint8)
    return out


def load_split(cfg, train):
    """One split of cfg's data set, as the model sees it before any crop -> (images uint8, (N, H, W)
    for one channel or (N, C, H, W), labels int64 (N,), class names), on the CPU. Needs
    cfg["CLASS_NAMES"] and cfg["IMAGE_CHANNELS"] for a folder's test split (the training set's)."""
    spec = DATASETS[cfg["DATASET"]]
    reader, data_dir = spec["reader"], cfg["DATA_DIR"]
    if reader == "folder":
        known = cfg["CLASS_NAMES"] if not train and cfg["CLASS_NAMES"] else None
        images, labels, classes = read_folder(data_dir, train, cfg["IMAGE_SIZE"], known)
        channels = cfg["IMAGE_CHANNELS"] or (3 if (images[:, 0] != images[:, 1]).any()
                                             or (images[:, 1] != images[:, 2]).any() else 1)
        if channels == 1:  # ITU-R 601-2 luma, as PIL's convert("L")
            r, g, b = images.int().unbind(1)
            images = ((r * 299 + g * 587 + b * 114 + 500) // 1000).to(torch.uint8)
    elif reader in ("cifar10", "svhn", "smallnorb"):
        images, labels, classes = {"cifar10": read_cifar10, "svhn": read_svhn,
                                   "smallnorb": read_smallnorb}[reader](data_dir, train)
    else:
        images, labels, classes = load_idx(reader, data_dir, train, split=spec.get("split"))
        if reader == "EMNIST":
            images = images.transpose(1, 2).contiguous()  # torchvision's EMNIST images stand transposed
        if spec.get("split") == "letters":  # labels 1..26 (0 is "N/A") -> 0..25
            labels, classes = labels - 1, classes[1:]
    limit = cfg["TRAIN_SIZE"] if train else cfg["TEST_SIZE"]
    if limit:
        images, labels = images[:limit], labels[:limit]
    if cfg["IMAGE_SIZE"] and reader != "folder" and cfg["DATASET"] != "multimnist":
        images = resize_images(images if images.dim() == 4 else images.unsqueeze(1), cfg["IMAGE_SIZE"])
        images = images.squeeze(1) if images.shape[1] == 1 else images
    return images, labels, classes


class DeviceBatches:
    """Batches by index slicing of a device-side permutation of a data set that lives on the device."""

    def __init__(self, images, labels, batch_size, shuffle):
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle = batch_size, shuffle
        self.rows = len(labels)

    def __len__(self):
        return math.ceil(len(self.labels) / self.batch_size)

    def take(self, n):
        """The first n images and labels."""
        return self.images[:n], self.labels[:n]

    def shard(self, rank, world):
        """Part `rank` of `world` contiguous parts, in the same order (the test pass under torchrun)."""
        if world == 1:
            return self
        rows = slice(rank * self.rows // world, (rank + 1) * self.rows // world)
        return DeviceBatches(self.images[rows], self.labels[rows], self.batch_size, self.shuffle)

    def __iter__(self):
        n = len(self.labels)
        order = torch.randperm(n, device=self.labels.device) if self.shuffle else None
        for start in range(0, n, self.batch_size):
            if order is None:
                yield self.images[start:start + self.batch_size], self.labels[start:start + self.batch_size]
            else:
                idx = order[start:start + self.batch_size]
                yield self.images[idx], self.labels[idx]


def random_shift(images, max_shift):
    """Shift each image by its own random (dy, dx) in [-max_shift, max_shift], zero padding.
    images (B, C, H, W) -> (B, C, H, W), on the images' device."""
    if max_shift == 0:
        return images
    B, C, H, W = images.shape
    m = max_shift
    padded = F.pad(images, (m, m, m, m))  # (B, C, H+2m, W+2m)
    offsets = torch.randint(0, 2 * m + 1, (2, B, 1), device=images.device)  # top-left corner per image
    rows = (offsets[0] + torch.arange(H, device=images.device)).unsqueeze(2)  # (B, H, 1)
    cols = (offsets[1] + torch.arange(W, device=images.device)).unsqueeze(1)  # (B, 1, W)
    batch = torch.arange(B, device=images.device).view(B, 1, 1)
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)  # (B, C, H, W)


def random_crop_flip(images, size, flip):
    """Training augmentation of the paper's CIFAR10 and smallNORB set-ups (sec. 7): for each image
    its own random size x size crop and, if `flip`, a left-right flip with probability 1/2, drawn
    on the images' device. images (B, C, H, W) -> (B, C, size, size)."""
    B, C, H, W = images.shape
    device = images.device
    top = torch.randint(0, H - size + 1, (B, 1, 1), device=device)
    left = torch.randint(0, W - size + 1, (B, 1, 1), device=device)
    cols = torch.arange(size, device=device).view(1, 1, size).expand(B, 1, size)
    if flip:
        mirrored = torch.rand(B, 1, 1, device=device) < 0.5
        cols = torch.where(mirrored, size - 1 - cols, cols)
    rows = top + torch.arange(size, device=device).view(1, size, 1)  # (B, size, 1)
    batch = torch.arange(B, device=device).view(B, 1, 1)
    return images.permute(0, 2, 3, 1)[batch, rows, left + cols].permute(0, 3, 1, 2)


def center_crop(images, size):
    """The central size x size part of every image (test images of the crop set-ups)."""
    H, W = images.shape[-2:]
    top, left = (H - size) // 2, (W - size) // 2
    return images[..., top:top + size, left:left + size]


def to_float_images(images_u8, crop=0):
    """uint8 (B, H, W) (one channel) or (B, C, H, W) -> float (B, C, H, W) in [0, 1]; with `crop`, the
    central crop x crop part (what the model sees of a test image)."""
    images = (images_u8.unsqueeze(1) if images_u8.dim() == 3 else images_u8).float().div_(255.0)
    return center_crop(images, crop) if crop else images


def multimnist_draw(labels, max_shift=4, generator=None):
    """The random part of MultiMNIST (sec. 6): for each row k, a partner of another class and the two
    digits' offsets. labels (N,) -> sources int64 (N, 2) (rows [k, partner]) and shifts int64
    (N, 2, 2) ((dy, dx) of each digit, each in [-max_shift, max_shift]), on the labels' device,
    from `generator` (None: torch's default generator of that device)."""
    labels = labels.long()
    N, device = len(labels), labels.device
    if N and (labels == labels[0]).all():
        raise ValueError("multimnist_pairs needs images of at least two classes")
    partner = torch.randint(0, N, (N,), device=device, generator=generator)
    while True:  # draw again where the partner has the same class (about 1 row in 10 for MNIST)
        same = (labels[partner] == labels).nonzero().flatten()
        if not len(same):
            break
        partner[same] = torch.randint(0, N, (len(same),), device=device, generator=generator)
    shifts = torch.randint(-max_shift, max_shift + 1, (N, 2, 2), device=device, generator=generator)
    return torch.stack([torch.arange(N, device=device), partner], 1), shifts


def multimnist_compose(images, sources, shifts):
    """MultiMNIST images from drawn rows: images uint8 (N, H, W), sources (n, 2), shifts (n, 2, 2) ->
    composites uint8 (n, 36, 36) and parts uint8 (n, 2, 36, 36): each part is its digit alone,
    offset by its shift from the centre of the canvas; composite = min(part 0 + part 1, 255)."""
    n, (_, H, W), device = len(sources), images.shape, images.device
    margin = (MULTIMNIST_CANVAS - H) // 2
    span = torch.arange(MULTIMNIST_CANVAS, device=device)
    src = images[sources]  # (n, 2, H, W)
    # canvas pixel (y, x) shows source pixel (y - margin - dy, x - margin - dx), where that is inside it
    ys = span - margin - shifts[:, :, 0, None]  # (n, 2, canvas)
    xs = span - margin - shifts[:, :, 1, None]
    inside = ((ys >= 0) & (ys < H))[..., :, None] & ((xs >= 0) & (xs < W))[..., None, :]
    row = torch.arange(n, device=device)[:, None, None, None]
    which = torch.arange(2, device=device)[None, :, None, None]
    parts = src[row, which, ys.clamp(0, H - 1)[..., :, None], xs.clamp(0, W - 1)[..., None, :]] * inside
    composites = (parts[:, 0].int() + parts[:, 1].int()).clamp_(max=255).to(torch.uint8)
    return composites, parts


def multimnist_pairs(images, labels, max_shift=4, generator=None, chunk=8192):
    """MultiMNIST (paper, sec. 6): each image overlaid on a partner of another class.

    images uint8 (N, 28, 28), labels (N,) -> composites uint8 (N, 36, 36), parts uint8
    (N, 2, 36, 36) and pair_labels int64 (N, 2). Row k pairs image k (part 0, label 0) with a
    random image of another class from the same tensors (part 1, label 1). Each part is its digit
    alone in the canvas, at its own random offset of up to `max_shift` pixels in each direction
    from the centre (zero elsewhere); composites = min(part 0 + part 1, 255), pixel by pixel.
    All randomness comes from `generator` (on the tensors' device) and is drawn before any image
    is built, so the result does not depend on `chunk`, the rows built at a time."""
    N, H, W = images.shape
    margin = (MULTIMNIST_CANVAS - H) // 2
    if H != W or not 0 <= max_shift <= margin:
        raise ValueError(f"multimnist_pairs needs square images of at most {MULTIMNIST_CANVAS - 2 * max_shift} "
                         f"pixels and 0 <= max_shift <= {margin}")
    sources, shifts = multimnist_draw(labels, max_shift, generator)
    built = [multimnist_compose(images, sources[k:k + chunk], shifts[k:k + chunk]) for k in range(0, N, chunk)]
    composites = torch.cat([c for c, _ in built]) if built else images.new_zeros((0, MULTIMNIST_CANVAS) * 2)
    parts = torch.cat([p for _, p in built]) if built else images.new_zeros((0, 2) + (MULTIMNIST_CANVAS,) * 2)
    return composites, parts, labels.long()[sources]


class PairBatches:
    """MultiMNIST batches, composed on the device as they are used: (composites uint8 (B, 36, 36),
    pair_labels (B, 2), parts uint8 (B, 2, 36, 36)). Made from the digits of one MNIST split.

    Training (`fixed` False) draws new partners and shifts at every pass, from torch's default
    generator of the device, and visits the rows in a new order: that generator's state is saved in
    every checkpoint, so a resumed run draws what the uninterrupted run would. A test set (`fixed`
    True) draws `repeats` rows per digit once, on the CPU from MULTIMNIST_TEST_SEED: the same pairs
    in every epoch, every run, on every device."""

    def __init__(self, images, labels, batch_size, max_shift, fixed, repeats=1):
        self.images, self.digit_labels = images, labels.long()
        self.batch_size, self.max_shift, self.fixed = batch_size, max_shift, fixed
        self.rows = len(labels) * (repeats if fixed else 1)
        self.table = None
        if fixed:
            generator = torch.Generator().manual_seed(MULTIMNIST_TEST_SEED)
            drawn = [multimnist_draw(self.digit_labels.cpu(), max_shift, generator) for _ in range(repeats)]
            self.table = tuple(torch.cat(t).to(images.device) for t in zip(*drawn))

    def __len__(self):
        return math.ceil(self.rows / self.batch_size)

    def rows_at(self, idx, table):
        sources, shifts = table[0][idx], table[1][idx]
        composites, parts = multimnist_compose(self.images, sources, shifts)
        return composites, self.digit_labels[sources], parts

    def shard(self, rank, world):
        """Part `rank` of `world` contiguous parts of the fixed test rows (the test pass under torchrun)."""
        if world == 1:
            return self
        part = copy.copy(self)
        rows = slice(rank * self.rows // world, (rank + 1) * self.rows // world)
        part.table = tuple(t[rows] for t in self.table)
        part.rows = len(part.table[0])
        return part

    def take(self, n):
        """The first n test rows (or of a fresh training draw)."""
        table = self.table or multimnist_draw(self.digit_labels, self.max_shift)
        return self.rows_at(slice(0, n), table)

    def __iter__(self):
        if self.fixed:
            table, order = self.table, None
        else:
            table = multimnist_draw(self.digit_labels, self.max_shift)
            order = torch.randperm(self.rows, device=self.digit_labels.device)
        for start in range(0, self.rows, self.batch_size):
            idx = slice(start, start + self.batch_size) if order is None else order[start:start + self.batch_size]
            yield self.rows_at(idx, table)


class Data:
    """A data set as the trainer uses it: training and test batches on the device (DeviceBatches or
    PairBatches), its name, class names, channels, image size as stored and as the model sees it
    (after a crop), and the objects per image."""

    def __init__(self, name, train, test, classes, channels, stored_size, input_size):
        self.name, self.train, self.test, self.classes = name, train, test, classes
        self.channels, self.stored_size, self.image_size = channels, stored_size, input_size
        self.digits = DATASETS[name]["digits"]

    def describe(self):
        if self.digits == 1:
            sizes = f"{self.train.rows:,} training and " if self.train else ""
            return f"{sizes}{self.test.rows:,} test images"
        sizes = f"{self.train.rows:,} training pairs (new partners and shifts every epoch) and " if self.train else ""
        return f"{sizes}{self.test.rows:,} fixed test pairs"


def load_data(cfg, device, train=True):
    """cfg's data set on `device` -> Data (without training batches if not `train`). Records what
    the data decides in cfg (saved in checkpoints, so that the model can be rebuilt without the
    data): NUM_CLASSES, IMAGE_CHANNELS, IMAGE_SIZE (as stored) and CLASS_NAMES."""
    splits = {}
    for split in ("train", "test") if train else ("test",):
        images, labels, classes = load_split(cfg, split == "train")
        if split == "train" or not cfg["CLASS_NAMES"]:
            resolve_data_settings(cfg, images, classes)
        images, labels = images.to(device), labels.to(device)
        batch_size = cfg["BATCH_SIZE"] if split == "train" else cfg["EVAL_BATCH_SIZE"]
        if cfg["DATASET"] != "multimnist":
            splits[split] = DeviceBatches(images, labels, batch_size, shuffle=split == "train")
            continue
        if len(labels) and (labels == labels[0]).all():
            raise UsageError(f"multimnist needs {split} digits of at least two classes; the first "
                             f"{len(labels)} are all {int(labels[0])} (raise --{split}-size)")
        splits[split] = PairBatches(images, labels, batch_size, cfg["MULTIMNIST_SHIFT"], fixed=split == "test",
                                    repeats=cfg["MULTIMNIST_TEST_PAIRS"])
    return Data(cfg["DATASET"], splits.get("train"), splits["test"], cfg["CLASS_NAMES"], cfg["IMAGE_CHANNELS"],
                cfg["IMAGE_SIZE"], input_size(cfg))


def resolve_data_settings(cfg, images, classes):
    """NUM_CLASSES, IMAGE_CHANNELS, IMAGE_SIZE and CLASS_NAMES from the data (one split's images as
    load_split returns them); a value given explicitly must agree. Then validate_shape(cfg)."""
    channels = 1 if images.dim() == 3 else images.shape[1]
    size = MULTIMNIST_CANVAS if cfg["DATASET"] == "multimnist" else images.shape[-1]
    if cfg["NUM_CLASSES"] not in (0, len(classes)):
        raise UsageError(f"--num-classes {cfg['NUM_CLASSES']}: {cfg['DATASET']} has {len(classes)} classes "
                         f"(leave it 0 to follow the data)")
    if cfg["IMAGE_CHANNELS"] not in (0, channels):
        raise UsageError(f"--image-channels {cfg['IMAGE_CHANNELS']}: {cfg['DATASET']} images have {channels} "
                         f"(only folder converts)")
    cfg.update(NUM_CLASSES=len(classes), IMAGE_CHANNELS=channels, IMAGE_SIZE=size, CLASS_NAMES=list(classes))
    validate_shape(cfg)


def nominal_data_settings(cfg):
    """What load_data would decide, from DATASETS' `shape` (for synthetic data: bench.py); values
    given explicitly (IMAGE_SIZE, IMAGE_CHANNELS, NUM_CLASSES) are kept."""
    channels, size, classes = DATASETS[cfg["DATASET"]]["shape"]
    if cfg["DATASET"] == "multimnist":
        cfg["IMAGE_SIZE"] = size
    cfg.update(NUM_CLASSES=cfg["NUM_CLASSES"] or classes, IMAGE_CHANNELS=cfg["IMAGE_CHANNELS"] or channels,
               IMAGE_SIZE=cfg["IMAGE_SIZE"] or size)
    cfg["CLASS_NAMES"] = cfg["CLASS_NAMES"] or [str(k) for k in range(cfg["NUM_CLASSES"])]
    validate_shape(cfg)
    return cfg


def input_size(cfg):
    """The side of the images the model sees: the crop, or the image."""
    return cfg["CROP_SIZE"] or cfg["IMAGE_SIZE"]


def smallest_input(kernel_size):
    """The smallest image side that leaves a 1x1 PrimaryCaps grid: Conv1 and PrimaryCaps (stride 2)."""
    return 2 * kernel_size - 1


def validate_shape(cfg):
    """Raise UsageError for images too small for Conv1 + PrimaryCaps, or a crop larger than them."""
    size, smallest = input_size(cfg), smallest_input(cfg["KERNEL_SIZE"])
    if cfg["CROP_SIZE"] > cfg["IMAGE_SIZE"]:
        raise UsageError(f"--crop-size {cfg['CROP_SIZE']} is larger than the {cfg['IMAGE_SIZE']}x{cfg['IMAGE_SIZE']} "
                         f"images")
    if size < smallest:
        raise UsageError(f"{size}x{size} images are too small for Conv1 and PrimaryCaps ({cfg['KERNEL_SIZE']}x"
                         f"{cfg['KERNEL_SIZE']} kernels, stride 2): the smallest size that works is {smallest}x"
                         f"{smallest} (--image-size {smallest} or more)")


def authors_choices(cfg):
    """Which of the authors' code's departures from the paper's text are on (PRESETS["authors"])."""
    on = {"INIT": cfg["INIT"] == "authors", "PRIMARY_SCALE": cfg["PRIMARY_SCALE"] != 1,
          "DIGIT_CAPS_BIAS": cfg["DIGIT_CAPS_BIAS"], "MARGIN_REDUCTION": cfg["MARGIN_REDUCTION"] != "sum"}
    return [f"{k}={cfg[k]}" for k, v in on.items() if v]


def model_line(model, device, dtype, data, cfg=None):
    """The start-up line: the model, the device and the data (and the authors' choices that are on)."""
    choices = authors_choices(cfg) if cfg is not None else []
    return (f"CapsNet: {sum(p.numel() for p in model.parameters()):,} parameters on {device} "
            f"({'bf16 autocast' if dtype else 'fp32'}); {data.name}: {data.describe()}, "
            f"{data.channels}x{data.image_size}x{data.image_size} input, {model.grid}x{model.grid} grid of "
            f"{model.num_primary:,} primary capsules, {model.num_classes} classes"
            + (f"; the authors' code's {', '.join(choices)}" if choices else ""))


# ---- one step: images -> loss and lengths; the compiled-or-eager choice; the meters' inputs ----
class Stepper:
    """The network callable torchnet's Engine calls: sample -> (loss, lengths).

    A sample is (images uint8 (B, H, W), labels (B,)), or for MultiMNIST (composites, pair labels
    (B, 2), parts uint8 (B, 2, H, W)): then the decoder runs once per digit, masked by that digit's
    capsule (in training the labels', at test the two longest, matched to the labels by
    matched_predictions), and each reconstruction is compared with its own digit's image.
    Training images get their per-image random shift here, on the device; test images never do.

    Under torchrun (`dist` enabled, `ddp` the DistributedDataParallel wrapper of `model`) a
    training sample is the global batch: its shifts are drawn for the whole batch, as one process
    draws them, and this process then computes its own share of the rows. The loss it
    back-propagates is scaled by share x world size / batch, so that DDP's mean of the gradients
    is the gradient of the global batch's mean loss, also when the shares differ (the last batch).
    `last` holds (this process's mean loss, its labels) of the latest call, for the meters."""

    def __init__(self, model, loss_fn, device, dtype, max_shift, channels_last, dist=None, ddp=None, crop=0,
                 flip=False):
        self.model, self.loss_fn = model, loss_fn
        self.device, self.dtype = device, dtype
        self.max_shift, self.channels_last = max_shift, channels_last
        self.dist, self.ddp = dist, ddp
        self.crop, self.flip = crop, flip  # CIFAR10 and smallNORB: random crops (and flips) in training
        self.last = None

    def __call__(self, sample):
        training = self.model.training  # the mode is the model's: model.train() / model.eval()
        images = to_float_images(sample[0], 0 if training else self.crop)
        if training:
            images = random_shift(images, self.max_shift)
            if self.crop or self.flip:
                images = random_crop_flip(images, self.crop or images.shape[-1], self.flip)
        batch = len(images)
        share = slice(None)
        if training and self.ddp is not None:
            share = self.dist.share(batch)
        images, labels, *parts = images[share], sample[1][share], *(p[share] for p in sample[2:])
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        forward = self.ddp if training and self.ddp is not None else self.model
        with autocast(self.device, self.dtype):
            if not parts:
                lengths, recon = forward(images, labels if training else None)
            else:
                lengths, recon = forward(images, labels if training else None, digits=labels.shape[1])
        if not parts:
            loss = self.loss_fn(images, labels, lengths, recon)
        else:
            if not training:  # the reconstruction matched to label k compared with part k
                _, swapped = matched_predictions(lengths.detach(), labels)
                recon = torch.where(swapped[:, None, None, None, None], recon.flip(1), recon)
            present = F.one_hot(labels, lengths.shape[1]).sum(1)  # (B, J): both classes present
            targets = parts[0].unsqueeze(2).float().div_(255.0)  # (B, 2, 1, H, W)
            loss = self.loss_fn(targets, present, lengths, recon)
        self.last = (loss.detach(), labels)
        if training and self.ddp is not None:
            loss = loss * (len(labels) * self.dist.world / batch)
        return loss, lengths.detach()


class CompileChoice:
    """Which capsule layer the trainer runs: compiled or eager. COMPILE = True or False forces one;
    COMPILE = "auto" decides by measurement: the first training steps run the compiled layer
    twice (it compiles in the first), the eager one once, untimed, then both in turn, TIMED
    steps each, timed; the one with the faster median step is kept for the rest of the run. Those
    steps are real training steps (the same mathematics either way). The choice is printed in one
    line, recorded in each metrics row and in the checkpoint, and a resumed run keeps it (or
    continues an unfinished trial), so that it trains exactly as the uninterrupted run.
    Why: how fast inductor's code is depends on the torch release and the machine; torch 2.14's
    compiled training was 2.5x slower than eager before the capsule layer's layout change, and a
    faster default on one machine can be the slower one on another (results/README.md)."""

    WARMUP = ("compiled", "compiled", "eager")
    TIMED = 4

    def __init__(self, model, device, setting, state=None, dist=None):
        self.model, self.device, self.dist = model, device, dist or Distributed({})
        self.schedule = list(self.WARMUP) + ["compiled", "eager"] * self.TIMED
        self.step, self.times, self.choice = 0, {"compiled": [], "eager": []}, None
        self.current, self.started, self.clock = None, 0.0, time.perf_counter
        if setting != "auto":
            self.choice = "compiled" if setting else "eager"
        elif state:  # resuming: the recorded choice, or the trial where it stopped
            self.choice, self.step = state["choice"], state["step"]
            self.times = {k: list(v) for k, v in state["times"].items()}
        if self.choice is not None:
            self.use(self.choice)

    def use(self, kind):
        self.model.use_compile(kind == "compiled")

    def state(self):
        return {"choice": self.choice, "step": self.step, "times": self.times}

    def before_step(self):
        if self.choice is None:
            self.current = self.schedule[self.step]
            self.use(self.current)
            sync(self.device)
            self.started = self.clock()

    def after_step(self):
        if self.choice is None:
            sync(self.device)
            seconds = self.clock() - self.started
            if self.step >= len(self.WARMUP):
                self.times[self.current].append(seconds)
            self.step += 1
            if self.step == len(self.schedule):
                self.decide()

    def decide(self):
        median = {k: sorted(t)[len(t) // 2] for k, t in self.times.items()}
        if self.model.compiled.failed:
            self.choice, why = "eager", "torch.compile failed"
        else:
            self.choice = "compiled" if median["compiled"] <= median["eager"] else "eager"
            why = f"median training step {median['compiled']:.3f} s compiled, {median['eager']:.3f} s eager"
        self.choice = self.dist.from_main(self.choice)  # under torchrun: rank 0's measurement for all
        self.use(self.choice)
        print(f"compile auto: the {self.choice} capsule layer is faster here ({why}, torch "
              f"{torch.__version__}); it is used from now on", flush=True)


def pass_meters(num_classes, digits=1):
    """The torchnet meters of one pass: loss, accuracy and confusion; for two-digit images the
    accuracy is both digits right (the paper's MultiMNIST score) and accuracy_any at least one."""
    from torchnet import meter

    meters = {"loss": meter.AverageValueMeter(), "confusion": meter.ConfusionMeter(num_classes)}
    if digits == 1:
        meters["accuracy"] = meter.ClassErrorMeter(accuracy=True)
    else:
        meters["accuracy"], meters["accuracy_any"] = meter.AverageValueMeter(), meter.AverageValueMeter()
    return meters


def meter_values(meters):
    """{loss, accuracy[, accuracy_any]} of a pass's meters, accuracies in %."""
    values = {"loss": float(meters["loss"].value()[0])}
    accuracy = meters["accuracy"].value()
    values["accuracy"] = float(accuracy[0])  # ClassErrorMeter: [top-1]; AverageValueMeter: (mean, std)
    if "accuracy_any" in meters:
        values["accuracy_any"] = float(meters["accuracy_any"].value()[0])
    return values


class PassStats:
    """Loss sum, correct count and per-batch outputs of one pass, kept on the device (no sync per
    batch); handed to the torchnet meters once, at the end of the pass. With pair labels (B, 2)
    "correct" is both digits right, "correct_any" at least one, and the confusion counts each
    label against the capsule matched to it (matched_predictions)."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self):
        self.loss_sum = torch.zeros((), device=self.device)
        self.correct = torch.zeros((), device=self.device, dtype=torch.long)
        self.correct_any = torch.zeros((), device=self.device, dtype=torch.long)
        self.count = 0
        self.batch_losses, self.batch_sizes, self.outputs, self.targets = [], [], [], []

    def add(self, loss, lengths, labels):
        n = labels.shape[0]
        self.loss_sum += loss.detach() * n
        self.count += n
        self.batch_losses.append(loss.detach())
        self.batch_sizes.append(n)
        if labels.dim() == 1:
            self.correct += (lengths.argmax(1) == labels).sum()
            self.outputs.append(lengths.float())
            self.targets.append(labels)
        else:
            both, any_right = two_digit_scores(lengths, labels)
            self.correct += both.sum()
            self.correct_any += any_right.sum()
            self.outputs.append(matched_predictions(lengths, labels)[0].flatten())
            self.targets.append(labels.flatten())

    def totals(self):
        """(loss sum, correct count, images) so far: one device sync."""
        loss, correct = torch.stack([self.loss_sum, self.correct.to(self.loss_sum.dtype)]).tolist()
        return loss, correct, self.count

    def gather(self, dist):
        """Under torchrun: this pass's numbers from every process, in rank order, on every process,
        so that the meters see the whole pass (the same sums as one process)."""
        if not dist.enabled:
            return
        mine = (torch.stack(self.batch_losses).tolist() if self.batch_losses else [], self.batch_sizes,
                [o.cpu() for o in self.outputs], [t.cpu() for t in self.targets],
                torch.stack([self.loss_sum, self.correct.float(), self.correct_any.float()]).tolist())
        self.reset()
        for losses, sizes, outputs, targets, (loss_sum, correct, correct_any) in dist.gather(mine):
            self.batch_losses += [torch.tensor(x, device=self.device) for x in losses]
            self.batch_sizes += sizes
            self.outputs += outputs
            self.targets += targets
            self.loss_sum += loss_sum
            self.correct += round(correct)
            self.correct_any += round(correct_any)
            self.count += sum(sizes)

    def feed(self, meters):
        """Hand the pass to pass_meters() meters."""
        if not self.count:
            return
        for loss, n in zip(torch.stack(self.batch_losses).tolist(), self.batch_sizes):
            meters["loss"].add(loss * n, n)  # AverageValueMeter.add(sum, n) keeps the per-image mean
        outputs, targets = torch.cat(self.outputs).cpu(), torch.cat(self.targets).cpu()
        meters["confusion"].add(outputs, targets)
        if "accuracy_any" in meters:
            correct, correct_any = torch.stack([self.correct, self.correct_any]).tolist()
            meters["accuracy"].add(100.0 * correct, self.count)
            meters["accuracy_any"].add(100.0 * correct_any, self.count)
        else:
            meters["accuracy"].add(outputs, targets)


# ---- the epoch loop: torchnet's Engine and its hooks, checkpoints every epoch, resume ----
class Trainer:
    """torchnet Engine with named hooks: a train pass per epoch, then a test pass, logs, checkpoint."""

    def __init__(self, cfg, device, model, optimizer, scheduler, data, start_epoch=0, best_accuracy=None,
                 compile_state=None, dist=None):
        from torchnet.engine import Engine

        self.cfg, self.device, self.model = cfg, device, model
        self.optimizer, self.scheduler = optimizer, scheduler
        self.dtype = amp_dtype(device, cfg["AMP"])
        self.dist = dist = dist or Distributed({})
        ddp = None
        if dist.enabled:  # the gradients averaged over the processes; the model itself stays plain
            # Conv1's weight (256, 1, 9, 9) gets its gradient with channels-last strides from the CPU
            # path (primary_capsules); with one input channel that is the same memory order, and
            # DDP's warning about it says nothing.
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
            ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        self.network = Stepper(model, build_loss(cfg), device, self.dtype, cfg["MAX_SHIFT"], cfg["CHANNELS_LAST"],
                               dist, ddp, cfg["CROP_SIZE"], cfg["FLIP"])
        self.data, self.train_batches = data, data.train
        self.test_batches = data.test.shard(dist.rank, dist.world)  # each process tests its part
        self.start_epoch, self.best_accuracy = start_epoch, best_accuracy
        self.meters = {mode: pass_meters(cfg["NUM_CLASSES"], data.digits) for mode in ("train", "test")}
        self.stats = PassStats(device)
        self.compile_choice = CompileChoice(model, device, cfg["COMPILE"], compile_state, dist)
        self.visdom = VisdomPlots(cfg if dist.main else dict(cfg, VISDOM=False))
        self.run_dir = cfg["RUN_DIR"]
        self.engine = Engine()
        self.engine.hooks.update(on_start=self.on_start, on_start_epoch=self.on_start_epoch,
                                 on_sample=self.on_sample, on_forward=self.on_forward,
                                 on_update=self.on_update, on_end_epoch=self.on_end_epoch)
        self.epoch_started = 0.0

    # hooks: each one small, mode passed explicitly through state['train']
    def on_start(self, state):
        if state["train"]:
            state["epoch"] = self.start_epoch
        self.reset_pass("train" if state["train"] else "test")

    def on_start_epoch(self, state):
        self.model.train()
        self.model.record_routing = True
        self.model.logit_changes = []
        self.reset_pass("train")
        self.epoch_started = time.perf_counter()
        desc = f"epoch {state['epoch'] + 1}/{state['maxepoch']} train"
        state["iterator"] = self.progress(self.train_batches, desc)

    def on_sample(self, state):
        if state["train"]:
            self.compile_choice.before_step()

    def on_forward(self, state):
        loss, labels = self.network.last  # this process's share of the batch
        self.stats.add(loss, state["output"], labels)
        self.tick(state["epoch"] if state["train"] else None)

    def on_update(self, state):
        self.compile_choice.after_step()

    def on_end_epoch(self, state):
        sync(self.device)
        train_seconds = time.perf_counter() - self.epoch_started
        self.model.record_routing = False
        changes = torch.stack(self.model.logit_changes).mean(0).tolist() if self.model.logit_changes else []
        self.model.logit_changes = []
        self.finish_pass("train")
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        test_seconds = self.evaluate()
        row = self.metrics_row(state["epoch"], lr, train_seconds, test_seconds, changes)
        self.end_epoch(state, row)

    # helpers used by the hooks
    def reset_pass(self, mode):
        for m in self.meters[mode].values():
            m.reset()
        self.stats.reset()
        self.batch_in_pass = 0
        self.last_totals = (0.0, 0.0, 0)  # PassStats.totals() at the last progress update

    def progress(self, batches, desc):
        from tqdm import tqdm

        self.bar = tqdm(batches, desc=desc, leave=False, dynamic_ncols=True, mininterval=0.5,
                        file=sys.stderr, unit="batch", disable=not self.dist.main)
        return self.bar

    def tick(self, epoch=None):
        """Every PROGRESS_EVERY batches (one device sync): the running loss and accuracy of the pass
        in the tqdm bar; in training also the mean of those batches alone in Visdom's live windows,
        at x = epoch + the fraction of it done."""
        self.batch_in_pass += 1
        if self.batch_in_pass % self.cfg["PROGRESS_EVERY"] == 0:
            loss_sum, correct, count = self.stats.totals()
            self.bar.set_postfix(loss=f"{loss_sum / count:.4f}", acc=f"{100.0 * correct / count:.2f}%",
                                 refresh=False)
            if epoch is not None:
                last_sum, last_correct, last_count = self.last_totals
                self.last_totals = loss_sum, correct, count
                fraction = self.batch_in_pass / len(self.train_batches)
                self.visdom.log_progress(epoch + fraction, (loss_sum - last_sum) / (count - last_count),
                                         100.0 * (correct - last_correct) / (count - last_count))

    def finish_pass(self, mode):
        self.stats.gather(self.dist)
        self.stats.feed(self.meters[mode])
        self.bar.close()

    def evaluate(self):
        """Test pass under model.eval() and no_grad (torchnet's Engine.test does neither)."""
        started = time.perf_counter()
        self.model.eval()
        with torch.no_grad():
            self.engine.test(self.network, self.progress(self.test_batches, "test"))
        sync(self.device)
        self.finish_pass("test")
        return time.perf_counter() - started

    def metrics_row(self, epoch, lr, train_seconds, test_seconds, changes):
        """One metrics.jsonl row. For two-digit images train_accuracy and test_accuracy are both
        digits right (the paper's score), and *_accuracy_any at least one."""
        row = {"epoch": epoch, "lr": lr}
        for mode in ("train", "test"):
            row.update({f"{mode}_{k}": v for k, v in meter_values(self.meters[mode]).items()})
        row.update({"train_seconds": round(train_seconds, 3), "test_seconds": round(test_seconds, 3),
                    "train_images_per_s": round(self.train_batches.rows / train_seconds, 1),
                    "routing_logit_change": changes, "compile": self.compile_choice.choice or "trial"})
        return row

    def end_epoch(self, state, row):
        epoch = state["epoch"]
        both = " (both digits)" if "test_accuracy_any" in row else ""
        anyone = f", at least one {row['test_accuracy_any']:.2f}%" if both else ""
        print(f"epoch {epoch}/{state['maxepoch']}  lr {row['lr']:.3g}  train loss {row['train_loss']:.4f} "
              f"acc {row['train_accuracy']:.2f}%  test loss {row['test_loss']:.4f} acc{both} "
              f"{row['test_accuracy']:.2f}%{anyone}  ({row['train_seconds']:.1f}s + {row['test_seconds']:.1f}s)",
              flush=True)
        is_best = self.best_accuracy is None or row["test_accuracy"] > self.best_accuracy
        if is_best:
            self.best_accuracy = row["test_accuracy"]
        if not self.dist.main:  # one voice: rank 0 writes and plots (every process has the same row)
            return
        # The row first: a run killed (kill -9) before its checkpoint resumes from the previous
        # epoch and drops this row again (truncate_metrics), so metrics and checkpoints agree.
        with sigint_deferred():
            with open(os.path.join(self.run_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            ckpt = self.checkpoint(epoch)
            atomic_torch_save(ckpt, os.path.join(self.run_dir, "last.pt"))
            if is_best:
                atomic_torch_save(ckpt, os.path.join(self.run_dir, "best.pt"))
        if self.visdom.enabled:
            self.log_visdom(epoch, row)

    def checkpoint(self, epoch):
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "epoch": epoch, "best_accuracy": self.best_accuracy,
                "config": self.cfg, "rng_state": rng_state(), "compile_choice": self.compile_choice.state()}

    def log_visdom(self, epoch, row):
        from torchvision.utils import make_grid

        n = min(self.cfg["RECON_IMAGES"], self.data.test.rows)
        self.model.eval()
        figures = caption = None
        if self.data.digits == 1:
            test_images, test_labels = self.data.test.take(self.data.test.rows)
            with torch.no_grad(), autocast(self.device, self.dtype):
                images = to_float_images(test_images[:n], self.cfg["CROP_SIZE"])
                _, recon = self.model(images)
            grid = make_grid(viewable(torch.cat([images, recon.float()])).cpu(), nrow=n, padding=2, pad_value=0.5)
            if self.cfg["VISUALIZE_EVERY_EPOCH"]:
                figures = visual_figures(self.model, test_images, test_labels, self.cfg["NUM_CLASSES"],
                                         self.cfg["CROP_SIZE"])
        else:  # Fig. 5 is the reconstruction window of two-digit images
            tiles = fig5_tiles(self.model, *self.data.test.take(n)[:2])
            grid, caption = tiles["grid"], fig5_caption(tiles)
        confusion = self.meters["test"]["confusion"].value()
        self.visdom.log_epoch(epoch, row, confusion, grid, figures, caption)

    def train(self, epochs):
        self.engine.train(self.network, self.train_batches, epochs, self.optimizer)


def truncate_metrics(run_dir, last_epoch):
    """Rewrite metrics.jsonl with the rows up to the checkpoint's epoch: drops rows of an epoch
    whose checkpoint was never written and a last line cut short by a crash."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    kept = [r for r in read_metrics(run_dir) if r.get("epoch", math.inf) <= last_epoch]
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(path + ".tmp", path)


def prepare(cfg, dist=None):
    """Device, seeded RNG and allocator settings shared by every mode -> (device, malloc tuned?).
    Under torchrun (`dist`) the device is this process's GPU (LOCAL_RANK)."""
    device = resolve_device(cfg["DEVICE"])
    if dist is not None:
        device = dist.device(device)
    seed_everything(cfg["SEED"])
    malloc_tuned = device.type == "cpu" and cfg["CPU_MALLOC_TUNING"] and tune_cpu_malloc()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device, bool(malloc_tuned)


def place_model(model, cfg, device):
    model = model.to(device)
    if cfg["CHANNELS_LAST"]:
        model = model.to(memory_format=torch.channels_last)
    if cfg["COMPILE"] is True:
        model.use_compile()
    return model


def fresh_run_dir(run_dir):
    """run_dir, or run_dir-2, -3, ... if it already holds a run: a new run never overwrites or
    mixes with an earlier one (continue that one with --resume)."""
    def holds_run(d):
        return any(os.path.exists(os.path.join(d, f)) for f in ("metrics.jsonl", "last.pt", "best.pt"))

    candidate, k = run_dir, 1
    while holds_run(candidate):
        k += 1
        candidate = f"{run_dir.rstrip(os.sep)}-{k}"
    if candidate != run_dir:
        print(f"{run_dir} holds an earlier run (continue it with --resume {os.path.join(run_dir, 'last.pt')}); "
              f"this run writes to {candidate}")
    return candidate


def run_training(cfg, ckpt, dist=None, resume_auto=False):
    """Train from the constants, or continue `ckpt`. Under torchrun (`dist`) every process runs this
    with its share of each batch. `resume_auto`: --resume auto found no checkpoint, so a fresh run
    starts in RUN_DIR itself (a restarted job then finds its last.pt there)."""
    dist = dist or Distributed({})
    if dist.enabled and cfg["BATCH_SIZE"] % dist.world:
        raise UsageError(f"--batch-size {cfg['BATCH_SIZE']} must be a multiple of the number of processes "
                         f"({dist.world}): each one takes an equal share of every batch")
    device, _ = prepare(cfg, dist)
    dist.start(device)
    if ckpt is None and not resume_auto:
        cfg["RUN_DIR"] = fresh_run_dir(cfg["RUN_DIR"]) if dist.main else None
    cfg["RUN_DIR"] = dist.from_main(cfg["RUN_DIR"])
    if len(set(dist.gather(ckpt["epoch"] if ckpt else None))) > 1:
        raise UsageError("the processes found different checkpoints: RUN_DIR and --resume must be on a file "
                         "system that every machine sees")
    data = load_data(cfg, device)  # before anything is written: bad data is one line and nothing else
    os.makedirs(cfg["RUN_DIR"], exist_ok=True)
    last = data.train.rows % cfg["BATCH_SIZE"]
    if 0 < last < dist.world:
        raise UsageError(f"the last training batch holds {last} images, fewer than the {dist.world} processes: "
                         f"change --train-size or --batch-size")
    model = place_model(build_model(cfg), cfg, device)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=cfg["LR_DECAY"])
    start_epoch, best = 0, None
    if ckpt is not None:
        load_weights(model, ckpt["model"])
        if "optimizer" not in ckpt:
            raise UsageError("--resume needs a training checkpoint (last.pt or best.pt) to continue training")
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scheduler.gamma = cfg["LR_DECAY"]
        start_epoch, best = ckpt["epoch"], ckpt["best_accuracy"]
        set_rng_state(ckpt["rng_state"])
        if dist.main:
            truncate_metrics(cfg["RUN_DIR"], start_epoch)
        print(f"resumed from epoch {start_epoch} (best test accuracy so far {best:.2f}%) in {cfg['RUN_DIR']}")
    elif resume_auto and dist.main:
        truncate_metrics(cfg["RUN_DIR"], 0)  # rows of an epoch 1 whose checkpoint was never written
        print(f"--resume auto: no {os.path.join(cfg['RUN_DIR'], 'last.pt')} yet; a new run starts there")
    dtype = amp_dtype(device, cfg["AMP"])
    for line in (dataset_line(cfg), preset_line(cfg)):
        if line:
            print(line)
    print(f"{model_line(model, device, dtype, data, cfg)}; seed {cfg['SEED']}, run dir {cfg['RUN_DIR']}")
    if dist.enabled:
        print(f"torchrun: {dist.world} processes ({'NCCL' if device.type == 'cuda' else 'gloo'}), each computing "
              f"{cfg['BATCH_SIZE'] // dist.world} of the {cfg['BATCH_SIZE']} images of every batch")
    if start_epoch >= cfg["EPOCHS"]:
        print(f"nothing to do: the checkpoint is at epoch {start_epoch} and --epochs is {cfg['EPOCHS']}")
        return
    compile_state = ckpt.get("compile_choice") if ckpt is not None else None
    trainer = Trainer(cfg, device, model, optimizer, scheduler, data, start_epoch, best, compile_state, dist)
    trainer.train(cfg["EPOCHS"])


# ---- the other modes: --eval-only, --visualize, --export-weights ----
def run_eval(cfg, ckpt, others=()):
    """--eval-only: the test set through the checkpoint's model; with `others` (more checkpoints
    of the same data set and classes), also their ensemble: the capsule lengths averaged over the
    models before the argmax (the paper's CIFAR10 ensemble; the authors' code sums them)."""
    device, _ = prepare(cfg)
    data = load_data(cfg, device, train=False)
    dtype = amp_dtype(device, cfg["AMP"])
    members = [(cfg, ckpt)] + [(member_config(cfg, other), other) for other in others]
    steppers = []
    for member_cfg, member in members:
        model = place_model(build_model(member_cfg), member_cfg, device)
        load_weights(model, member["model"])
        model.eval()
        steppers.append(Stepper(model, build_loss(member_cfg), device, dtype, 0, cfg["CHANNELS_LAST"],
                                crop=cfg["CROP_SIZE"]))
    stats = [PassStats(device) for _ in range(len(members) + (len(members) > 1))]
    started = time.perf_counter()
    with torch.no_grad():
        for sample in data.test:
            outputs = [step(sample) for step in steppers]
            for (loss, lengths), st in zip(outputs, stats):
                st.add(loss, lengths, sample[1])
            if len(members) > 1:
                mean = torch.stack([lengths for _, lengths in outputs]).mean(0)
                stats[-1].add(torch.stack([loss for loss, _ in outputs]).mean(), mean, sample[1])
    sync(device)
    seconds = time.perf_counter() - started
    results = []
    for k, st in enumerate(stats):
        meters = pass_meters(cfg["NUM_CLASSES"], data.digits)
        st.feed(meters)
        values = meter_values(meters)
        name = "ensemble" if k == len(members) else f"model {k + 1}"
        result = {"dataset": data.name, "test_accuracy": values["accuracy"], "test_loss": values["loss"],
                  "test_images": data.test.rows, "seconds": round(seconds, 3), "device": str(device),
                  "dtype": "bf16" if dtype else "fp32",
                  "checkpoint_epoch": None if name == "ensemble" else members[k][1].get("epoch")}
        if "accuracy_any" in values:
            result["test_accuracy_any"] = values["accuracy_any"]
        result["confusion"] = meters["confusion"].value().tolist()
        results.append(result)
        if len(members) > 1:
            what = "the mean of their capsule lengths" if name == "ensemble" else members[k][1].get("path", "")
            print(f"{name} ({what}): test accuracy {result['test_accuracy']:.2f}%"
                  + ("" if name == "ensemble" else f"  test loss {result['test_loss']:.4f}"))
    result = results[-1]
    if data.digits == 1:
        print(f"test accuracy {result['test_accuracy']:.2f}%  test loss {result['test_loss']:.4f}  "
              f"({data.test.rows:,} images, {seconds:.1f}s)" if len(members) == 1 else
              f"ensemble of {len(members)}: test accuracy {result['test_accuracy']:.2f}%  "
              f"({data.test.rows:,} images, {seconds:.1f}s)")
        print("confusion matrix (rows: true class, columns: predicted):")
    else:
        print(f"{data.name}: both digits right {result['test_accuracy']:.2f}% (error "
              f"{100 - result['test_accuracy']:.2f}%), at least one right {result['test_accuracy_any']:.2f}%  "
              f"test loss {result['test_loss']:.4f}  ({data.test.rows:,} pairs, {seconds:.1f}s)")
        print("confusion matrix of the digits (rows: true class, columns: the capsule matched to it):")
    for k, counts in enumerate(result["confusion"]):
        print(f"  {k}: " + " ".join(f"{int(c):5d}" for c in counts))
    os.makedirs(cfg["RUN_DIR"], exist_ok=True)
    with open(os.path.join(cfg["RUN_DIR"], "eval.json"), "w", encoding="utf-8") as f:
        json.dump(result if len(members) == 1 else dict(result, members=results[:-1]), f, indent=1)
    return result


def member_config(cfg, ckpt):
    """The constants of another checkpoint of an ensemble: its model's, cfg's data (which must agree)."""
    member = dict(cfg)
    member.update({k: v for k, v in ckpt.get("config", {}).items() if k in MODEL_KEYS})
    for key in ("DATASET", "NUM_CLASSES", "IMAGE_CHANNELS", "IMAGE_SIZE", "CROP_SIZE"):
        if member[key] not in (cfg[key], 0):
            raise UsageError(f"--resume {ckpt.get('path')}: an ensemble needs one data set and shape, but its "
                             f"{key} is {member[key]!r}, the first model's {cfg[key]!r}")
        member[key] = cfg[key]
    return member


def run_visualize(cfg, ckpt):
    from torchvision.utils import save_image

    device, _ = prepare(cfg)
    data = load_data(cfg, device, train=False)
    model = build_model(cfg).to(device)
    load_weights(model, ckpt["model"])
    out = cfg["RUN_DIR"]
    os.makedirs(out, exist_ok=True)
    written = []
    if data.digits == 1:
        test_images, test_labels = data.test.take(data.test.rows)
        figures = visual_figures(model, test_images, test_labels, cfg["NUM_CLASSES"], cfg["CROP_SIZE"])
        _, digit_labels = one_per_class(test_images, test_labels, cfg["NUM_CLASSES"])
        for grid, label in zip(figures["fig4_per_digit"], digit_labels.tolist()):
            written.append(os.path.join(out, f"fig4_digit{label}.png"))
            save_image(grid, written[-1])
        for name in ("class_masks", "couplings"):
            written.append(os.path.join(out, f"{name}.png"))
            save_image(figures[name], written[-1])
    else:  # Fig. 5: pairs of the fixed test set and their reconstructions
        written.append(os.path.join(out, "fig5.png"))
        tiles = fig5_tiles(model, *data.test.take(min(cfg["RECON_IMAGES"], data.test.rows))[:2])
        if importlib.util.find_spec("matplotlib") is None:
            save_image(tiles["grid"], written[-1])  # the same tiles, without the labels written on them
        else:
            plot_fig5_png(tiles, written[-1])
    rows = read_metrics(out)
    if rows and importlib.util.find_spec("matplotlib") is None:
        print("warning: matplotlib is not installed, so curves.png and routing_logit_change.png are not drawn "
              "(pip install matplotlib)", file=sys.stderr)
    elif rows:
        written.append(os.path.join(out, "curves.png"))
        plot_curves_png(rows, written[-1])
        if plot_routing_png(rows, os.path.join(out, "routing_logit_change.png")):
            written.append(os.path.join(out, "routing_logit_change.png"))
    print("wrote " + ", ".join(written))
    return written


def run_predict(cfg, ckpt, paths):
    """--predict: each image file converted as the model's data was (channels, size, the central
    crop; for the MNIST-like data sets a dark digit on a light background is inverted, and the
    output says so) -> the predicted class and every class's capsule length, printed, in
    RUN_DIR/predictions.json, and RUN_DIR/predict_<name>.png: the input beside its reconstruction.
    Every file is read before anything is written."""
    import numpy as np
    from PIL import Image
    from torchvision.utils import make_grid, save_image

    device, _ = prepare(cfg)
    if not cfg["IMAGE_SIZE"]:  # a checkpoint from before the data decided these: the data set's shape
        nominal_data_settings(cfg)
    model = build_model(cfg).to(device)
    load_weights(model, ckpt["model"])
    model.eval()
    dark_on_light = DATASETS[cfg["DATASET"]]["reader"] in ("MNIST", "FashionMNIST", "KMNIST", "EMNIST")
    size, channels = cfg["IMAGE_SIZE"], cfg["IMAGE_CHANNELS"]
    inputs, inverted = [], []
    for path in paths:
        try:
            with Image.open(path) as image:
                image = image.convert("L" if channels != 3 else "RGB").resize((size, size), Image.BILINEAR)
                x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
        except (OSError, ValueError) as e:
            raise UsageError(f"--predict: cannot read image {path}: {type(e).__name__}: {e}") from None
        x = x.permute(2, 0, 1) if x.dim() == 3 else x.unsqueeze(0).repeat(channels, 1, 1)  # (C, H, W)
        flip = dark_on_light and x.float().mean() > 127.5  # MNIST's digits are light on black
        inputs.append(255 - x if flip else x)
        inverted.append(bool(flip))
    images = to_float_images(torch.stack(inputs).to(device), cfg["CROP_SIZE"])
    with torch.no_grad():
        lengths, recon = model(images)
    names = cfg["CLASS_NAMES"] or [str(k) for k in range(cfg["NUM_CLASSES"])]
    os.makedirs(cfg["RUN_DIR"], exist_ok=True)
    predictions = []
    for k, path in enumerate(paths):
        best = int(lengths[k].argmax())
        stem = os.path.splitext(os.path.basename(path))[0]
        picture = os.path.join(cfg["RUN_DIR"], f"predict_{stem}.png")
        save_image(make_grid(viewable(torch.stack([images[k], recon[k]])).cpu(), nrow=2, padding=2, pad_value=0.5),
                   picture)
        predictions.append({"image": path, "class": best, "class_name": names[best], "inverted": inverted[k],
                            "lengths": {name: round(float(v), 4) for name, v in zip(names, lengths[k])},
                            "picture": picture})
        note = " (a dark digit on a light background: inverted first, as MNIST's are light on black)" \
            if inverted[k] else ""
        print(f"{path}: class {names[best]} (capsule length {float(lengths[k, best]):.3f}){note}")
        print("  " + "  ".join(f"{name}: {float(v):.3f}" for name, v in zip(names, lengths[k])))
    with open(os.path.join(cfg["RUN_DIR"], "predictions.json"), "w", encoding="utf-8") as f:
        json.dump(predictions, f, indent=1)
    print(f"wrote {os.path.join(cfg['RUN_DIR'], 'predictions.json')} and the predict_*.png pictures")
    return predictions


MODEL_KEYS = ("DATASET", "IMAGE_SIZE", "IMAGE_CHANNELS", "CROP_SIZE", "CLASS_NAMES", "CONV1_CHANNELS", "PRIMARY_CAPS", "PRIMARY_DIM", "DIGIT_DIM", "NUM_CLASSES", "KERNEL_SIZE",
              "ROUTING_ITERATIONS", "ROUTING_LEAKY", "W_INIT_STD", "INIT", "PRIMARY_SCALE", "DIGIT_CAPS_BIAS", "DECODER_HIDDEN1", "DECODER_HIDDEN2",
              "M_PLUS", "M_MINUS", "LAMBDA_ABSENT", "RECON_WEIGHT")  # what an exported model carries: shape, loss


def export_weights(ckpt, cfg, path):
    """The model weights alone, in fp16, with the constants that define the model (no paths)."""
    if not cfg["IMAGE_SIZE"]:  # a checkpoint from before the data's shape was saved: the data set's
        nominal_data_settings(cfg)
    state = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    atomic_torch_save({"model": state, "config": {k: cfg[k] for k in MODEL_KEYS}, "epoch": ckpt.get("epoch")},
                      path)
    print(f"wrote {path} ({os.path.getsize(path) / 2**20:.1f} MiB, fp16 weights)")


# ---- Visdom: live plots, one warning and no plots without a server ----
def visdom_reachable(server, port, timeout=1.0):
    """True if a Visdom server answers at server:port (checked once, quietly)."""
    try:
        with socket.create_connection((server, port), timeout=timeout):
            pass
    except OSError:
        return False
    import visdom

    logging.getLogger("visdom").setLevel(logging.CRITICAL)  # its client logs every retry
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            client = visdom.Visdom(server=f"http://{server}", port=port, use_incoming_socket=False,
                                   raise_exceptions=True)
            return bool(client.check_connection())
    except Exception:  # something answers on that port, but not Visdom
        return False


FIG5_TITLE = ("Fig. 5: test pairs (top), reconstructions from the two longest capsules, red = first label, "
              "green = second (middle), red = first label, green = a class not present (bottom)")


class VisdomPlots:
    """Live plots through torchnet's Visdom loggers. Checked once at start; if the server is not
    there, or stops answering later, one warning line and training goes on without it."""

    def __init__(self, cfg):
        self.enabled = False
        if not cfg["VISDOM"]:
            return
        server, port, env = cfg["VISDOM_SERVER"], cfg["VISDOM_PORT"], cfg["VISDOM_ENV"]
        if not visdom_reachable(server, port):
            print(f"warning: no Visdom server answers at {server}:{port}; training without live plots "
                  f"(start one with: python -m visdom.server -port {port} -bind_local)", file=sys.stderr)
            return
        from torchnet.logger import VisdomLogger, VisdomPlotLogger

        def plot(title, ylabel, caption=None, markers=True):
            return VisdomPlotLogger("line", env=env, port=port, server=server, win=f"{env}_{title}",
                                    opts=dict(title=caption or title, xlabel="epoch", ylabel=ylabel,
                                              markers=markers, markersize=6))

        def window(kind, title, **opts):
            return VisdomLogger(kind, env=env, port=port, server=server, win=f"{env}_{title}",
                                opts=dict(title=title, **opts))

        try:
            with contextlib.redirect_stdout(io.StringIO()):
                self.loss = plot("loss", "loss")
                self.accuracy = plot("accuracy", "accuracy (%)")
                self.lr = plot("learning rate", "learning rate")
                self.routing = plot("routing logit change", "mean |change of b_ij|")
                every = f"mean of every {cfg['PROGRESS_EVERY']} batches"
                self.live_loss = plot("training loss, live", "loss", f"training loss, live ({every})", False)
                self.live_accuracy = plot("training accuracy, live", "accuracy (%)",
                                          f"training accuracy, live ({every})", False)
                labels = [str(k) for k in range(cfg["NUM_CLASSES"])]
                self.confusion = window("heatmap", "confusion matrix (test)", columnnames=labels,
                                        rownames=labels, xlabel="predicted", ylabel="true")
                if DATASETS[cfg["DATASET"]]["digits"] == 1:
                    self.recon = window("image", "test images (top) and reconstructions (bottom)")
                else:
                    self.recon = window("image", FIG5_TITLE)
                self.fig4 = window("image", "Fig. 4: each of the 16 dimensions perturbed by -0.25..0.25")
                self.masks = window("image", "reconstruction under every class mask (rows: digits, cols: masks)")
                self.couplings = window("image", "couplings c_ij of one test image (per class: 32 types x 6x6; "
                                                 "min black, max white)")
            self.loggers = [self.loss, self.accuracy, self.lr, self.routing, self.live_loss, self.live_accuracy,
                            self.confusion, self.recon, self.fig4, self.masks, self.couplings]
            for lg in self.loggers:
                lg.viz.raise_exceptions = True  # errors reach us instead of being printed per call
        except Exception as e:
            self._fail(e)
            return
        self.enabled = True
        self.url = f"http://{server}:{port}/env/{env}"
        print(f"Visdom: plots at {self.url}")

    def _fail(self, error):
        self.enabled = False
        print(f"warning: Visdom stopped answering ({type(error).__name__}); training goes on without live "
              f"plots", file=sys.stderr)

    def _lines(self, logger, epoch, values):
        """Append one point per named series; create the window with a legend the first time."""
        import numpy as np

        if logger.viz.win_exists(win=logger.win, env=logger.env):
            for name, value in values.items():
                logger.log(epoch, value, name=name)
        else:
            logger.viz.line(X=np.array([[epoch] * len(values)]), Y=np.array([list(values.values())]),
                            win=logger.win, env=logger.env, opts=dict(logger.opts, legend=list(values)))

    def log_progress(self, epoch, loss, accuracy):
        """One point per live window at fractional epoch `epoch` (every PROGRESS_EVERY batches)."""
        if not self.enabled:
            return
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                self._lines(self.live_loss, epoch, {"train": loss})
                self._lines(self.live_accuracy, epoch, {"train": accuracy})
        except Exception as e:  # a server that went away: warn once, keep training
            self._fail(e)

    def log_epoch(self, epoch, row, confusion, recon_grid, figures=None, recon_caption=None):
        if not self.enabled:
            return
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                self._lines(self.loss, epoch, {"train": row["train_loss"], "test": row["test_loss"]})
                accuracy = {"train": row["train_accuracy"], "test": row["test_accuracy"]}
                if "test_accuracy_any" in row:  # two-digit images: train and test are both digits right
                    accuracy["test, at least one digit"] = row["test_accuracy_any"]
                self._lines(self.accuracy, epoch, accuracy)
                self._lines(self.lr, epoch, {"lr": row["lr"]})
                if row.get("routing_logit_change"):
                    self._lines(self.routing, epoch, {f"iteration {k + 1}": value for k, value in
                                                      enumerate(row["routing_logit_change"])})
                self.confusion.log(confusion)
                if recon_caption:
                    self.recon.opts = dict(self.recon.opts, caption=recon_caption)
                self.recon.log(recon_grid.numpy())
                if figures:
                    self.fig4.log(figures["fig4"].numpy())
                    self.masks.log(figures["class_masks"].numpy())
                    self.couplings.log(figures["couplings"].numpy())
        except Exception as e:  # a server that went away: warn once, keep training
            self._fail(e)


# ---- figures: Fig. 4, every class mask, couplings, curves (sec. 5.1, Appendix A) ----
@torch.no_grad()
def perturbation_grid(model, images, steps=11, span=0.25):
    """Fig. 4: for each image, every dimension of its winning digit capsule set to v_d + delta,
    delta in [-span, span] (11 steps of 0.05), decoded. images (N, 1, 28, 28) -> (N, E, steps, 1, 28, 28)."""
    v, _ = model.capsules(images)  # (N, J, E)
    N, J, E = v.shape
    winner = (v * v).sum(-1).argmax(1)  # (N,)
    deltas = torch.linspace(-span, span, steps, device=v.device)  # (S,)
    vv = v[:, None, None].expand(N, E, steps, J, E).clone()  # (N, E, S, J, E)
    dims = torch.arange(E, device=v.device)
    vv[torch.arange(N)[:, None, None], dims[None, :, None], torch.arange(steps)[None, None, :],
       winner[:, None, None], dims[None, :, None]] += deltas  # add delta to dim d of the winner
    classes = winner[:, None, None].expand(N, E, steps).reshape(-1)
    out = model.decode(vv.reshape(-1, J, E), classes)  # (N*E*S, 1, 28, 28)
    return out.reshape(N, E, steps, *out.shape[1:])


@torch.no_grad()
def class_mask_grid(model, images):
    """Reconstruction of every image from the capsule of every class: (N, 1, 28, 28) -> (N, J, 1, 28, 28)."""
    v, _ = model.capsules(images)  # (N, J, E)
    N, J, _ = v.shape
    classes = torch.arange(J, device=v.device).repeat(N)  # (N*J,)
    out = model.decode(v.repeat_interleave(J, dim=0), classes)
    return out.reshape(N, J, *out.shape[1:])


@torch.no_grad()
def coupling_maps(model, image):
    """Couplings c_ij of one image, (1, 1, 28, 28) -> (J, T=32, 6, 6); they sum to 1 over J."""
    _, c = model.capsules(image)  # (1, I, J), I ordered (type, row, col)
    J = c.shape[2]
    return c[0].t().reshape(J, model.primary_caps, model.grid, model.grid)


def one_per_class(images, labels, num_classes):
    """The first image of every class present (in class order): (K, 28, 28) uint8, (K,)."""
    picks = [int((labels == k).nonzero()[0]) for k in range(num_classes) if (labels == k).any()]
    picks = torch.tensor(picks, dtype=torch.long, device=labels.device)
    return images[picks], labels[picks]


def viewable(images):
    """Images (..., C, H, W) as make_grid shows them: one or three channels (of a stereo pair, the
    first camera's image)."""
    return images[..., :1, :, :] if images.shape[-3] == 2 else images


def visual_figures(model, images_u8, labels, num_classes, crop=0, most=10):
    """All capsule figures as CHW float images in [0, 1] (CPU), for PNG files and Visdom: for the
    first test image of each of the first `most` classes (test images centre-cropped by `crop`)."""
    from torchvision.utils import make_grid

    was_training = model.training
    model.eval()
    digits, _ = one_per_class(images_u8, labels, num_classes)
    x = to_float_images(digits[:most], crop)
    pert = viewable(perturbation_grid(model, x))  # (K, E, S, C, H, W)
    per_digit = [make_grid(p.flatten(0, 1).float().cpu(), nrow=p.shape[1], padding=1, pad_value=0.5)
                 for p in pert]
    masks = viewable(class_mask_grid(model, x))  # (K, J, C, H, W)
    maps = coupling_maps(model, x[:1]).float().cpu()  # (J, T, 6, 6)
    scaled = (maps - maps.min()) / (maps.max() - maps.min()).clamp_min(1e-12)  # smallest black, largest white
    panels = [make_grid(F.interpolate(m.unsqueeze(1), scale_factor=4, mode="nearest"), nrow=8, padding=1,
                        pad_value=0.3) for m in scaled]
    model.train(was_training)
    return {
        "fig4_per_digit": per_digit,
        "fig4": make_grid(torch.stack(per_digit), nrow=5, padding=6, pad_value=1.0),
        "class_masks": make_grid(torch.cat([viewable(x).cpu().unsqueeze(1), masks.float().cpu()], 1).flatten(0, 1),
                                 nrow=masks.shape[1] + 1, padding=2, pad_value=0.5),
        "couplings": make_grid(torch.stack(panels), nrow=5, padding=6, pad_value=1.0),
        "coupling_maps": maps,
    }


@torch.no_grad()
def fig5_tiles(model, composites_u8, pair_labels):
    """Fig. 5 (sec. 6) for two-digit images: composites uint8 (N, H, W), labels (N, 2) -> dict of
    'inputs', 'recon' and 'forced' (N, 3, H, W) RGB in [0, 1] (CPU), 'labels' and 'predicted' (N, 2),
    'absent' (N,) and 'grid' (all tiles, one column per image). recon overlays the decoder's output
    from the two longest capsules, matched to the labels: red for the first label's digit, green
    for the second's. forced is the paper's "*" column: red from the first label's capsule, green
    from the longest capsule of a class that is neither a label nor predicted."""
    from torchvision.utils import make_grid

    was_training = model.training
    model.eval()
    images = to_float_images(composites_u8)
    v, _ = model.capsules(images)  # (N, J, E)
    lengths = (v * v).sum(-1)
    predicted, _ = matched_predictions(lengths, pair_labels)
    taken = F.one_hot(torch.cat([pair_labels, predicted], 1), v.shape[1]).sum(1) > 0  # (N, J)
    absent = lengths.masked_fill(taken, -1.0).argmax(1)  # (N,)

    def overlay(red, green):
        rg = torch.cat([model.decode(v, red), model.decode(v, green)], 1).float()  # (N, 2, H, W)
        return torch.cat([rg, torch.zeros_like(rg[:, :1])], 1).cpu()  # (N, 3, H, W)

    tiles = {"inputs": images.repeat(1, 3, 1, 1).cpu(), "recon": overlay(predicted[:, 0], predicted[:, 1]),
             "forced": overlay(pair_labels[:, 0], absent)}
    model.train(was_training)
    grid = make_grid(torch.cat([tiles["inputs"], tiles["recon"], tiles["forced"]]), nrow=len(images), padding=2,
                     pad_value=0.5)
    return dict(tiles, grid=grid, labels=pair_labels.cpu(), predicted=predicted.cpu(), absent=absent.cpu())


def fig5_caption(tiles):
    """The paper's L:(labels) R:(reconstructed) pairs of fig5_tiles(), column by column."""
    return "  ".join(f"L:({a},{b}) R:({c},{d})" for (a, b), (c, d) in
                     zip(tiles["labels"].tolist(), tiles["predicted"].tolist()))


def plot_fig5_png(tiles, path):
    """fig5_tiles() as a labelled picture (matplotlib): per image, L:(labels) above the input,
    R:(predicted) above the red/green reconstruction, R:(label, *absent) above the forced one."""
    from matplotlib.figure import Figure

    n = len(tiles["labels"])
    fig = Figure(figsize=(1.1 * n + 0.4, 4.0), dpi=120, layout="constrained")
    axes = fig.subplots(3, n, squeeze=False)
    for k in range(n):
        (a, b), (c, d) = tiles["labels"][k].tolist(), tiles["predicted"][k].tolist()
        titles = (f"L:({a},{b})", f"R:({c},{d})", f"R:({a},*{int(tiles['absent'][k])})")
        for row, (name, title) in enumerate(zip(("inputs", "recon", "forced"), titles)):
            ax = axes[row, k]
            ax.imshow(tiles[name][k].permute(1, 2, 0).numpy(), interpolation="nearest")
            wrong = row == 1 and (c, d) != (a, b)
            ax.set_title(title, fontsize=8, color="tab:red" if wrong else "black")
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("Fig. 5: input (top); reconstructions from the two longest capsules, red = first label's digit, "
                 "green = second's (middle); * = from a class not in the image (bottom)", fontsize=8)
    fig.savefig(path)


def plot_curves_png(rows, path):
    """Test accuracy (top) and train/test loss (bottom, log scale) per epoch from metrics.jsonl rows,
    drawn with matplotlib (no display needed)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    epochs = [r["epoch"] for r in rows]
    fig = Figure(figsize=(8, 6), dpi=120, layout="constrained")
    accuracy, loss = fig.subplots(2, 1, sharex=True)
    accuracy.plot(epochs, [r["test_accuracy"] for r in rows], "o-", ms=3, color="tab:red", label="test")
    accuracy.set_ylabel("test accuracy (%)")
    accuracy.set_title(f"final epoch {epochs[-1]}: {rows[-1]['test_accuracy']:.2f}% test accuracy, "
                       f"test loss {rows[-1]['test_loss']:.4f}")
    for key, color in (("train_loss", "tab:blue"), ("test_loss", "tab:red")):
        loss.plot(epochs, [r[key] for r in rows], "o-", ms=3, color=color, label=key.split("_")[0])
    loss.set_yscale("log")
    loss.yaxis.set_major_locator(LogLocator(subs=(1, 2, 3, 5)))  # round values: 0.01, 0.02, 0.03, 0.05, 0.1
    loss.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    loss.yaxis.set_minor_formatter(NullFormatter())
    loss.set_ylabel("loss (margin + 0.0005 x SSE)")
    loss.set_xlabel("epoch")
    loss.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (accuracy, loss):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(path)


def plot_routing_png(rows, path):
    """Appendix A: mean |change of b_ij| per routing iteration, per epoch (matplotlib)."""
    rows = [r for r in rows if r.get("routing_logit_change")]
    if not rows:
        return False
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 4), dpi=120, layout="constrained")
    ax = fig.subplots()
    epochs = [r["epoch"] for r in rows]
    for it in range(len(rows[0]["routing_logit_change"])):
        ax.plot(epochs, [r["routing_logit_change"][it] for r in rows], "o-", ms=3, label=f"iteration {it + 1}")
    ax.set_title("mean |change of the routing logits b_ij| per iteration (Appendix A)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean |change of b_ij|")
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path)
    return True


def read_metrics(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a crash or a full disk
                continue
    return rows


# ---- checkpoints: atomic writes, loading with one-line errors ----
def atomic_torch_save(obj, path):
    """Write to a temporary file in the same directory, fsync, then rename over `path`."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path):
    """A training checkpoint (dict with 'model', 'optimizer', ...) or weights alone (a state dict,
    possibly fp16). Raises UsageError with one line if the file is unusable."""
    if not os.path.isfile(path):
        raise UsageError(f"--resume: no checkpoint file at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"--resume: {path} is not a readable checkpoint ({type(e).__name__})") from None
    if isinstance(ckpt, dict) and "model" in ckpt:
        return dict(ckpt, path=path)
    if isinstance(ckpt, dict) and all(torch.is_tensor(v) for v in ckpt.values()):
        return {"model": ckpt, "path": path}
    raise UsageError(f"--resume: {path} holds neither a checkpoint nor a model state dict")


def load_weights(model, state):
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise UsageError(f"--resume: the weights do not fit this model's constants: {first}") from None


# ---- many processes: torchrun, one process per GPU (or CPU share), DistributedDataParallel ----
class Distributed:
    """The process group torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, ...); a plain `python capsule_network.py` is a world of one, and nothing here
    then does anything. Every process draws the same random numbers (the same seed, the same
    draws for the global batch), so each one can take its share of any batch by itself."""

    def __init__(self, environ=os.environ):
        self.world = int(environ.get("WORLD_SIZE", "1"))
        self.rank = int(environ.get("RANK", "0"))
        self.local_rank = int(environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        self.started = False

    @property
    def main(self):
        return self.rank == 0

    def start(self, device):
        """Join the group: NCCL on CUDA, gloo on the CPU."""
        if self.enabled and not self.started:
            import torch.distributed as tdist

            tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.started = True

    def stop(self):
        if self.started:
            import torch.distributed as tdist

            tdist.destroy_process_group()
            self.started = False

    def device(self, device):
        """cuda -> cuda:LOCAL_RANK (and made current); other devices as they are."""
        if self.enabled and device.type == "cuda":
            device = torch.device("cuda", self.local_rank % torch.cuda.device_count())
            torch.cuda.set_device(device)
        return device

    def share(self, n):
        """This process's rows of a batch of n: contiguous, sizes differing by at most one."""
        start = self.rank * n // self.world
        return slice(start, (self.rank + 1) * n // self.world)

    def gather(self, obj):
        """[obj of rank 0, obj of rank 1, ...] on every process."""
        if not self.enabled:
            return [obj]
        import torch.distributed as tdist

        every = [None] * self.world
        tdist.all_gather_object(every, obj)
        return every

    def from_main(self, obj):
        """Rank 0's obj, on every process."""
        if not self.enabled:
            return obj
        import torch.distributed as tdist

        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]


# ---- devices and the process: device choice, bf16, allocator, RNG state, Ctrl-C ----
def resolve_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available[name]:
        raise UsageError(f"--device {name} was asked for, but this machine has no {name.upper()} device")
    return torch.device(name)


def amp_dtype(device, enabled):
    """bf16 for autocast where the hardware runs it natively, else None (fp32)."""
    if not enabled:
        return None
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cpu":
        # torch >= 2.5 says whether the CPU has avx512_bf16 or AMX; older releases cannot tell,
        # and train in fp32 (results/README.md measured them so)
        cpu = getattr(torch, "cpu", None)
        native = [getattr(cpu, n, lambda: False)() for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        if any(native):
            return torch.bfloat16
    return None


def autocast(device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()

_malloc_tuned = None  # result of the first tune_cpu_malloc() call of this process

def tune_cpu_malloc():
    """Keep glibc from unmapping big activations after every step (they are page-faulted back on
    the next one; measured in results/README.md): big blocks come from the heap, and up to 1 GiB of
    freed memory stays with the process. Process-wide and done once; CapsuleNet calls it at its
    first CPU forward unless built with cpu_malloc_tuning=False. True when the settings took effect."""
    global _malloc_tuned
    if _malloc_tuned is None:
        try:
            libc = ctypes.CDLL("libc.so.6")
            m_trim_threshold, m_mmap_max = -1, -4
            _malloc_tuned = libc.mallopt(m_mmap_max, 0) == 1 and libc.mallopt(m_trim_threshold, 1 << 30) == 1
        except (OSError, AttributeError):
            _malloc_tuned = False
    return _malloc_tuned


def seed_everything(seed):
    torch.manual_seed(seed)  # seeds CPU, CUDA and MPS generators


def rng_state():
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "mps" in state and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])


@contextlib.contextmanager
def sigint_deferred():
    """Hold Ctrl-C until the block ends, so an epoch's metrics row and checkpoints are written
    together or not at all."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


# ---- command line: every constant is a flag; main() ----
def constants_table(path=__file__):
    """(name, help) of every tunable constant, read from the constants block of this file (or of
    another script written the same way: bench.py)."""
    with open(os.path.abspath(path), encoding="utf-8") as f:
        source = f.read()
    block = source.split("# ---- constants", 1)[1].split("# ---- end of constants", 1)[0]
    return re.findall(r"^([A-Z][A-Z0-9_]*) = .*?  # (.+)$", block, re.M)


DATA_DECIDED = {"CLASS_NAMES": []}  # set from the data (load_data), saved in checkpoints; no flags


def default_config():
    """The constants at the top of this file, as a dict, and what the data will decide."""
    return dict({name: globals()[name] for name, _ in constants_table()}, **copy.deepcopy(DATA_DECIDED))


def validate_config(cfg):
    """Raise UsageError naming the first constant with an impossible value."""
    checks = [
        (cfg["DATASET"] in DATASETS, f"--dataset must be one of {', '.join(DATASETS)}, not {cfg['DATASET']!r}"),
        (cfg["DEVICE"] in DEVICES, f"--device must be one of {', '.join(DEVICES)}"),
        (cfg["COMPILE"] in ("auto", True, False), "--compile must be auto, on or off"),
        (cfg["EPOCHS"] >= 0, "--epochs must be >= 0"),
        (cfg["BATCH_SIZE"] >= 1, "--batch-size must be >= 1"),
        (cfg["EVAL_BATCH_SIZE"] >= 1, "--eval-batch-size must be >= 1"),
        (cfg["LR"] > 0, "--lr must be > 0"),
        (0 < cfg["LR_DECAY"] <= 1, "--lr-decay must be in (0, 1]"),
        (cfg["TRAIN_SIZE"] >= 0, "--train-size must be >= 0 (0 = all)"),
        (cfg["TEST_SIZE"] >= 0, "--test-size must be >= 0 (0 = all)"),
        (0 <= cfg["MAX_SHIFT"] < 14, "--max-shift must be in [0, 13]"),
        (cfg["DATASET"] != "multimnist" or cfg["MAX_SHIFT"] == 0,
         "--max-shift does not apply to multimnist (its digits are shifted by --multimnist-shift): leave it 0"),
        (0 <= cfg["MULTIMNIST_SHIFT"] <= (MULTIMNIST_CANVAS - 28) // 2,
         f"--multimnist-shift must be in [0, {(MULTIMNIST_CANVAS - 28) // 2}] (a 28x28 digit in a 36x36 image)"),
        (cfg["MULTIMNIST_TEST_PAIRS"] >= 1, "--multimnist-test-pairs must be >= 1"),
        (cfg["ROUTING_ITERATIONS"] >= 1, "--routing-iterations must be >= 1"),
        (min(cfg["CONV1_CHANNELS"], cfg["PRIMARY_CAPS"], cfg["PRIMARY_DIM"], cfg["DIGIT_DIM"],
             cfg["DECODER_HIDDEN1"], cfg["DECODER_HIDDEN2"]) >= 1, "layer sizes must be >= 1"),
        (cfg["NUM_CLASSES"] >= 0, "--num-classes must be >= 0 (0 = the data set's)"),
        (cfg["KERNEL_SIZE"] >= 1, "--kernel-size must be >= 1"),
        (cfg["IMAGE_SIZE"] >= 0, "--image-size must be >= 0 (0 = as stored)"),
        (cfg["IMAGE_CHANNELS"] in (0, 1, 2, 3), "--image-channels must be 1 or 3 (0 = the data set's)"),
        (cfg["CROP_SIZE"] >= 0, "--crop-size must be >= 0 (0 = no crops)"),
        (cfg["DATASET"] != "multimnist" or (cfg["CROP_SIZE"] == 0 and cfg["IMAGE_SIZE"] in (0, MULTIMNIST_CANVAS)),
         "multimnist images are 36x36: leave --image-size and --crop-size 0"),
        (cfg["W_INIT_STD"] > 0, "--w-init-std must be > 0"),
        (cfg["INIT"] in ("torch", "authors"), f"--init must be torch or authors, not {cfg['INIT']!r}"),
        (cfg["PRIMARY_SCALE"] > 0, "--primary-scale must be > 0"),
        (cfg["MARGIN_REDUCTION"] in ("sum", "half-mean"),
         f"--margin-reduction must be sum or half-mean, not {cfg['MARGIN_REDUCTION']!r}"),
        (0 <= cfg["M_MINUS"] < cfg["M_PLUS"] <= 1, "need 0 <= --m-minus < --m-plus <= 1"),
        (cfg["LAMBDA_ABSENT"] >= 0, "--lambda-absent must be >= 0"),
        (cfg["RECON_WEIGHT"] >= 0, "--recon-weight must be >= 0"),
        (cfg["PROGRESS_EVERY"] >= 1, "--progress-every must be >= 1"),
        (cfg["RECON_IMAGES"] >= 1, "--recon-images must be >= 1"),
        (1 <= cfg["VISDOM_PORT"] <= 65535, "--visdom-port must be in 1..65535"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


def compile_setting(text):
    """--compile's value: auto, or on/off (also true/false, yes/no, 1/0) -> "auto", True or False."""
    value = {"auto": "auto", "on": True, "true": True, "yes": True, "1": True,
             "off": False, "false": False, "no": False, "0": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"must be auto, on or off, not {text!r}")
    return value


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as a single line (exit code 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_constant_flags(parser, path=__file__, values=None):
    """One flag per constant of the script at `path` (values: its globals): FOO_BAR -> --foo-bar."""
    values = globals() if values is None else values
    for name, help_text in constants_table(path):
        default = values[name]
        flag = "--" + name.lower().replace("_", "-")
        text = f"{help_text} (default: {default})"
        if name == "COMPILE":  # --compile [auto|on|off], --no-compile
            parser.add_argument(flag, dest=name, nargs="?", const=True, type=compile_setting, default=None,
                                metavar="auto|on|off", help=text)
            parser.add_argument("--no-compile", dest=name, action="store_const", const=False,
                                help="the same as --compile off")
        elif isinstance(default, bool):
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                                default=None, help=text)
        else:
            parser.add_argument(flag, dest=name, type=type(default), default=None, help=text,
                                metavar=name)


def build_parser():
    parser = OneLineParser(
        prog="capsule_network.py",
        description="Train, evaluate or visualise CapsNet (Sabour et al., 2017) on MNIST, MultiMNIST, the paper's "
                    "other data sets or your own images.",
    )
    add_constant_flags(parser)
    parser.add_argument("--resume", metavar="PATH", action="append",
                        help="continue from a checkpoint (last.pt, best.pt); auto: from RUN_DIR/last.pt if it "
                             "exists, else start a new run there (for restarted or requeued jobs); given several "
                             "times with --eval-only: evaluate the ensemble of those models")
    parser.add_argument("--eval-only", action="store_true",
                        help="with --resume: evaluate on the test set, print accuracy and confusion matrix")
    parser.add_argument("--visualize", action="store_true",
                        help="with --resume: write the capsule visualisations as PNG files into the run dir")
    parser.add_argument("--benchmark", action="store_true",
                        help="hand over to bench.py (the same flags): time training and evaluation against "
                             "the baseline")
    parser.add_argument("--benchmark-json", metavar="PATH", help="with --benchmark: bench.py's --json PATH")
    parser.add_argument("--predict", metavar="IMAGE", nargs="+",
                        help="with --resume: classify these image files (converted as the model's data was), "
                             "write RUN_DIR/predictions.json and a PNG of each beside its reconstruction")
    parser.add_argument("--export-weights", metavar="PATH",
                        help="with --resume: write the model weights alone, in fp16, to PATH")
    return parser


def make_config(args, ckpt):
    """Constants, then the checkpoint's (when resuming), then a --preset given now, then the other
    flags given on the command line."""
    cfg = default_config()
    explicit = {name: getattr(args, name) for name in cfg if getattr(args, name, None) is not None}
    saved = ckpt.get("config", {}) if ckpt is not None else {}
    dataset = explicit.get("DATASET", saved.get("DATASET", cfg["DATASET"]))
    if dataset not in DATASETS:
        raise UsageError(f"--dataset must be one of {', '.join(DATASETS)}, not {dataset!r}")
    cfg.update(DATASETS[dataset]["settings"])  # the data set's own settings replace the constants
    if ckpt is not None and "config" in ckpt:
        training = "optimizer" in ckpt  # a training checkpoint, not exported weights
        cfg.update({k: v for k, v in ckpt["config"].items() if k in cfg and (training or k in MODEL_KEYS)})
        if training and "RUN_DIR" not in explicit:  # a training run continues in its own folder
            resume = args.resume[0] if isinstance(args.resume, list) else args.resume
            cfg["RUN_DIR"] = os.path.dirname(os.path.abspath(resume))
    if explicit.get("PRESET"):
        cfg.update(preset_values(explicit["PRESET"]))
    cfg.update(explicit)
    validate_config(cfg)
    return cfg


def settings_line(title, values, cfg, whose):
    """'TITLE: K=V, ...' with the values in force (an explicit flag may have changed one)."""
    return f"{title}: " + ", ".join(
        f"{k}={cfg[k]}" + ("" if cfg[k] == v else f" ({whose} {v}, overridden)") for k, v in values.items())


def preset_values(text):
    """The constants set by --preset NAME[,NAME...], later names winning."""
    values = {}
    for name in text.split(","):
        if name not in PRESETS:
            raise UsageError(f"--preset must be one or more of {', '.join(PRESETS)} (comma-separated), not {name!r}")
        values.update(PRESETS[name])
    return values


def preset_line(cfg):
    """'preset NAME: K=V, ...', or None without a preset."""
    if not cfg["PRESET"]:
        return None
    return settings_line(f"preset {cfg['PRESET']}", preset_values(cfg["PRESET"]), cfg, "the preset's")


def dataset_line(cfg):
    """'data set NAME: K=V, ...' for a data set with settings of its own, else None."""
    values = DATASETS[cfg["DATASET"]]["settings"]
    if not values:
        return None
    return settings_line(f"data set {cfg['DATASET']} (the paper's settings for it)", values, cfg, "its")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--benchmark" in argv:  # the benchmark lives in bench.py, beside this file
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import bench

        return bench.main([a for a in argv if a != "--benchmark"])
    parser = build_parser()
    args = parser.parse_args(argv)
    dist = Distributed()  # torchrun's environment; a world of one without it
    training = not (args.export_weights or args.eval_only or args.visualize or args.predict)
    if dist.enabled and not training and not dist.main:
        return 0  # evaluation, figures and export run in rank 0 alone
    with contextlib.ExitStack() as stack:
        if not dist.main:  # one voice: rank 0 prints
            stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
        try:
            return run_mode(args, training, dist)
        except UsageError as e:
            if dist.main:
                print(f"capsule_network.py: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            if dist.main:
                print("\ninterrupted: the last completed epoch is in last.pt; continue with --resume",
                      file=sys.stderr)
            return 130
        finally:
            dist.stop()


def run_mode(args, training, dist):
    for flag in ("eval_only", "visualize", "export_weights", "predict"):
        if getattr(args, flag) and not args.resume:
            raise UsageError(f"--{flag.replace('_', '-')} needs --resume PATH")
    resumes = args.resume or []
    if len(resumes) > 1 and not args.eval_only:
        raise UsageError("several --resume checkpoints are an ensemble: only with --eval-only")
    args.resume = resumes[0] if resumes else None
    resume_auto = args.resume == "auto"
    if resume_auto:  # RUN_DIR/last.pt if it exists, else a fresh run in RUN_DIR
        if not training:
            raise UsageError("--resume auto is for training; name the checkpoint to evaluate, visualise or export")
        path = os.path.join(args.RUN_DIR or RUN_DIR, "last.pt")
        args.resume = path if os.path.exists(path) else None
    ckpt = load_checkpoint(args.resume) if args.resume else None
    cfg = make_config(args, ckpt)
    if args.export_weights:
        export_weights(ckpt, cfg, args.export_weights)
    elif args.eval_only:
        run_eval(cfg, ckpt, [load_checkpoint(path) for path in resumes[1:]])
    elif args.predict:
        run_predict(cfg, ckpt, args.predict)
    elif args.visualize:
        run_visualize(cfg, ckpt)
    else:
        run_training(cfg, ckpt, dist, resume_auto and ckpt is None)
    return 0


if __name__ == "__main__":
    sys.exit(main())

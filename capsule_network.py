"""CapsNet with dynamic routing, trained on MNIST, MultiMNIST, other data sets or your own images, in one script.

Sabour, Frosst & Hinton, "Dynamic Routing Between Capsules", NIPS 2017 (arXiv:1710.09829):
Conv1 -> PrimaryCaps -> DigitCaps with routing-by-agreement (Procedure 1), margin loss (eq. 4)
and a reconstruction decoder. Built on torch, torchvision, torchnet (Engine, meters, Visdom
loggers), tqdm and Visdom.

    python -m visdom.server -port 8097 -bind_local &   # optional: live plots at http://localhost:8097
    python capsule_network.py                          # train with the constants below
    python capsule_network.py --help                   # every constant as a flag, with its default

The file, top to bottom (support code lives in the capsnet/ package beside it):
    constants      every tunable, grouped: data, model and loss (as in the paper), the authors'
                   code's choices, training, speed, logging; each one is also a flag. PRESETS
                   (named recipes) and DATASETS (each data set and the paper's settings for it)
    model          squash (eq. 1), dynamic_routing (Procedure 1 as written; --routing-impl
                   reference trains it), capsule_layer (the same routing factored: the default),
                   CapsuleNet (Fig. 1 and 2); EfficientCapsNet (--model efficient-capsnet: the
                   network of capsnet/efficient.py with this file's decoder and class scores)
    loss           CapsuleLoss: margin loss (eq. 4) + 0.0005 x summed squared reconstruction
                   error; build_model, build_optimizer, build_loss from the constants
    one step       BatchLoss: what torchnet's Engine calls per batch (shift, forward, loss)
    epoch loop     Trainer (Engine hooks: train pass, test pass, metrics, checkpoints, Visdom),
                   run_training
    other modes    run_eval (--eval-only, ensembles), run_visualize (--visualize), run_predict
                   (--predict), export_weights (--export-weights)
    command line   the configuration (constants < data set < checkpoint < preset < flags), main()
capsnet/: data.py (readers, batches, shifts, MultiMNIST), fast.py (the CPU's faster PrimaryCaps
convolution, the compile choice, the whole compiled step), meters.py, figures.py (also --predict's
output), visdom_plots.py, runtime.py (devices, RNG, checkpoints, torchrun), cli.py (flags from the
constants), efficient.py (Efficient-CapsNet).
The speed benchmark is bench.py, beside this file. Measured results and the commands behind them
are in README.md; the lab notes in results/README.md.
"""

import contextlib
import copy
import functools
import json
import os
import signal
import sys
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

# support code (capsnet/); multimnist_pairs and two_digit_scores are imported for users' scripts
from capsnet.baseline import BaselineLoss, baseline_line, build_baseline
from capsnet.cli import OneLineParser, add_constant_flags, constants_table, validate_config
from capsnet.data import (input_size, load_data, multimnist_pairs, nominal_data_settings,  # noqa: F401
                          random_brightness_contrast, random_crop_flip, random_shift, read_images_as_data,
                          smallest_input, standardize, to_float_images)
from capsnet.decoders import DeconvDecoder
from capsnet.efficient import EfficientBody, efficient_augment
from capsnet.fast import CompileChoice, CompiledOrEager, WholeStep, conv1_primary_cpu
from capsnet.figures import epoch_views, write_figures, write_predictions
from capsnet.meters import (PassStats, matched_predictions, meter_values, pass_meters, print_evaluation,  # noqa: F401
                            two_digit_scores)
from capsnet.runtime import (Distributed, NonFiniteLoss, Preempted, UsageError, amp_choice, amp_dtype,
                             atomic_torch_save, autocast, fresh_run_dir, how_it_ended, load_checkpoint, load_weights,
                             model_to_device, resume_into, rng_state, set_rng_state, setup_process,
                             stop_signals, sync, truncate_metrics, tune_cpu_malloc)
from capsnet.visdom_plots import VisdomPlots

# ---- constants (each one is also a command-line flag: FOO_BAR -> --foo-bar) ----
# data
DATASET: str = "mnist"  # mnist, fashion-mnist, kmnist, emnist-balanced, emnist-letters, cifar10, svhn, smallnorb, folder, multimnist, expanded-mnist, affnist
DATA_DIR: str = "data"  # where the data set's files are, in torchvision's layouts: DATA_DIR/MNIST/raw, ... (README)
TRAIN_SIZE: int = 0  # use the first N training images; 0 = all 60,000
TEST_SIZE: int = 0  # use the first N test images; 0 = all 10,000
IMAGE_SIZE: int = 0  # images resized to IMAGE_SIZE x IMAGE_SIZE before any crop; 0 = as stored (folder: 28)
IMAGE_CHANNELS: int = 0  # folder: 1 or 3; 0 = the data set's (folder: 3 if any training image has colour, else 1)
CROP_SIZE: int = 0  # random CROP_SIZE crops of training images, the central one at test; 0 = none (cifar10: 24)
FLIP: bool = False  # random left-right flips of training images (cifar10)
DISTORT: bool = False  # random brightness (+-63/255) and contrast (x0.2..1.8) per training image, after the crop (cifar10: the authors' code)
STANDARDIZE: bool = False  # the network sees each image minus its mean, over its standard deviation; the decoder still draws [0, 1] pixels (cifar10: the authors' code)
MAX_SHIFT: int = 2  # random shift of up to this many pixels per image, training only (paper, sec. 5; not multimnist)
MULTIMNIST_SHIFT: int = 4  # multimnist: each digit of a pair shifted by up to this many pixels in the 36x36 image
AUGMENT: str = "none"  # more training augmentation, per image on the device: none, or efficient (Efficient-CapsNet's rotation, shift, squish, erase)
MULTIMNIST_TEST_PAIRS: int = 1  # multimnist: fixed test images per MNIST test digit (the paper made 1,000)
# model, as in the paper (sec. 4, Fig. 1 and 2)
MODEL: str = "capsnet"  # capsnet: the paper's; efficient-capsnet: Mazzia et al. 2021, self-attention routing (capsnet/efficient.py); baseline-cnn: the paper's CNN baselines (capsnet/baseline.py)
CONV1_CHANNELS: int = 256  # Conv1 filters, 9x9, stride 1 (paper, sec. 4)
PRIMARY_CAPS: int = 32  # primary capsule types (channels of 8-D capsules) on the 6x6 grid
PRIMARY_DIM: int = 8  # dimension of a primary capsule
DIGIT_DIM: int = 16  # dimension of a digit capsule
NUM_CLASSES: int = 0  # digit capsules, one per class; 0 = as many as the data set has (MNIST: 10)
KERNEL_SIZE: int = 9  # kernel of Conv1 and PrimaryCaps
ROUTING_ITERATIONS: int = 3  # routing-by-agreement iterations (paper: 3, sec. 4 and Procedure 1)
ROUTING_IMPL: str = "factored"  # factored: capsule_layer, the same routing computed faster; reference: dynamic_routing as written (slower)
ROUTING_LEAKY: bool = False  # an extra "none-of-the-above" parent with logit 0 in each child's softmax (CIFAR10, sec. 7)
W_INIT_STD: float = 0.01  # standard deviation of the normal initialisation of the W_ij matrices (INIT torch)
BASELINE_LAYERS: str = "auto"  # baseline-cnn: sec5 (the paper's MNIST baseline), conv-model (the authors' conv_model.py, max-pooled), auto (conv-model for multimnist, expanded-mnist, affnist; else sec5)
BASELINE_DROPOUT: float = 0.5  # baseline-cnn: dropout before the class layer (the paper names no rate)
# where the authors' released code (Sarasra/models, research/capsules) differs from the paper's text;
# off by default, all on with --preset authors (README: "The authors' code")
INIT: str = "torch"  # torch: PyTorch's layer defaults, W_ij ~ N(0, W_INIT_STD); authors: truncated normals (Conv1 0.05, the rest 0.1), biases 0.1
PRIMARY_SCALE: float = 1.0  # PrimaryCaps pre-activation = this x convolution + bias; authors: 0.03125 (one routing pass over 32 types, zero logits)
DIGIT_CAPS_BIAS: bool = False  # a learned bias (J, E), starting at 0.1, added to s_j before the squash (authors' code; not in the paper)
DECODER: str = "fc"  # fc: the paper's 512-1024 fully connected decoder (Fig. 2); deconv: ethanleet/CapsNet's transposed convolutions
CONV1_LEAKY: float = 0.0  # slope of a leaky ReLU on Conv1 (0: the paper's ReLU; soskek's port: 0.05)
DECODER_HIDDEN1: int = 512  # first decoder layer width (Fig. 2)
DECODER_HIDDEN2: int = 1024  # second decoder layer width (Fig. 2)
RECON_DETACH: bool = False  # the decoder learns from detached capsules: its loss trains it, not the capsules (cifar10: the authors' code trains no decoder)
# loss, as in the paper (eq. 4, sec. 4.1)
M_PLUS: float = 0.9  # margin loss m+ (eq. 4)
M_MINUS: float = 0.1  # margin loss m- (eq. 4)
LAMBDA_ABSENT: float = 0.5  # margin loss weight lambda for absent classes (eq. 4)
RECON_WEIGHT: float = 0.0005  # reconstruction loss = this x sum of squared pixel errors (sec. 4.1)
MARGIN_REDUCTION: str = "sum"  # sum: eq. 4 summed over the classes; half-mean: the authors' code, 0.5 x the mean over the classes
# training
PRESET: str = ""  # named recipes from PRESETS below, comma-separated (e.g. mnist-2h,authors); their values, then the explicit flags
RUN_DIR: str = "runs/capsnet"  # metrics.jsonl, last.pt, best.pt, eval.json and PNG figures go here
DEVICE: str = "auto"  # auto (CUDA, then MPS, then CPU), cpu, cuda or mps
SEED: int = 0  # seeds torch's generators; all randomness comes from torch
EPOCHS: int = 50  # total training epochs (a resumed run continues up to this number)
BATCH_SIZE: int = 100  # training batch size (the paper does not give one; 100 is the common choice)
EVAL_BATCH_SIZE: int = 100  # test batch size (on the 2-core CPU, 100 evaluated faster than 250 or 500)
LR: float = 1e-3  # Adam learning rate (paper: TensorFlow's Adam defaults)
LR_DECAY: float = 0.96  # exponential decay of the learning rate per epoch (see lr_decay_note below)
LR_MIN: float = 0.0  # the learning rate decays no lower than this (Efficient-CapsNet's code: 5e-5)
# speed: the same mathematics, computed faster (results/README.md)
AMP: bool = True  # bf16 autocast for the convolutions and decoder where the device supports bf16
COMPILE: str = "auto"  # torch.compile the capsule part: auto (keep what trains faster here), on, off; step: the whole step
CHANNELS_LAST: bool = False  # channels_last memory format for the convolutions (slower on the CPU: results/README.md)
CPU_MALLOC_TUNING: bool = True  # keep glibc from returning big activations to the OS each step (CPU)
CPU_DFT_CONV: bool = True  # CPU: PrimaryCaps convolution through small DFTs (same math, ~3x fewer FLOPs)
CPU_GEMM_WEIGHT_GRAD: bool = True  # CPU, CPU_DFT_CONV off: PrimaryCaps weight gradient as one im2col GEMM
ROUTING_BF16: bool = False  # DigitCaps' three matrix products in bf16 (softmax, squash, sums stay fp32): faster, not fp32, so off
# logging: terminal, Visdom, figures
PROGRESS_EVERY: int = 25  # every N batches: running loss/accuracy in the tqdm bar, a point in Visdom's live windows
RECON_IMAGES: int = 16  # test images shown next to their reconstructions in Visdom
VISUALIZE_EVERY_EPOCH: bool = True  # capsule visualisations (Fig. 4, class masks, couplings) in Visdom
VISDOM: bool = True  # log to a Visdom server (training goes on without one)
VISDOM_SERVER: str = "localhost"  # Visdom host name (torchnet adds http://)
VISDOM_PORT: int = 8097  # Visdom port
VISDOM_ENV: str = "capsnet"  # Visdom environment the plots go to
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
    # A complete, annealed CIFAR-10 run that ends in about 3 hours on a 2-core CPU in fp32: a batch
    # of 128 (the authors' code) took 0.85 s there, about 6 minutes an epoch with the test pass;
    # x0.9 per epoch ends the 30th at 4.7% of LR. Use with the data set's settings (--dataset cifar10).
    "cifar10-3h": {"EPOCHS": 30, "LR_DECAY": 0.9, "BATCH_SIZE": 128},
    # Efficient-CapsNet's MNIST recipe (EscVM/Efficient-CapsNet config.json, utils/tools.py): Adam at
    # 5e-4, x0.97 per epoch down to 5e-5, batch 16, 150 epochs, their augmentation instead of the shift
    "efficient-capsnet": {"MODEL": "efficient-capsnet", "AUGMENT": "efficient", "MAX_SHIFT": 0, "LR": 5e-4,
                          "LR_DECAY": 0.97, "LR_MIN": 5e-5, "BATCH_SIZE": 16, "EPOCHS": 150},
}


# What each data set is, and the paper's settings for it: they replace the constants above when
# that data set is chosen (printed at start; a flag given explicitly still wins). `reader` says
# how its files are read (load_split), `objects` how many objects an image holds, `shape` its
# (channels, image size, classes) as stored, for synthetic data (bench.py; folder: a typical one).
DATASETS = {
    "mnist": {"shape": (1, 28, 10), "reader": "MNIST", "objects": 1, "settings": {}},
    "fashion-mnist": {"shape": (1, 28, 10), "reader": "FashionMNIST", "objects": 1, "settings": {}},
    "kmnist": {"shape": (1, 28, 10), "reader": "KMNIST", "objects": 1, "settings": {}},
    # torchvision's EMNIST images stand transposed (load_split turns them upright); the letters'
    # labels start at 1 (load_split makes them 0..25)
    "emnist-balanced": {"shape": (1, 28, 47), "reader": "EMNIST", "split": "balanced", "objects": 1, "settings": {}},
    "emnist-letters": {"shape": (1, 28, 26), "reader": "EMNIST", "split": "letters", "objects": 1, "settings": {}},
    # sec. 7: three colour channels, 64 primary capsule types, 24x24 patches (random crops in training,
    # the central one at test) and a "none-of-the-above" routing option. The rest as the authors'
    # code (input_data/cifar10/cifar10_input.py, README): flips, brightness and contrast, per-image
    # standardisation, and no decoder shaping the capsules (here it learns beside them, for the
    # figures). Their SAME padding (a 12x12 grid) is not taken: docs/datasets.md says why.
    "cifar10": {"shape": (3, 32, 10), "reader": "cifar10", "objects": 1,
                "settings": {"PRIMARY_CAPS": 64, "CROP_SIZE": 24, "FLIP": True, "DISTORT": True, "STANDARDIZE": True,
                             "RECON_DETACH": True, "ROUTING_LEAKY": True, "MAX_SHIFT": 0}},
    # sec. 7: the smaller network the paper trained on SVHN (64 Conv1 channels, 16 primary capsule
    # types of 6 dimensions, 8-dimensional class capsules); 32x32 colour images
    "svhn": {"shape": (3, 32, 10), "reader": "svhn", "objects": 1, "settings": {"CONV1_CHANNELS": 64, "PRIMARY_CAPS": 16, "PRIMARY_DIM": 6,
                                                         "DIGIT_DIM": 8}},
    # sec. 7: 5 classes, the stereo pair as two channels, 96x96 downsampled to 48x48, random 32x32
    # crops in training, the central crop at test (see the README for what is not done here)
    "smallnorb": {"shape": (2, 96, 5), "reader": "smallnorb", "objects": 1, "settings": {"IMAGE_SIZE": 48, "CROP_SIZE": 32,
                                                                   "MAX_SHIFT": 0}},
    "folder": {"shape": (3, 28, 10), "reader": "folder", "objects": 1, "settings": {"IMAGE_SIZE": 28}},
    # MultiMNIST (sec. 6): 36x36 images of two digits, so Conv1 is 28x28 and PrimaryCaps a 10x10 grid
    # of 3,200 capsules. The paper decays the learning rate with a 10x longer period because its
    # set is larger: here an epoch is one pair per MNIST training digit, so 0.96 per epoch becomes
    # 0.96 ** 0.1 = 0.996 per epoch. No extra shift: the pairs' own shifts are the augmentation.
    "multimnist": {"shape": (1, 36, 10), "reader": "MNIST", "objects": 2, "settings": {"LR_DECAY": 0.996, "MAX_SHIFT": 0}},
    # sec. 5.2 (capsnet/affnist.py): MNIST digits at a new random place on a 40x40 canvas every epoch; tested on
    # the same at fixed places, or on affNIST (its files in DATA_DIR/affNIST, else a generated affNIST-like set)
    "expanded-mnist": {"shape": (1, 40, 10), "reader": "MNIST", "canvas": 40, "objects": 1, "settings": {"MAX_SHIFT": 0}},
    "affnist": {"shape": (1, 40, 10), "reader": "MNIST", "canvas": 40, "objects": 1, "settings": {"MAX_SHIFT": 0}},
}

# lr_decay_note: the paper says only "exponentially decaying learning rate"; the authors' code
# takes x0.96 every 2000 steps (about x0.988 per epoch at batch 100), which barely anneals 50
# epochs; x0.96 per epoch ends them at 13% of LR, stable enough to report the final epoch.


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
    ROUTING_IMPL = "reference" trains with this function (through routing_as_written); the default
    runs the same computation factored (capsule_layer), tested equal to it.
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


def routing_as_written(W, u, iterations, record, leaky=False, bias=None):
    """DigitCaps through dynamic_routing: u_hat_j|i = W_ij u_i for every pair, then Procedure 1.
    W (J, I, E, D), u (B, I, D) -> v (B, J, E), c (B, I, J), the logit changes (iterations,) or None:
    the signature and the results of capsule_layer. Edit dynamic_routing and train it with
    --routing-impl reference."""
    u_hat = torch.einsum("jied,bid->bije", W, u)  # (B, I, J, E)
    changes = [] if record else None
    v, c = dynamic_routing(u_hat, iterations, changes, leaky, bias)
    return v, c, (torch.stack(changes) if record else None)


def capsule_layer(W, u, iterations, record, children_last=False, leaky=False, bias=None, product_dtype=None):
    """DigitCaps with routing: W (J, I, E, D), primary capsules u (B, I, D) -> v (B, J, E),
    c (B, I, J) and, if `record`, the mean |change of b_ij| per iteration (iterations,), else None.
    `bias` (J, E) is added to s_j before the squash, as in dynamic_routing. `product_dtype`
    (ROUTING_BF16: torch.bfloat16) is what the three matrix products read; their results, and
    everything else, stay in W's dtype.

    The same computation as dynamic_routing(u_hat) with u_hat_j|i = W_ij u_i (tests check this),
    factored so that u_hat, 1152 x 10 x 16 numbers per image, is never built:
      s_j = sum_i c_ij W_ij u_i            = one GEMM per class over k, K = I * D = 9216
      u_hat_j|i . v_j = u_i . (W_ij^T v_j) = one GEMM per class, then a dot over d.
    In the first iteration c_ij = 1/J for all i, j (1/(J+1) with `leaky`, see parent_softmax), so s
    is a single GEMM of u with all of W.

    `children_last` orders k as (d, i) instead of (i, d), so that the element-wise work runs along
    the 1152 children rather than the 8 capsule dimensions: the layout the compiled version uses
    (inductor's loops then fill whole vector registers; results/README.md), while eager
    broadcasting is faster with (i, d)."""
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
    low = product_dtype or W.dtype
    Wl, ul = Wk.to(low), uk.to(low)  # the products' inputs (the same tensors without product_dtype)
    changes = []
    b = None  # routing logits, (J, B, I); b_ij = 0 before the first iteration
    for r in range(iterations):
        if b is None:
            parents = J + 1 if leaky else J  # softmax of zeros over the parents
            c = u.new_full((J, B, I), 1.0 / parents)
            s = (ul.reshape(B, I * D) @ Wl.reshape(J * E, I * D).t()).to(W.dtype).reshape(B, J, E).transpose(0, 1) / parents
        else:
            c = parent_softmax(b, 0, leaky)  # (J, B, I), softmax over parents j
            x = (c.to(low).unsqueeze(dim_d) * ul).reshape(J, B, I * D)  # (J, B, K): c_ij u_i
            s = torch.bmm(x, Wl.transpose(1, 2)).to(W.dtype)  # (J, B, E) = sum_i c_ij W_ij u_i
        if bias is not None:
            s = s + bias.unsqueeze(1)  # (J, B, E)
        v = squash(s)  # (J, B, E)
        if r < iterations - 1 or record:
            wv = torch.bmm(v.to(low), Wl).to(W.dtype).reshape(J, *uk.shape[1:])  # W_ij^T v_j
            agreement = (wv * uk).sum(dim_d)  # (J, B, I) = u_hat_j|i . v_j
            if record:
                changes.append(agreement.detach().abs().mean())
            b = agreement if b is None else b + agreement
    return v.transpose(0, 1), c.permute(1, 2, 0), (torch.stack(changes) if record else None)


def make_decoder(kind, inputs, hidden, channels, size):
    """The masked capsules (B, inputs) -> pixels: Fig. 2's fully connected decoder (fc), or
    ethanleet/CapsNet's transposed convolutions (deconv, capsnet/decoders.py)."""
    if kind == "deconv":
        return DeconvDecoder(inputs, channels, size)
    return nn.Sequential(nn.Linear(inputs, hidden[0]), nn.ReLU(inplace=True), nn.Linear(hidden[0], hidden[1]),
                         nn.ReLU(inplace=True), nn.Linear(hidden[1], channels * size * size), nn.Sigmoid())


class CapsuleNet(nn.Module):
    """Conv1 -> PrimaryCaps -> DigitCaps (routing) -> lengths, plus the masked decoder (Fig. 1, 2)."""
    standardize = False  # STANDARDIZE: per-image standardisation of the input (set by build_model)
    recon_detach = False  # RECON_DETACH: the decoder reads detached capsules (set by build_model)

    def __init__(self, conv1_channels=CONV1_CHANNELS, primary_caps=PRIMARY_CAPS, primary_dim=PRIMARY_DIM,
                 digit_dim=DIGIT_DIM, num_classes=10, kernel_size=KERNEL_SIZE,
                 routing_iterations=ROUTING_ITERATIONS, w_init_std=W_INIT_STD, routing_leaky=False,
                 decoder_hidden=(DECODER_HIDDEN1, DECODER_HIDDEN2), image_size=28,
                 dft_conv=CPU_DFT_CONV, gemm_weight_grad=CPU_GEMM_WEIGHT_GRAD, cpu_malloc_tuning=CPU_MALLOC_TUNING,
                 in_channels=1, init=INIT, primary_scale=PRIMARY_SCALE, digit_caps_bias=DIGIT_CAPS_BIAS,
                 routing_impl=ROUTING_IMPL, decoder=DECODER, conv1_leaky=CONV1_LEAKY, routing_bf16=ROUTING_BF16):
        super().__init__()
        if routing_bf16 and routing_impl != "factored":
            raise ValueError("ROUTING_BF16 is an option of the factored capsule layer (ROUTING_IMPL factored)")
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
        self.decoder = make_decoder(decoder, digit_dim * num_classes, decoder_hidden, in_channels, image_size)
        self.conv1_leaky = conv1_leaky
        self.primary_scale = primary_scale
        # the authors' code adds a bias to s_j, starting at 0.1 (its bias_variable)
        self.digit_bias = nn.Parameter(torch.full((num_classes, digit_dim), 0.1)) if digit_caps_bias else None
        if init == "authors":
            self.init_as_authors()
        self.record_routing = False  # when True, capsules() appends Appendix A's logit changes
        self.logit_changes = []
        # the routing that runs: the factored capsule_layer (products in bf16 with routing_bf16), or
        # Procedure 1 as written
        self.factored, self.routing_bf16 = routing_impl == "factored", routing_bf16
        self.routing = capsule_layer if self.factored else routing_as_written
        if routing_bf16:
            self.routing = functools.partial(capsule_layer, product_dtype=torch.bfloat16)
        self.capsule_layer = self.routing  # replaced by a compiled version by use_compile()
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
        layers = [m for m in self.decoder.modules() if isinstance(m, (nn.Linear, nn.ConvTranspose2d))]
        for layer in layers:
            truncated(layer.weight, 0.1)
        for bias in (self.conv1.bias, self.primary.bias, *(m.bias for m in layers)):
            bias.fill_(0.1)

    def conv1_activation(self, x):
        """ReLU after Conv1 (the paper), or a leaky ReLU with slope CONV1_LEAKY."""
        return F.leaky_relu(x, self.conv1_leaky, inplace=True) if self.conv1_leaky else F.relu(x, inplace=True)

    def primary_weight(self):
        """The PrimaryCaps kernel as it acts: x PRIMARY_SCALE (1/32 in the authors' code), the bias apart."""
        w = self.primary.weight
        return w if self.primary_scale == 1 else w * self.primary_scale

    def use_compile(self, compiled=True):
        """torch.compile the capsule part only: it fuses the memory-bound routing ops, while the
        convolutions stay on the vendor kernels (compiling them made CPU training slower).
        use_compile(False) switches back to the eager capsule layer (the compiled one is kept)."""
        if compiled and self.compiled is None:
            # the factored layer in its layout for compiled code (see capsule_layer)
            self.compiled = CompiledOrEager(functools.partial(self.routing, children_last=True) if self.factored
                                            else self.routing)
        self.capsule_layer = self.compiled if compiled else self.routing

    def primary_capsules(self, images):
        """images (B, C, H, W) -> squashed primary capsules (B, I, D) (MNIST: I = 1152, D = 8)."""
        x = conv1_primary_cpu(self, images) if images.device.type == "cpu" else None  # faster, same values
        if x is None:
            x = self.conv1_activation(self.conv1(images))  # (B, 256, 20, 20)
            x = F.conv2d(x, self.primary_weight(), self.primary.bias, self.primary.stride)  # (B, 32*8, 6, 6)
        B = x.shape[0]
        # Each capsule is the 8 channels of one type at one pixel, never neighbouring pixels.
        x = x.reshape(B, self.primary_caps, self.primary_dim, self.grid, self.grid)  # (B, T, D, 6, 6)
        u = x.permute(0, 1, 3, 4, 2).reshape(B, self.num_primary, self.primary_dim)  # (B, I, D)
        return squash(u.float())

    def capsules(self, images):
        """images (B, 1, H, W) -> digit capsules v (B, J, E) and couplings c (B, I, J), in fp32."""
        if self.cpu_malloc_tuning and images.device.type == "cpu":
            tune_cpu_malloc()  # once per process (see tune_cpu_malloc)
        if self.standardize:  # STANDARDIZE (cifar10): what the network sees; the decoder's target stays
            images = standardize(images)
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

    def forward(self, images, labels=None, objects=1):
        """images (B, 1, 28, 28) in [0, 1] -> (lengths (B, J), reconstructions (B, 1, 28, 28)).

        The decoder sees the capsule of `labels` when given (training), else the longest one.
        Images of several digits (MultiMNIST, sec. 6): `labels` (B, K), one class per digit, or
        without labels the `objects` longest capsules; the decoder then runs once per digit, masked
        by that digit's capsule alone, and the reconstructions are (B, K, 1, H, W)."""
        v, _ = self.capsules(images)
        lengths = torch.sqrt((v * v).sum(-1) + 1e-12)  # (B, J): class scores, no softmax
        if labels is not None:
            classes = labels
        else:
            classes = lengths.argmax(dim=1) if objects == 1 else lengths.topk(objects, dim=1).indices
        if self.recon_detach:  # RECON_DETACH: the reconstruction loss reaches the decoder only
            v = v.detach()
        if classes.dim() == 1:
            return lengths, self.decode(v, classes)
        return lengths, torch.stack([self.decode(v, classes[:, k]) for k in range(classes.shape[1])], 1)


class EfficientCapsNet(EfficientBody):
    """Efficient-CapsNet (capsnet/efficient.py) with CapsuleNet's class scores (lengths) and masked decoder."""
    forward, decode = CapsuleNet.forward, CapsuleNet.decode
    standardize = recon_detach = False

    def capsules(self, images):
        return super().capsules(standardize(images) if self.standardize else images)


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


def build_model(cfg):
    """CapsuleNet from the constants and what the data decided (load_data: classes, channels, size);
    where nothing is decided yet (the constants alone), the data set's usual shape (MNIST's)."""
    if not cfg["IMAGE_SIZE"] or not cfg["IMAGE_CHANNELS"] or not cfg["NUM_CLASSES"]:
        cfg = nominal_data_settings(dict(cfg), DATASETS[cfg["DATASET"]])
    if cfg["MODEL"] == "baseline-cnn":  # capsnet/baseline.py
        model = build_baseline(cfg, DATASETS[cfg["DATASET"]])
    elif cfg["MODEL"] == "efficient-capsnet":
        size, channels, classes = input_size(cfg), cfg["IMAGE_CHANNELS"], cfg["NUM_CLASSES"]
        decoder = make_decoder(cfg["DECODER"], cfg["DIGIT_DIM"] * classes, (cfg["DECODER_HIDDEN1"], cfg["DECODER_HIDDEN2"]),
                               channels, size)
        model = EfficientCapsNet(decoder, classes, size, channels, cfg["DIGIT_DIM"])
    else:
        model = CapsuleNet(cfg["CONV1_CHANNELS"], cfg["PRIMARY_CAPS"], cfg["PRIMARY_DIM"], cfg["DIGIT_DIM"],
                          cfg["NUM_CLASSES"], cfg["KERNEL_SIZE"], cfg["ROUTING_ITERATIONS"], cfg["W_INIT_STD"],
                          cfg["ROUTING_LEAKY"], (cfg["DECODER_HIDDEN1"], cfg["DECODER_HIDDEN2"]),
                          image_size=input_size(cfg), in_channels=cfg["IMAGE_CHANNELS"],
                          dft_conv=cfg["CPU_DFT_CONV"], gemm_weight_grad=cfg["CPU_GEMM_WEIGHT_GRAD"],
                          cpu_malloc_tuning=cfg["CPU_MALLOC_TUNING"], init=cfg["INIT"],
                          primary_scale=cfg["PRIMARY_SCALE"], digit_caps_bias=cfg["DIGIT_CAPS_BIAS"],
                          routing_impl=cfg["ROUTING_IMPL"], decoder=cfg["DECODER"], conv1_leaky=cfg["CONV1_LEAKY"],
                          routing_bf16=cfg["ROUTING_BF16"])
    model.standardize, model.recon_detach = cfg["STANDARDIZE"], cfg["RECON_DETACH"]
    return model


def build_optimizer(model, cfg):
    """Adam (TensorFlow's defaults but the learning rate, as in the paper), as one fused kernel
    where this torch has it: the same update, about 3x faster than the per-parameter loop on the CPU."""
    try:
        return torch.optim.Adam(model.parameters(), lr=cfg["LR"], fused=True)
    except (RuntimeError, TypeError, ValueError):  # older torch, or a device without the kernel
        return torch.optim.Adam(model.parameters(), lr=cfg["LR"])


def build_loss(cfg):
    if cfg["MODEL"] == "baseline-cnn":
        return BaselineLoss()
    return CapsuleLoss(cfg["M_PLUS"], cfg["M_MINUS"], cfg["LAMBDA_ABSENT"], cfg["RECON_WEIGHT"],
                       cfg["MARGIN_REDUCTION"])


# ---- the start-up lines ----
def authors_choices(cfg):
    """Which of the authors' code's departures from the paper's text are on (PRESETS["authors"])."""
    on = {"INIT": cfg["INIT"] == "authors", "PRIMARY_SCALE": cfg["PRIMARY_SCALE"] != 1,
          "DIGIT_CAPS_BIAS": cfg["DIGIT_CAPS_BIAS"], "MARGIN_REDUCTION": cfg["MARGIN_REDUCTION"] != "sum"}
    return [f"{k}={cfg[k]}" for k, v in on.items() if v]


def model_line(model, device, amp, data, cfg=None):
    """The start-up line: the model, the device, the arithmetic and why (amp_choice's text), the data,
    and the authors' choices that are on."""
    if not hasattr(model, "capsules"):  # the CNN baselines
        return baseline_line(model, device, amp, data)
    choices = authors_choices(cfg) if cfg is not None else []
    name = "Efficient-CapsNet" if isinstance(model, EfficientBody) else "CapsNet"
    if getattr(model, "routing_bf16", False):
        amp += "; routing products in bf16 (ROUTING_BF16)"
    return (f"{name}: {sum(p.numel() for p in model.parameters()):,} parameters on {device} "
            f"({amp}); {data.name}: {data.describe()}, "
            f"{data.channels}x{data.image_size}x{data.image_size} input, {model.grid}x{model.grid} grid of "
            f"{model.num_primary:,} primary capsules, {model.num_classes} classes"
            + (f"; the authors' code's {', '.join(choices)}" if choices else ""))


# ---- one step: a batch -> its loss and class scores (what torchnet's Engine calls) ----
class BatchLoss:
    """The network callable torchnet's Engine calls: sample -> (loss, lengths).

    A sample is (images uint8 (B, H, W), labels (B,)), or for MultiMNIST (composites, pair labels
    (B, 2), parts uint8 (B, 2, H, W)): then the decoder runs once per digit, masked by that digit's
    capsule (in training the labels', at test the two longest, matched to the labels by
    matched_predictions), and each reconstruction is compared with its own digit's image.
    Training images get their per-image random shift (and AUGMENT) here, on the device; test images never do.

    Under torchrun (`dist` enabled, `ddp` the DistributedDataParallel wrapper of `model`) a
    training sample is the global batch: its shifts are drawn for the whole batch, as one process
    draws them, and this process then computes its own share of the rows. The loss it
    back-propagates is scaled by share x world size / batch, so that DDP's mean of the gradients
    is the gradient of the global batch's mean loss, also when the shares differ (the last batch).
    `last` holds (this process's mean loss, its labels) of the latest call, for the meters."""

    def __init__(self, model, loss_fn, device, dtype, max_shift, channels_last, dist=None, ddp=None, crop=0,
                 flip=False, augment="none", distort=False):
        self.model, self.loss_fn = model, loss_fn
        self.device, self.dtype = device, dtype
        self.max_shift, self.channels_last = max_shift, channels_last
        self.dist, self.ddp = dist, ddp
        self.crop, self.flip = crop, flip  # CIFAR10 and smallNORB: random crops (and flips) in training
        self.augment = augment  # AUGMENT: "efficient" adds Efficient-CapsNet's augmentation in training
        self.distort = distort  # DISTORT (cifar10): the authors' random brightness and contrast in training
        self.last, self.whole, self.whole_step = None, False, None

    def __call__(self, sample):
        training = self.model.training  # the mode is the model's: model.train() / model.eval()
        images = to_float_images(sample[0], 0 if training else self.crop)
        if training:
            images = random_shift(images, self.max_shift)
            if self.augment == "efficient":
                images = efficient_augment(images)
            if self.crop or self.flip:
                images = random_crop_flip(images, self.crop or images.shape[-1], self.flip)
            if self.distort:
                images = random_brightness_contrast(images)
        batch = len(images)
        share = slice(None)
        if training and self.ddp is not None:
            share = self.dist.own_rows(batch)
        images, labels, *parts = images[share], sample[1][share], *(p[share] for p in sample[2:])
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        whole = training and self.whole
        loss, lengths = (self.whole_step if whole else self.forward_loss)(images, labels, *parts)
        self.last = (loss.detach().clone() if whole else loss.detach(), labels)
        if training and self.ddp is not None:
            loss = loss * (len(labels) * self.dist.world / batch)
        return loss, lengths.detach()

    def forward_loss(self, images, labels, *parts):
        """The forward pass and loss of one batch -> (loss, lengths): what COMPILE = "step" compiles."""
        training = self.model.training
        forward = self.ddp if training and self.ddp is not None else self.model
        with autocast(self.device, self.dtype):
            if not parts:
                lengths, recon = forward(images, labels if training else None)
            else:
                lengths, recon = forward(images, labels if training else None, objects=labels.shape[1])
        if not parts:
            return self.loss_fn(images, labels, lengths, recon), lengths
        if not training and recon is not None:  # the reconstruction matched to label k compared with part k
            _, swapped = matched_predictions(lengths.detach(), labels)
            recon = torch.where(swapped[:, None, None, None, None], recon.flip(1), recon)
        present = F.one_hot(labels, lengths.shape[1]).sum(1)  # (B, J): both classes present
        targets = parts[0].unsqueeze(2).float().div_(255.0)  # (B, 2, 1, H, W)
        return self.loss_fn(targets, present, lengths, recon), lengths

    def use_whole_step(self, on=True):
        """COMPILE = "step": training batches through WholeStep (capsnet/fast.py), made at the first use."""
        if on and self.whole_step is None:
            graphs = self.device.type == "cuda" and self.ddp is None
            self.whole_step = WholeStep(self.model, self.forward_loss, graphs)
        self.whole = on


# ---- the epoch loop: torchnet's Engine and its hooks, checkpoints every epoch, resume ----
class Trainer:
    """torchnet Engine with named hooks: a train pass per epoch, then a test pass, logs, checkpoint."""

    def __init__(self, cfg, device, model, optimizer, scheduler, data, start_epoch=0, best_accuracy=None,
                 compile_state=None, dist=None, partial=None):
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
        self.network = BatchLoss(model, build_loss(cfg), device, self.dtype, cfg["MAX_SHIFT"], cfg["CHANNELS_LAST"],
                               dist, ddp, cfg["CROP_SIZE"], cfg["FLIP"], cfg["AUGMENT"],
                               cfg["DISTORT"])
        self.data, self.train_batches = data, data.train
        self.test_batches = data.test.shard(dist.rank, dist.world)  # each process tests its part
        self.start_epoch, self.best_accuracy = start_epoch, best_accuracy
        self.saved_epoch = start_epoch  # the epoch last.pt holds
        self.meters = {mode: pass_meters(cfg["NUM_CLASSES"], data.objects) for mode in ("train", "test")}
        self.stats = PassStats(device)
        compile_setting = cfg["COMPILE"] if hasattr(model, "capsules") else False  # a CNN baseline runs eagerly
        self.compile_choice = CompileChoice(model, device, compile_setting, compile_state, dist, self.network)
        self.visdom = VisdomPlots(cfg if dist.main else dict(cfg, VISDOM=False), data.objects)
        self.run_dir = cfg["RUN_DIR"]
        self.engine = Engine()
        self.engine.hooks.update(on_start=self.on_start, on_start_epoch=self.on_start_epoch,
                                 on_sample=self.on_sample, on_forward=self.on_forward,
                                 on_update=self.on_update, on_end_epoch=self.on_end_epoch)
        self.epoch_started = 0.0
        self.partial = partial  # a mid-epoch checkpoint's position: where the first epoch goes on
        self.stop = []  # the stop signals caught (stop_signals)

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
        seconds = 0.0
        if self.partial is None:
            self.plan = self.train_batches.plan()  # this epoch's order (and pairs) of the data
        else:  # the epoch a mid-epoch checkpoint stopped in goes on where it was, drawing nothing new
            part, self.partial = self.partial, None
            self.plan = part["plan"] and {k: v.to(self.device) for k, v in part["plan"].items()}
            stats = part["stats"]
            self.stats.restore([stats[self.dist.rank]] if len(stats) == self.dist.world else
                               stats if self.dist.main else [])
            self.model.logit_changes = [c.to(self.device) for c in part["logit_changes"]]
            self.batch_in_pass, self.last_totals, seconds = part["batch"], part["last_totals"], part["seconds"]
        self.epoch_started = time.perf_counter() - seconds
        desc = f"epoch {state['epoch'] + 1}/{state['maxepoch']} train"
        batches = self.train_batches.batches(self.plan, self.batch_in_pass)
        state["iterator"] = self.progress(batches, desc, self.batch_in_pass, len(self.train_batches))

    def on_sample(self, state):
        if state["train"]:
            self.compile_choice.before_step()

    def on_forward(self, state):
        loss, labels = self.network.last  # this process's share of the batch
        self.stats.add(loss, state["output"], labels)
        self.show_progress(state["epoch"] if state["train"] else None)

    def on_update(self, state):
        self.compile_choice.after_step()
        every = 1 if not self.dist.enabled else self.cfg["PROGRESS_EVERY"]  # a collective under torchrun
        if self.batch_in_pass % every == 0 and self.dist.any(self.stop, self.device):
            self.stop_here(state)

    def on_end_epoch(self, state):
        bad = self.stats.totals()[3]  # the epoch's last batches, since the last progress update
        if bad >= 0:
            self.diverged(state["epoch"], bad + 1)
        if not torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all():
            self.diverged(state["epoch"], None)  # a non-finite gradient in the last step
        train_seconds = time.perf_counter() - self.epoch_started
        changes = self.routing_changes()  # none from the whole compiled step: then the test pass's
        self.finish_pass("train")
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        for group in self.optimizer.param_groups:  # LR_MIN: the decay stops there
            group["lr"] = max(group["lr"], self.cfg["LR_MIN"])
        test_seconds = self.evaluate(record_routing=not changes)
        row = self.metrics_row(state["epoch"], lr, train_seconds, test_seconds, changes or self.routing_changes())
        self.end_epoch(state, row)

    # helpers used by the hooks
    def reset_pass(self, mode):
        for m in self.meters[mode].values():
            m.reset()
        self.stats.reset()
        self.batch_in_pass = 0
        self.last_totals = (0.0, 0.0, 0)  # PassStats.totals() at the last progress update

    def progress(self, batches, desc, initial=0, total=None):
        from tqdm import tqdm

        self.bar = tqdm(batches, desc=desc, leave=False, dynamic_ncols=True, mininterval=0.5, initial=initial,
                        total=total, file=sys.stderr, unit="batch", disable=not self.dist.main)
        return self.bar

    def stop_here(self, state, between_epochs=False):
        """A stop signal arrived: write the position (mid-epoch: the epoch's plan, the batches done, the
        pass's sums so far, with weights, Adam, scheduler and RNG as after this batch) to last.pt,
        then stop with Preempted. Between epochs, last.pt already holds the completed epoch."""
        last = os.path.join(self.run_dir, "last.pt")
        name = signal.Signals(self.stop[0]).name if self.stop else "a stop signal of another process"
        where = f"after epoch {state['epoch']}"
        if not between_epochs:
            self.bar.close()
            ckpt = self.checkpoint(state["epoch"])
            stats = self.dist.gather(self.stats.snapshot())
            ckpt["partial"] = {"batch": self.batch_in_pass, "stats": stats, "last_totals": self.last_totals,
                               "plan": self.plan and {k: v.cpu() for k, v in self.plan.items()},
                               "logit_changes": [c.cpu() for c in self.model.logit_changes],
                               "seconds": time.perf_counter() - self.epoch_started}
            if self.dist.main:
                atomic_torch_save(ckpt, last)
            self.dist.barrier()
            where = f"in epoch {state['epoch'] + 1} after batch {self.batch_in_pass} of {len(self.train_batches)}"
        raise Preempted(self.stop[0] if self.stop else signal.SIGTERM,
                        f"stopped by {name} {where}: {last} holds the run up to there; continue with --resume {last}")

    def show_progress(self, epoch=None):
        """Every PROGRESS_EVERY batches (one device sync): the running loss and accuracy of the pass
        in the tqdm bar; in training also the mean of those batches alone in Visdom's live windows,
        at x = epoch + the fraction of it done."""
        self.batch_in_pass += 1
        if self.batch_in_pass % self.cfg["PROGRESS_EVERY"] == 0:
            loss_sum, correct, count, bad = self.stats.totals()
            if bad >= 0 and epoch is not None:
                self.diverged(epoch + 1, bad + 1)
            self.bar.set_postfix(loss=f"{loss_sum / count:.4f}", acc=f"{100.0 * correct / count:.2f}%",
                                 refresh=False)
            if epoch is not None:
                last_sum, last_correct, last_count = self.last_totals
                self.last_totals = loss_sum, correct, count
                fraction = self.batch_in_pass / len(self.train_batches)
                self.visdom.log_progress(epoch + fraction, (loss_sum - last_sum) / (count - last_count),
                                         100.0 * (correct - last_correct) / (count - last_count))

    def diverged(self, epoch, batch):
        """Stop the run: the loss of `batch` of `epoch` (or, batch None, the weights) was not finite.
        Nothing of this epoch is written: last.pt and best.pt keep the last finite epoch."""
        self.bar.close()  # cleared: the error is the terminal's last line
        what = f"training loss became NaN or infinite at epoch {epoch}, batch {batch}" if batch else \
            f"weights became NaN or infinite in epoch {epoch}"
        last = os.path.join(self.run_dir, "last.pt")
        kept = f"{last} keeps epoch {self.saved_epoch}" if self.saved_epoch else "no checkpoint was written"
        raise NonFiniteLoss(f"the {what} (learning rate {self.optimizer.param_groups[0]['lr']:.3g}): the run "
                            f"diverged; {kept}; lower --lr, or resume an earlier checkpoint")

    def finish_pass(self, mode):
        self.stats.gather(self.dist)
        self.stats.feed(self.meters[mode])
        self.bar.close()

    def routing_changes(self):
        """The mean routing logit change of each iteration over the steps recorded; recording stops."""
        changes, self.model.logit_changes, self.model.record_routing = self.model.logit_changes, [], False
        return torch.stack(changes).mean(0).tolist() if changes else []

    def evaluate(self, record_routing=False):
        """Test pass under model.eval() and no_grad (torchnet's Engine.test does neither)."""
        started = time.perf_counter()
        self.model.eval()
        self.model.record_routing = record_routing
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
                    "routing_logit_change": changes, "compile": self.compile_choice.choice or "trial",
                    "test_set": self.data.name})
        return row

    def end_epoch(self, state, row):
        epoch = state["epoch"]
        both = " (both digits)" if "test_accuracy_any" in row else ""
        anyone = f", at least one {row['test_accuracy_any']:.2f}%" if both else ""
        print(f"epoch {epoch}/{state['maxepoch']}  lr {row['lr']:.3g}  train loss {row['train_loss']:.4f} "
              f"acc {row['train_accuracy']:.2f}%  test loss {row['test_loss']:.4f} acc{both} "
              f"{row['test_accuracy']:.2f}%{anyone}  ({row['train_seconds']:.1f}s + {row['test_seconds']:.1f}s)"
              + ("" if self.data.name == self.cfg["DATASET"] else f"  [test set: {self.data.name}]"),
              flush=True)
        is_best = self.best_accuracy is None or row["test_accuracy"] > self.best_accuracy
        if is_best:
            self.best_accuracy = row["test_accuracy"]
        self.saved_epoch = epoch
        if self.dist.main:  # one voice: rank 0 writes and plots (every process has the same row)
            # The row first: a run killed (kill -9) before its checkpoint resumes from the previous
            # epoch and drops this row again (truncate_metrics), so metrics and checkpoints agree;
            # best.pt before last.pt, so that last.pt never names a best epoch best.pt lacks. Stop
            # signals wait (stop_signals) until the files are written.
            with open(os.path.join(self.run_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            ckpt = self.checkpoint(epoch)
            if is_best:
                atomic_torch_save(ckpt, os.path.join(self.run_dir, "best.pt"))
            atomic_torch_save(ckpt, os.path.join(self.run_dir, "last.pt"))
            if self.visdom.enabled:
                self.log_visdom(epoch, row)
        if epoch < state["maxepoch"] and self.dist.any(self.stop, self.device):
            self.stop_here(state, between_epochs=True)

    def checkpoint(self, epoch):
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "epoch": epoch, "best_accuracy": self.best_accuracy,
                "config": self.cfg, "rng_state": rng_state(self.device), "compile_choice": self.compile_choice.state()}

    def log_visdom(self, epoch, row):
        self.model.eval()
        grid, figures, caption = epoch_views(self.model, self.data, self.cfg, self.device, self.dtype)
        self.visdom.log_epoch(epoch, row, self.meters["test"]["confusion"].value(), grid, figures, caption)

    def train(self, epochs):
        finished = False
        try:
            with stop_signals() as self.stop:
                self.engine.train(self.network, self.train_batches, epochs, self.optimizer)
            finished = True
        finally:  # what is queued for Visdom goes out (briefly, if the run stops on an error or signal)
            self.visdom.flush(60.0 if finished else 5.0)


def run_training(cfg, ckpt, dist=None, resume_auto=False, where=None):
    """Train from the constants, or continue `ckpt`. Under torchrun (`dist`) every process runs this
    with its share of each batch. `resume_auto`: --resume auto found no checkpoint, so a fresh run
    starts in RUN_DIR itself (a restarted job then finds its last.pt there)."""
    dist = dist or Distributed({})
    if dist.enabled and cfg["BATCH_SIZE"] % dist.world:
        raise UsageError(f"--batch-size {cfg['BATCH_SIZE']} must be a multiple of the number of processes "
                         f"({dist.world}): each one takes an equal share of every batch")
    device, _ = setup_process(cfg, dist)
    dist.start(device)
    if ckpt is None and not resume_auto:
        cfg["RUN_DIR"] = fresh_run_dir(cfg["RUN_DIR"]) if dist.main else None
    cfg["RUN_DIR"] = dist.from_main(cfg["RUN_DIR"])
    if where is not None:
        where["run_dir"] = cfg["RUN_DIR"]
    if len(set(dist.gather(ckpt["epoch"] if ckpt else None))) > 1:
        raise UsageError("the processes found different checkpoints: RUN_DIR and --resume must be on a file "
                         "system that every machine sees")
    data = load_data(cfg, device, DATASETS[cfg["DATASET"]])  # bad data: one line, and nothing written
    if ckpt is not None and dist.main:
        resume_into(cfg["RUN_DIR"], ckpt["path"], ckpt["epoch"])
    os.makedirs(cfg["RUN_DIR"], exist_ok=True)
    if dist.main:  # temporary files of a process killed while it wrote a checkpoint
        for name in os.listdir(cfg["RUN_DIR"]):
            if ".pt.tmp" in name:
                os.remove(os.path.join(cfg["RUN_DIR"], name))
    last = data.train.rows % cfg["BATCH_SIZE"]
    if 0 < last < dist.world:
        raise UsageError(f"the last training batch holds {last} images, fewer than the {dist.world} processes: "
                         f"change --train-size or --batch-size")
    model = model_to_device(build_model(cfg), cfg, device)
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
        set_rng_state(ckpt["rng_state"], device)
        part = ckpt.get("partial")
        inside = f", batch {part['batch']} of epoch {start_epoch + 1}" if part else ""
        print(f"resumed from epoch {start_epoch}{inside} (best test accuracy so far {best:.2f}%) in {cfg['RUN_DIR']}")
        if cfg["LR"] != ckpt["config"]["LR"]:  # --lr given now: the schedule restarts from it
            rate = max(cfg["LR"] * cfg["LR_DECAY"] ** start_epoch, cfg["LR_MIN"])
            for group in optimizer.param_groups:
                group["lr"] = rate
            scheduler.base_lrs = [cfg["LR"]] * len(optimizer.param_groups)
            print(f"--lr {cfg['LR']:g} (the checkpoint's {ckpt['config']['LR']:g}): epoch {start_epoch + 1} trains at "
                  f"{rate:.3g}, as if the run had started at {cfg['LR']:g}")
    elif resume_auto and dist.main:
        truncate_metrics(cfg["RUN_DIR"], 0)  # rows of an epoch 1 whose checkpoint was never written
        print(f"--resume auto: no {os.path.join(cfg['RUN_DIR'], 'last.pt')} yet; a new run starts there")
    for line in (dataset_line(cfg), preset_line(cfg)):
        if line:
            print(line)
    print(f"{model_line(model, device, amp_choice(device, cfg['AMP'])[1], data, cfg)}; seed {cfg['SEED']}, run dir {cfg['RUN_DIR']}")
    if dist.enabled:
        print(f"torchrun: {dist.world} processes ({'NCCL' if device.type == 'cuda' else 'gloo'}), each computing "
              f"{cfg['BATCH_SIZE'] // dist.world} of the {cfg['BATCH_SIZE']} images of every batch")
    if start_epoch >= cfg["EPOCHS"]:
        print(f"nothing to do: the checkpoint is at epoch {start_epoch} and --epochs is {cfg['EPOCHS']}")
        return
    compile_state = ckpt.get("compile_choice") if ckpt is not None else None
    trainer = Trainer(cfg, device, model, optimizer, scheduler, data, start_epoch, best, compile_state, dist,
                      ckpt.get("partial") if ckpt is not None else None)
    trainer.train(cfg["EPOCHS"])
    dist.barrier()  # every process done (rank 0's last checkpoint written) before the group ends


# ---- the other modes: --eval-only, --visualize, --export-weights ----
def run_eval(cfg, ckpt, others=()):
    """--eval-only: the test set through the checkpoint's model; with `others` (more checkpoints
    of the same data set and classes), also their ensemble: the capsule lengths averaged over the
    models before the argmax (the paper's CIFAR10 ensemble; the authors' code sums them)."""
    device, _ = setup_process(cfg)
    data = load_data(cfg, device, DATASETS[cfg["DATASET"]], train=False)
    dtype = amp_dtype(device, cfg["AMP"])
    members = [(cfg, ckpt)] + [(member_config(cfg, other), other) for other in others]
    steppers = []
    for member_cfg, member in members:
        model = model_to_device(build_model(member_cfg), member_cfg, device)
        load_weights(model, member["model"])
        model.eval()
        steppers.append(BatchLoss(model, build_loss(member_cfg), device, dtype, 0, cfg["CHANNELS_LAST"],
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
        meters = pass_meters(cfg["NUM_CLASSES"], data.objects)
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
    print_evaluation(result, data.name, data.objects, len(members), seconds)
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
    """--visualize: the figures of the checkpoint's model and of its run's metrics (write_figures)."""
    device, _ = setup_process(cfg)
    data = load_data(cfg, device, DATASETS[cfg["DATASET"]], train=False)
    model = build_model(cfg).to(device)
    load_weights(model, ckpt["model"])
    written = write_figures(model, data, cfg, cfg["RUN_DIR"])
    print("wrote " + ", ".join(written))
    return written


def run_predict(cfg, ckpt, paths):
    """--predict: each image file converted as the model's data was (channels, size, the central
    crop; for the MNIST-like data sets a dark digit on a light background is inverted, and the
    output says so) -> the predicted class and every class's capsule length, printed, in
    RUN_DIR/predictions.json, and RUN_DIR/predict_<name>.png: the input beside its reconstruction
    (figures.write_predictions). Every file is read before anything is written."""
    device, _ = setup_process(cfg)
    model = build_model(cfg).to(device)
    load_weights(model, ckpt["model"])
    model.eval()
    if not hasattr(model, "capsules"):
        raise UsageError("--predict draws each image beside its reconstruction from a capsule; --model baseline-cnn has "
                         "neither: measure it with --eval-only")
    dark_on_light = DATASETS[cfg["DATASET"]]["reader"] in ("MNIST", "FashionMNIST", "KMNIST", "EMNIST")
    inputs, inverted = read_images_as_data(paths, cfg["IMAGE_SIZE"], cfg["IMAGE_CHANNELS"], dark_on_light)
    images = to_float_images(inputs.to(device), cfg["CROP_SIZE"])
    with torch.no_grad():
        lengths, recon = model(images)
    names = cfg["CLASS_NAMES"] or [str(k) for k in range(cfg["NUM_CLASSES"])]
    return write_predictions(paths, images, recon, lengths, names, inverted, cfg["RUN_DIR"])


MODEL_KEYS = ("MODEL", "DATASET", "IMAGE_SIZE", "IMAGE_CHANNELS", "CROP_SIZE", "CLASS_NAMES", "CONV1_CHANNELS", "PRIMARY_CAPS", "PRIMARY_DIM", "DIGIT_DIM", "NUM_CLASSES", "KERNEL_SIZE",
              "ROUTING_ITERATIONS", "ROUTING_LEAKY", "W_INIT_STD", "INIT", "PRIMARY_SCALE", "DIGIT_CAPS_BIAS", "DECODER", "CONV1_LEAKY", "DECODER_HIDDEN1", "DECODER_HIDDEN2",
              "BASELINE_LAYERS", "BASELINE_DROPOUT",
              "STANDARDIZE",
              "M_PLUS", "M_MINUS", "LAMBDA_ABSENT", "RECON_WEIGHT", "MARGIN_REDUCTION")  # what an exported model carries: shape, loss


def export_weights(ckpt, cfg, path):
    """The model weights alone, in fp16, with the constants that define the model (no paths)."""
    state = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    atomic_torch_save({"model": state, "config": {k: cfg[k] for k in MODEL_KEYS}, "epoch": ckpt.get("epoch")},
                      path)
    print(f"wrote {path} ({os.path.getsize(path) / 2**20:.1f} MiB, fp16 weights)")


# ---- command line: every constant is a flag; main() ----


DATA_DECIDED = {"CLASS_NAMES": []}  # set from the data (load_data), saved in checkpoints; no flags


def default_config():
    """The constants at the top of this file, as a dict, and what the data will decide."""
    return dict({name: globals()[name] for name, _, _ in constants_table(__file__)}, **copy.deepcopy(DATA_DECIDED))


def build_parser():
    parser = OneLineParser(
        prog="capsule_network.py",
        description="Train, evaluate or visualise CapsNet (Sabour et al., 2017) on MNIST, MultiMNIST, the paper's "
                    "other data sets or your own images.",
    )
    add_constant_flags(parser, __file__, globals())
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
    """The one place the configuration is made. Each source overrides the ones before it:
    1. the constants at the top of this file;
    2. the data set's own settings (DATASETS[name]["settings"], the paper's for it);
    3. a checkpoint's constants when resuming (a training checkpoint: all of them, and its run
       directory; exported weights: the model's, MODEL_KEYS);
    4. a --preset given now (PRESETS, comma-separated names, later ones winning);
    5. the flags given explicitly on the command line.
    Then validate_config: an impossible value is one UsageError line."""
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
    validate_config(cfg, DATASETS)
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
        sys.modules.setdefault("capsule_network", sys.modules[__name__])  # bench times this module, not a copy
        import bench

        return bench.main([a for a in argv if a != "--benchmark"])
    parser = build_parser()
    args = parser.parse_args(argv)
    dist = Distributed()  # torchrun's environment; a world of one without it
    training = not (args.export_weights or args.eval_only or args.visualize or args.predict)
    if dist.enabled and not training and not dist.main:
        return 0  # evaluation, figures and export run in rank 0 alone
    where = {}  # the run directory and batch sizes, once known: for the error lines
    with contextlib.ExitStack() as stack:
        if not dist.main:  # one voice: rank 0 prints
            stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
        try:
            return run_mode(args, training, dist, where)
        except (Exception, KeyboardInterrupt) as e:  # ours: one line on stderr and an exit code
            code, line = how_it_ended(e, where, training)
            if code is None:
                raise
            if dist.main:
                print(line, file=sys.stderr)
            return code
        finally:
            dist.stop()


def run_mode(args, training, dist, where):
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
    where.update(batch=cfg["BATCH_SIZE"], eval_batch=cfg["EVAL_BATCH_SIZE"])
    if not training and not cfg["IMAGE_SIZE"]:  # a checkpoint from before the data's shape was saved
        nominal_data_settings(cfg, DATASETS[cfg["DATASET"]])
    if args.export_weights:
        export_weights(ckpt, cfg, args.export_weights)
    elif args.eval_only:
        run_eval(cfg, ckpt, [load_checkpoint(path) for path in resumes[1:]])
    elif args.predict:
        run_predict(cfg, ckpt, args.predict)
    elif args.visualize:
        run_visualize(cfg, ckpt)
    else:
        run_training(cfg, ckpt, dist, resume_auto and ckpt is None, where)
    return 0


if __name__ == "__main__":
    sys.exit(main())

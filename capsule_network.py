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
                   code's choices, training, speed, logging; each one is also a flag. A constant
                   written None takes the data set's value from DATASET_SETTINGS (the paper's
                   settings for each data set); PRESETS are named recipes
    model          squash (eq. 1), dynamic_routing (Procedure 1 as written; --routing-impl
                   reference trains it), factored_routing (the same routing factored: the default),
                   CapsNetConfig and CapsuleNet (Fig. 1 and 2); EfficientCapsNet (--model
                   efficient-capsnet: the network of capsnet/efficient.py with this file's decoder)
    loss           CapsuleLoss: margin loss (eq. 4) + 0.0005 x summed squared reconstruction
                   error; build_model, build_optimizer, build_loss from the settings
    one step       BatchLoss: what torchnet's Engine calls per batch (shift, forward, loss)
    epoch loop     Trainer (Engine hooks: train pass, test pass, metrics, checkpoints, Visdom),
                   run_training
    command line   the flags, the settings (capsnet/config.py: constants < data set < checkpoint <
                   preset < flags), main(); the other modes (--eval-only, --visualize, --predict,
                   --export-weights) are in capsnet/modes.py, --explore in capsnet/explore.py
capsnet/: config.py (the settings of a run), data.py (readers, batches, shifts, MultiMNIST),
fast.py (the CPU's faster PrimaryCaps convolution, the compiled routing, the whole compiled step),
meters.py, figures.py, modes.py, visdom_plots.py, runtime.py (devices, RNG, checkpoints, the run
directory, torchrun), cli.py (flags from the constants), efficient.py (Efficient-CapsNet).
The speed benchmark is bench.py, beside this file (the same flags). Measured results and the
commands behind them are in README.md; the lab notes in results/README.md.
"""

import contextlib
import copy
import dataclasses
import functools
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# support code (capsnet/); multimnist_pairs and two_digit_scores are imported for users' scripts
from capsnet.baseline import BaselineLoss, build_baseline
from capsnet.cli import OneLineParser, add_constant_flags, constants_table
from capsnet.config import DATA_DECIDED, MODEL_KEYS, make_config, settings_lines
from capsnet.data import (input_size, load_data, multimnist_pairs, nominal_data_settings,  # noqa: F401
                          random_brightness_contrast, random_crop_flip, random_shift, smallest_input, standardize,
                          to_float_images)
from capsnet.decoders import DeconvDecoder
from capsnet.efficient import EfficientBody, efficient_augment
from capsnet.explore import run_explore
from capsnet.fast import CompileChoice, WholeStep, model_to_device, use_cpu_speedups
from capsnet.figures import epoch_views
from capsnet.meters import PassMeters, epoch_row, matched_predictions, print_epoch, routing_changes, two_digit_scores  # noqa: F401,E501
from capsnet.modes import (add_mode_flags, authors_choices, export_weights, model_line, resolve_resume,  # noqa: F401
                           run_eval, run_predict, run_visualize)
from capsnet.runtime import (Distributed, RunRecord, UsageError, amp_choice, amp_dtype, autocast, check_position,
                             choose_run_dir, finite_weights, how_it_ended, load_checkpoint, loss_scaler, prepare_run_dir,
                             resume_training, scaled_steps, settle, setup_process, step_schedule, stop_signals,
                             sync, together, training_checkpoint, trim_cpu_malloc, truncate_metrics, wrap_ddp)
from capsnet.visdom_plots import LiveProgress, VisdomPlots

# ---- constants (each one is also a command-line flag: FOO_BAR -> --foo-bar) ----
# data
DATASET: str = "mnist"  # mnist, fashion-mnist, kmnist, emnist-balanced, emnist-letters, cifar10, svhn, smallnorb, folder, multimnist, expanded-mnist, affnist
DATA_DIR: str = "data"  # where the data set's files are, in torchvision's layouts: DATA_DIR/MNIST/raw, ... (README)
TRAIN_SIZE: int = 0  # use the first N training images; 0 = all 60,000
TEST_SIZE: int = 0  # use the first N test images; 0 = all 10,000
IMAGE_SIZE: int = None  # images resized to IMAGE_SIZE x IMAGE_SIZE before any crop; 0 = as stored; None = the data set's (smallnorb 48, folder 28, else 0)
IMAGE_CHANNELS: int = 0  # folder: 1 or 3; 0 = the data set's (folder: 3 if any training image has colour, else 1)
CROP_SIZE: int = None  # random CROP_SIZE crops of training images, the central one at test; 0 = none; None = the data set's (cifar10 24, smallnorb 32, else 0)
FLIP: bool = None  # random left-right flips of training images; None = the data set's (cifar10 on, else off)
DISTORT: bool = None  # random brightness (+-63/255) and contrast (x0.2..1.8) per training image, after the crop; None = the data set's (cifar10 on: the authors' code)
STANDARDIZE: bool = None  # the network sees each image minus its mean, over its standard deviation (the decoder still draws [0, 1] pixels); None = the data set's (cifar10 on: the authors' code)
MAX_SHIFT: int = None  # random shift of up to this many pixels per image, training only; None = the data set's (the paper: 2, sec. 5; 0 where crops or pairs replace it)
MULTIMNIST_SHIFT: int = 4  # multimnist: each digit of a pair shifted by up to this many pixels in the 36x36 image
AUGMENT: str = "none"  # more training augmentation, per image on the device: none, or efficient (Efficient-CapsNet's rotation, shift, squish, erase)
MULTIMNIST_TEST_PAIRS: int = 1  # multimnist: fixed test images per MNIST test digit (the paper made 1,000)
# model, as in the paper (sec. 4, Fig. 1 and 2)
MODEL: str = "capsnet"  # capsnet: the paper's; efficient-capsnet: Mazzia et al. 2021, self-attention routing (capsnet/efficient.py); baseline-cnn: the paper's CNN baselines (capsnet/baseline.py)
CONV1_CHANNELS: int = None  # Conv1 filters, 9x9, stride 1; None = the data set's (the paper: 256, sec. 4; svhn 64)
PRIMARY_CAPS: int = None  # primary capsule types (channels of 8-D capsules) on the 6x6 grid; None = the data set's (the paper: 32; cifar10 64, svhn 16)
PRIMARY_DIM: int = None  # dimension of a primary capsule; None = the data set's (the paper: 8; svhn 6)
DIGIT_DIM: int = None  # dimension of a digit capsule; None = the data set's (the paper: 16; svhn 8)
NUM_CLASSES: int = 0  # digit capsules, one per class; 0 = as many as the data set has (MNIST: 10)
KERNEL_SIZE: int = 9  # kernel of Conv1 and PrimaryCaps
ROUTING_ITERATIONS: int = 3  # routing-by-agreement iterations (paper: 3, sec. 4 and Procedure 1)
ROUTING_IMPL: str = "factored"  # factored: factored_routing, the same routing computed faster; reference: dynamic_routing as written (slower)
ROUTING_LEAKY: bool = None  # an extra "none-of-the-above" parent with logit 0 in each child's softmax; None = the data set's (cifar10 on, sec. 7)
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
DECODER_BN: bool = False  # batch norm before each hidden ReLU of the decoder (ethanleet/CapsNet's placement; not in the paper)
RECON_DETACH: bool = None  # the decoder learns from detached capsules: its loss trains it, not the capsules; None = the data set's (cifar10 on: the authors' code trains no decoder there)
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
LR_DECAY: float = None  # exponential decay of the learning rate per epoch; None = the data set's (0.96; multimnist 0.996; docs/datasets.md says why)
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
    # A complete, annealed MNIST run of about 2 to 2.5 hours on a 2-core CPU (4.2 minutes an epoch
    # in bf16): the last of 30 epochs trains at 2.5% of LR. Chosen from the 10-epoch curve in
    # results/ (the accuracy still moved by +-0.1 point at 69% of LR) and XifengGuo's x0.9 per epoch.
    "mnist-2h": {"EPOCHS": 30, "LR_DECAY": 0.88},
    # The authors' released code where it differs from the paper's text (Sarasra/models,
    # research/capsules): margin loss 0.5 x the mean over classes, a DigitCaps bias, PrimaryCaps as
    # one routing pass over the 32 types (x 1/32), truncated-normal weights and biases of 0.1.
    # Training stays as set: combine with a schedule, --preset mnist-2h,authors.
    "authors": {"MARGIN_REDUCTION": "half-mean", "DIGIT_CAPS_BIAS": True, "PRIMARY_SCALE": 1 / 32, "INIT": "authors"},
    # A complete CIFAR-10 run of about 3 hours on a 2-core CPU in fp32 (a batch of 128, the authors'
    # size, took 0.85 s there): the 30th epoch trains at 4.7% of LR. With --dataset cifar10.
    "cifar10-3h": {"EPOCHS": 30, "LR_DECAY": 0.9, "BATCH_SIZE": 128},
    # Efficient-CapsNet's MNIST recipe (EscVM/Efficient-CapsNet config.json, utils/tools.py): Adam at
    # 5e-4, x0.97 per epoch down to 5e-5, batch 16, 150 epochs, their augmentation instead of the shift
    "efficient-capsnet": {"MODEL": "efficient-capsnet", "AUGMENT": "efficient", "MAX_SHIFT": 0, "LR": 5e-4,
                          "LR_DECAY": 0.97, "LR_MIN": 5e-5, "BATCH_SIZE": 16, "EPOCHS": 150},
}


# The paper's settings for each data set: what a constant written None above takes, from the data
# set's row, else from "default" (the paper's MNIST set-up, sec. 4 and 5); the start-up line lists
# them. Each data set's reader and shape: capsnet/data.py, DATA_SETS.
DATASET_SETTINGS = {
    "default": {"IMAGE_SIZE": 0, "CONV1_CHANNELS": 256, "PRIMARY_CAPS": 32, "PRIMARY_DIM": 8, "DIGIT_DIM": 16, "ROUTING_LEAKY": False,
                "MAX_SHIFT": 2, "CROP_SIZE": 0, "FLIP": False, "DISTORT": False, "STANDARDIZE": False,
                "RECON_DETACH": False, "LR_DECAY": 0.96},
    "mnist": {}, "fashion-mnist": {}, "kmnist": {}, "emnist-balanced": {}, "emnist-letters": {},
    # sec. 7: three colour channels, 64 primary capsule types, 24x24 patches (random crops in training,
    # the central one at test) and a "none-of-the-above" routing option. The rest as the authors'
    # code (input_data/cifar10/cifar10_input.py, README): flips, brightness and contrast, per-image
    # standardisation, and no decoder shaping the capsules (here it learns beside them, for the
    # figures). Their SAME padding (a 12x12 grid) is not taken: docs/datasets.md says why.
    "cifar10": {"PRIMARY_CAPS": 64, "CROP_SIZE": 24, "FLIP": True, "DISTORT": True, "STANDARDIZE": True,
                "RECON_DETACH": True, "ROUTING_LEAKY": True, "MAX_SHIFT": 0},
    # sec. 7: the smaller network the paper trained on SVHN (64 Conv1 channels, 16 primary capsule
    # types of 6 dimensions, 8-dimensional class capsules); 32x32 colour images
    "svhn": {"CONV1_CHANNELS": 64, "PRIMARY_CAPS": 16, "PRIMARY_DIM": 6, "DIGIT_DIM": 8},
    # sec. 7: 5 classes, the stereo pair as two channels, 96x96 downsampled to 48x48, random 32x32
    # crops in training, the central crop at test (see the README for what is not done here)
    "smallnorb": {"IMAGE_SIZE": 48, "CROP_SIZE": 32, "MAX_SHIFT": 0},
    "folder": {"IMAGE_SIZE": 28},
    # MultiMNIST (sec. 6): 36x36 images of two digits, so Conv1 is 28x28 and PrimaryCaps a 10x10 grid
    # of 3,200 capsules. The paper decays the learning rate with a 10x longer period because its
    # set is larger: here an epoch is one pair per MNIST training digit, so 0.96 per epoch becomes
    # 0.96 ** 0.1 = 0.996 per epoch. No extra shift: the pairs' own shifts are the augmentation.
    "multimnist": {"LR_DECAY": 0.996, "MAX_SHIFT": 0},
    # sec. 5.2: the digits' places on the 40x40 canvas are their augmentation
    "expanded-mnist": {"MAX_SHIFT": 0}, "affnist": {"MAX_SHIFT": 0},
}



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
    bias (DIGIT_CAPS_BIAS; not in the paper), is added to every s_j before the squash. If
    `logit_changes` is a list, the mean |change of b_ij| of every iteration, the last, unused, one
    included (Appendix A's measure), is appended to it. ROUTING_IMPL reference trains this."""
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
    the signature and the results of factored_routing. Edit dynamic_routing and train it with
    --routing-impl reference."""
    u_hat = torch.einsum("jied,bid->bije", W, u)  # (B, I, J, E)
    changes = [] if record else None
    v, c = dynamic_routing(u_hat, iterations, changes, leaky, bias)
    return v, c, (torch.stack(changes) if record else None)


def factored_routing(W, u, iterations, record, children_last=False, leaky=False, bias=None, product_dtype=None):
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

    `children_last` orders k as (d, i) instead of (i, d): the element-wise work then runs along the
    1152 children (the layout compiled code runs fastest; eager broadcasting prefers (i, d))."""
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


def make_decoder(cfg):
    """A CapsNetConfig's decoder, the masked capsules (B, J * E) -> pixels: Fig. 2's fully connected
    one (fc), or ethanleet/CapsNet's transposed convolutions (deconv, capsnet/decoders.py);
    `decoder_bn` (DECODER_BN, not in the paper): ethanleet's batch norm before each hidden ReLU."""
    inputs, channels, size = cfg.digit_dim * cfg.num_classes, cfg.image_channels, cfg.image_size
    if cfg.decoder == "deconv":
        return DeconvDecoder(inputs, channels, size, cfg.decoder_bn)

    def hidden_layer(n_in, n_out):
        return [nn.Linear(n_in, n_out), *([nn.BatchNorm1d(n_out)] if cfg.decoder_bn else []), nn.ReLU(inplace=True)]
    return nn.Sequential(*hidden_layer(inputs, cfg.decoder_hidden1), *hidden_layer(cfg.decoder_hidden1,
                                                                                   cfg.decoder_hidden2),
                         nn.Linear(cfg.decoder_hidden2, channels * size * size), nn.Sigmoid())


@dataclasses.dataclass
class CapsNetConfig:
    """What a CapsuleNet is: its input, the paper's quantities (sec. 4, Fig. 1 and 2; the defaults
    are its MNIST network) and the options of the authors' code. Each field is the constant of
    the same name in capitals; from_settings reads them from a run's settings."""
    image_channels: int = 1
    image_size: int = 28  # the side the network sees: the crop where there is one
    num_classes: int = 10
    conv1_channels: int = 256
    kernel_size: int = 9
    primary_caps: int = 32
    primary_dim: int = 8
    digit_dim: int = 16
    routing_iterations: int = 3
    routing_leaky: bool = False
    routing_impl: str = "factored"
    routing_bf16: bool = False
    w_init_std: float = 0.01
    init: str = "torch"
    primary_scale: float = 1.0
    digit_caps_bias: bool = False
    conv1_leaky: float = 0.0
    standardize: bool = False
    decoder: str = "fc"
    decoder_hidden1: int = 512
    decoder_hidden2: int = 1024
    decoder_bn: bool = False
    recon_detach: bool = False

    @classmethod
    def from_settings(cls, cfg):
        values = {f.name: cfg[f.name.upper()] for f in dataclasses.fields(cls)}
        return cls(**dict(values, image_size=input_size(cfg)))


class CapsuleNet(nn.Module):
    """Conv1 -> PrimaryCaps -> DigitCaps (routing) -> lengths, plus the masked decoder (Fig. 1, 2).

    Two attributes let capsnet/fast.py run the same mathematics faster: `routing`, the function
    DigitCaps routes with (eager_routing, or a compiled version of it: fast.use_compiled_routing),
    and `conv_path`, a faster ReLU(Conv1) + PrimaryCaps convolution on the CPU (None: plain
    convolutions; fast.use_cpu_speedups)."""

    def __init__(self, config=None):
        super().__init__()
        self.config = cfg = config or CapsNetConfig()
        if cfg.routing_bf16 and cfg.routing_impl != "factored":
            raise ValueError("ROUTING_BF16 is an option of the factored routing (ROUTING_IMPL factored)")
        if cfg.image_size < smallest_input(cfg.kernel_size):
            raise ValueError(f"{cfg.image_size}x{cfg.image_size} images are too small for {cfg.kernel_size}x"
                             f"{cfg.kernel_size} Conv1 and PrimaryCaps: the smallest is {smallest_input(cfg.kernel_size)}")
        self.primary_caps, self.primary_dim = cfg.primary_caps, cfg.primary_dim
        self.num_classes, self.digit_dim = cfg.num_classes, cfg.digit_dim
        self.image_size, self.in_channels = cfg.image_size, cfg.image_channels
        self.conv1 = nn.Conv2d(cfg.image_channels, cfg.conv1_channels, cfg.kernel_size)
        # One conv for all 32 capsule types: output channel t * 8 + d is dimension d of type t.
        self.primary = nn.Conv2d(cfg.conv1_channels, cfg.primary_caps * cfg.primary_dim, cfg.kernel_size, stride=2)
        self.grid = ((cfg.image_size - cfg.kernel_size + 1) - cfg.kernel_size) // 2 + 1  # 6 for MNIST
        self.num_primary = cfg.primary_caps * self.grid * self.grid  # I = 1152
        # W_ij (E x D) for every parent j and child i: (J, I, E, D); small initialisation.
        self.W = nn.Parameter(cfg.w_init_std * torch.randn(cfg.num_classes, self.num_primary, cfg.digit_dim,
                                                           cfg.primary_dim))
        self.decoder = make_decoder(cfg)
        # the authors' code adds a bias to s_j, starting at 0.1 (its bias_variable)
        self.digit_bias = nn.Parameter(torch.full((cfg.num_classes, cfg.digit_dim), 0.1)) if cfg.digit_caps_bias else None
        if cfg.init == "authors":
            init_as_authors(self)
        self.record_routing = False  # when True, capsules() appends Appendix A's logit changes
        self.logit_changes = []
        # DigitCaps' routing: the factored routing (its products in bf16 with routing_bf16), or
        # Procedure 1 as written
        self.eager_routing = routing_as_written if cfg.routing_impl == "reference" else factored_routing
        if cfg.routing_bf16:
            self.eager_routing = functools.partial(factored_routing, product_dtype=torch.bfloat16)
        self.routing = self.eager_routing
        self.conv_path = None

    def routing_to_compile(self):
        """The routing in the layout compiled code runs fastest (factored_routing's children_last)."""
        if self.config.routing_impl == "reference":
            return self.eager_routing
        return functools.partial(self.eager_routing, children_last=True)

    def conv1_activation(self, x):
        """ReLU after Conv1 (the paper), or a leaky ReLU with slope CONV1_LEAKY."""
        slope = self.config.conv1_leaky
        return F.leaky_relu(x, slope, inplace=True) if slope else F.relu(x, inplace=True)

    def primary_weight(self):
        """The PrimaryCaps kernel as it acts: x PRIMARY_SCALE (1/32 in the authors' code), the bias apart."""
        w, scale = self.primary.weight, self.config.primary_scale
        return w if scale == 1 else w * scale

    def primary_capsules(self, images):
        """images (B, C, H, W) -> squashed primary capsules (B, I, D) (MNIST: I = 1152, D = 8)."""
        x = None
        if self.conv_path is not None and images.device.type == "cpu":
            x = self.conv_path(self, images)  # the same values, faster; None where it does not apply
        if x is None:
            x = self.conv1_activation(self.conv1(images))  # (B, 256, 20, 20)
            x = F.conv2d(x, self.primary_weight(), self.primary.bias, self.primary.stride)  # (B, 32*8, 6, 6)
        B = x.shape[0]
        # Each capsule is the 8 channels of one type at one pixel, never neighbouring pixels.
        x = x.reshape(B, self.primary_caps, self.primary_dim, self.grid, self.grid)  # (B, T, D, 6, 6)
        u = x.permute(0, 1, 3, 4, 2).reshape(B, self.num_primary, self.primary_dim)  # (B, I, D)
        return squash(u.float())

    def capsules(self, images):
        """images (B, C, H, W) -> digit capsules v (B, J, E) and couplings c (B, I, J), in fp32."""
        if self.config.standardize:  # STANDARDIZE (cifar10): what the network sees; the decoder's target stays
            images = standardize(images)
        u = self.primary_capsules(images)  # (B, I, D)
        with torch.autocast(device_type=u.device.type, enabled=False):
            bias = None if self.digit_bias is None else self.digit_bias.float()
            v, c, changes = self.routing(self.W.float(), u, self.config.routing_iterations, self.record_routing,
                                         leaky=self.config.routing_leaky, bias=bias)
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
        if self.config.recon_detach:  # RECON_DETACH: the reconstruction loss reaches the decoder only
            v = v.detach()
        if classes.dim() == 1:
            return lengths, self.decode(v, classes)
        return lengths, torch.stack([self.decode(v, classes[:, k]) for k in range(classes.shape[1])], 1)


@torch.no_grad()
def init_as_authors(model):
    """The authors' code's initialisation of a CapsuleNet: truncated normals cut at 2 standard
    deviations (TensorFlow's truncated_normal_initializer), std 0.05 for Conv1 and 0.1 for
    PrimaryCaps, W_ij and the decoder; every bias 0.1. The paper states none of these."""
    def truncated(w, std):
        nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)

    truncated(model.conv1.weight, 0.05)
    truncated(model.primary.weight, 0.1)
    truncated(model.W, 0.1)
    layers = [m for m in model.decoder.modules() if isinstance(m, (nn.Linear, nn.ConvTranspose2d))]
    for layer in layers:
        truncated(layer.weight, 0.1)
    for bias in (model.conv1.bias, model.primary.bias, *(m.bias for m in layers)):
        bias.fill_(0.1)


class EfficientCapsNet(EfficientBody):
    """Efficient-CapsNet (capsnet/efficient.py) with CapsuleNet's class scores (lengths) and masked
    decoder; of a CapsNetConfig it takes the input, the classes, the capsule size and the decoder."""
    forward, decode = CapsuleNet.forward, CapsuleNet.decode

    def __init__(self, config):
        super().__init__(make_decoder(config), config.num_classes, config.image_size, config.image_channels, config.digit_dim)
        self.config = config

    def capsules(self, images):
        return super().capsules(standardize(images) if self.config.standardize else images)


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
    """The model of a run's settings, on the CPU, with the CPU speed paths (capsnet/fast.py) as set.
    The data's shape comes from load_data; without it (the constants alone), the data set's usual one."""
    if not cfg["IMAGE_SIZE"] or not cfg["IMAGE_CHANNELS"] or not cfg["NUM_CLASSES"]:
        cfg = nominal_data_settings(dict(cfg))
    if cfg["MODEL"] == "baseline-cnn":  # the paper's CNN baselines (capsnet/baseline.py)
        return build_baseline(cfg)
    config = CapsNetConfig.from_settings(cfg)
    model = EfficientCapsNet(config) if cfg["MODEL"] == "efficient-capsnet" else CapsuleNet(config)
    return use_cpu_speedups(model, cfg["CPU_DFT_CONV"], cfg["CPU_GEMM_WEIGHT_GRAD"], cfg["CPU_MALLOC_TUNING"])


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


# ---- one step: a batch -> its loss and class scores (what torchnet's Engine calls) ----
class BatchLoss:
    """The network callable torchnet's Engine calls: sample -> (loss, lengths).

    A sample is (images uint8 (B, H, W), labels (B,)), or for MultiMNIST (composites, pair labels
    (B, 2), parts uint8 (B, 2, H, W)): then the decoder runs once per digit, masked by that digit's
    capsule (in training the labels', at test the two longest, matched to the labels by
    matched_predictions), and each reconstruction is compared with its own digit's image.
    Training images get their per-image shift (crops, flips, AUGMENT, DISTORT) here, on the device.

    Under torchrun (`dist` enabled, `ddp` the DistributedDataParallel wrapper of `model`) a sample
    is the global batch: its shifts are drawn for the whole batch, then this process computes its
    share of the rows, its loss scaled by share x world size / batch (DDP's mean of the gradients
    is then the global batch's). `last`: (this process's mean loss, its labels) of the latest call."""

    def __init__(self, model, loss_fn, device, dtype, max_shift, channels_last, dist=None, ddp=None, crop=0,
                 flip=False, augment="none", distort=False):
        self.model, self.loss_fn = model, loss_fn
        self.device, self.dtype = device, dtype
        self.max_shift, self.channels_last = max_shift, channels_last
        self.dist, self.ddp = dist, ddp
        self.crop, self.flip = crop, flip  # CIFAR10 and smallNORB: random crops (and flips) in training
        self.augment = augment  # AUGMENT: "efficient" adds Efficient-CapsNet's augmentation in training
        self.distort = distort  # DISTORT (cifar10): the authors' random brightness and contrast in training
        self.last, self.whole, self.whole_step, self.scaler = None, False, None, loss_scaler(device, dtype)  # fp16: a GradScaler

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
        return (self.scaler.scale(loss) if training and self.scaler else loss), lengths.detach()

    @classmethod
    def for_run(cls, model, cfg, device, dist=None, ddp=None):
        """The step of a run's settings: its loss, arithmetic and training augmentation."""
        return cls(model, build_loss(cfg), device, amp_dtype(device, cfg["AMP"]), cfg["MAX_SHIFT"], cfg["CHANNELS_LAST"],
                   dist, ddp, cfg["CROP_SIZE"], cfg["FLIP"], cfg["AUGMENT"], cfg["DISTORT"])

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
    """torchnet's Engine with named hooks (run_training starts it): a train pass per epoch, a test pass,
    the metrics row, checkpoints (RunRecord), live progress, Visdom; a stop signal or a NaN ends it."""
    HOOKS = ("on_start", "on_start_epoch", "on_sample", "on_forward", "on_update", "on_end_epoch")

    def __init__(self, cfg, device, model, optimizer, scheduler, data, start_epoch=0, best_accuracy=None,
                 compile_state=None, dist=None, partial=None):
        from torchnet.engine import Engine

        self.cfg, self.device, self.model, self.optimizer, self.scheduler = cfg, device, model, optimizer, scheduler
        self.dist = dist = dist or Distributed({})
        self.network = BatchLoss.for_run(model, cfg, device, dist, wrap_ddp(model, device, dist))
        self.data, self.train_batches = data, data.train
        self.test_batches = data.test.shard(dist.rank, dist.world)  # each process tests its part
        self.start_epoch, self.partial = start_epoch, partial  # partial: where a mid-epoch checkpoint stopped
        self.record = RunRecord(cfg["RUN_DIR"], dist, start_epoch, best_accuracy)
        self.passes = PassMeters(cfg["NUM_CLASSES"], data.objects, device)
        self.compile_choice = CompileChoice(model, device, cfg["COMPILE"], compile_state, dist, self.network)
        self.visdom = VisdomPlots(cfg if dist.main else dict(cfg, VISDOM=False), data.objects)
        self.live = LiveProgress(cfg["PROGRESS_EVERY"], self.visdom, dist.main)
        self.engine = Engine()
        self.engine.hooks.update((hook, getattr(self, hook)) for hook in self.HOOKS)
        self.stop = []  # the stop signals caught (stop_signals)

    def on_start(self, state):
        state["epoch"] = self.start_epoch  # training's first epoch (the test pass's state has no epoch of its own)
        self.passes.start("train" if state["train"] else "test")
        self.live.start_pass()

    def on_start_epoch(self, state):
        self.model.train()
        self.model.record_routing, self.model.logit_changes = True, []
        self.passes.start("train")
        self.live.start_pass()
        self.epoch_started, self.plan = time.perf_counter(), None
        if self.partial is None:
            self.plan = self.train_batches.plan()  # this epoch's order (and pairs) of the data
        else:  # the epoch a mid-epoch checkpoint stopped in goes on where it was, drawing nothing new
            part, self.partial = self.partial, None
            self.plan, self.model.logit_changes, seconds = self.record.restore_position(
                part, self.passes.stats, self.live, self.device, self.train_batches.rows)
            self.epoch_started -= seconds
        batches = self.train_batches.batches(self.plan, self.live.batch)
        desc = f"epoch {state['epoch'] + 1}/{state['maxepoch']} train"
        state["iterator"] = self.live.wrap(batches, desc, len(self.train_batches))

    def on_sample(self, state):
        if state["train"]:
            self.compile_choice.before_step()

    def on_forward(self, state):
        loss, labels = self.network.last  # this process's share of the batch
        self.passes.stats.add(loss, state["output"], labels)
        totals = self.live.due(self.passes.stats)
        if totals is not None:
            if state["train"]:
                self.diverged(state["epoch"] + 1, totals[3])
            self.live.show(totals, state["epoch"] if state["train"] else None, len(self.train_batches))

    def on_update(self, state):
        self.compile_choice.after_step()
        trim_cpu_malloc()  # the tuned CPU heap's free pages back to the OS when it has grown
        every = 1 if not self.dist.enabled else self.cfg["PROGRESS_EVERY"]  # a collective under torchrun
        if self.live.batch % every == 0 and self.dist.any(self.stop, self.device):
            self.stop_here(state)

    def on_end_epoch(self, state):
        self.diverged(state["epoch"], self.passes.stats.totals()[3], True)  # since the last progress update
        train_seconds = time.perf_counter() - self.epoch_started
        changes = routing_changes(self.model)  # none from the whole compiled step: then the test pass's
        self.passes.finish("train", self.dist)
        self.live.close()
        lr = step_schedule(self.optimizer, self.scheduler, self.cfg["LR_MIN"])
        test_seconds = self.evaluate(record_routing=not changes)
        row = epoch_row(state["epoch"], lr, self.passes.meters, (train_seconds, test_seconds), self.data,
                        changes or routing_changes(self.model), self.compile_choice.choice or "trial", self.device)
        print_epoch(row, state["maxepoch"], self.cfg["DATASET"])
        self.record.end_epoch(row, lambda: self.checkpoint(state["epoch"]))  # stop signals wait for it
        if self.dist.main and self.visdom.enabled:  # the curves, the confusion matrix and the figures
            views = epoch_views(self.model.eval(), self.data, self.cfg, self.device, self.network.dtype)
            self.visdom.log_epoch(state["epoch"], row, self.passes.meters["test"]["confusion"].value(), *views)
        if state["epoch"] < state["maxepoch"] and self.dist.any(self.stop, self.device):
            self.stop_here(state, between_epochs=True)

    def stop_here(self, state, between_epochs=False):
        """A stop signal arrived: mid-epoch, last.pt gets the position (RunRecord.save_position; between
        epochs it holds the completed epoch already). Then stop with Preempted."""
        where = f"after epoch {state['epoch']}"
        if not between_epochs:
            self.diverged(state["epoch"] + 1, self.passes.stats.totals()[3])  # no non-finite position is written
            self.live.close()
            self.record.save_position(self.checkpoint(state["epoch"]), self.live, self.passes.stats, self.plan,
                                      self.model.logit_changes, time.perf_counter() - self.epoch_started)
            where = f"in epoch {state['epoch'] + 1} after batch {self.live.batch} of {len(self.train_batches)}"
        raise self.record.preempted(self.stop, where)

    def diverged(self, epoch, bad, weights=False):
        """Stop the run (RunRecord.diverged) if in any process the loss of a batch of `epoch` was not
        finite (`bad`: this process's first such batch from 0, or -1), or, `weights`, a weight is
        not (a non-finite gradient in the last step). Nothing of this epoch is written."""
        bad = self.dist.earliest(bad, self.device)  # under torchrun every process stops here alike
        if bad >= 0 or (weights and not finite_weights(self.model)):
            self.live.close()  # cleared: the error is the terminal's last line
            raise self.record.diverged(epoch, bad + 1 if bad >= 0 else None, self.optimizer.param_groups[0]["lr"])

    def evaluate(self, record_routing=False):  # model.eval() and no_grad: torchnet's Engine.test does neither
        started = time.perf_counter()
        self.model.eval()
        self.model.record_routing = record_routing
        with torch.no_grad():
            self.engine.test(self.network, self.live.wrap(self.test_batches, "test"))
        sync(self.device)
        self.passes.finish("test", self.dist)
        self.live.close()
        return time.perf_counter() - started

    def checkpoint(self, epoch):
        return training_checkpoint(epoch, self.cfg, self.model, self.optimizer, self.scheduler, self.device,
                                   self.record.best_accuracy, self.compile_choice.state(), self.network.scaler)


def run_training(cfg, ckpt, dist=None, resume_auto=False, where=None, origin=None):
    """Train from the constants, or continue `ckpt`. Under torchrun (`dist`) every process runs this
    with its share of each batch. `resume_auto`: --resume auto found no checkpoint, so a fresh run
    starts in RUN_DIR itself (a restarted job then finds its last.pt there)."""
    dist = dist or Distributed({})
    if dist.enabled and cfg["BATCH_SIZE"] % dist.world:
        raise UsageError(f"--batch-size {cfg['BATCH_SIZE']} must be a multiple of the number of processes "
                         f"({dist.world}): each one takes an equal share of every batch")
    device, _ = setup_process(cfg, dist)
    dist.start(device)
    cfg["RUN_DIR"] = choose_run_dir(cfg["RUN_DIR"], ckpt, dist, fresh=ckpt is None and not resume_auto)
    if where is not None:
        where["run_dir"] = cfg["RUN_DIR"]
    check_position(ckpt, cfg)  # a mid-epoch checkpoint: the settings that made its epoch's batches
    data = together(dist, load_data, cfg, device)  # bad data, in any process: one line, and nothing written
    prepare_run_dir(cfg["RUN_DIR"], ckpt, dist)
    last = data.train.rows % cfg["BATCH_SIZE"]
    if 0 < last < dist.world:
        raise UsageError(f"the last training batch holds {last} images, fewer than the {dist.world} processes: "
                         f"change --train-size or --batch-size")
    model = model_to_device(build_model(cfg), cfg, device)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=cfg["LR_DECAY"])
    start_epoch, best = 0, None
    if ckpt is not None:
        start_epoch, best = resume_training(ckpt, cfg, model, optimizer, scheduler, device)
    elif resume_auto and dist.main:
        truncate_metrics(cfg["RUN_DIR"], 0)  # rows of an epoch 1 whose checkpoint was never written
        print(f"--resume auto: no {os.path.join(cfg['RUN_DIR'], 'last.pt')} yet; a new run starts there")
    for line in settings_lines(cfg, origin or {}, file_constants()):
        print(line)
    print(f"{model_line(model, device, amp_choice(device, cfg['AMP'])[1], data, cfg)}; seed {cfg['SEED']}, run dir {cfg['RUN_DIR']}")
    if dist.enabled:
        print(dist.describe(device, cfg["BATCH_SIZE"]))
    if start_epoch >= cfg["EPOCHS"]:
        print(f"nothing to do: the checkpoint is at epoch {start_epoch} and --epochs is {cfg['EPOCHS']}")
        return
    saved = ckpt or {}  # a resumed run's compile choice, and its position inside an epoch
    trainer = Trainer(cfg, device, model, optimizer, scheduler, data, start_epoch, best, saved.get("compile_choice"), dist, saved.get("partial"))
    finished = False
    try:
        with stop_signals() as trainer.stop:
            trainer.engine.train(trainer.network, data.train, cfg["EPOCHS"], scaled_steps(optimizer, trainer.network.scaler, saved.get("scaler")))
        finished = True
    finally:  # what is queued for Visdom goes out (briefly, if the run stops on an error or signal)
        trainer.visdom.flush(60.0 if finished else 5.0)
    dist.barrier()  # every process done (rank 0's last checkpoint written) before the group ends


# ---- command line: every constant is a flag; main() ----
def file_constants():
    """The constants at the top of this file as written (None: the data set's), and what the data decides."""
    return dict({name: globals()[name] for name, _, _ in constants_table(__file__)}, **copy.deepcopy(DATA_DECIDED))


def flags_given(args):
    """{NAME: value} of the constants' flags given on the command line."""
    return {name: getattr(args, name) for name in file_constants() if getattr(args, name, None) is not None}


def configure(explicit, ckpt=None, resume_path=None):
    """(cfg, origin) of a run: the flags given (`explicit`, {NAME: value}) over the constants above,
    in the order capsnet/config.py's docstring gives."""
    return make_config(file_constants(), DATASET_SETTINGS, PRESETS, explicit, ckpt, resume_path, MODEL_KEYS)


def default_config(**changes):
    """The settings of a run of this file with `changes` given as flags (for scripts and tests)."""
    return configure(changes)[0]


def build_parser():
    presets = "; ".join(f"{name}: " + ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                                 for k, v in values.items()) for name, values in PRESETS.items())
    parser = OneLineParser(
        prog="capsule_network.py",
        description="Train, evaluate or visualise CapsNet (Sabour et al., 2017) on MNIST, MultiMNIST, the paper's "
                    "other data sets or your own images. The speed benchmark is bench.py, beside this file (the "
                    "same flags).",
        epilog=f"presets (--preset NAME[,NAME]): {presets}",
    )
    add_constant_flags(parser, __file__, globals())
    add_mode_flags(parser)  # --resume, --eval-only, --visualize, --predict, --export-weights
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    dist = Distributed()  # torchrun's environment; a world of one without it
    training = not (args.export_weights or args.eval_only or args.visualize or args.predict or args.explore)
    if dist.enabled and not training and not dist.main:
        return 0  # evaluation, figures and export run in rank 0 alone
    where = {}  # the run directory and batch sizes, once known: for the error lines
    with contextlib.ExitStack() as stack:
        if not dist.main:  # one voice: rank 0 prints
            stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
        try:
            return run_mode(args, training, dist, where)
        except (Exception, KeyboardInterrupt) as e:  # ours: one line on stderr and an exit code
            code, line = settle(dist, e, *how_it_ended(e, where, training))  # torchrun: every process alike
            if code is None:
                raise
            if dist.main:
                print(line, file=sys.stderr)
            return code
        finally:
            dist.stop()


def run_mode(args, training, dist, where):
    resume_auto, others = resolve_resume(args, training, args.RUN_DIR or RUN_DIR)  # args.resume: one path or None
    ckpt = load_checkpoint(args.resume) if args.resume else None
    cfg, origin = configure(flags_given(args), ckpt, args.resume)
    where.update(batch=cfg["BATCH_SIZE"], eval_batch=cfg["EVAL_BATCH_SIZE"])
    if not training and not cfg["IMAGE_SIZE"]:  # a checkpoint from before the data's shape was saved
        nominal_data_settings(cfg)
    if args.export_weights:
        export_weights(ckpt, cfg, args.export_weights)
    elif args.eval_only:
        run_eval(cfg, ckpt, [load_checkpoint(path) for path in others], build_model, BatchLoss.for_run)
    elif args.predict:
        run_predict(cfg, ckpt, args.predict, build_model)
    elif args.visualize:
        run_visualize(cfg, ckpt, build_model)
    elif args.explore:
        run_explore(cfg, ckpt, build_model, args)
    else:
        run_training(cfg, ckpt, dist, resume_auto and ckpt is None, where, origin)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""CapsNet with dynamic routing, trained on MNIST, in one script.

Sabour, Frosst & Hinton, "Dynamic Routing Between Capsules", NIPS 2017 (arXiv:1710.09829):
Conv1 -> PrimaryCaps -> DigitCaps with routing-by-agreement (Procedure 1), margin loss (eq. 4)
and a reconstruction decoder. Built on torch, torchvision, torchnet (Engine, meters, Visdom
loggers), tqdm and Visdom.

    python -m visdom.server &          # optional: live plots at http://localhost:8097
    python capsule_network.py          # train with the constants below
    python capsule_network.py --help   # every constant as a flag, with its default

Measured results and the commands that produced them are in README.md.
"""

import argparse
import contextlib
import ctypes
import functools
import io
import json
import logging
import math
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---- constants (each one is also a command-line flag: FOO_BAR -> --foo-bar) ----
DATA_DIR = "data"  # torchvision MNIST root: files live in DATA_DIR/MNIST/raw
RUN_DIR = "runs/capsnet"  # metrics.jsonl, last.pt, best.pt, eval.json and PNG figures go here
DEVICE = "auto"  # auto (CUDA, then MPS, then CPU), cpu, cuda or mps
SEED = 0  # seeds torch's generators; all randomness comes from torch
EPOCHS = 50  # total training epochs (a resumed run continues up to this number)
BATCH_SIZE = 100  # training batch size (the paper does not give one; 100 is the common choice)
EVAL_BATCH_SIZE = 100  # test batch size (on the 2-core CPU, 100 evaluated faster than 250 or 500)
LR = 1e-3  # Adam learning rate (paper: TensorFlow's Adam defaults)
LR_DECAY = 0.96  # exponential decay of the learning rate per epoch (see lr_decay_note below)
TRAIN_SIZE = 0  # use the first N training images; 0 = all 60,000
TEST_SIZE = 0  # use the first N test images; 0 = all 10,000
MAX_SHIFT = 2  # random shift of up to this many pixels per image, training only (paper, sec. 5)
ROUTING_ITERATIONS = 3  # routing-by-agreement iterations (paper: 3)
CONV1_CHANNELS = 256  # Conv1 filters, 9x9, stride 1 (paper, sec. 4)
PRIMARY_CAPS = 32  # primary capsule types (channels of 8-D capsules) on the 6x6 grid
PRIMARY_DIM = 8  # dimension of a primary capsule
DIGIT_DIM = 16  # dimension of a digit capsule
NUM_CLASSES = 10  # digit capsules, one per class
KERNEL_SIZE = 9  # kernel of Conv1 and PrimaryCaps
W_INIT_STD = 0.01  # standard deviation of the normal initialisation of the W_ij matrices
M_PLUS = 0.9  # margin loss m+ (eq. 4)
M_MINUS = 0.1  # margin loss m- (eq. 4)
LAMBDA_ABSENT = 0.5  # margin loss weight lambda for absent classes (eq. 4)
RECON_WEIGHT = 0.0005  # reconstruction loss = this x sum of squared pixel errors (sec. 4.1)
DECODER_HIDDEN1 = 512  # first decoder layer width (Fig. 2)
DECODER_HIDDEN2 = 1024  # second decoder layer width (Fig. 2)
AMP = True  # bf16 autocast for the convolutions and decoder where the device supports bf16
COMPILE = True  # torch.compile the capsule part (W_ij predictions + routing); eager if it fails
CHANNELS_LAST = False  # channels_last memory format for the convolutions (slower on the CPU: README "Speed")
CPU_MALLOC_TUNING = True  # keep glibc from returning big activations to the OS each step (CPU)
CPU_DFT_CONV = True  # CPU: PrimaryCaps convolution through small DFTs (same math, ~3x fewer FLOPs)
CPU_GEMM_WEIGHT_GRAD = True  # CPU, CPU_DFT_CONV off: PrimaryCaps weight gradient as one im2col GEMM
PROGRESS_EVERY = 25  # refresh the running loss/accuracy in the tqdm bar every N batches
RECON_IMAGES = 16  # test images shown next to their reconstructions in Visdom
VISUALIZE_EVERY_EPOCH = True  # capsule visualisations (Fig. 4, class masks, couplings) in Visdom
VISDOM = True  # log to a Visdom server (training goes on without one)
VISDOM_SERVER = "localhost"  # Visdom host name (torchnet adds http://)
VISDOM_PORT = 8097  # Visdom port
VISDOM_ENV = "capsnet"  # Visdom environment the plots go to
BENCHMARK_STEPS = 15  # timed steps per measurement in --benchmark (the median step is reported)
BENCHMARK_WARMUP = 3  # untimed warm-up steps in --benchmark
BENCHMARK_ROUNDS = 3  # --benchmark times the programs in turn, each one's steps split into this many rounds
BENCHMARK_BASELINE = True  # --benchmark also times direct fp32 use and the gram-ai-structured baseline
# ---- end of constants ----

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


# ---- helpers ----
def constants_table():
    """(name, help) of every tunable constant, read from the constants block of this file."""
    with open(os.path.abspath(__file__), encoding="utf-8") as f:
        source = f.read()
    block = source.split("# ---- constants", 1)[1].split("# ---- end of constants", 1)[0]
    return re.findall(r"^([A-Z][A-Z0-9_]*) = .*?  # (.+)$", block, re.M)


def default_config():
    """The constants at the top of this file, as a dict."""
    return {name: globals()[name] for name, _ in constants_table()}


def validate_config(cfg):
    """Raise UsageError naming the first constant with an impossible value."""
    checks = [
        (cfg["DEVICE"] in DEVICES, f"--device must be one of {', '.join(DEVICES)}"),
        (cfg["EPOCHS"] >= 0, "--epochs must be >= 0"),
        (cfg["BATCH_SIZE"] >= 1, "--batch-size must be >= 1"),
        (cfg["EVAL_BATCH_SIZE"] >= 1, "--eval-batch-size must be >= 1"),
        (cfg["LR"] > 0, "--lr must be > 0"),
        (0 < cfg["LR_DECAY"] <= 1, "--lr-decay must be in (0, 1]"),
        (cfg["TRAIN_SIZE"] >= 0, "--train-size must be >= 0 (0 = all)"),
        (cfg["TEST_SIZE"] >= 0, "--test-size must be >= 0 (0 = all)"),
        (0 <= cfg["MAX_SHIFT"] < 14, "--max-shift must be in [0, 13]"),
        (cfg["ROUTING_ITERATIONS"] >= 1, "--routing-iterations must be >= 1"),
        (min(cfg["CONV1_CHANNELS"], cfg["PRIMARY_CAPS"], cfg["PRIMARY_DIM"], cfg["DIGIT_DIM"],
             cfg["DECODER_HIDDEN1"], cfg["DECODER_HIDDEN2"]) >= 1, "layer sizes must be >= 1"),
        (cfg["NUM_CLASSES"] == 10, "--num-classes must be 10 for MNIST"),
        (cfg["KERNEL_SIZE"] in (9,), "--kernel-size must be 9 (the 6x6 capsule grid needs it)"),
        (cfg["W_INIT_STD"] > 0, "--w-init-std must be > 0"),
        (0 <= cfg["M_MINUS"] < cfg["M_PLUS"] <= 1, "need 0 <= --m-minus < --m-plus <= 1"),
        (cfg["LAMBDA_ABSENT"] >= 0, "--lambda-absent must be >= 0"),
        (cfg["RECON_WEIGHT"] >= 0, "--recon-weight must be >= 0"),
        (cfg["PROGRESS_EVERY"] >= 1, "--progress-every must be >= 1"),
        (cfg["RECON_IMAGES"] >= 1, "--recon-images must be >= 1"),
        (1 <= cfg["VISDOM_PORT"] <= 65535, "--visdom-port must be in 1..65535"),
        (cfg["BENCHMARK_STEPS"] >= 1, "--benchmark-steps must be >= 1"),
        (cfg["BENCHMARK_WARMUP"] >= 0, "--benchmark-warmup must be >= 0"),
        (cfg["BENCHMARK_ROUNDS"] >= 1, "--benchmark-rounds must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as a single line (exit code 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser():
    parser = OneLineParser(
        prog="capsule_network.py",
        description="Train, evaluate, benchmark or visualise CapsNet (Sabour et al., 2017) on MNIST.",
    )
    for name, help_text in constants_table():
        default = globals()[name]
        flag = "--" + name.lower().replace("_", "-")
        text = f"{help_text} (default: {default})"
        if isinstance(default, bool):
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                                default=None, help=text)
        else:
            parser.add_argument(flag, dest=name, type=type(default), default=None, help=text,
                                metavar=name)
    parser.add_argument("--resume", metavar="PATH", help="continue from a checkpoint (last.pt, best.pt)")
    parser.add_argument("--eval-only", action="store_true",
                        help="with --resume: evaluate on the test set, print accuracy and confusion matrix")
    parser.add_argument("--visualize", action="store_true",
                        help="with --resume: write the capsule visualisations as PNG files into the run dir")
    parser.add_argument("--benchmark", action="store_true",
                        help="time training and evaluation steps on synthetic data, with the baseline")
    parser.add_argument("--benchmark-json", metavar="PATH", help="with --benchmark: also write the results as JSON")
    parser.add_argument("--export-weights", metavar="PATH",
                        help="with --resume: write the model weights alone, in fp16, to PATH")
    parser.add_argument("--benchmark-worker", choices=("baseline", "direct"), help=argparse.SUPPRESS)
    return parser


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
        cpu = getattr(torch, "cpu", None)
        native = [getattr(cpu, n, lambda: False)() for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        if any(native):
            return torch.bfloat16
    return None


def autocast(device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


_malloc_tuned = None  # result of the first tune_cpu_malloc() call of this process


def tune_cpu_malloc():
    """Keep glibc from unmapping big activations after every step (they are page-faulted back on
    the next one; measured in README "Speed"): big blocks come from the heap, and up to 1 GiB of
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


def atomic_torch_save(obj, path):
    """Write to a temporary file in the same directory, fsync, then rename over `path`."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# ---- model ----
def squash(s, dim=-1, eps=1e-12):
    """Eq. 1: v = ||s||^2 / (1 + ||s||^2) * s / ||s||, written as s * ||s|| / (1 + ||s||^2).
    eps inside the root keeps the value and the gradient finite at s = 0."""
    sq_norm = (s * s).sum(dim=dim, keepdim=True)
    return s * (torch.sqrt(sq_norm + eps) / (1.0 + sq_norm))


def dynamic_routing(u_hat, iterations, logit_changes=None):
    """Procedure 1. u_hat (B, I, J, E) predictions of child i for parent j -> v (B, J, E), c (B, I, J).

    b_ij starts at 0 for every example; c_i = softmax over the parents j, so sum_j c_ij = 1.
    If `logit_changes` is a list, the mean |change of b_ij| of every iteration is appended to it
    (detached tensors; Appendix A's measure), including the last, unused, update.
    The model runs the same computation factored (capsule_layer); this is the plain reference.
    """
    b = u_hat.new_zeros(u_hat.shape[:3])  # (B, I, J)
    for r in range(iterations):
        c = b.softmax(dim=2)  # (B, I, J), softmax over parents j
        s = torch.einsum("bij,bije->bje", c, u_hat)  # (B, J, E) = sum_i c_ij u_hat_j|i
        v = squash(s)  # (B, J, E)
        if r < iterations - 1 or logit_changes is not None:
            agreement = torch.einsum("bije,bje->bij", u_hat, v)  # (B, I, J) = u_hat_j|i . v_j
            if logit_changes is not None:
                logit_changes.append(agreement.detach().abs().mean())
            b = b + agreement
    return v, c


class StridedConvGemmGrad(torch.autograd.Function):
    """conv2d (no padding) whose weight gradient is computed as one im2col GEMM.

    Same mathematics as F.conv2d; on CPUs oneDNN's weight-gradient kernel for the 256->256 9x9
    stride-2 PrimaryCaps convolution runs far below the matrix units' speed, and this is the
    largest single cost of a training step (measured in README "Speed")."""

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


def capsule_layer(W, u, iterations, record):
    """DigitCaps with routing: W (J, I, E, D), primary capsules u (B, I, D) -> v (B, J, E),
    c (B, I, J) and, if `record`, the mean |change of b_ij| per iteration (iterations,), else None.

    The same computation as dynamic_routing(u_hat) with u_hat_j|i = W_ij u_i (tests check this),
    factored so that u_hat, 1152 x 10 x 16 numbers per image, is never built:
      s_j = sum_i c_ij W_ij u_i            = one GEMM per class over k = (i, d), K = 9216
      u_hat_j|i . v_j = u_i . (W_ij^T v_j) = one GEMM per class, then a dot over d.
    In the first iteration c_ij = 1/J for all i, j, so s is a single GEMM of u with all of W."""
    J, I, E, D = W.shape
    B = u.shape[0]
    Wk = W.permute(0, 2, 1, 3).reshape(J, E, I * D)  # (J, E, K): row e of W_ij for every k = (i, d)
    u_flat = u.reshape(B, I * D)  # (B, K)
    changes = []
    b = None  # routing logits, (J, B, I); b_ij = 0 before the first iteration
    for r in range(iterations):
        if b is None:
            c = u.new_full((J, B, I), 1.0 / J)  # softmax of zeros over the J parents
            s = (u_flat @ Wk.reshape(J * E, I * D).t()).reshape(B, J, E).transpose(0, 1) / J  # (J, B, E)
        else:
            c = b.softmax(dim=0)  # (J, B, I), softmax over parents j
            x = (c.unsqueeze(-1) * u.unsqueeze(0)).reshape(J, B, I * D)  # (J, B, K): c_ij u_i
            s = torch.bmm(x, Wk.transpose(1, 2))  # (J, B, E) = sum_i c_ij W_ij u_i
        v = squash(s)  # (J, B, E)
        if r < iterations - 1 or record:
            wv = torch.bmm(v, Wk).reshape(J, B, I, D)  # W_ij^T v_j
            agreement = (wv * u.unsqueeze(0)).sum(-1)  # (J, B, I) = u_hat_j|i . v_j
            if record:
                changes.append(agreement.detach().abs().mean())
            b = agreement if b is None else b + agreement
    return v.transpose(0, 1), c.permute(1, 2, 0), (torch.stack(changes) if record else None)


class CompiledOrEager:
    """torch.compile(fn), falling back to fn with one warning if compiling fails (no compiler,
    unsupported platform). Compilation happens at the first call of each new input kind."""

    def __init__(self, fn):
        self.eager = fn
        self.fn = torch.compile(fn)

    def __call__(self, *args):
        if self.fn is self.eager:
            return self.eager(*args)
        try:
            return self.fn(*args)
        except Exception as e:  # torch._dynamo / inductor raise many types
            first = (str(e).strip().splitlines() or [""])[0][:160]
            print(f"warning: torch.compile failed ({type(e).__name__}: {first}); running eagerly",
                  file=sys.stderr)
            self.fn = self.eager
            return self.eager(*args)


class CapsuleNet(nn.Module):
    """Conv1 -> PrimaryCaps -> DigitCaps (routing) -> lengths, plus the masked decoder (Fig. 1, 2)."""

    def __init__(self, conv1_channels=CONV1_CHANNELS, primary_caps=PRIMARY_CAPS, primary_dim=PRIMARY_DIM,
                 digit_dim=DIGIT_DIM, num_classes=NUM_CLASSES, kernel_size=KERNEL_SIZE,
                 routing_iterations=ROUTING_ITERATIONS, w_init_std=W_INIT_STD,
                 decoder_hidden=(DECODER_HIDDEN1, DECODER_HIDDEN2), image_size=28,
                 dft_conv=CPU_DFT_CONV, gemm_weight_grad=CPU_GEMM_WEIGHT_GRAD, cpu_malloc_tuning=CPU_MALLOC_TUNING):
        super().__init__()
        self.primary_caps, self.primary_dim = primary_caps, primary_dim
        self.num_classes, self.digit_dim = num_classes, digit_dim
        self.routing_iterations = routing_iterations
        self.image_size = image_size
        self.conv1 = nn.Conv2d(1, conv1_channels, kernel_size)
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
            nn.Linear(decoder_hidden[1], image_size * image_size), nn.Sigmoid(),
        )
        self.record_routing = False  # when True, capsules() appends Appendix A's logit changes
        self.logit_changes = []
        self.capsule_layer = capsule_layer  # replaced by a compiled version by use_compile()
        self.dft_conv = dft_conv  # on CPU tensors only (conv2d_dft)
        self.gemm_weight_grad = gemm_weight_grad  # on CPU tensors only, without dft_conv (StridedConvGemmGrad)
        self._weight_f = None  # (weight, dtype, its values, dft_weight) kept between evaluation batches
        self.cpu_malloc_tuning = cpu_malloc_tuning  # tune_cpu_malloc() at the first CPU forward

    def use_compile(self):
        """torch.compile the capsule part only: it fuses the memory-bound routing ops, while the
        convolutions stay on the vendor kernels (compiling them made CPU training slower)."""
        self.capsule_layer = CompiledOrEager(capsule_layer)

    def primary_capsules(self, images):
        """images (B, 1, H, W) -> squashed primary capsules (B, I=1152, D=8)."""
        if self.dft_conv and images.device.type == "cpu":
            # Given its one input channel with channels-last strides (the same memory), Conv1
            # writes channels-last: the layout conv2d_dft reads without a transpose.
            _, _, H, W = images.shape
            images = images.contiguous().as_strided(images.shape, (H * W, 1, W, 1))
            x = F.relu(self.conv1(images), inplace=True).permute(0, 2, 3, 1)  # (B, 20, 20, 256)
            x = conv2d_dft(x, self.primary.weight, self.primary.bias, self.primary.stride[0], x.dtype,
                           self.cached_weight_f(x.dtype))  # (B, 32*8, 6, 6)
        else:
            x = F.relu(self.conv1(images), inplace=True)  # (B, 256, 20, 20)
            if (self.gemm_weight_grad and x.device.type == "cpu" and torch.is_grad_enabled()
                    and self.primary.weight.requires_grad):
                dtype = x.dtype  # bf16 under autocast
                x = StridedConvGemmGrad.apply(x, self.primary.weight.to(dtype), self.primary.bias.to(dtype),
                                              self.primary.stride[0])  # (B, 32*8, 6, 6)
            else:
                x = self.primary(x)  # (B, 32*8, 6, 6)
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
                                           dft_weight(w, self.primary.stride[0], self.grid, dtype))
        return cached[3]

    def capsules(self, images):
        """images (B, 1, H, W) -> digit capsules v (B, J, E) and couplings c (B, I, J), in fp32."""
        if self.cpu_malloc_tuning and images.device.type == "cpu":
            tune_cpu_malloc()  # once per process; without it CPU steps ran up to 1.5x slower (README "Speed")
        u = self.primary_capsules(images)  # (B, I, D)
        with torch.autocast(device_type=u.device.type, enabled=False):
            v, c, changes = self.capsule_layer(self.W.float(), u, self.routing_iterations, self.record_routing)
        if changes is not None:
            self.logit_changes.append(changes)
        return v, c

    def decode(self, v, classes):
        """Reconstruct from the capsule of `classes` (B,) alone: v (B, J, E) -> (B, 1, H, W)."""
        mask = F.one_hot(classes, self.num_classes).to(v.dtype)  # (B, J)
        masked = (v * mask.unsqueeze(-1)).flatten(1)  # (B, J*E)
        out = self.decoder(masked)
        return out.reshape(-1, 1, self.image_size, self.image_size)

    def forward(self, images, labels=None):
        """images (B, 1, 28, 28) in [0, 1] -> (lengths (B, J), reconstructions (B, 1, 28, 28)).

        The decoder sees the capsule of `labels` when given (training), else the longest one."""
        v, _ = self.capsules(images)
        lengths = torch.sqrt((v * v).sum(-1) + 1e-12)  # (B, J): class scores, no softmax
        classes = labels if labels is not None else lengths.argmax(dim=1)
        return lengths, self.decode(v, classes)


class CapsuleLoss(nn.Module):
    """Margin loss (eq. 4) summed over classes + RECON_WEIGHT x summed squared error, batch mean."""

    def __init__(self, m_plus=M_PLUS, m_minus=M_MINUS, lambda_absent=LAMBDA_ABSENT, recon_weight=RECON_WEIGHT):
        super().__init__()
        self.m_plus, self.m_minus = m_plus, m_minus
        self.lambda_absent, self.recon_weight = lambda_absent, recon_weight

    def forward(self, images, labels, lengths, reconstructions):
        lengths = lengths.float()
        present = F.one_hot(labels, lengths.shape[1]).to(lengths.dtype)  # (B, J)
        margin = (present * F.relu(self.m_plus - lengths) ** 2
                  + self.lambda_absent * (1 - present) * F.relu(lengths - self.m_minus) ** 2).sum(1)
        error = (reconstructions.float() - images.float()).flatten(1)  # (B, 784)
        return (margin + self.recon_weight * (error * error).sum(1)).mean()


def build_model(cfg):
    return CapsuleNet(cfg["CONV1_CHANNELS"], cfg["PRIMARY_CAPS"], cfg["PRIMARY_DIM"], cfg["DIGIT_DIM"],
                      cfg["NUM_CLASSES"], cfg["KERNEL_SIZE"], cfg["ROUTING_ITERATIONS"], cfg["W_INIT_STD"],
                      (cfg["DECODER_HIDDEN1"], cfg["DECODER_HIDDEN2"]),
                      dft_conv=cfg["CPU_DFT_CONV"], gemm_weight_grad=cfg["CPU_GEMM_WEIGHT_GRAD"],
                      cpu_malloc_tuning=cfg["CPU_MALLOC_TUNING"])


def build_optimizer(model, cfg):
    """Adam (TensorFlow's defaults but the learning rate, as in the paper), as one fused kernel
    where this torch has it: the same update, about 3x faster than the per-parameter loop on the CPU."""
    try:
        return torch.optim.Adam(model.parameters(), lr=cfg["LR"], fused=True)
    except (RuntimeError, TypeError, ValueError):  # older torch, or a device without the kernel
        return torch.optim.Adam(model.parameters(), lr=cfg["LR"])


def build_loss(cfg):
    return CapsuleLoss(cfg["M_PLUS"], cfg["M_MINUS"], cfg["LAMBDA_ABSENT"], cfg["RECON_WEIGHT"])


# ---- data ----
def load_mnist(data_dir, train, limit=0):
    """MNIST through torchvision -> (images uint8 (N, 28, 28), labels int64 (N,)), on the CPU.
    Raises UsageError (one line) if the files are missing, cannot be downloaded, or are corrupt."""
    from torchvision.datasets import MNIST

    raw = os.path.join(data_dir, "MNIST", "raw")
    chatter = io.StringIO()  # torchvision prints its download attempts; we report one line
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            dataset = MNIST(data_dir, train=train, download=True)
        images, labels = dataset.data, dataset.targets
        if images.dim() != 3 or tuple(images.shape[1:]) != (28, 28) or images.dtype != torch.uint8:
            raise ValueError(f"images have shape {tuple(images.shape)}, expected (N, 28, 28) uint8")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"{len(labels)} labels for {len(images)} images")
        if len(labels) and (labels.min() < 0 or labels.max() > 9):
            raise ValueError("labels outside 0..9")
    except Exception as e:  # torchvision raises many types here; all mean "no usable MNIST"
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        reason = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"  # e.g. which file, and why
        raise UsageError(f"cannot load MNIST from {raw} (expected {', '.join(MNIST_FILES)}, or .gz of them, "
                         f"or a network connection to download them): {type(e).__name__}: {reason}") from None
    if limit:
        images, labels = images[:limit], labels[:limit]
    return images, labels.long()


class DeviceBatches:
    """Batches by index slicing of a device-side permutation of a data set that lives on the device."""

    def __init__(self, images, labels, batch_size, shuffle):
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle = batch_size, shuffle

    def __len__(self):
        return math.ceil(len(self.labels) / self.batch_size)

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


def to_float_images(images_u8):
    """uint8 (B, 28, 28) -> float (B, 1, 28, 28) in [0, 1]."""
    return images_u8.unsqueeze(1).float().div_(255.0)


# ---- train / eval steps ----
class Stepper:
    """The network callable torchnet's Engine calls: sample -> (loss, lengths).

    Training images get their per-image random shift here, on the device; test images never do."""

    def __init__(self, model, loss_fn, device, dtype, max_shift, channels_last):
        self.model, self.loss_fn = model, loss_fn
        self.device, self.dtype = device, dtype
        self.max_shift, self.channels_last = max_shift, channels_last

    def __call__(self, sample):
        images_u8, labels = sample
        training = self.model.training  # the mode is the model's: model.train() / model.eval()
        images = to_float_images(images_u8)
        if training:
            images = random_shift(images, self.max_shift)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.dtype):
            lengths, recon = self.model(images, labels if training else None)
        loss = self.loss_fn(images, labels, lengths, recon)
        return loss, lengths.detach()


class PassStats:
    """Loss sum, correct count and per-batch outputs of one pass, kept on the device (no sync per
    batch); handed to the torchnet meters once, at the end of the pass."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self):
        self.loss_sum = torch.zeros((), device=self.device)
        self.correct = torch.zeros((), device=self.device, dtype=torch.long)
        self.count = 0
        self.batch_losses, self.batch_sizes, self.outputs, self.targets = [], [], [], []

    def add(self, loss, lengths, labels):
        n = labels.shape[0]
        self.loss_sum += loss.detach() * n
        self.correct += (lengths.argmax(1) == labels).sum()
        self.count += n
        self.batch_losses.append(loss.detach())
        self.batch_sizes.append(n)
        self.outputs.append(lengths.float())
        self.targets.append(labels)

    def running(self):
        """(mean loss, accuracy %) so far: one device sync."""
        loss, correct = torch.stack([self.loss_sum, self.correct.to(self.loss_sum.dtype)]).tolist()
        return loss / max(self.count, 1), 100.0 * correct / max(self.count, 1)

    def feed(self, loss_meter, acc_meter, conf_meter):
        if not self.count:
            return
        for loss, n in zip(torch.stack(self.batch_losses).tolist(), self.batch_sizes):
            loss_meter.add(loss * n, n)  # AverageValueMeter.add(sum, n) keeps the per-image mean
        outputs, targets = torch.cat(self.outputs).cpu(), torch.cat(self.targets).cpu()
        acc_meter.add(outputs, targets)
        conf_meter.add(outputs, targets)


# ---- Visdom ----
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
                  f"(start one with: python -m visdom.server -port {port})", file=sys.stderr)
            return
        from torchnet.logger import VisdomLogger, VisdomPlotLogger

        def plot(title, ylabel):
            return VisdomPlotLogger("line", env=env, port=port, server=server, win=f"{env}_{title}",
                                    opts=dict(title=title, xlabel="epoch", ylabel=ylabel, markers=True, markersize=6))

        def window(kind, title, **opts):
            return VisdomLogger(kind, env=env, port=port, server=server, win=f"{env}_{title}",
                                opts=dict(title=title, **opts))

        try:
            with contextlib.redirect_stdout(io.StringIO()):
                self.loss = plot("loss", "loss")
                self.accuracy = plot("accuracy", "accuracy (%)")
                self.lr = plot("learning rate", "learning rate")
                self.routing = plot("routing logit change", "mean |change of b_ij|")
                labels = [str(k) for k in range(cfg["NUM_CLASSES"])]
                self.confusion = window("heatmap", "confusion matrix (test)", columnnames=labels,
                                        rownames=labels, xlabel="predicted", ylabel="true")
                self.recon = window("image", "test images (top) and reconstructions (bottom)")
                self.fig4 = window("image", "Fig. 4: each of the 16 dimensions perturbed by -0.25..0.25")
                self.masks = window("image", "reconstruction under every class mask (rows: digits, cols: masks)")
                self.couplings = window("image", "couplings c_ij of one test image (per class: 32 types x 6x6; "
                                                 "min black, max white)")
            self.loggers = [self.loss, self.accuracy, self.lr, self.routing, self.confusion, self.recon,
                            self.fig4, self.masks, self.couplings]
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

    def log_epoch(self, epoch, row, confusion, recon_grid, figures=None):
        if not self.enabled:
            return
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                self._lines(self.loss, epoch, {"train": row["train_loss"], "test": row["test_loss"]})
                self._lines(self.accuracy, epoch, {"train": row["train_accuracy"], "test": row["test_accuracy"]})
                self._lines(self.lr, epoch, {"lr": row["lr"]})
                if row.get("routing_logit_change"):
                    self._lines(self.routing, epoch, {f"iteration {k + 1}": value for k, value in
                                                      enumerate(row["routing_logit_change"])})
                self.confusion.log(confusion)
                self.recon.log(recon_grid.numpy())
                if figures:
                    self.fig4.log(figures["fig4"].numpy())
                    self.masks.log(figures["class_masks"].numpy())
                    self.couplings.log(figures["couplings"].numpy())
        except Exception as e:  # a server that went away: warn once, keep training
            self._fail(e)


# ---- visualisations (Part B of the paper's figures) ----
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


def visual_figures(model, images_u8, labels, num_classes):
    """All capsule figures as CHW float images in [0, 1] (CPU), for PNG files and Visdom."""
    from torchvision.utils import make_grid

    was_training = model.training
    model.eval()
    digits, _ = one_per_class(images_u8, labels, num_classes)
    x = to_float_images(digits)
    pert = perturbation_grid(model, x)  # (K, E, S, 1, 28, 28)
    per_digit = [make_grid(p.flatten(0, 1).float().cpu(), nrow=p.shape[1], padding=1, pad_value=0.5)
                 for p in pert]
    masks = class_mask_grid(model, x)  # (K, J, 1, 28, 28)
    maps = coupling_maps(model, x[:1]).float().cpu()  # (J, T, 6, 6)
    scaled = (maps - maps.min()) / (maps.max() - maps.min()).clamp_min(1e-12)  # smallest black, largest white
    panels = [make_grid(F.interpolate(m.unsqueeze(1), scale_factor=4, mode="nearest"), nrow=8, padding=1,
                        pad_value=0.3) for m in scaled]
    model.train(was_training)
    return {
        "fig4_per_digit": per_digit,
        "fig4": make_grid(torch.stack(per_digit), nrow=5, padding=6, pad_value=1.0),
        "class_masks": make_grid(torch.cat([x.cpu().unsqueeze(1), masks.float().cpu()], 1).flatten(0, 1),
                                 nrow=masks.shape[1] + 1, padding=2, pad_value=0.5),
        "couplings": make_grid(torch.stack(panels), nrow=5, padding=6, pad_value=1.0),
        "coupling_maps": maps,
    }


def plot_curves_png(rows, path):
    """Test accuracy (top) and train/test loss (bottom) per epoch from metrics.jsonl rows, drawn with
    PIL (no plotting library). Every value is drawn inside its panel's range, none clipped."""
    from PIL import Image, ImageDraw

    W, H, pad = 900, 360, 50
    img = Image.new("RGB", (W, H * 2), "white")
    draw = ImageDraw.Draw(img)
    epochs = [r["epoch"] for r in rows]
    panels = [("test accuracy (%)", [("test", [r["test_accuracy"] for r in rows], (200, 30, 30))]),
              ("loss", [("test", [r["test_loss"] for r in rows], (200, 30, 30)),
                        ("train", [r["train_loss"] for r in rows], (30, 30, 200))])]
    for p, (title, series) in enumerate(panels):
        top = p * H
        values = [v for _, ys, _ in series for v in ys]
        lo, hi = min(values), max(values)
        hi = hi if hi > lo else lo + 1
        x0, x1, y0, y1 = pad + 30, W - pad, top + pad, top + H - pad

        def xy(e, v):
            fx = (e - epochs[0]) / max(epochs[-1] - epochs[0], 1)
            fy = (v - lo) / (hi - lo)
            return x0 + fx * (x1 - x0), y1 - fy * (y1 - y0)

        draw.rectangle([x0, y0, x1, y1], outline="black")
        draw.text((x0, top + 15), title, fill="black")
        for k in range(5):
            v = lo + (hi - lo) * k / 4
            _, y = xy(epochs[0], v)
            draw.line([x0 - 4, y, x0, y], fill="black")
            draw.text((5, y - 6), f"{v:.4g}", fill="black")
        for e in sorted({epochs[0], epochs[-1], epochs[len(epochs) // 2]}):
            x, _ = xy(e, lo)
            draw.text((x - 6, y1 + 6), str(e), fill="black")
        draw.text(((x0 + x1) // 2 - 15, y1 + 22), "epoch", fill="black")
        for k, (name, ys, color) in enumerate(series):
            points = [xy(e, v) for e, v in zip(epochs, ys)]
            if len(points) > 1:
                draw.line(points, fill=color, width=2)
            for x, y in points:
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
            draw.text((x1 - 80, y0 + 10 + 15 * k), name, fill=color)
    img.save(path)


def plot_routing_png(rows, path):
    """Appendix A: mean |change of b_ij| per routing iteration, per epoch, drawn with PIL."""
    rows = [r for r in rows if r.get("routing_logit_change")]
    if not rows:
        return False
    from PIL import Image, ImageDraw

    W, H, pad = 900, 380, 60
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    iterations = len(rows[0]["routing_logit_change"])
    values = [v for r in rows for v in r["routing_logit_change"]]
    hi = max(values) or 1.0
    epochs = [r["epoch"] for r in rows]
    x0, x1, y0, y1 = pad, W - pad, pad, H - pad
    draw.rectangle([x0, y0, x1, y1], outline="black")
    draw.text((x0, 20), "mean |change of routing logit b_ij| per iteration (Appendix A)", fill="black")
    for k in range(5):
        y = y1 - (y1 - y0) * k / 4
        draw.text((5, y - 6), f"{hi * k / 4:.3g}", fill="black")
    colors = [(200, 30, 30), (30, 130, 30), (30, 30, 200), (150, 0, 150), (0, 150, 150)]
    for it in range(iterations):
        pts = [(x0 + (e - epochs[0]) / max(epochs[-1] - epochs[0], 1) * (x1 - x0),
                y1 - r["routing_logit_change"][it] / hi * (y1 - y0)) for e, r in zip(epochs, rows)]
        color = colors[it % len(colors)]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        for x, y in pts:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
        draw.text((x1 - 100, y0 + 10 + 15 * it), f"iteration {it + 1}", fill=color)
    draw.text((x0, y1 + 10), f"epoch {epochs[0]}", fill="black")
    draw.text((x1 - 60, y1 + 10), f"epoch {epochs[-1]}", fill="black")
    img.save(path)
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


# ---- checkpoints ----
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
        return ckpt
    if isinstance(ckpt, dict) and all(torch.is_tensor(v) for v in ckpt.values()):
        return {"model": ckpt}
    raise UsageError(f"--resume: {path} holds neither a checkpoint nor a model state dict")


def load_weights(model, state):
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise UsageError(f"--resume: the weights do not fit this model's constants: {first}") from None


# ---- training ----
class Trainer:
    """torchnet Engine with named hooks: a train pass per epoch, then a test pass, logs, checkpoint."""

    def __init__(self, cfg, device, model, optimizer, scheduler, train_data, test_data, start_epoch=0,
                 best_accuracy=None):
        from torchnet import meter
        from torchnet.engine import Engine

        self.cfg, self.device, self.model = cfg, device, model
        self.optimizer, self.scheduler = optimizer, scheduler
        self.dtype = amp_dtype(device, cfg["AMP"])
        self.network = Stepper(model, build_loss(cfg), device, self.dtype, cfg["MAX_SHIFT"], cfg["CHANNELS_LAST"])
        self.train_batches = DeviceBatches(*train_data, cfg["BATCH_SIZE"], shuffle=True)
        self.test_batches = DeviceBatches(*test_data, cfg["EVAL_BATCH_SIZE"], shuffle=False)
        self.test_images, self.test_labels = test_data
        self.start_epoch, self.best_accuracy = start_epoch, best_accuracy
        self.meters = {mode: (meter.AverageValueMeter(), meter.ClassErrorMeter(accuracy=True),
                              meter.ConfusionMeter(cfg["NUM_CLASSES"])) for mode in ("train", "test")}
        self.stats = PassStats(device)
        self.visdom = VisdomPlots(cfg)
        self.run_dir = cfg["RUN_DIR"]
        self.engine = Engine()
        self.engine.hooks.update(on_start=self.on_start, on_start_epoch=self.on_start_epoch,
                                 on_forward=self.on_forward, on_end_epoch=self.on_end_epoch)
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

    def on_forward(self, state):
        _, labels = state["sample"]
        self.stats.add(state["loss"], state["output"], labels)
        self.tick()

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
        for m in self.meters[mode]:
            m.reset()
        self.stats.reset()
        self.batch_in_pass = 0

    def progress(self, batches, desc):
        from tqdm import tqdm

        self.bar = tqdm(batches, desc=desc, leave=False, dynamic_ncols=True, mininterval=0.5,
                        file=sys.stderr, unit="batch")
        return self.bar

    def tick(self):
        self.batch_in_pass += 1
        if self.batch_in_pass % self.cfg["PROGRESS_EVERY"] == 0:
            loss, acc = self.stats.running()
            self.bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.2f}%", refresh=False)

    def finish_pass(self, mode):
        self.stats.feed(*self.meters[mode])
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
        (train_loss, _), train_acc, _ = (m.value() for m in self.meters["train"])
        (test_loss, _), test_acc, _ = (m.value() for m in self.meters["test"])
        return {"epoch": epoch, "lr": lr, "train_loss": float(train_loss), "train_accuracy": train_acc[0],
                "test_loss": float(test_loss), "test_accuracy": test_acc[0],
                "train_seconds": round(train_seconds, 3), "test_seconds": round(test_seconds, 3),
                "train_images_per_s": round(len(self.train_batches.labels) / train_seconds, 1),
                "routing_logit_change": changes}

    def end_epoch(self, state, row):
        epoch = state["epoch"]
        print(f"epoch {epoch}/{state['maxepoch']}  lr {row['lr']:.3g}  train loss {row['train_loss']:.4f} "
              f"acc {row['train_accuracy']:.2f}%  test loss {row['test_loss']:.4f} acc {row['test_accuracy']:.2f}%  "
              f"({row['train_seconds']:.1f}s + {row['test_seconds']:.1f}s)", flush=True)
        is_best = self.best_accuracy is None or row["test_accuracy"] > self.best_accuracy
        if is_best:
            self.best_accuracy = row["test_accuracy"]
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
                "config": self.cfg, "rng_state": rng_state()}

    def log_visdom(self, epoch, row):
        from torchvision.utils import make_grid

        n = min(self.cfg["RECON_IMAGES"], len(self.test_labels))
        self.model.eval()
        with torch.no_grad(), autocast(self.device, self.dtype):
            images = to_float_images(self.test_images[:n])
            _, recon = self.model(images)
        grid = make_grid(torch.cat([images, recon.float()]).cpu(), nrow=n, padding=2, pad_value=0.5)
        figures = None
        if self.cfg["VISUALIZE_EVERY_EPOCH"]:
            figures = visual_figures(self.model, self.test_images, self.test_labels, self.cfg["NUM_CLASSES"])
        confusion = self.meters["test"][2].value()
        self.visdom.log_epoch(epoch, row, confusion, grid, figures)

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


def prepare(cfg):
    """Device, seeded RNG and allocator settings shared by every mode -> (device, malloc tuned?)."""
    device = resolve_device(cfg["DEVICE"])
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
    if cfg["COMPILE"]:
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


def run_training(cfg, ckpt):
    device, _ = prepare(cfg)
    if ckpt is None:
        cfg["RUN_DIR"] = fresh_run_dir(cfg["RUN_DIR"])
    os.makedirs(cfg["RUN_DIR"], exist_ok=True)
    train_data = [t.to(device) for t in load_mnist(cfg["DATA_DIR"], True, cfg["TRAIN_SIZE"])]
    test_data = [t.to(device) for t in load_mnist(cfg["DATA_DIR"], False, cfg["TEST_SIZE"])]
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
        truncate_metrics(cfg["RUN_DIR"], start_epoch)
        print(f"resumed from epoch {start_epoch} (best test accuracy so far {best:.2f}%) in {cfg['RUN_DIR']}")
    dtype = amp_dtype(device, cfg["AMP"])
    print(f"CapsNet: {sum(p.numel() for p in model.parameters()):,} parameters on {device}"
          f" ({'bf16 autocast' if dtype else 'fp32'}), {len(train_data[1]):,} training and "
          f"{len(test_data[1]):,} test images, seed {cfg['SEED']}, run dir {cfg['RUN_DIR']}")
    if start_epoch >= cfg["EPOCHS"]:
        print(f"nothing to do: the checkpoint is at epoch {start_epoch} and --epochs is {cfg['EPOCHS']}")
        return
    trainer = Trainer(cfg, device, model, optimizer, scheduler, train_data, test_data, start_epoch, best)
    trainer.train(cfg["EPOCHS"])


def run_eval(cfg, ckpt):
    from torchnet import meter

    device, _ = prepare(cfg)
    test_images, test_labels = (t.to(device) for t in load_mnist(cfg["DATA_DIR"], False, cfg["TEST_SIZE"]))
    model = place_model(build_model(cfg), cfg, device)
    load_weights(model, ckpt["model"])
    dtype = amp_dtype(device, cfg["AMP"])
    network = Stepper(model, build_loss(cfg), device, dtype, 0, cfg["CHANNELS_LAST"])
    stats = PassStats(device)
    loss_meter, acc_meter = meter.AverageValueMeter(), meter.ClassErrorMeter(accuracy=True)
    conf_meter = meter.ConfusionMeter(cfg["NUM_CLASSES"])
    model.eval()
    started = time.perf_counter()
    with torch.no_grad():
        for images, labels in DeviceBatches(test_images, test_labels, cfg["EVAL_BATCH_SIZE"], shuffle=False):
            loss, lengths = network((images, labels))
            stats.add(loss, lengths, labels)
    sync(device)
    seconds = time.perf_counter() - started
    stats.feed(loss_meter, acc_meter, conf_meter)
    result = {"test_accuracy": acc_meter.value()[0], "test_loss": float(loss_meter.value()[0]),
              "test_images": len(test_labels), "seconds": round(seconds, 3), "device": str(device),
              "dtype": "bf16" if dtype else "fp32", "checkpoint_epoch": ckpt.get("epoch")}
    print(f"test accuracy {result['test_accuracy']:.2f}%  test loss {result['test_loss']:.4f}  "
          f"({len(test_labels):,} images, {seconds:.1f}s)")
    print("confusion matrix (rows: true class, columns: predicted):")
    for k, counts in enumerate(conf_meter.value()):
        print(f"  {k}: " + " ".join(f"{int(c):5d}" for c in counts))
    os.makedirs(cfg["RUN_DIR"], exist_ok=True)
    with open(os.path.join(cfg["RUN_DIR"], "eval.json"), "w", encoding="utf-8") as f:
        json.dump(dict(result, confusion=conf_meter.value().tolist()), f, indent=1)
    return result


def run_visualize(cfg, ckpt):
    from torchvision.utils import save_image

    device, _ = prepare(cfg)
    test_images, test_labels = (t.to(device) for t in load_mnist(cfg["DATA_DIR"], False, cfg["TEST_SIZE"]))
    model = build_model(cfg).to(device)
    load_weights(model, ckpt["model"])
    out = cfg["RUN_DIR"]
    os.makedirs(out, exist_ok=True)
    figures = visual_figures(model, test_images, test_labels, cfg["NUM_CLASSES"])
    _, digit_labels = one_per_class(test_images, test_labels, cfg["NUM_CLASSES"])
    written = []
    for grid, label in zip(figures["fig4_per_digit"], digit_labels.tolist()):
        written.append(os.path.join(out, f"fig4_digit{label}.png"))
        save_image(grid, written[-1])
    for name in ("class_masks", "couplings"):
        written.append(os.path.join(out, f"{name}.png"))
        save_image(figures[name], written[-1])
    rows = read_metrics(out)
    if rows:
        written.append(os.path.join(out, "curves.png"))
        plot_curves_png(rows, written[-1])
        if plot_routing_png(rows, os.path.join(out, "routing_logit_change.png")):
            written.append(os.path.join(out, "routing_logit_change.png"))
    print("wrote " + ", ".join(written))
    return written


MODEL_KEYS = ("CONV1_CHANNELS", "PRIMARY_CAPS", "PRIMARY_DIM", "DIGIT_DIM", "NUM_CLASSES", "KERNEL_SIZE",
              "ROUTING_ITERATIONS", "W_INIT_STD", "DECODER_HIDDEN1", "DECODER_HIDDEN2", "M_PLUS", "M_MINUS",
              "LAMBDA_ABSENT", "RECON_WEIGHT")  # what an exported model carries: its shape and loss


def export_weights(ckpt, cfg, path):
    """The model weights alone, in fp16, with the constants that define the model (no paths)."""
    state = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    atomic_torch_save({"model": state, "config": {k: cfg[k] for k in MODEL_KEYS}, "epoch": ckpt.get("epoch")},
                      path)
    print(f"wrote {path} ({os.path.getsize(path) / 2**20:.1f} MiB, fp16 weights)")


# ---- benchmark ----
class GramStyleCapsNet(nn.Module):
    """A CapsNet laid out like gram-ai/capsule-networks, for the speed baseline only: eight separate
    primary-capsule convolutions, a (10, B, 1152, 1, 16) routing tensor and a softmax over the
    lengths, all fp32. Same layer sizes as CapsuleNet; its semantic bugs are kept on purpose
    (this is the structure users run), and nothing trains with it."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 256, 9)
        self.primary = nn.ModuleList([nn.Conv2d(256, 32, 9, stride=2) for _ in range(8)])
        self.route_weights = nn.Parameter(0.01 * torch.randn(10, 1152, 8, 16))
        self.decoder = nn.Sequential(nn.Linear(160, 512), nn.ReLU(inplace=True), nn.Linear(512, 1024),
                                     nn.ReLU(inplace=True), nn.Linear(1024, 784), nn.Sigmoid())

    @staticmethod
    def squash(t, dim=-1):
        n2 = (t ** 2).sum(dim=dim, keepdim=True)
        return n2 / (1 + n2) * t / torch.sqrt(n2)

    def forward(self, x, y=None):
        x = F.relu(self.conv1(x), inplace=True)
        u = torch.cat([conv(x).reshape(x.size(0), -1, 1) for conv in self.primary], dim=-1)  # (B, 1152, 8)
        u = self.squash(u)
        priors = u[None, :, :, None, :] @ self.route_weights[:, None, :, :, :]  # (10, B, 1152, 1, 16)
        logits = torch.zeros_like(priors)
        for i in range(3):
            probs = F.softmax(logits, dim=2)
            v = self.squash((probs * priors).sum(dim=2, keepdim=True))  # (10, B, 1, 1, 16)
            if i != 2:
                logits = logits + (priors * v).sum(dim=-1, keepdim=True)
        v = v.squeeze(2).squeeze(2).transpose(0, 1)  # (B, 10, 16)
        classes = F.softmax((v ** 2).sum(dim=-1) ** 0.5, dim=-1)
        if y is None:
            y = classes.argmax(dim=1)
        mask = torch.eye(10, device=x.device).index_select(0, y)
        recon = self.decoder((v * mask[:, :, None]).reshape(x.size(0), -1))
        return classes, recon


def gram_style_loss(images, labels, classes, recon):
    onehot = F.one_hot(labels, 10).float()
    margin = onehot * F.relu(0.9 - classes) ** 2 + 0.5 * (1 - onehot) * F.relu(classes - 0.1) ** 2
    return (margin.sum() + 0.0005 * ((recon - images.flatten(1)) ** 2).sum()) / images.size(0)


class StepTimer:
    """One program under test: warm-up once, then `segment(mode, n)` -> n step times (seconds)."""

    def __init__(self, model, train_step, eval_step, device, warmup):
        self.model, self.steps, self.device = model, {"train": train_step, "eval": eval_step}, device
        for mode in ("train", "eval"):
            self.model.train(mode == "train")
            for _ in range(warmup):
                self.steps[mode]()
        sync(device)

    def segment(self, mode, n):
        """One untimed step (the caches are the previous program's), then n timed steps."""
        self.model.train(mode == "train")
        self.steps[mode]()
        sync(self.device)
        times = []
        for _ in range(n):
            started = time.perf_counter()
            self.steps[mode]()
            sync(self.device)
            times.append(time.perf_counter() - started)
        return times


def synthetic_batch(batch_size, seed, device):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch_size, 28, 28), dtype=torch.uint8, generator=g).to(device)
    labels = torch.randint(0, 10, (batch_size,), generator=g).to(device)
    return images, labels


def peak_memory_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def benchmark_worker(cfg, kind):
    """Runs in its own process, with the default environment, fp32 and no trainer settings:
    kind 'baseline' is the gram-ai-structured model, kind 'direct' is CapsuleNet + CapsuleLoss +
    Adam called directly, as a user's own script would. After its warm-up it prints one JSON line,
    then answers each line "train N" / "eval N" on stdin with N step times, and "done" with its
    peak memory."""
    device = resolve_device(cfg["DEVICE"])
    seed_everything(cfg["SEED"])
    if kind == "baseline":
        model, loss_fn = GramStyleCapsNet().to(device), gram_style_loss
    else:
        model, loss_fn = CapsuleNet().to(device), CapsuleLoss()
    optimizer = torch.optim.Adam(model.parameters())
    images_u8, labels = synthetic_batch(cfg["BATCH_SIZE"], cfg["SEED"], device)
    images = to_float_images(images_u8)
    eval_images = to_float_images(synthetic_batch(cfg["EVAL_BATCH_SIZE"], cfg["SEED"], device)[0])

    def train_step():
        optimizer.zero_grad()
        classes, recon = model(images, labels)
        loss_fn(images, labels, classes, recon).backward()
        optimizer.step()

    def eval_step():
        with torch.no_grad():
            model(eval_images)

    timer = StepTimer(model, train_step, eval_step, device, cfg["BENCHMARK_WARMUP"])
    print(json.dumps({"ready": kind}), flush=True)
    for line in sys.stdin:
        mode, _, n = line.strip().partition(" ")
        if mode == "done":
            break
        print(json.dumps({"times": timer.segment(mode, int(n))}), flush=True)
    print(json.dumps({"peak_memory_mib": peak_memory_mib(device)}), flush=True)


class WorkerProgram:
    """A benchmark_worker in a fresh process with the default environment (nothing inherited from
    this process's settings; the direct CapsuleNet still sets the allocator itself, as it would in
    a user's script): same interface as StepTimer, and None-safe when it fails."""

    def __init__(self, cfg, kind):
        self.kind = kind
        args = [sys.executable, os.path.abspath(__file__), "--benchmark-worker", kind,
                "--device", cfg["DEVICE"], "--batch-size", str(cfg["BATCH_SIZE"]),
                "--eval-batch-size", str(cfg["EVAL_BATCH_SIZE"]), "--seed", str(cfg["SEED"]),
                "--benchmark-warmup", str(cfg["BENCHMARK_WARMUP"])]
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True, bufsize=1)

    def request(self, line):
        """Send one command, return its JSON answer; None (with one warning) if the worker failed."""
        try:
            if line:
                self.proc.stdin.write(line + "\n")
                self.proc.stdin.flush()
            while True:  # skip anything else a library printed to stdout
                answer = self.proc.stdout.readline()
                if not answer:
                    raise EOFError(f"{self.kind} worker exited")
                if answer.startswith("{"):
                    return json.loads(answer)
        except (OSError, ValueError, EOFError):
            self.proc.kill()
            self.proc.wait()
            self.stderr.seek(0)
            tail = (self.stderr.read().strip().splitlines() or ["no output"])[-1]
            print(f"warning: {self.kind} benchmark failed: {tail}", file=sys.stderr)
            return None

    def segment(self, mode, n):
        answer = self.request(f"{mode} {n}")
        return answer and answer["times"]

    def finish(self):
        answer = self.request("done")
        self.proc.wait()
        self.stderr.close()
        return answer and answer["peak_memory_mib"]


def alternate_segments(programs, steps, rounds):
    """Time every program in turn, in `rounds` short segments per mode, the order rotating from
    round to round, so that a slow minute of a shared machine (or the page-freeing aftermath of the
    previous program) hits all of them alike -> {name: {mode: median step seconds}}. A program
    that fails is dropped."""
    sizes = [steps // rounds + (r < steps % rounds) for r in range(rounds)]
    times = {name: {"train": [], "eval": []} for name in programs}
    for mode in ("train", "eval"):
        for r, n in enumerate(k for k in sizes if k):
            names = list(programs)
            for name in names[r % len(names):] + names[:r % len(names)]:
                got = programs[name].segment(mode, n)
                if got is None:
                    del programs[name], times[name]
                else:
                    times[name][mode] += got
    return {name: {mode: sorted(t)[len(t) // 2] for mode, t in per.items()} for name, per in times.items()}


def run_benchmark(cfg, json_path=None):
    device, malloc_tuned = prepare(cfg)
    workers = {}
    if cfg["BENCHMARK_BASELINE"]:  # they start (and warm up) while this process warms up
        workers = {kind: WorkerProgram(cfg, kind) for kind in ("direct", "baseline")}
    model = place_model(build_model(cfg), cfg, device)
    optimizer = build_optimizer(model, cfg)
    dtype = amp_dtype(device, cfg["AMP"])
    network = Stepper(model, build_loss(cfg), device, dtype, cfg["MAX_SHIFT"], cfg["CHANNELS_LAST"])
    batch = synthetic_batch(cfg["BATCH_SIZE"], cfg["SEED"], device)
    eval_batch = synthetic_batch(cfg["EVAL_BATCH_SIZE"], cfg["SEED"], device)

    def train_step():  # exactly what torchnet's Engine does per training batch
        optimizer.zero_grad()
        loss, _ = network(batch)
        loss.backward()
        optimizer.step()

    def eval_step():  # what the test pass does per batch
        with torch.no_grad():
            network(eval_batch)

    programs = {"this": StepTimer(model, train_step, eval_step, device, cfg["BENCHMARK_WARMUP"])}
    programs.update((kind, w) for kind, w in workers.items() if w.request(None) is not None)  # ready
    medians = alternate_segments(programs, cfg["BENCHMARK_STEPS"], cfg["BENCHMARK_ROUNDS"])
    rates = {name: (cfg["BATCH_SIZE"] / m["train"], cfg["EVAL_BATCH_SIZE"] / m["eval"])
             for name, m in medians.items()}
    peaks = {kind: w.finish() for kind, w in workers.items() if kind in rates}
    train_ips, eval_ips = rates["this"]
    result = {
        "device": str(device), "device_name": device_name(device), "dtype": "bf16 autocast" if dtype else "fp32",
        "batch_size": cfg["BATCH_SIZE"], "eval_batch_size": cfg["EVAL_BATCH_SIZE"],
        "steps": cfg["BENCHMARK_STEPS"], "rounds": cfg["BENCHMARK_ROUNDS"], "warmup": cfg["BENCHMARK_WARMUP"],
        "statistic": "median step",
        "train_images_per_s": round(train_ips, 1), "eval_images_per_s": round(eval_ips, 1),
        "seconds_per_mnist_epoch": round(60000 / train_ips + 10000 / eval_ips, 1),
        "peak_memory_mib": round(peak_memory_mib(device), 1),
        "settings": {"amp": dtype is not None, "compile": cfg["COMPILE"], "channels_last": cfg["CHANNELS_LAST"],
                     "cpu_dft_conv": device.type == "cpu" and cfg["CPU_DFT_CONV"],
                     "cpu_malloc_tuning": bool(malloc_tuned), "threads": torch.get_num_threads(),
                     "cudnn_benchmark": device.type == "cuda", "tf32": device.type == "cuda"},
        "torch": torch.__version__,
    }
    print(f"device {result['device_name']}, {result['dtype']}, batch {cfg['BATCH_SIZE']} (eval "
          f"{cfg['EVAL_BATCH_SIZE']}), median of {cfg['BENCHMARK_STEPS']} steps after {cfg['BENCHMARK_WARMUP']} "
          f"warm-up, programs alternating in {cfg['BENCHMARK_ROUNDS']} rounds")
    print(f"settings: " + ", ".join(f"{k}={v}" for k, v in result["settings"].items()))
    print(f"this model:  train {train_ips:8.1f} images/s   eval {eval_ips:8.1f} images/s   "
          f"~{result['seconds_per_mnist_epoch']:.1f} s per MNIST epoch (60k train + 10k test), "
          f"peak memory {result['peak_memory_mib']:.0f} MiB")
    labels = {"direct": ("direct fp32", "CapsuleNet + CapsuleLoss + Adam, own process"),
              "baseline": ("baseline", "gram-ai-structured, fp32, own process")}
    for kind in ("direct", "baseline"):
        if kind in rates:
            result[f"{kind}_train_images_per_s"] = round(rates[kind][0], 1)
            result[f"{kind}_eval_images_per_s"] = round(rates[kind][1], 1)
            result[f"{kind}_peak_memory_mib"] = peaks[kind] and round(peaks[kind], 1)
            print(f"{labels[kind][0] + ':':12s} train {rates[kind][0]:8.1f} images/s   eval "
                  f"{rates[kind][1]:8.1f} images/s   ({labels[kind][1]})")
    if "baseline" in rates:
        base_train, base_eval = rates["baseline"]
        result.update(train_speedup=round(train_ips / base_train, 2), eval_speedup=round(eval_ips / base_eval, 2))
        print(f"speed-up:    train {result['train_speedup']:.2f}x   eval {result['eval_speedup']:.2f}x   "
              f"(this model / baseline)")
        if "direct" in rates:
            result.update(direct_train_speedup=round(rates["direct"][0] / base_train, 2),
                          direct_eval_speedup=round(rates["direct"][1] / base_eval, 2))
            print(f"             train {result['direct_train_speedup']:.2f}x   eval "
                  f"{result['direct_eval_speedup']:.2f}x   (direct fp32 / baseline)")
    if json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return result


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
            return f"{model} ({os.cpu_count()} cores)"
        except (OSError, StopIteration):
            return "cpu"
    return device.type


# ---- main ----
def make_config(args, ckpt):
    """Constants, then the checkpoint's (when resuming), then the flags given on the command line."""
    cfg = default_config()
    explicit = {name: getattr(args, name) for name in cfg if getattr(args, name) is not None}
    if ckpt is not None and "config" in ckpt:
        training = "optimizer" in ckpt  # a training checkpoint, not exported weights
        cfg.update({k: v for k, v in ckpt["config"].items() if k in cfg and (training or k in MODEL_KEYS)})
        if training and "RUN_DIR" not in explicit:  # a training run continues in its own folder
            cfg["RUN_DIR"] = os.path.dirname(os.path.abspath(args.resume))
    cfg.update(explicit)
    validate_config(cfg)
    return cfg


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        for flag in ("eval_only", "visualize", "export_weights"):
            if getattr(args, flag) and not args.resume:
                raise UsageError(f"--{flag.replace('_', '-')} needs --resume PATH")
        ckpt = load_checkpoint(args.resume) if args.resume else None
        cfg = make_config(args, ckpt)
        if args.benchmark_worker:
            benchmark_worker(cfg, args.benchmark_worker)
        elif args.benchmark:
            run_benchmark(cfg, args.benchmark_json)
        elif args.export_weights:
            export_weights(ckpt, cfg, args.export_weights)
        elif args.eval_only:
            run_eval(cfg, ckpt)
        elif args.visualize:
            run_visualize(cfg, ckpt)
        else:
            run_training(cfg, ckpt)
    except UsageError as e:
        print(f"capsule_network.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: the last completed epoch is in last.pt; continue with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

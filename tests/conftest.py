"""Shared fixtures for the capsule_network.py test suite.

No test needs the real MNIST: `tiny_mnist` writes 200 training and 100 test images as
uncompressed IDX files in torchvision's layout (ROOT/MNIST/raw/...), so
torchvision.datasets.MNIST(ROOT, download=True) finds them and downloads nothing.
End-to-end runs use a small architecture (through the script's own flags) to stay fast.
"""

import contextlib
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "capsule_network.py")
sys.path.insert(0, ROOT)

import capsule_network as cn  # noqa: E402  (after the sys.path change)
from capsnet import data, fast  # noqa: E402

if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    # a non-interactive shell starts a background job with SIGINT ignored, and every process the
    # tests start would inherit that: Python's own handling, as in a foreground run, so that the
    # tests that press Ctrl-C on a child (test_explore.py) test the program, not how pytest began
    signal.signal(signal.SIGINT, signal.default_int_handler)

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest.ini runs more worker processes than a 2-core machine has cores: one intra-op thread
    # each (and in whatever they start), or OpenMP threads spin waiting for a core another holds
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"

MNIST_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
N_TRAIN, N_TEST = 200, 100

# Small architecture for end-to-end runs: every size is a flag of the script.
SMALL_ARCH = ["--conv1-channels", "16", "--primary-caps", "4",
              "--decoder-hidden1", "32", "--decoder-hidden2", "64"]
SMALL_BATCHES = ["--batch-size", "20", "--eval-batch-size", "50"]
METRIC_KEYS = {"epoch", "lr", "train_loss", "train_accuracy", "test_loss", "test_accuracy",
               "train_seconds", "test_seconds"}
CHECKPOINT_KEYS = {"model", "optimizer", "scheduler", "epoch", "best_accuracy", "config", "rng_state"}


# The files that take longest, longest first (seconds of wall at -n 3 on the 2-core machine,
# results/README.md: 168, 121, 115, 78, 57, 52, 45, 40, 30). pytest-xdist hands whole files to its
# workers in the order of collection (pytest.ini: --no-loadscope-reorder), so none of them starts
# last and keeps one worker busy after the others have finished.
LONGEST_FILES = ("test_distributed.py", "test_benchmark.py", "test_visdom.py", "test_efficient.py",
                 "test_explore.py", "test_baseline.py", "test_visualisations.py", "test_faults.py",
                 "test_compile.py")


def pytest_collection_modifyitems(items):
    rank = {name: k for k, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FILES)))  # stable: each file's order kept


# ---- tiny MNIST ----
def make_digits(n, seed):
    """n learnable-ish 28x28 uint8 images: class k is a bright 6x6 blob at a class-specific place
    (jittered by one pixel) on a noisy background. Labels cycle 0..9, so any prefix of >= 10
    images holds every class."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    images = rng.integers(0, 40, size=(n, 28, 28)).astype(np.uint8)
    for i, k in enumerate(labels):
        r = 4 + (k // 4) * 7 + rng.integers(-1, 2)
        c = 3 + (k % 4) * 6 + rng.integers(-1, 2)
        images[i, r:r + 6, c:c + 6] = 180 + rng.integers(0, 76)
    return images, labels.astype(np.uint8)


def write_idx_images(path, images):
    n, h, w = images.shape
    with open(path, "wb") as f:
        f.write(struct.pack(">IIII", 0x00000803, n, h, w) + images.astype(np.uint8).tobytes())


def write_idx_labels(path, labels):
    with open(path, "wb") as f:
        f.write(struct.pack(">II", 0x00000801, len(labels)) + np.asarray(labels, np.uint8).tobytes())


def write_mnist(root, n_train=N_TRAIN, n_test=N_TEST):
    """Write the four IDX files under root/MNIST/raw; return the arrays written."""
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    train, test = make_digits(n_train, seed=1), make_digits(n_test, seed=2)
    for prefix, (images, labels) in (("train", train), ("t10k", test)):
        write_idx_images(os.path.join(raw, f"{prefix}-images-idx3-ubyte"), images)
        write_idx_labels(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), labels)
    return {"root": root, "raw": raw, "train": train, "test": test}


@pytest.fixture(scope="session")
def tiny_mnist(tmp_path_factory):
    """Read-only tiny MNIST shared by the session (tests that corrupt data make their own)."""
    return write_mnist(str(tmp_path_factory.mktemp("mnist")))


@pytest.fixture(scope="session")
def real_digits(tmp_path_factory):
    """The first 200 MNIST test digits as the test split of a data folder (the training split:
    tiny synthetic digits, which --eval-only does not read)."""
    fixture = np.load(os.path.join(ROOT, "tests", "fixtures", "mnist-test-first200.npz"))
    root = str(tmp_path_factory.mktemp("real"))
    raw = write_mnist(root)["raw"]
    write_idx_images(os.path.join(raw, "t10k-images-idx3-ubyte"), fixture["images"])
    write_idx_labels(os.path.join(raw, "t10k-labels-idx1-ubyte"), fixture["labels"])
    return root


@pytest.fixture
def fresh_mnist(tmp_path):
    """A private copy of tiny MNIST that a test may damage."""
    return write_mnist(str(tmp_path / "data"))


# ---- running the script ----
def run_script(args, cwd=None, timeout=300, env=None):
    """Run capsule_network.py in a subprocess -> CompletedProcess (text), with .seconds added."""
    # One intra-op thread: the tiny runs gain nothing from two, and spinning OpenMP threads make
    # them very slow when the machine is shared (results are the same either way).
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    full_env.update(env or {})
    started = time.perf_counter()
    done = subprocess.run([sys.executable, SCRIPT, *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    done.seconds = time.perf_counter() - started
    return done


def run_main(args):
    """capsule_network.main(args) in this process -> the fields of run_script's result (returncode,
    stdout, stderr, seconds), for runs where a separate process is not what is tested: it saves
    the start of a Python with torch (about 4 s each). One intra-op thread, as run_script's."""
    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cn.main([str(a) for a in args])
            except SystemExit as e:  # argparse's errors
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        torch.set_num_threads(threads)
    done = subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
    done.seconds = time.perf_counter() - started
    return done


def describe(done):
    """Failure message with the process's output."""
    return f"exit {done.returncode}\n--- stdout ---\n{done.stdout[-4000:]}\n--- stderr ---\n{done.stderr[-4000:]}"


def train_args(data_root, run_dir, *extra, epochs=2):
    """Flags of a tiny training run on the CPU (also on a machine with a GPU: tests/test_cuda.py
    covers CUDA) with the eager capsule layer: COMPILE = "auto" picks by timing, and runs compared
    step for step must not pick differently; compiling is the subject of tests/test_compile.py
    and tests/test_speedups.py, which ask for it (a later flag wins)."""
    return ["--data-dir", data_root, "--run-dir", run_dir, "--no-visdom", "--epochs", epochs, "--device", "cpu",
            "--compile", "off", *SMALL_ARCH, *SMALL_BATCHES, *extra]


def backend_flags():
    """The global backend settings setup_process changes on CUDA: cudnn.benchmark and TF32, read
    through the API this torch has (reading the old one after the new was set raises)."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision"):
        return {"benchmark": cudnn.benchmark, "matmul": matmul.fp32_precision, "conv": cudnn.conv.fp32_precision}
    return {"benchmark": cudnn.benchmark, "matmul": matmul.allow_tf32, "conv": cudnn.allow_tf32}


@pytest.fixture
def restore_backend_flags():
    """Put back cudnn.benchmark and TF32 after a test that sets them (a CUDA run in this process,
    setup_process), so that the tests after it compute as before."""
    saved = backend_flags()
    yield saved
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    cudnn.benchmark = saved["benchmark"]
    if hasattr(matmul, "fp32_precision"):
        matmul.fp32_precision, cudnn.conv.fp32_precision = saved["matmul"], saved["conv"]
    else:
        matmul.allow_tf32, cudnn.allow_tf32 = saved["matmul"], saved["conv"]


def read_rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_pt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="session")
def trained_run(tiny_mnist, tmp_path_factory):
    """A 2-epoch training run of the small architecture (seed 0). Tests must not write into it:
    copy it with `copy_run` first."""
    run_dir = str(tmp_path_factory.mktemp("trained") / "run")
    done = run_script(train_args(tiny_mnist["root"], run_dir, epochs=2))
    assert done.returncode == 0, describe(done)
    return {"dir": run_dir, "process": done, "data": tiny_mnist}


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


# ---- models built in-process ----
def small_model(seed=0, dft_conv=True, gemm_weight_grad=True, cpu_malloc_tuning=True, **kw):
    """A small CapsuleNet (CapsNetConfig fields in `kw`, decoder_hidden=(h1, h2) for both widths),
    with the CPU speed paths as given (fast.use_cpu_speedups), in eval mode."""
    torch.manual_seed(seed)
    model = cn.CapsuleNet(model_config(**dict(dict(conv1_channels=16, primary_caps=4, decoder_hidden=(32, 64)), **kw)))
    return fast.use_cpu_speedups(model, dft_conv, gemm_weight_grad, cpu_malloc_tuning).eval()


def model_config(decoder_hidden=None, **kw):
    """cn.CapsNetConfig with the decoder's two widths given as one pair."""
    if decoder_hidden:
        kw.update(decoder_hidden1=decoder_hidden[0], decoder_hidden2=decoder_hidden[1])
    return cn.CapsNetConfig(**kw)


@pytest.fixture(scope="session")
def full_model():
    """The paper-sized CapsuleNet with the script's default constants (eval mode, seed 0)."""
    torch.manual_seed(0)
    return fast.use_cpu_speedups(cn.CapsuleNet()).eval()


@pytest.fixture
def digit_batch(tiny_mnist):
    """Float test images (8, 1, 28, 28) in [0, 1] and their labels, one of classes 0..7 each."""
    images, labels = tiny_mnist["test"]
    x = data.to_float_images(torch.from_numpy(images[:8].copy()))
    return x, torch.from_numpy(labels[:8].astype(np.int64))


def whole_step_arms(dtype, device="cpu", steps=3):
    """The same tiny model trained `steps` Adam steps on the same batches eagerly and with the whole
    step compiled -> per arm (losses, first step's gradients, the weights' change). The compiled
    arm is checked to have run compiled code (dynamo's counters: at least one graph), not a
    silent fallback to eager."""
    from torch._dynamo.utils import counters

    cfg = dict(cn.default_config(), CONV1_CHANNELS=16, PRIMARY_CAPS=4, DECODER_HIDDEN1=32, DECODER_HIDDEN2=64)
    torch.manual_seed(0)
    first = cn.build_model(cfg)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 256, (8, 28, 28), generator=g, dtype=torch.uint8),
                torch.randint(0, 10, (8,), generator=g)) for _ in range(steps)]
    arms = {}
    for kind in ("eager", "step"):
        counters.clear()
        model = cn.build_model(cfg).to(device)
        model.load_state_dict(first.state_dict())
        network = cn.BatchLoss(model, cn.build_loss(cfg), torch.device(device), dtype, 0, False)
        network.use_whole_step(kind == "step")
        optimizer = cn.build_optimizer(model, cfg)
        model.train()
        losses, grads = [], None
        for images, labels in batches:
            optimizer.zero_grad()
            loss, _ = network((images.to(device), labels.to(device)))
            loss.backward()
            grads = grads or [p.grad.clone() for p in model.parameters()]
            optimizer.step()
            losses.append(loss.item())
        assert network.whole_step is None or not network.whole_step.failed
        assert (counters["stats"]["unique_graphs"] >= 1) == (kind == "step"), (kind, dict(counters["stats"]))
        change = torch.cat([(p.cpu() - p0).flatten() for p, p0 in zip(model.parameters(), first.parameters())])
        arms[kind] = losses, [g.cpu() for g in grads], change.detach()
    return arms

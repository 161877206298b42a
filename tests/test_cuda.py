"""CUDA: forward/backward, a BatchLoss training step and the visualisations on the GPU; what the
start-up sets (TF32 through the current API, cudnn.benchmark) and says (a GPU torch cannot use),
tested on any machine by faking the device."""

import os
import signal
import subprocess
import sys
import warnings

import pytest
import torch

from conftest import (SCRIPT, cn, describe, load_pt, read_rows, run_main, run_script, small_model, train_args,
                      whole_step_arms)
from capsnet import fast, figures, runtime  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
# a CUDA run in this process turns on cudnn.benchmark and TF32: put back after every test here
pytestmark = pytest.mark.usefixtures("restore_backend_flags")


def test_tf32_is_set_through_the_api_this_torch_has(monkeypatch):
    """setup_process on a CUDA device (faked: resolve_device answers cuda): TF32 through
    fp32_precision where this torch has it, else allow_tf32; cudnn.benchmark on; no warning."""
    monkeypatch.setattr(runtime, "resolve_device", lambda name: torch.device("cuda"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        device, _ = runtime.setup_process(cn.default_config())
    assert device.type == "cuda" and torch.backends.cudnn.benchmark
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        assert torch.backends.cuda.matmul.fp32_precision == torch.backends.cudnn.conv.fp32_precision == "tf32"
    else:
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


def test_tf32_on_a_torch_without_fp32_precision_uses_allow_tf32(monkeypatch):
    """A torch older than 2.9 (faked: flags without fp32_precision): the allow_tf32 setters."""
    from types import SimpleNamespace

    matmul, cudnn = SimpleNamespace(allow_tf32=False), SimpleNamespace(allow_tf32=False, benchmark=False)
    monkeypatch.setattr(torch.backends.cuda, "matmul", matmul)
    monkeypatch.setattr(torch.backends, "cudnn", cudnn)
    runtime.use_tf32()
    assert matmul.allow_tf32 and cudnn.allow_tf32


DRIVER_LINE = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n"


def fake_unusable_gpu(monkeypatch, tmp_path, smi=True, driver=DRIVER_LINE, said=None):
    """This machine as one with an NVIDIA GPU that torch cannot use: torch.cuda.is_available()
    False (warning `said`, as torch does for an old driver), nvidia-smi on the PATH (`smi`), the
    driver's /proc file holding `driver` (None: no such file)."""
    def is_available():
        if said:
            warnings.warn(said)
        return False

    monkeypatch.setattr(torch.cuda, "is_available", is_available)
    monkeypatch.setattr(runtime.shutil, "which", lambda name: "/usr/bin/nvidia-smi" if smi and name == "nvidia-smi"
                        else None)
    path = tmp_path / "nvidia-version"
    if driver is not None:
        path.write_text(driver)
    monkeypatch.setattr(runtime, "NVIDIA_DRIVER_FILE", str(path))
    monkeypatch.setattr(runtime, "_cuda_said", [])
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def test_a_gpu_torch_cannot_use_is_named_in_one_line(monkeypatch, tmp_path, capsys):
    """The automatic choice (DEVICE auto) on a machine whose NVIDIA GPU this torch cannot use: the
    CPU, and one warning line with the driver's version, torch's own words and what to install."""
    said = "CUDA initialization: The NVIDIA driver on your system is too old (found version 12020)."
    fake_unusable_gpu(monkeypatch, tmp_path, said=said)
    device, _ = runtime.setup_process(cn.default_config(DEVICE="auto"))
    err = capsys.readouterr().err.strip().splitlines()
    assert device.type == "cpu" and len(err) == 1, err
    assert err[0].startswith("warning: this machine has an NVIDIA GPU (driver 535.104.05) that torch ")
    assert f"(torch: {said})" in err[0] and "https://download.pytorch.org/whl/cu126" in err[0]


@pytest.mark.parametrize("smi, driver", [(True, None), (False, DRIVER_LINE)])
def test_either_sign_of_an_nvidia_gpu_is_enough(monkeypatch, tmp_path, capsys, smi, driver):
    """nvidia-smi alone (the driver's version then unreadable), or the driver's file alone."""
    fake_unusable_gpu(monkeypatch, tmp_path, smi=smi, driver=driver)
    runtime.setup_process(cn.default_config(DEVICE="auto"))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("driver version unreadable" if driver is None else "driver 535.104.05") in err[0]


def test_no_gpu_line_without_a_gpu_for_a_chosen_device_or_beside_rank_0(monkeypatch, tmp_path, capsys):
    """No NVIDIA GPU: nothing said. --device cpu (not the automatic choice), or a torchrun process
    other than rank 0: nothing said either."""
    fake_unusable_gpu(monkeypatch, tmp_path, smi=False, driver=None)
    runtime.setup_process(cn.default_config(DEVICE="auto"))
    fake_unusable_gpu(monkeypatch, tmp_path)
    runtime.setup_process(cn.default_config(DEVICE="cpu"))
    runtime.setup_process(cn.default_config(DEVICE="auto"), runtime.Distributed({"WORLD_SIZE": "2", "RANK": "1"}))
    assert capsys.readouterr().err == ""


@needs_cuda
def test_cuda_forward_backward_and_train_step(digit_batch):
    """On CUDA (bf16 autocast where supported, channels_last): forward shapes, finite loss,
    gradients for every parameter and an Adam step that changes the weights."""
    device = torch.device("cuda")
    cfg = cn.default_config()
    model = cn.model_to_device(small_model(), cfg, device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    dtype = runtime.amp_dtype(device, True)
    stepper = cn.BatchLoss(model, cn.CapsuleLoss(), device, dtype, 2, True)
    x, labels = digit_batch
    images_u8 = (x[:, 0] * 255).round().to(torch.uint8).to(device)
    labels = labels.to(device)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.zero_grad()
    loss, lengths = stepper((images_u8, labels))
    assert lengths.shape == (8, 10) and lengths.device.type == "cuda"
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    optimizer.step()
    assert any(not torch.equal(before[n], p.detach()) for n, p in model.named_parameters())
    model.eval()
    with torch.no_grad():
        eval_loss, eval_lengths = stepper((images_u8, labels))
    assert torch.isfinite(eval_loss) and ((eval_lengths >= 0) & (eval_lengths < 1)).all()


@needs_cuda
def test_cuda_visualisations(digit_batch):
    """perturbation_grid, class_mask_grid and coupling_maps work on CUDA tensors."""
    model = small_model(w_init_std=1.0).cuda()
    x = digit_batch[0].cuda()
    assert figures.perturbation_grid(model, x).shape == (8, 16, 11, 1, 28, 28)
    assert figures.class_mask_grid(model, x).shape == (8, 10, 1, 28, 28)
    maps = figures.coupling_maps(model, x[:1])
    torch.testing.assert_close(maps.sum(0), torch.ones(4, 6, 6, device="cuda"))


# ---- what runs on a GPU, end to end (skipped without CUDA) ----

needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
ON_CUDA = ["--device", "cuda"]  # after train_args' --device cpu: the later flag wins


def close_runs(run_a, run_b, tolerance=1e-4):
    """Two CUDA runs of the same steps. Exactly the same: what is deterministic on a GPU, the
    epochs, learning rates, schedule, Adam's step counts and the CPU's and the GPU's random states
    (the same draws: the same data order and shifts). To `tolerance`: the losses and the weights,
    as cuDNN (cudnn.benchmark on) may pick kernels that add in another order between processes,
    and some add with atomics."""
    rows_a, rows_b = read_rows(run_a), read_rows(run_b)
    assert [(r["epoch"], r["lr"]) for r in rows_a] == [(r["epoch"], r["lr"]) for r in rows_b]
    for a, b in zip(rows_a, rows_b):
        for key in ("train_loss", "test_loss"):
            assert a[key] == pytest.approx(b[key], rel=tolerance, abs=tolerance), (a["epoch"], key)
    a, b = load_pt(os.path.join(run_a, "last.pt")), load_pt(os.path.join(run_b, "last.pt"))
    assert a["epoch"] == b["epoch"] and a["scheduler"] == b["scheduler"] and "partial" not in a
    for k, state in a["optimizer"]["state"].items():
        assert torch.equal(state["step"], b["optimizer"]["state"][k]["step"]), k
    for kind in ("cpu", "cuda"):
        assert torch.equal(a["rng_state"][kind], b["rng_state"][kind]), kind
    for name in a["model"]:
        torch.testing.assert_close(a["model"][name], b["model"][name], rtol=tolerance, atol=tolerance, msg=name)


@needs_cuda
def test_a_clean_cuda_start_up_says_no_warning(tiny_mnist, tmp_path):
    """A run on the GPU in a fresh process: no warning of ours or torch's (TF32 set through the
    API this torch has)."""
    done = run_script(train_args(tiny_mnist["root"], str(tmp_path / "run"), *ON_CUDA, epochs=1))
    assert done.returncode == 0 and "warn" not in done.stderr.lower(), describe(done)


@needs_cuda
def test_a_tiny_run_on_cuda_stops_mid_epoch_resumes_evaluates_and_exports(tiny_mnist, tmp_path, monkeypatch):
    """Train on the GPU, stop by SIGTERM in epoch 2 (the position written), resume to the end of an
    uninterrupted run: what is deterministic on a GPU exactly, the losses and weights to 1e-4
    (close_runs says which is which); then --eval-only and --export-weights of the result."""
    straight, run = str(tmp_path / "straight"), str(tmp_path / "run")
    done = run_main(train_args(tiny_mnist["root"], straight, "--no-amp", *ON_CUDA, epochs=3))
    assert done.returncode == 0 and "parameters on cuda" in done.stdout, describe(done)
    calls, real_call = [0], cn.BatchLoss.__call__

    def call(self, sample):
        calls[0] += 1
        if calls[0] == 16:  # epoch 2, batch 4
            os.kill(os.getpid(), signal.SIGTERM)
        return real_call(self, sample)

    monkeypatch.setattr(cn.BatchLoss, "__call__", call)
    done = run_main(train_args(tiny_mnist["root"], run, "--no-amp", *ON_CUDA, epochs=3))
    assert done.returncode == 143 and "stopped by SIGTERM in epoch 2 after batch 4" in done.stderr, describe(done)
    monkeypatch.setattr(cn.BatchLoss, "__call__", real_call)
    last = os.path.join(run, "last.pt")
    assert load_pt(last)["partial"]["batch"] == 4
    done = run_main(["--resume", last])
    assert done.returncode == 0, describe(done)
    close_runs(run, straight)
    done = run_main(["--eval-only", "--resume", last, "--run-dir", tmp_path / "eval"])
    assert done.returncode == 0 and "test accuracy" in done.stdout, describe(done)
    done = run_main(["--export-weights", tmp_path / "w.pt", "--resume", last])
    assert done.returncode == 0, describe(done)
    assert all(v.dtype == torch.float16 for v in load_pt(tmp_path / "w.pt")["model"].values() if v.is_floating_point())


@needs_cuda
def test_fp16_with_a_gradient_scaler_below_compute_capability_8(tiny_mnist, tmp_path, monkeypatch):
    """A GPU below compute capability 8.0 (faked: 7.5) trains in fp16 autocast with a gradient scaler:
    the start-up line says so, every checkpoint holds the scaler's state, and a run resumed after
    epoch 1 ends as the uninterrupted one (close_runs: exactly what is deterministic, the rest to
    1e-3, fp16's rounding)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    straight, run = str(tmp_path / "straight"), str(tmp_path / "run")
    done = run_main(train_args(tiny_mnist["root"], straight, *ON_CUDA, epochs=2))
    assert done.returncode == 0 and "fp16 autocast with a gradient scaler: compute capability 7.5" in done.stdout, \
        describe(done)
    done = run_main(train_args(tiny_mnist["root"], run, *ON_CUDA, epochs=1))
    assert done.returncode == 0 and load_pt(os.path.join(run, "last.pt"))["scaler"]["scale"] > 0, describe(done)
    done = run_main(["--resume", os.path.join(run, "last.pt"), "--epochs", 2])
    assert done.returncode == 0, describe(done)
    close_runs(run, straight, tolerance=1e-3)
    assert load_pt(os.path.join(run, "last.pt"))["scaler"] == load_pt(os.path.join(straight, "last.pt"))["scaler"]


@needs_cuda
def test_the_compiled_capsule_layer_on_cuda_equals_eager(digit_batch):
    """fast.use_compiled_routing() on the GPU: the compiled code ran, and v, c and every gradient equal eager's."""
    from torch._dynamo.utils import counters

    x, labels = digit_batch
    x, labels = x.cuda(), labels.cuda()
    eager, compiled = small_model(w_init_std=1.0).cuda().train(), small_model(w_init_std=1.0).cuda().train()
    fast.use_compiled_routing(compiled)
    counters.clear()
    grads = []
    for model in (eager, compiled):
        v, c = model.capsules(x)
        (v.norm(dim=-1)[torch.arange(len(labels)), labels].sum() + c.square().sum()).backward()
        grads.append((v.detach(), c.detach(), {k: p.grad for k, p in model.named_parameters() if p.grad is not None}))
    assert not fast.compiled_routing(compiled).failed and counters["stats"]["unique_graphs"] >= 1
    (v0, c0, g0), (v1, c1, g1) = grads
    torch.testing.assert_close(v1, v0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(c1, c0, rtol=1e-4, atol=1e-5)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-3, atol=1e-5, msg=k)


@needs_cuda
@pytest.mark.parametrize("dtype, rtol", [(None, 1e-3), (torch.bfloat16, 3e-2)])
def test_the_whole_compiled_step_on_cuda_trains_as_the_eager_one(dtype, rtol):
    """COMPILE = "step" on the GPU (CUDA graphs): three Adam steps give eager's losses, gradients and
    weight changes (fp32 with TF32 convolutions, and bf16 autocast, to their rounding)."""
    arms = whole_step_arms(dtype, "cuda")
    (eager_losses, eager_grads, eager_change), (losses, grads, change) = arms["eager"], arms["step"]
    assert losses == pytest.approx(eager_losses, rel=rtol / 10)
    for a, b in zip(grads, eager_grads):
        assert (a - b).norm() <= rtol * b.norm() + 1e-12
    assert (change - eager_change).norm() <= rtol * eager_change.norm()


@needs_cuda
def test_a_tiny_run_on_cuda_in_the_whole_step_mode(tiny_mnist, tmp_path):
    """--compile step on CUDA: two epochs without a compile fallback, recorded as "step", and a
    resumed third epoch."""
    run = str(tmp_path / "run")
    done = run_main(train_args(tiny_mnist["root"], run, "--device", "cuda", "--compile", "step"))
    assert done.returncode == 0 and "torch.compile failed" not in done.stderr, describe(done)
    assert [r["compile"] for r in read_rows(run)] == ["step", "step"]
    done = run_main(["--resume", os.path.join(run, "last.pt"), "--epochs", "3", "--no-visdom"])
    assert done.returncode == 0 and [r["compile"] for r in read_rows(run)][-1] == "step", describe(done)


@needs_two_gpus
@pytest.mark.parametrize("model", ["capsnet", "efficient-capsnet"])
def test_two_processes_on_two_gpus_train_as_one(tiny_mnist, tmp_path, model):
    """torchrun with NCCL, one process per GPU: the rows of one process on one GPU, to 1e-4; for
    Efficient-CapsNet also its batch norms' running statistics (SyncBatchNorm: the global batch's
    statistics, where plain batch norm would use each process's half)."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    args = ["--train-size", 190, "--no-amp", "--model", model, *ON_CUDA]
    done = run_main(train_args(tiny_mnist["root"], one, *args, epochs=2))
    assert done.returncode == 0, describe(done)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", "29531", SCRIPT, *map(str, train_args(tiny_mnist["root"], two, *args, epochs=2))]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "torchrun: 2 processes (NCCL)" in done.stdout, describe(done)
    close_runs(two, one)

"""CUDA: forward/backward, a BatchLoss training step and the visualisations on the GPU."""

import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import SCRIPT, cn, describe, load_pt, read_rows, run_main, small_model, train_args, whole_step_arms
from capsnet import fast, figures, runtime  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


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
    """The same metrics rows and weights to `tolerance` (cuDNN's kernels may add in any order)."""
    rows_a, rows_b = read_rows(run_a), read_rows(run_b)
    assert [r["epoch"] for r in rows_a] == [r["epoch"] for r in rows_b]
    for a, b in zip(rows_a, rows_b):
        for key in ("lr", "train_loss", "test_loss"):
            assert a[key] == pytest.approx(b[key], rel=tolerance, abs=tolerance), (a["epoch"], key)
    wa, wb = load_pt(os.path.join(run_a, "last.pt"))["model"], load_pt(os.path.join(run_b, "last.pt"))["model"]
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=tolerance, atol=tolerance, msg=name)


@needs_cuda
def test_a_tiny_run_on_cuda_stops_mid_epoch_resumes_evaluates_and_exports(tiny_mnist, tmp_path, monkeypatch):
    """Train on the GPU, stop by SIGTERM in epoch 2 (the position written), resume to the end of an
    uninterrupted run's numbers, then --eval-only and --export-weights of the result."""
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
def test_two_processes_on_two_gpus_train_as_one(tiny_mnist, tmp_path):
    """torchrun with NCCL, one process per GPU: the rows of one process on one GPU, to 1e-4."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    args = ["--train-size", 190, "--no-amp", *ON_CUDA]
    done = run_main(train_args(tiny_mnist["root"], one, *args, epochs=2))
    assert done.returncode == 0, describe(done)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", "29531", SCRIPT, *map(str, train_args(tiny_mnist["root"], two, *args, epochs=2))]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "torchrun: 2 processes (NCCL)" in done.stdout, describe(done)
    close_runs(two, one)

"""MODEL = "efficient-capsnet" (capsnet/efficient.py): Mazzia et al.'s Efficient-CapsNet, its
squash, self-attention routing and augmentation, and the trainer's features with it."""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from capsnet import efficient, runtime
from conftest import ROOT, cn, describe, load_pt, read_rows, run_main, train_args

EFFICIENT = ["--model", "efficient-capsnet"]


def efficient_model(seed=0, decoder="fc", **cfg):
    torch.manual_seed(seed)
    return cn.build_model(dict(cn.default_config(), MODEL="efficient-capsnet", DECODER=decoder, **cfg))


def test_the_parameter_counts_are_the_papers():
    """161,824 trainable parameters without the decoder, 1,573,168 with the FC decoder (MNIST)."""
    model = efficient_model()
    total = sum(p.numel() for p in model.parameters())
    assert total - sum(p.numel() for p in model.decoder.parameters()) == 161_824
    assert total == 1_573_168
    assert sum(p.numel() for p in efficient_model(decoder="deconv").parameters()) == 161_824 + 250_121


@pytest.mark.parametrize("channels, size, grid", [(1, 28, 9), (1, 36, 13), (3, 24, 7), (2, 32, 11)])
def test_the_depthwise_kernel_covers_the_grid_the_convolutions_leave(channels, size, grid):
    """28 -> 24 -> 22 -> 20 -> 9 (MNIST); the depthwise kernel is that grid, so every input shape
    ends in 16 capsules of 8 dimensions; the reconstruction has the input's shape."""
    model = efficient_model(IMAGE_SIZE=size, IMAGE_CHANNELS=channels).eval()
    assert model.primary.kernel_size == (grid, grid) and model.primary.groups == 128
    x = torch.rand(2, channels, size, size)
    assert model.primary_capsules(x).shape == (2, 16, 8)
    with torch.no_grad():
        lengths, recon = model(x)
    assert lengths.shape == (2, 10) and recon.shape == (2, channels, size, size)


def test_primary_capsules_are_their_layers_in_their_order():
    """Each convolution, then ReLU, then batch norm; the depthwise convolution; capsule n is
    channels 8n..8n+7; their squash."""
    model = efficient_model().eval()
    with torch.no_grad():
        for norm in model.norms:  # running statistics that are not the identity
            norm.running_mean.uniform_(0, 0.5)
            norm.running_var.uniform_(0.5, 2)
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.1, 0.1)
        x = torch.rand(3, 1, 28, 28)
        h = x
        for conv, norm in zip(model.convs, model.norms):
            h = F.relu(F.conv2d(h, conv.weight, conv.bias, conv.stride))
            h = (h - norm.running_mean[:, None, None]) / torch.sqrt(norm.running_var[:, None, None] + 1e-3)
            h = h * norm.weight[:, None, None] + norm.bias[:, None, None]
        h = F.conv2d(h, model.primary.weight, model.primary.bias, groups=128)  # (3, 128, 1, 1)
        s = h.reshape(3, 16, 8)
        n = s.norm(dim=-1, keepdim=True)
        expected = (1 - 1 / torch.exp(n)) * s / n
        torch.testing.assert_close(model.primary_capsules(x), expected, rtol=1e-4, atol=1e-6)


def their_routing(u, b):
    """FCCaps.call of utils/layers.py after the votes, restated with the same einsums:
    u (B, N, I, D) votes, b (N, I, 1)."""
    c = torch.einsum("...ij,...kj->...i", u, u)[..., None]  # (B, N, I, 1)
    c = c / math.sqrt(u.shape[-1])
    c = torch.softmax(c, dim=1)
    c = c + b
    s = (u * c).sum(dim=-2)  # (B, N, D)
    n = s.norm(dim=-1, keepdim=True)
    return (1 - 1 / (torch.exp(n) + 1e-20)) * (s / (n + 1e-20)), c[..., 0]


def test_self_attention_routing_is_their_fccaps_in_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(3, 10, 16, 16, generator=g, dtype=torch.float64, requires_grad=True)
    b = (0.1 * torch.randn(10, 16, 1, generator=g, dtype=torch.float64)).requires_grad_()
    v, c = efficient.self_attention_routing(u, b)
    v_ref, c_ref = their_routing(u, b)
    torch.testing.assert_close(v, v_ref)
    torch.testing.assert_close(c, c_ref)
    w = torch.randn(v.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((v * w).sum(), (u, b))
    grads_ref = torch.autograd.grad((v_ref * w).sum(), (u, b))
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want)
    assert not torch.allclose(c.sum(1), torch.ones(3, 16, dtype=torch.float64))  # the bias comes after the softmax


def test_the_votes_are_w_times_each_child_for_every_class():
    g = torch.Generator().manual_seed(1)
    W, u = torch.randn(10, 16, 8, 16, generator=g), torch.randn(2, 16, 8, generator=g)
    bias = torch.zeros(10, 16, 1)
    votes = torch.stack([torch.stack([u[:, i] @ W[j, i] for i in range(16)], 1) for j in range(10)], 1)  # (B, J, I, E)
    v, c = efficient.fc_caps(W, u, bias)
    v_ref, c_ref = their_routing(votes, bias)
    torch.testing.assert_close(v, v_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(c, c_ref, rtol=1e-4, atol=1e-5)


def test_their_squash_is_finite_at_zero_with_finite_gradients():
    s = torch.zeros(2, 16, dtype=torch.float32, requires_grad=True)
    v = efficient.efficient_squash(s)
    (g,) = torch.autograd.grad(v.sum(), s)
    assert torch.equal(v, torch.zeros_like(v)) and torch.isfinite(g).all()
    x = torch.randn(5, 8, dtype=torch.float64) * torch.tensor([1e-3, 0.1, 1, 3, 30], dtype=torch.float64)[:, None]
    n = x.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(efficient.efficient_squash(x), (1 - torch.exp(-n)) * x / n)
    assert (efficient.efficient_squash(x).norm(dim=-1) < 1).all()


def blob_images(n=6, size=28):
    images = torch.zeros(n, 1, size, size)
    for k in range(n):
        images[k, 0, 6 + k:14 + k, 9:15 + k % 3] = torch.linspace(0.3, 1, 8)[:, None]
    return images


def test_the_margin_shift_keeps_the_ink_inside_the_canvas():
    """Even at the largest fractions toward either side, the shift moves whole pixels without
    losing any ink, and by as much as the margin allows."""
    images = blob_images()
    for toward_start in (True, False):
        side = torch.full((6, 2), toward_start)
        shifted = efficient.margin_shift(images, torch.full((6, 2), 0.9999), side)
        torch.testing.assert_close(shifted.sum((1, 2, 3)), images.sum((1, 2, 3)))
        rows = shifted[:, 0].sum(2) > 0
        cols = shifted[:, 0].sum(1) > 0
        if toward_start:  # floor(0.9999 x margin) lines: one short of the edge at most
            assert (rows.float().argmax(1) <= 1).all() and (cols.float().argmax(1) <= 1).all()
        else:
            assert rows[:, -1].all() and cols[:, -1].all()


def test_the_squish_narrows_the_ink_and_erase_clears_one_patch():
    images = torch.zeros(1, 1, 28, 28)
    images[0, 0, 4:24, 4:24] = 1
    narrow = efficient.squish(images, torch.tensor([7.0]), torch.tensor([0.0]))
    width = (narrow[0, 0, 14] > 0.5).sum()
    assert width == 15  # 20 columns x 21/28
    erased = efficient.erase(torch.ones(2, 1, 28, 28), torch.tensor([[4, 4], [22, 22]]))
    assert (erased == 0).sum() == 2 * 16 and erased[1, 0, 22:26, 22:26].sum() == 0


def test_the_augmentation_is_drawn_per_image_and_only_in_training():
    """Two copies of one image come out different; BatchLoss augments training batches only."""
    torch.manual_seed(0)
    twins = blob_images(1).expand(8, 1, 28, 28).contiguous()
    out = efficient.efficient_augment(twins)
    assert out.shape == twins.shape and out.device == twins.device
    assert len({tuple(o.flatten().tolist()) for o in out}) == 8
    assert ((out >= 0) & (out <= 1 + 1e-6)).all()

    model = efficient_model(DECODER_HIDDEN1=8, DECODER_HIDDEN2=8)
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    step = cn.BatchLoss(model, cn.CapsuleLoss(), torch.device("cpu"), None, 0, False, augment="efficient")
    sample = ((twins[:, 0] * 255).to(torch.uint8), torch.zeros(8, dtype=torch.long))
    model.eval()
    step(sample)
    model.train()
    step(sample)
    plain = sample[0].float().div(255).unsqueeze(1)
    assert torch.equal(seen[0], plain) and not torch.equal(seen[1], plain)


def test_lr_min_stops_the_decay(tiny_mnist, tmp_path):
    run = str(tmp_path / "run")
    done = run_main(train_args(tiny_mnist["root"], run, *EFFICIENT, "--lr-decay", 0.5, "--lr-min", 3e-4,
                               "--train-size", 40, "--test-size", 20, epochs=3))
    assert done.returncode == 0, describe(done)
    assert [r["lr"] for r in read_rows(run)] == pytest.approx([1e-3, 5e-4, 3e-4])


@pytest.mark.parametrize("decoder", ["fc", "deconv"])
def test_a_tiny_run_trains_resumes_exactly_and_evaluates(tiny_mnist, tmp_path, decoder):
    """Each decoder with Efficient-CapsNet and its augmentation: 2 epochs in one go equal 1 + 1
    resumed (batch norm's running statistics included); --eval-only, the exported fp16 weights,
    --predict and --visualize work on the result."""
    small = ["--train-size", 60, "--test-size", 40, "--augment", "efficient", "--decoder", decoder]
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    done = run_main(train_args(tiny_mnist["root"], straight, *EFFICIENT, *small, epochs=2))
    assert done.returncode == 0 and "Efficient-CapsNet: " in done.stdout, describe(done)
    done = run_main(train_args(tiny_mnist["root"], resumed, *EFFICIENT, *small, epochs=1))
    assert done.returncode == 0, describe(done)
    done = run_main(["--resume", os.path.join(resumed, "last.pt"), "--epochs", 2])
    assert done.returncode == 0, describe(done)
    for a, b in zip(read_rows(straight), read_rows(resumed)):
        for key in ("train_loss", "test_loss", "test_accuracy"):
            assert a[key] == pytest.approx(b[key], rel=1e-6), key
    ra, rb = load_pt(os.path.join(straight, "last.pt")), load_pt(os.path.join(resumed, "last.pt"))
    assert "norms.0.running_mean" in ra["model"] and ra["config"]["MODEL"] == "efficient-capsnet"
    for name in ra["model"]:
        torch.testing.assert_close(ra["model"][name], rb["model"][name], rtol=0, atol=1e-6, msg=name)

    last = os.path.join(straight, "last.pt")
    done = run_main(["--eval-only", "--resume", last])
    accuracy = read_rows(straight)[-1]["test_accuracy"]
    assert done.returncode == 0 and f"test accuracy {accuracy:.2f}%" in done.stdout, describe(done)
    exported = str(tmp_path / "weights.pt")
    assert run_main(["--export-weights", exported, "--resume", last]).returncode == 0
    assert load_pt(exported)["config"]["MODEL"] == "efficient-capsnet"
    done = run_main(["--eval-only", "--resume", exported, "--data-dir", tiny_mnist["root"], "--device", "cpu",
                     "--run-dir", str(tmp_path / "eval")])
    assert done.returncode == 0 and "test accuracy" in done.stdout, describe(done)
    out = str(tmp_path / "figures")
    done = run_main(["--visualize", "--resume", last, "--run-dir", out])
    assert done.returncode == 0, describe(done)
    assert {"rotation.png", "couplings.png"} <= set(os.listdir(out)), os.listdir(out)


def test_an_ensemble_of_both_models_evaluates(tiny_mnist, tmp_path):
    runs = []
    for name, extra in (("caps", []), ("eff", EFFICIENT)):
        run = str(tmp_path / name)
        done = run_main(train_args(tiny_mnist["root"], run, *extra, "--train-size", 40, "--test-size", 40, epochs=1))
        assert done.returncode == 0, describe(done)
        runs.append(os.path.join(run, "last.pt"))
    done = run_main(["--eval-only", "--resume", runs[0], "--resume", runs[1], "--run-dir", str(tmp_path / "ens")])
    assert done.returncode == 0 and "ensemble of 2" in done.stdout, describe(done)


def test_multimnist_trains_with_efficient_capsnet(tiny_mnist, tmp_path):
    run = str(tmp_path / "run")
    done = run_main(train_args(tiny_mnist["root"], run, *EFFICIENT, "--dataset", "multimnist", "--train-size", 40,
                               "--test-size", 20, epochs=1))
    assert done.returncode == 0, describe(done)
    assert load_pt(os.path.join(run, "last.pt"))["model"]["primary.weight"].shape == (128, 1, 13, 13)


@pytest.mark.parametrize("args, message", [
    (["--image-size", 10], "10x10 images are too small for Efficient-CapsNet's four convolutions"),
    (["--dataset", "multimnist", "--augment", "efficient"], "--augment efficient is for single-object images"),
    (["--augment", "flips"], "--augment must be none or efficient, not 'flips'"),
])
def test_settings_it_cannot_take_are_one_line(tiny_mnist, tmp_path, args, message):
    done = run_main(train_args(tiny_mnist["root"], str(tmp_path / "run"), *EFFICIENT, *args))
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1, \
        describe(done)


def test_bench_times_efficient_capsnet_against_both_capsnets(tmp_path):
    """bench.py --model efficient-capsnet: this model is Efficient-CapsNet (its parameters in the
    JSON), timed beside the paper's CapsNet used directly and the gram-ai-structured baseline."""
    from test_benchmark import TINY, run_bench

    out = tmp_path / "eff.json"
    done = run_bench(TINY + ["--model", "efficient-capsnet", "--augment", "efficient", "--json", out], tmp_path)
    assert done.returncode == 0, describe(done)
    with open(out, encoding="utf-8") as f:
        result = json.load(f)
    assert (result["model"], result["parameters"]) == ("efficient-capsnet", 1_573_168)
    for kind in ("", "direct_", "baseline_"):
        assert result[f"{kind}train_images_per_s"] > 0, kind
    assert result["train_speedup"] == pytest.approx(result["train_images_per_s"] / result["baseline_train_images_per_s"],
                                                    rel=2e-3, abs=0.006)


def test_two_processes_train_and_resume_it(tiny_mnist, tmp_path):
    """torchrun: each process's batch norm sees its share of the batch (DDP keeps rank 0's running
    statistics), so two processes are not bit-equal to one; they train, write one checkpoint, and
    a checkpoint of two continues in one."""
    from test_distributed import two_processes

    run = str(tmp_path / "two")
    done = two_processes(train_args(tiny_mnist["root"], run, *EFFICIENT, "--train-size", 40, "--test-size", 20, epochs=1))
    assert done.returncode == 0 and done.stdout.count("epoch 1/1") == 1, describe(done)
    done = run_main(["--resume", os.path.join(run, "last.pt"), "--epochs", 2])
    assert done.returncode == 0 and [r["epoch"] for r in read_rows(run)] == [1, 2], describe(done)


SHIPPED = os.path.join(ROOT, "results", "efficient-capsnet-mnist.pt")


def test_the_shipped_weights_are_the_runs_final_epoch_and_classify_real_digits(real_digits, tmp_path):
    """results/efficient-capsnet-mnist.pt (the complete MNIST run, results/README.md): fp16
    weights of its final epoch (42) with the model's constants, about 3 MB; --eval-only on the
    first 200 real MNIST test digits gets at least 198 right (random weights: about 10%)."""
    assert os.path.isfile(SHIPPED), f"{SHIPPED} is missing: it is part of the project (results/README.md)"
    shipped = load_pt(SHIPPED)
    assert os.path.getsize(SHIPPED) < 4 * 2**20 and shipped["epoch"] == 42
    assert shipped["config"]["MODEL"] == "efficient-capsnet"
    assert all(v.dtype == torch.float16 for v in shipped["model"].values() if v.is_floating_point())
    done = run_main(["--eval-only", "--resume", SHIPPED, "--data-dir", real_digits, "--device", "cpu",
                     "--run-dir", str(tmp_path / "eval"), "--no-visdom"])
    assert done.returncode == 0, describe(done)
    with open(tmp_path / "eval" / "eval.json", encoding="utf-8") as f:
        result = json.load(f)
    assert result["test_images"] == 200 and result["checkpoint_epoch"] == 42
    assert result["test_accuracy"] >= 99.0 and result["test_loss"] < 0.03, result


@pytest.mark.parametrize("device, world, synchronised", [("cuda", 2, True), ("cpu", 2, False), ("cuda", 1, False)])
def test_batch_norm_is_synchronised_only_on_cuda_under_torchrun(monkeypatch, device, world, synchronised):
    """wrap_ddp (DistributedDataParallel faked): on CUDA under torchrun the four batch norms become
    SyncBatchNorm in place, keeping the very parameters and buffers the optimizer and the checkpoint
    hold; on the CPU (no synchronised batch norm in torch) and in one process they stay plain."""
    made = []
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", lambda model, device_ids=None: made.append(model))
    torch.manual_seed(0)
    model = cn.build_model(dict(cn.default_config(), MODEL="efficient-capsnet"))
    params, buffers, keys = list(model.parameters()), list(model.buffers()), list(model.state_dict())
    runtime.wrap_ddp(model, torch.device(device, 0) if device == "cuda" else torch.device(device),
                     runtime.Distributed({"WORLD_SIZE": str(world), "RANK": "0"}))
    norms = [type(m) for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms == [torch.nn.SyncBatchNorm if synchronised else torch.nn.BatchNorm2d] * 4
    assert made == ([model] if world > 1 else []) and list(model.state_dict()) == keys
    assert all(a is b for a, b in zip(model.parameters(), params)) and len(list(model.parameters())) == len(params)
    assert all(a is b for a, b in zip(model.buffers(), buffers))

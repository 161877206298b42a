"""Capsule visualisations (Fig. 4 perturbations, class masks, couplings), --visualize PNGs and
--export-weights."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import N_TEST, cn, copy_run, describe, load_pt, read_rows, run_main, small_model
from capsnet import figures  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return small_model(w_init_std=1.0)  # long capsules, so every decode differs visibly


def test_perturbation_grid_shape_and_middle_step(model, digit_batch):
    """perturbation_grid -> (N, 16, 11, 1, 28, 28); step 5 (delta 0) is the plain reconstruction
    from the winning capsule."""
    x, _ = digit_batch
    grid = figures.perturbation_grid(model, x)
    assert grid.shape == (8, 16, 11, 1, 28, 28)
    with torch.no_grad():
        v, _ = model.capsules(x)
        plain = model.decode(v, v.norm(dim=-1).argmax(1))
    for d in range(16):
        torch.testing.assert_close(grid[:, d, 5], plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dim, step", [(0, 0), (7, 2), (15, 10)])
def test_perturbation_grid_moves_one_dimension_of_the_winner(model, digit_batch, dim, step):
    """Entry (d, k) decodes the winning capsule with dimension d moved by -0.25 + 0.05 k."""
    x, _ = digit_batch
    grid = figures.perturbation_grid(model, x)
    with torch.no_grad():
        v, _ = model.capsules(x)
        winner = v.norm(dim=-1).argmax(1)
        moved = v.clone()
        moved[torch.arange(8), winner, dim] += -0.25 + 0.05 * step
        expected = model.decode(moved, winner)
    torch.testing.assert_close(grid[:, dim, step], expected, rtol=1e-5, atol=1e-6)
    assert (grid[:, dim, step] - grid[:, dim, 5]).abs().max() > 1e-4


def test_class_mask_grid(model, digit_batch):
    """class_mask_grid -> (N, 10, 1, 28, 28); column k is the reconstruction from capsule k."""
    x, _ = digit_batch
    grid = figures.class_mask_grid(model, x)
    assert grid.shape == (8, 10, 1, 28, 28)
    with torch.no_grad():
        v, _ = model.capsules(x)
        for k in range(10):
            torch.testing.assert_close(grid[:, k], model.decode(v, torch.full((8,), k)), rtol=1e-5, atol=1e-6)


def test_coupling_maps_full_size(full_model, digit_batch):
    """coupling_maps -> (10, 32, 6, 6) for the paper's model; sums to 1 over the classes; entry
    (j, t, r, c) is the coupling of primary capsule t*36 + r*6 + c to class j."""
    x, _ = digit_batch
    maps = figures.coupling_maps(full_model, x[:1])
    assert maps.shape == (10, 32, 6, 6)
    torch.testing.assert_close(maps.sum(0), torch.ones(32, 6, 6))
    with torch.no_grad():
        _, c = full_model.capsules(x[:1])
    for j, t, r, col in [(0, 0, 0, 0), (3, 5, 2, 4), (9, 31, 5, 5), (6, 17, 0, 3)]:
        assert maps[j, t, r, col] == c[0, t * 36 + r * 6 + col, j]


def test_coupling_maps_small_architecture(model, digit_batch):
    """coupling_maps follows the model's number of capsule types."""
    maps = figures.coupling_maps(model, digit_batch[0][:1])
    assert maps.shape == (10, 4, 6, 6)
    torch.testing.assert_close(maps.sum(0), torch.ones(4, 6, 6))


def test_one_per_class_picks_the_first_image_of_each_class():
    """one_per_class returns the first image of every class present, in class order."""
    labels = torch.tensor([3, 1, 3, 0, 1])
    images = torch.arange(5).view(5, 1, 1).expand(5, 28, 28)
    picked, picked_labels = figures.one_per_class(images, labels, 10)
    assert picked_labels.tolist() == [0, 1, 3]
    assert picked[:, 0, 0].tolist() == [3, 1, 0]


def assert_png(path):
    from PIL import Image

    assert os.path.getsize(path) > 500, path
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG" and min(img.size) >= 30, (path, img.size)
        lo, hi = img.convert("L").getextrema()
        assert hi > lo, f"{path} is a single flat colour"
        return img.size


def test_visualize_writes_the_figures(trained_run, tmp_path):
    """--visualize --resume last.pt writes fig4_digit{k}.png for every class in the test set,
    class_masks.png, couplings.png, curves.png and routing_logit_change.png, all valid PNGs."""
    run = copy_run(trained_run["dir"], tmp_path / "vis")
    done = run_main(["--visualize", "--resume", os.path.join(run, "last.pt")])
    assert done.returncode == 0, describe(done)
    names = [f"fig4_digit{k}.png" for k in range(10)] + ["class_masks.png", "couplings.png", "curves.png",
                                                         "routing_logit_change.png", "rotation.png",
                                                         "primary_capsules.png"]
    for name in names:
        assert name in done.stdout, name
        size = assert_png(os.path.join(run, name))
        if name.startswith("fig4"):
            assert size == (11 * 29 + 1, 16 * 29 + 1)  # 11 steps across, 16 dimensions down
        if name == "primary_capsules.png":  # 3 test images x 6 capsules down; input, all, 6 scales across
            assert size == (8 * 30 + 2, 18 * 30 + 2)
    summary = json.load(open(os.path.join(run, "primary_capsules.json")))
    assert summary["train_images"] == 200 and len(summary["decoder_error_per_epoch"]) == 5
    assert [len(image["capsules"]) for image in summary["images"]] == [6, 6, 6]


def test_visualize_without_matplotlib_writes_the_rest_and_warns_once(trained_run, tmp_path, monkeypatch, capsys):
    """Without matplotlib the capsule figures are still written; one warning names what is missing."""
    run = copy_run(trained_run["dir"], tmp_path / "vis")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a))
    assert cn.main(["--visualize", "--resume", os.path.join(run, "last.pt")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: matplotlib is not installed"), err
    assert os.path.exists(os.path.join(run, "couplings.png")) and not os.path.exists(os.path.join(run, "curves.png"))
    assert not os.path.exists(os.path.join(run, "rotation.png"))


def test_compare_runs_draws_each_run_with_its_final_epoch(tmp_path):
    """results/compare-runs.py: one accuracy and two loss lines per run, the legend giving each
    run's label and final epoch; the script writes a PNG."""
    rows = {"a": [{"epoch": e, "test_accuracy": 98 + e / 10, "test_loss": 0.1 / e, "train_loss": 0.2 / e}
                  for e in (1, 2, 3)],
            "b": [{"epoch": e, "test_accuracy": 97 + e / 4, "test_loss": 0.3 / e, "train_loss": 0.4 / e}
                  for e in (1, 2)]}
    accuracy, loss = figures.curves_figure(list(rows.items())).axes
    legend = [t.get_text() for t in accuracy.get_legend().get_texts()]
    assert legend == ["a: final epoch 98.30%", "b: final epoch 97.50%"], legend
    assert [line.get_ydata().tolist() for line in accuracy.get_lines()] == [
        [r["test_accuracy"] for r in rows[k]] for k in rows]
    assert [line.get_label() for line in loss.get_lines()] == [
        "a: test, final 0.0333", "a: train", "b: test, final 0.1500", "b: train"]
    paths = []
    for name, run in rows.items():
        paths.append(tmp_path / f"{name}.jsonl")
        paths[-1].write_text("".join(json.dumps(r) + "\n" for r in run))
    out = tmp_path / "both.png"
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results", "compare-runs.py")
    done = subprocess.run([sys.executable, script, str(out), *(f"{k}={p}" for k, p in zip(rows, paths))],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert_png(out)


def test_export_weights_fp16_and_evaluate_them(trained_run, tmp_path):
    """--export-weights writes the model's tensors alone in fp16 with the model's constants (no
    optimizer); --eval-only accepts that file without the architecture flags and writes eval.json."""
    out = tmp_path / "weights.pt"
    last = os.path.join(trained_run["dir"], "last.pt")
    done = run_main(["--export-weights", out, "--resume", last])
    assert done.returncode == 0, describe(done)
    exported, ckpt = load_pt(out), load_pt(last)
    assert "optimizer" not in exported and exported["epoch"] == ckpt["epoch"]
    assert exported["config"] == {k: ckpt["config"][k] for k in cn.MODEL_KEYS}
    weights = exported["model"]
    assert weights.keys() == ckpt["model"].keys()
    for name, tensor in weights.items():
        assert tensor.dtype == torch.float16, name
        torch.testing.assert_close(tensor, ckpt["model"][name].half(), rtol=0, atol=0)

    eval_dir = tmp_path / "eval"
    done = run_main(["--eval-only", "--resume", out, "--data-dir", trained_run["data"]["root"],
                       "--run-dir", eval_dir, "--no-visdom", "--device", "cpu"])
    assert done.returncode == 0, describe(done)
    import json

    with open(eval_dir / "eval.json", encoding="utf-8") as f:
        result = json.load(f)
    # fp16 weights evaluate as the run's own test pass of that epoch did: within one image of 100
    # and the loss to fp16 rounding
    row = read_rows(trained_run["dir"])[-1]
    assert result["test_images"] == N_TEST and result["checkpoint_epoch"] == exported["epoch"] == row["epoch"]
    assert abs(result["test_accuracy"] - row["test_accuracy"]) <= 1.0, (result, row)
    assert result["test_loss"] == pytest.approx(row["test_loss"], rel=2e-2), (result, row)


def test_the_rotation_sweep_turns_each_image_and_asks_the_model():
    """0 degrees is the image itself, 90 degrees is torch.rot90 (pixel centres land on pixel
    centres); every class capsule's length at every angle, and reconstructions of each."""
    model = small_model()
    images = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    angles, lengths, rotated, recon = figures.rotation_sweep(model, images, step=30)
    assert angles.tolist() == list(range(0, 360, 30)) and lengths.shape == (2, 12, 10)
    assert rotated.shape == recon.shape == (2, 12, 1, 28, 28)
    torch.testing.assert_close(rotated[:, 0], images, rtol=0, atol=1e-5)
    turned = torch.rot90(images, 1, dims=(2, 3))  # counter-clockwise on the screen ...
    clockwise = torch.rot90(images, -1, dims=(2, 3))
    assert min((rotated[:, 3] - turned).abs().max(), (rotated[:, 3] - clockwise).abs().max()) < 1e-4
    with torch.no_grad():
        direct, _ = model(rotated[:, 5])
    torch.testing.assert_close(lengths[:, 5], direct)

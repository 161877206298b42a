"""End to end through the command line, on tiny IDX files with a small architecture:
training, metrics.jsonl, checkpoints, exact resume, metrics truncation, --eval-only."""

import json
import math
import os
import re

import pytest
import torch

from conftest import (CHECKPOINT_KEYS, METRIC_KEYS, N_TEST, copy_run, describe, load_pt, read_rows,
                      run_main, small_model, train_args)


def test_training_writes_one_metrics_row_per_epoch(trained_run):
    """--epochs 2 -> exit 0 and two metrics rows with losses, accuracies in percent, lr, timings."""
    assert "Traceback" not in trained_run["process"].stderr
    rows = read_rows(trained_run["dir"])
    assert [r["epoch"] for r in rows] == [1, 2]
    for row in rows:
        assert METRIC_KEYS <= set(row), set(row)
        for key in ("train_loss", "test_loss"):
            assert math.isfinite(row[key]) and row[key] > 0
        for key in ("train_accuracy", "test_accuracy"):
            assert 0 <= row[key] <= 100
        assert row["train_seconds"] >= 0 and row["test_seconds"] >= 0
    # lr of each epoch: LR x LR_DECAY^(epoch - 1)
    assert rows[0]["lr"] == pytest.approx(1e-3, rel=1e-9)
    assert rows[1]["lr"] == pytest.approx(1e-3 * 0.96, rel=1e-9)
    # the epoch lines on stdout report the same numbers
    printed = re.findall(r"epoch (\d+)/2 .*test loss ([\d.]+) acc ([\d.]+)%", trained_run["process"].stdout)
    assert [int(e) for e, _, _ in printed] == [1, 2]
    for (_, loss, acc), row in zip(printed, rows):
        assert float(loss) == pytest.approx(row["test_loss"], abs=1e-4)
        assert float(acc) == pytest.approx(row["test_accuracy"], abs=0.01)


def test_the_tiny_digits_are_learned_a_little(trained_run):
    """Two epochs lower the training and test loss (the run really trains)."""
    rows = read_rows(trained_run["dir"])
    assert rows[1]["train_loss"] < rows[0]["train_loss"]
    assert rows[1]["test_loss"] < rows[0]["test_loss"]


def test_checkpoints_hold_the_training_state(trained_run):
    """last.pt and best.pt load with weights_only=True and hold model, optimizer, scheduler, epoch,
    best accuracy, config and RNG state; best.pt is the epoch with the best test accuracy."""
    rows = read_rows(trained_run["dir"])
    last = load_pt(os.path.join(trained_run["dir"], "last.pt"))
    best = load_pt(os.path.join(trained_run["dir"], "best.pt"))
    for ckpt in (last, best):
        assert CHECKPOINT_KEYS <= set(ckpt), set(ckpt)
        small_model().load_state_dict(ckpt["model"])  # every tensor fits the small architecture
        assert ckpt["config"]["CONV1_CHANNELS"] == 16 and ckpt["config"]["PRIMARY_CAPS"] == 4
        assert ckpt["config"]["EPOCHS"] == 2 and ckpt["config"]["BATCH_SIZE"] == 20
        assert isinstance(ckpt["rng_state"]["cpu"], torch.Tensor)
    assert last["epoch"] == 2
    top = max(r["test_accuracy"] for r in rows)
    assert last["best_accuracy"] == pytest.approx(top)
    assert best["epoch"] == next(r["epoch"] for r in rows if r["test_accuracy"] == top)
    steps = {float(s["step"]) for s in last["optimizer"]["state"].values()}
    assert steps == {2 * 200 / 20}  # 10 Adam steps per epoch
    assert last["scheduler"]["last_epoch"] == 2
    assert all(".tmp" not in name for name in os.listdir(trained_run["dir"]))


def test_resume_continues_exactly(trained_run, tmp_path):
    """--resume last.pt --epochs 3 appends row 3 (rows 1-2 unchanged) and ends exactly where an
    uninterrupted 3-epoch run with the same seed ends: same weights, Adam state, lr, accuracy.
    The architecture and data dir come from the checkpoint's config (not given again)."""
    resumed = copy_run(trained_run["dir"], tmp_path / "resumed")
    with open(os.path.join(resumed, "metrics.jsonl"), encoding="utf-8") as f:
        first_two = f.read().splitlines()
    done = run_main(["--resume", os.path.join(resumed, "last.pt"), "--epochs", 3])
    assert done.returncode == 0, describe(done)
    assert "resumed from epoch 2" in done.stdout

    straight = str(tmp_path / "straight")
    done = run_main(train_args(trained_run["data"]["root"], straight, epochs=3))
    assert done.returncode == 0, describe(done)

    with open(os.path.join(resumed, "metrics.jsonl"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert len(lines) == 3 and lines[:2] == first_two
    a, b = read_rows(resumed), read_rows(straight)
    assert a[2]["epoch"] == b[2]["epoch"] == 3
    assert a[2]["lr"] == b[2]["lr"] == pytest.approx(1e-3 * 0.96 ** 2)
    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
        assert a[2][key] == pytest.approx(b[2][key], rel=1e-6), key

    ra, rb = load_pt(os.path.join(resumed, "last.pt")), load_pt(os.path.join(straight, "last.pt"))
    assert ra["epoch"] == rb["epoch"] == 3
    assert ra["model"].keys() == rb["model"].keys()
    for name in ra["model"]:
        torch.testing.assert_close(ra["model"][name], rb["model"][name], rtol=0, atol=1e-7, msg=name)
    sa, sb = ra["optimizer"]["state"], rb["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert float(sa[k]["step"]) == float(sb[k]["step"]) == 30
        torch.testing.assert_close(sa[k]["exp_avg"], sb[k]["exp_avg"], rtol=0, atol=1e-9)
        torch.testing.assert_close(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"], rtol=0, atol=1e-9)
    assert ra["scheduler"]["last_epoch"] == rb["scheduler"]["last_epoch"] == 3
    assert torch.equal(ra["rng_state"]["cpu"], rb["rng_state"]["cpu"])


def test_resume_drops_metrics_rows_past_the_checkpoint(trained_run, tmp_path):
    """A run killed after writing rows past its last checkpoint: on resume, rows with an epoch
    beyond the checkpoint's are removed (here --epochs equals the checkpoint epoch, so nothing
    is trained and the file must hold exactly the two checkpointed rows)."""
    run = copy_run(trained_run["dir"], tmp_path / "killed")
    path = os.path.join(run, "metrics.jsonl")
    with open(path, encoding="utf-8") as f:
        original = f.read()
    with open(path, "a", encoding="utf-8") as f:
        for epoch in (3, 4):
            f.write(json.dumps({"epoch": epoch, "lr": 123.0, "train_loss": 9.9, "train_accuracy": 1.0,
                                "test_loss": 9.9, "test_accuracy": 1.0}) + "\n")
    done = run_main(["--resume", os.path.join(run, "last.pt")])
    assert done.returncode == 0, describe(done)
    assert "nothing to do" in done.stdout
    with open(path, encoding="utf-8") as f:
        assert f.read() == original


def test_resume_survives_a_partly_written_last_metrics_line(trained_run, tmp_path):
    """A process killed while appending a metrics row leaves a partial last line; resuming drops
    it (no traceback) and the file holds only whole rows again, so later rows append cleanly."""
    run = copy_run(trained_run["dir"], tmp_path / "partial")
    with open(os.path.join(run, "metrics.jsonl"), "a", encoding="utf-8") as f:
        f.write('{"epoch": 3, "lr": 0.0009216, "train_lo')
    done = run_main(["--resume", os.path.join(run, "last.pt")])
    assert done.returncode == 0 and "Traceback" not in done.stderr, describe(done)
    with open(os.path.join(run, "metrics.jsonl"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_fresh_run_does_not_mix_its_metrics_with_an_old_run(trained_run, tmp_path):
    """Training from scratch into a run dir that holds an older run leaves that run untouched
    (metrics and checkpoints) and writes the new run to RUN_DIR-2, saying so."""
    run = copy_run(trained_run["dir"], tmp_path / "reused")
    before = {name: open(os.path.join(run, name), "rb").read() for name in ("metrics.jsonl", "last.pt", "best.pt")}
    done = run_main(train_args(trained_run["data"]["root"], run, epochs=1))
    assert done.returncode == 0 and "Traceback" not in done.stderr, describe(done)
    after = {name: open(os.path.join(run, name), "rb").read() for name in before}
    assert after == before
    assert f"{run}-2" in done.stdout
    assert [r["epoch"] for r in read_rows(f"{run}-2")] == [1]
    assert os.path.exists(os.path.join(f"{run}-2", "last.pt"))


def test_eval_only_reports_the_checkpoints_test_accuracy(trained_run, tmp_path):
    """--eval-only --resume last.pt -> exit 0, prints the test accuracy in percent and writes
    eval.json next to the checkpoint; the numbers equal the last training epoch's test pass."""
    run = copy_run(trained_run["dir"], tmp_path / "evaluated")
    done = run_main(["--eval-only", "--resume", os.path.join(run, "last.pt")])
    assert done.returncode == 0, describe(done)
    printed = re.search(r"test accuracy ([\d.]+)%", done.stdout)
    assert printed, done.stdout
    with open(os.path.join(run, "eval.json"), encoding="utf-8") as f:
        result = json.load(f)
    row = read_rows(run)[-1]
    assert float(printed.group(1)) == pytest.approx(result["test_accuracy"], abs=0.005)
    assert 0 <= result["test_accuracy"] <= 100
    assert result["test_accuracy"] == pytest.approx(row["test_accuracy"], abs=1e-9)
    assert result["test_loss"] == pytest.approx(row["test_loss"], rel=1e-5)
    assert result["test_images"] == N_TEST and result["checkpoint_epoch"] == 2
    confusion = torch.tensor(result["confusion"])
    assert confusion.shape == (10, 10) and int(confusion.sum()) == N_TEST
    assert confusion.sum(1).tolist() == [N_TEST // 10] * 10  # rows are the true classes
    assert int(confusion.diag().sum()) == round(result["test_accuracy"] * N_TEST / 100)


def test_a_preset_run_prints_and_saves_its_recipe(tiny_mnist, tmp_path):
    """--preset mnist-2h (its epochs cut to 1 by a flag): the recipe's line at start, and the
    checkpoint carries the preset and its learning-rate decay (so --resume continues it)."""
    run = str(tmp_path / "run")
    done = run_main(train_args(tiny_mnist["root"], run, "--preset", "mnist-2h", epochs=1))
    assert done.returncode == 0, describe(done)
    assert "preset mnist-2h: LR_DECAY=0.88" in done.stdout.splitlines()
    ckpt = load_pt(os.path.join(run, "last.pt"))
    assert ckpt["config"]["PRESET"] == "mnist-2h" and ckpt["config"]["LR_DECAY"] == 0.88
    assert ckpt["scheduler"]["gamma"] == 0.88

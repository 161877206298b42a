"""The data sets expanded-mnist and affnist (capsnet/affnist.py): MNIST digits placed on a 40x40
canvas, the affNIST test set from its official .mat files (small ones written here in their
layout) or generated as affNIST documents, and the trainer's runs and evaluations on them."""

import json
import math
import os

import numpy as np
import pytest
import scipy.io
import torch

from capsnet import affnist, runtime
from conftest import SMALL_ARCH, cn, describe, run_main, train_args

CPU = torch.device("cpu")


def load(root, dataset="affnist", train=True, **values):
    """The data set as the trainer loads it, with the script's defaults and the data set's settings."""
    cfg = cn.default_config(DATASET=dataset, DATA_DIR=root)
    cfg.update(values)
    return cn.load_data(cfg, CPU, train), cfg


def blobs(n, seed=0, size=16):
    """n digits (n, 28, 28) uint8: a size x size block of ink at a random place, black elsewhere."""
    g = torch.Generator().manual_seed(seed)
    digits = torch.zeros(n, 28, 28, dtype=torch.uint8)
    corners = torch.randint(0, 28 - size + 1, (n, 2), generator=g)
    for k, (r, c) in enumerate(corners.tolist()):
        digits[k, r:r + size, c:c + size] = torch.randint(1, 256, (size, size), generator=g, dtype=torch.uint8)
    return digits


def full_digits(n, seed=0):
    """n digits whose every pixel holds ink, so that the ink's box is the digit's image."""
    return torch.randint(1, 256, (n, 28, 28), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def top_left(images):
    """The first row and column with ink of each image (n, H, W) -> (n, 2)."""
    box = affnist.ink_box(images)
    return box[:, [0, 2]]


# ---- placing digits on the canvas ----
def test_place_puts_each_digit_whole_at_its_offset():
    digits = full_digits(4)
    offsets = torch.tensor([[0, 0], [12, 12], [0, 12], [5, 7]])
    out = affnist.place(digits, offsets)
    assert out.shape == (4, 40, 40) and out.dtype == torch.uint8
    for k, (r, c) in enumerate(offsets.tolist()):
        assert torch.equal(out[k, r:r + 28, c:c + 28], digits[k])
        assert int(out[k].sum(dtype=torch.int64)) == int(digits[k].sum(dtype=torch.int64))  # nothing else, nothing lost


def test_training_places_are_new_per_digit_and_per_epoch():
    """Each plan draws a position in 0..12 (rows and columns) for every digit; positions differ
    between digits and between epochs; the batches show each digit where its plan says, and a
    plan resumed at batch k gives the rest of the same pass."""
    digits, labels = full_digits(300), torch.arange(300) % 10
    batches = affnist.PlacedBatches(digits, labels, batch_size=64)
    torch.manual_seed(0)
    first, second = batches.plan(), batches.plan()
    for plan in (first, second):
        offsets = plan["offsets"]
        assert offsets.min() == 0 and offsets.max() == 12
        assert len({tuple(o) for o in offsets.tolist()}) > 100  # of 169 places
    assert (first["offsets"] != second["offsets"]).any(1).float().mean() > 0.9
    passed = list(batches.batches(first))
    assert len(passed) == len(batches) == 5
    images, seen = torch.cat([b[0] for b in passed]), torch.cat([b[1] for b in passed])
    order = first["order"]
    assert torch.equal(seen, labels[order])
    assert torch.equal(top_left(images), first["offsets"][order])
    resumed = list(batches.batches(first, start=2))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(resumed, passed[2:])) and len(resumed) == 3
    torch.manual_seed(0)
    assert torch.equal(batches.plan()["offsets"], first["offsets"])  # from torch's generator: seeded, resumable


def test_the_expanded_mnist_test_places_are_fixed(tiny_mnist):
    """The test digits sit at places drawn once from EXPANDED_TEST_SEED: the same whatever the
    run's seed, and --test-size N takes the first N of them; the places vary between digits."""
    torch.manual_seed(1)
    data, cfg = load(tiny_mnist["root"], "expanded-mnist", train=False)
    torch.manual_seed(2)
    again, _ = load(tiny_mnist["root"], "expanded-mnist", train=False, TEST_SIZE=30)
    assert data.name == "expanded-mnist" and data.image_size == 40 and cfg["IMAGE_SIZE"] == 40
    images, labels = data.test.first_rows(data.test.rows)
    assert images.shape == (100, 40, 40) and torch.equal(again.test.images, images[:30])
    assert torch.equal(labels, torch.from_numpy(tiny_mnist["test"][1].astype(np.int64)))
    offsets = affnist.fixed_offsets(100)
    assert torch.equal(images, affnist.place(torch.from_numpy(tiny_mnist["test"][0]), offsets))
    assert len({tuple(o) for o in offsets.tolist()}) > 50


# ---- the generated affNIST-like test set ----
def test_the_affine_draws_are_affnists_ranges_and_fixed():
    """Rotation within +-20 degrees, shear within +-0.2, each scale in 0.8..1.2, the place in its
    range 0..1: uniform (they reach near both ends), the same on every call, the first N the same
    for any N."""
    draws = affnist.affine_draws(10)
    full = affnist.affine_draws(affnist.MNIST_TEST_ROWS)
    for name, (low, high) in {"rotation": (-20, 20), "shear": (-0.2, 0.2), "scale_x": (0.8, 1.2),
                              "scale_y": (0.8, 1.2), "place_y": (0, 1), "place_x": (0, 1)}.items():
        values = full[name]
        assert values.dtype == torch.float64 and low <= values.min() and values.max() <= high
        span = high - low
        assert values.min() < low + 0.01 * span and values.max() > high - 0.01 * span
        assert torch.equal(draws[name], values[:10])
        assert torch.equal(affnist.affine_draws(10)[name], draws[name])


def test_the_affine_matrix_is_rotation_shear_scale():
    draws = {k: v[:5] for k, v in affnist.affine_draws(5).items()}
    A = affnist.affine_matrices(draws)
    for k in range(5):
        a = math.radians(float(draws["rotation"][k]))
        rotation = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=torch.float64)
        shear = torch.tensor([[1, float(draws["shear"][k])], [0, 1]], dtype=torch.float64)
        scale = torch.diag(torch.tensor([float(draws["scale_x"][k]), float(draws["scale_y"][k])], dtype=torch.float64))
        torch.testing.assert_close(A[k], rotation @ shear @ scale)


def test_the_identity_transformation_places_the_digit_exactly():
    """No rotation, shear or scaling, and the place at the start of its range: the digit, pixel for
    pixel, at the canvas's top-left corner (the sampling adds nothing and loses nothing)."""
    digits = full_digits(3)
    zeros, ones = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    draws = {"rotation": zeros, "shear": zeros, "scale_x": ones, "scale_y": ones, "place_y": zeros, "place_x": zeros}
    out = affnist.affine_chunk(digits, draws, 40)
    assert torch.equal(out[:, :28, :28], digits) and out[:, 28:].sum() == 0 and out[:, :, 28:].sum() == 0


def test_the_generated_set_keeps_the_ink_inside_and_is_the_same_every_time():
    """Each digit's ink, transformed, lies inside the 40x40 image: the total ink is the digit's
    times the map's area factor |det A| (bilinear sampling), within a few percent. Generated twice
    (or only its first rows), the images are equal byte for byte."""
    digits = blobs(200)
    out = affnist.affine_like(digits)
    assert out.shape == (200, 40, 40) and out.dtype == torch.uint8
    det = torch.linalg.det(affnist.affine_matrices(affnist.affine_draws(200)))
    ratio = out.double().sum((1, 2)) / (digits.double().sum((1, 2)) * det.abs())
    assert (ratio - 1).abs().max() < 0.05
    assert torch.equal(affnist.affine_like(digits), out)
    assert torch.equal(affnist.affine_like(digits[:7]), out[:7])
    assert len({tuple(p) for p in top_left(out).tolist()}) > 100  # placed all over the canvas


# ---- the official .mat files ----
def write_affnist_mat(path, images, labels, **fields):
    """An affNIST .mat file in the official layout: the struct affNISTdata with image (1600, N)
    uint8, one image per column, row by row; label_int (1, N); label_one_of_n (10, N); and the
    transformation fields the reader ignores."""
    n = len(labels)
    data = {"image": images.reshape(n, 1600).T.astype(np.uint8), "label_int": np.asarray(labels, np.uint8)[None],
            "label_one_of_n": np.eye(10, dtype=np.uint8)[np.asarray(labels)].T,
            "affine_transform": np.zeros((6, n)), "human_readable_transform": np.zeros((7, n)),
            "index": np.arange(n)[None]}
    data.update(fields)
    scipy.io.savemat(path, {"affNISTdata": data})


def test_the_reader_reads_the_official_layout(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (5, 40, 40), dtype=np.uint8), np.array([7, 0, 9, 3, 3])
    images[0, 0, 1] = 255  # a pixel off the diagonal: the image is not read transposed
    images[0, 1, 0] = 0
    write_affnist_mat(tmp_path / "test.mat", images, labels)
    got_images, got_labels = affnist.read_affnist_mat(str(tmp_path / "test.mat"))
    assert got_images.dtype == torch.uint8 and got_images.shape == (5, 40, 40)
    assert np.array_equal(got_images.numpy(), images) and got_labels.tolist() == labels.tolist()


def write_batches(root, count=affnist.TEST_BATCHES, per_batch=2):
    """DATA_DIR/affNIST/test_batches/1.mat ... count.mat: batch k's labels are k % 10."""
    folder = root / affnist.AFFNIST_DIR / "test_batches"
    folder.mkdir(parents=True)
    for k in range(1, count + 1):
        write_affnist_mat(folder / f"{k}.mat", np.full((per_batch, 40, 40), k, np.uint8), [k % 10] * per_batch)
    return folder


def test_the_32_batches_are_read_in_their_order(tmp_path):
    """test_batches/1.mat ... 32.mat in numeric order (10.mat after 9.mat); with a limit only the
    files needed are read."""
    folder = write_batches(tmp_path)
    paths = affnist.affnist_files(str(tmp_path))
    assert [os.path.basename(p) for p in paths] == [f"{k}.mat" for k in range(1, 33)]
    images, labels = affnist.read_affnist(paths)
    assert labels.tolist() == [k % 10 for k in range(1, 33) for _ in range(2)]
    assert images[:, 0, 0].tolist() == [k for k in range(1, 33) for _ in range(2)]
    (folder / "4.mat").write_bytes(b"broken")
    images, labels = affnist.read_affnist(paths, limit=5)  # files 1 to 3 only
    assert len(labels) == 5 and images[4, 0, 0] == 3
    (tmp_path / affnist.AFFNIST_DIR / "test.mat").write_bytes(b"")
    assert affnist.affnist_files(str(tmp_path)) == [str(tmp_path / affnist.AFFNIST_DIR / "test.mat")]


def one_line_error(call, *needles):
    with pytest.raises(runtime.UsageError) as caught:
        call()
    text = str(caught.value)
    assert len(text.splitlines()) == 1, text
    for needle in needles:
        assert needle in text, text
    return text


def test_broken_files_are_one_line_errors(tmp_path):
    folder = write_batches(tmp_path, count=31)
    one_line_error(lambda: affnist.affnist_files(str(tmp_path)), "lacks 32.mat", "test_batches.zip")
    good = np.zeros((2, 40, 40), np.uint8)
    cases = {
        "garbage.mat": None,
        "other.mat": {"somethingElse": np.zeros(3)},
        "nofield.mat": {"affNISTdata": {"image": good.reshape(2, 1600).T}},
        "shape.mat": {"affNISTdata": {"image": np.zeros((784, 2), np.uint8), "label_int": np.zeros((1, 2))}},
        "count.mat": {"affNISTdata": {"image": good.reshape(2, 1600).T, "label_int": np.zeros((1, 3))}},
        "labels.mat": {"affNISTdata": {"image": good.reshape(2, 1600).T, "label_int": np.array([[3, 12]])}},
    }
    expected = {"garbage.mat": "garbage.mat", "other.mat": "no affNISTdata struct",
                "nofield.mat": "affNISTdata has no field label_int", "shape.mat": "expected (1600, N)",
                "count.mat": "3 labels for 2 images", "labels.mat": "outside the digits 0..9"}
    for name, content in cases.items():
        path = folder / name
        if content is None:
            path.write_bytes(b"this is not a MATLAB file at all")
        else:
            scipy.io.savemat(path, content)
        one_line_error(lambda: affnist.read_affnist_mat(str(path)), "cannot read affNIST from", expected[name])


def test_the_test_set_says_which_affnist_it_is(tiny_mnist, tmp_path):
    """Without the official files: 'affNIST-like (generated)' from the MNIST test digits; with
    DATA_DIR/affNIST/test.mat: 'affNIST', its images as stored (--test-size taken from them)."""
    data, cfg = load(tiny_mnist["root"], train=False)
    assert data.name == affnist.GENERATED_NAME and data.test.rows == 100 and cfg["IMAGE_SIZE"] == 40
    assert torch.equal(data.test.images, affnist.affine_like(torch.from_numpy(tiny_mnist["test"][0])))
    root = tmp_path / "data"
    root.mkdir()
    images = np.random.default_rng(1).integers(0, 256, (12, 40, 40), dtype=np.uint8)
    (root / affnist.AFFNIST_DIR).mkdir()
    write_affnist_mat(root / affnist.AFFNIST_DIR / "test.mat", images, [k % 10 for k in range(12)])
    data, cfg = load(str(root), train=False, TEST_SIZE=10)  # no MNIST files needed to evaluate
    assert data.name == affnist.AFFNIST_NAME and data.test.rows == 10
    assert np.array_equal(data.test.images.numpy(), images[:10]) and cfg["CLASS_NAMES"][0] == "0 - zero"


# ---- the trainer on them ----
def test_train_on_expanded_mnist_then_evaluate_on_affnist(tiny_mnist, tmp_path):
    """A tiny CapsNet run on expanded-mnist (40x40: a 12x12 primary grid); its metrics name the
    test set; --eval-only of its checkpoint with --dataset affnist prints and records which
    affNIST it measured."""
    run = str(tmp_path / "run")
    small = ["--train-size", "40", "--test-size", "20"]
    done = run_main(train_args(tiny_mnist["root"], run, "--dataset", "expanded-mnist", *small, epochs=1))
    assert done.returncode == 0, describe(done)
    assert "1x40x40 input, 12x12 grid" in done.stdout
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert rows[0]["test_set"] == "expanded-mnist"
    done = run_main(["--eval-only", "--resume", os.path.join(run, "last.pt"), "--dataset", "affnist",
                     "--device", "cpu", "--test-size", "20"])
    assert done.returncode == 0 and "affNIST-like (generated): test accuracy" in done.stdout, describe(done)
    with open(os.path.join(run, "eval.json"), encoding="utf-8") as f:
        assert json.load(f)["dataset"] == "affNIST-like (generated)"


def test_the_comparison_figure_draws_both_models_on_the_test_set_it_names(tiny_mnist, tmp_path, capsys):
    """results/paper-comparisons/affnist_figure.py with a CapsNet and a CNN trained on expanded-mnist:
    one PNG of the first COUNT affNIST(-like) images over CapsNet's reconstructions, the line
    naming the test set and each model's count of right predictions."""
    import importlib.util

    from conftest import ROOT
    from test_visualisations import assert_png

    runs = {name: str(tmp_path / name) for name in ("capsnet", "cnn")}
    small = ["--dataset", "expanded-mnist", "--train-size", "20", "--test-size", "10"]
    for name, extra in (("capsnet", []), ("cnn", ["--model", "baseline-cnn", "--baseline-dropout", "0"])):
        done = run_main(train_args(tiny_mnist["root"], runs[name], *small, *extra, epochs=1))
        assert done.returncode == 0, describe(done)
    spec = importlib.util.spec_from_file_location(
        "affnist_figure", os.path.join(ROOT, "results", "paper-comparisons", "affnist_figure.py"))
    figure = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(figure)
    out = str(tmp_path / "digits.png")
    figure.draw(tiny_mnist["root"], os.path.join(runs["capsnet"], "last.pt"), os.path.join(runs["cnn"], "last.pt"),
                out, 6)
    line = capsys.readouterr().out
    assert line.startswith(f"wrote {out} (affNIST-like (generated): CapsNet ") and "/6 right, CNN " in line
    assert assert_png(out) == (6 * 130, 320)  # figsize 1.3 x 6 by 3.2 inches at 100 dpi


def test_an_mnist_model_is_refused_on_affnist_in_one_line(tiny_mnist, tmp_path):
    """A 28x28 model cannot read 40x40 images (W_ij belong to a 6x6 grid's children, the
    baseline's first layer to a 28x28 map; a central crop cuts digits off): one line that says
    what to do instead."""
    cfg = dict(cn.default_config(), CONV1_CHANNELS=16, PRIMARY_CAPS=4, DECODER_HIDDEN1=32, DECODER_HIDDEN2=64,
               IMAGE_SIZE=28, IMAGE_CHANNELS=1, NUM_CLASSES=10, CLASS_NAMES=[str(k) for k in range(10)])
    path = str(tmp_path / "mnist.pt")
    torch.save({"model": cn.build_model(cfg).state_dict(), "config": {k: cfg[k] for k in cn.MODEL_KEYS}}, path)
    done = run_main(["--eval-only", "--resume", path, "--dataset", "affnist", "--data-dir", tiny_mnist["root"],
                     "--device", "cpu", "--run-dir", str(tmp_path / "eval")])
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, describe(done)
    assert "40x40" in done.stderr and "28x28" in done.stderr and "--dataset expanded-mnist" in done.stderr


def test_a_training_shift_on_placed_digits_is_one_line(tiny_mnist, tmp_path):
    done = run_main(train_args(tiny_mnist["root"], str(tmp_path / "run"), "--dataset", "affnist", "--max-shift", "2",
                               *SMALL_ARCH, epochs=1))
    assert done.returncode == 2 and "--max-shift does not apply to affnist" in done.stderr, describe(done)

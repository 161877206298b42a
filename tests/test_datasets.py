"""Data sets beyond MNIST, each tested on small files in its own format written here."""

import gzip
import struct

import numpy as np
import pytest
import torch

from conftest import cn
from capsnet import data, runtime  # noqa: E402


def load_split(cfg, train):
    return data.load_split(cfg, train)


def nominal_data_settings(cfg):
    return data.nominal_data_settings(cfg)


def write_norb(path, array, magic=0x1E3D4C55, compress=False):
    """A NORB binary matrix: magic, ndim, max(3, ndim) sizes (padded with 1), the elements."""
    dims = list(array.shape) + [1] * (3 - array.ndim)
    data = struct.pack("<ii", magic - (1 << 32) if magic >= 1 << 31 else magic, array.ndim)
    data += struct.pack(f"<{len(dims)}i", *dims) + array.tobytes()
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("compress", [False, True])
def test_read_norb_matrix_reads_bytes_and_integers(tmp_path, compress):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 2, 96, 96), dtype=np.uint8)
    labels = np.array([0, 4, 2, 1, 3, 0], dtype="<i4")
    write_norb(tmp_path / ("dat.mat.gz" if compress else "dat.mat"), images, compress=compress)
    write_norb(tmp_path / "cat.mat", labels, magic=0x1E3D4C54)
    got = data.read_norb_matrix(str(tmp_path / "dat.mat"))  # finds the .gz when only it exists
    assert got.dtype == torch.uint8 and tuple(got.shape) == (6, 2, 96, 96)
    assert np.array_equal(got.numpy(), images)
    cat = data.read_norb_matrix(str(tmp_path / "cat.mat"))
    assert cat.dtype == torch.int32 and cat.tolist() == labels.tolist()


def test_read_norb_matrix_names_the_bad_file(tmp_path):
    with pytest.raises(runtime.UsageError, match="missing.mat"):
        data.read_norb_matrix(str(tmp_path / "missing.mat"))
    write_norb(tmp_path / "short.mat", np.zeros((4, 2, 8, 8), np.uint8))
    with open(tmp_path / "short.mat", "r+b") as f:
        f.truncate(100)
    with pytest.raises(runtime.UsageError, match=r"short.mat: .*bytes of data for a 4x2x8x8 uint8 matrix"):
        data.read_norb_matrix(str(tmp_path / "short.mat"))
    (tmp_path / "text.mat").write_bytes(b"hello, this is not a matrix")
    with pytest.raises(runtime.UsageError, match="not a NORB binary matrix"):
        data.read_norb_matrix(str(tmp_path / "text.mat"))


def test_random_crop_flip_crops_and_flips_each_image_on_its_own():
    """Every output is a size x size window of its own image, mirrored or not; offsets and flips
    differ between images, and the same seed gives the same batch."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    torch.manual_seed(1)
    out = data.random_crop_flip(images, 24, flip=True)
    torch.manual_seed(1)
    assert torch.equal(out, data.random_crop_flip(images, 24, flip=True))
    assert out.shape == (64, 3, 24, 24)
    offsets, flips = set(), []
    for k in range(64):
        found = [(t, l, m) for t in range(9) for l in range(9) for m in (False, True)
                 if torch.equal(out[k], (lambda w: w.flip(-1) if m else w)(images[k, :, t:t + 24, l:l + 24]))]
        assert len(found) == 1, k
        offsets.add(found[0][:2])
        flips.append(found[0][2])
    assert len(offsets) > 20 and 10 < sum(flips) < 54
    torch.manual_seed(1)
    plain = data.random_crop_flip(images, 24, flip=False)
    assert not torch.equal(plain, out)
    assert torch.equal(data.center_crop(images, 24), images[:, :, 4:28, 4:28])


# ---- small files in each data set's own format ----
import json  # noqa: E402
import os  # noqa: E402
import pickle  # noqa: E402

from conftest import (SMALL_ARCH, SMALL_BATCHES, describe, make_digits, read_rows, run_main,  # noqa: E402
                      write_idx_images, write_idx_labels)

N_TRAIN, N_TEST = 60, 30


def colour_images(n, channels, size, classes, seed):
    """n uint8 images (n, channels, size, size) whose class k is a bright square at a class-specific
    place; labels cycle through the classes."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    images = rng.integers(0, 60, size=(n, channels, size, size)).astype(np.uint8)
    for i, k in enumerate(labels):
        r, c = (k * 7) % (size - 8), (k * 11) % (size - 8)
        images[i, :, r:r + 8, c:c + 8] = rng.integers(150, 256, size=(channels, 1, 1))
    return images, labels


def write_idx_set(root, folder, names, classes=10, transpose=False, offset=0):
    """MNIST-format files (IDX) under root/folder/raw with the given four names."""
    raw = os.path.join(root, folder, "raw")
    os.makedirs(raw, exist_ok=True)
    written = {}
    for (images_name, labels_name), n, seed in zip(names, (N_TRAIN, N_TEST), (1, 2)):
        images, labels = make_digits(n, seed)
        labels = (np.arange(n) % classes + offset).astype(np.uint8)
        write_idx_images(os.path.join(raw, images_name), images.transpose(0, 2, 1) if transpose else images)
        write_idx_labels(os.path.join(raw, labels_name), labels)
        written[images_name] = (images, labels)
    return written


MNIST_NAMES = [("train-images-idx3-ubyte", "train-labels-idx1-ubyte"), ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")]


def emnist_names(split):
    return [(f"emnist-{split}-{part}-images-idx3-ubyte", f"emnist-{split}-{part}-labels-idx1-ubyte")
            for part in ("train", "test")]


def write_cifar10(root, version="python"):
    """Small CIFAR-10 files in one official version: "python" (cifar-10-batches-py, pickled dicts)
    or "binary" (cifar-10-batches-bin, records of 1 label byte + 3,072 pixel bytes)."""
    images, labels = colour_images(N_TRAIN, 3, 32, 10, seed=3)
    test_images, test_labels = colour_images(N_TEST, 3, 32, 10, seed=4)
    parts = [(f"data_batch_{k + 1}", images[12 * k:12 * (k + 1)], labels[12 * k:12 * (k + 1)]) for k in range(5)]
    parts.append(("test_batch", test_images, test_labels))
    folder = os.path.join(root, "cifar-10-batches-py" if version == "python" else "cifar-10-batches-bin")
    os.makedirs(folder, exist_ok=True)
    for name, part_images, part_labels in parts:  # five training batches of 12, the test batch
        if version == "python":
            with open(os.path.join(folder, name), "wb") as f:
                pickle.dump({b"data": part_images.reshape(len(part_images), -1), b"labels": part_labels.tolist()}, f)
        else:
            records = np.concatenate([part_labels.astype(np.uint8)[:, None],
                                      part_images.reshape(len(part_images), -1)], axis=1)
            records.tofile(os.path.join(folder, name + ".bin"))
    return images, labels


def write_svhn(root):
    import scipy.io

    os.makedirs(root, exist_ok=True)
    for name, n, seed in (("train", N_TRAIN, 5), ("test", N_TEST, 6)):
        images, labels = colour_images(n, 3, 32, 10, seed)
        mat_labels = np.where(labels == 0, 10, labels).reshape(n, 1)  # SVHN writes the digit 0 as 10
        scipy.io.savemat(os.path.join(root, f"{name}_32x32.mat"), {"X": images.transpose(2, 3, 1, 0), "y": mat_labels})


def write_smallnorb(root):
    folder = os.path.join(root, "smallnorb")
    os.makedirs(folder, exist_ok=True)
    for stem, n, seed in (("smallnorb-5x46789x9x18x6x2x96x96-training", N_TRAIN, 7),
                          ("smallnorb-5x01235x9x18x6x2x96x96-testing", N_TEST, 8)):
        images, labels = colour_images(n, 2, 96, 5, seed)
        write_norb(os.path.join(folder, f"{stem}-dat.mat"), images)
        write_norb(os.path.join(folder, f"{stem}-cat.mat"), labels.astype("<i4"), magic=0x1E3D4C54)


def write_folder(root, colour=True, classes=("cat", "dog", "owl")):
    from PIL import Image

    for split, n, seed in (("train", 24, 9), ("test", 9, 10)):
        images, labels = colour_images(n, 3, 40, len(classes), seed)
        for i, (image, k) in enumerate(zip(images, labels)):
            os.makedirs(os.path.join(root, split, classes[k]), exist_ok=True)
            picture = Image.fromarray(image.transpose(1, 2, 0))
            if not colour:
                picture = picture.convert("L")
            picture.save(os.path.join(root, split, classes[k], f"{i}.{'png' if i % 2 else 'jpg'}"))


WRITERS = {
    "fashion-mnist": lambda root: write_idx_set(root, "FashionMNIST", MNIST_NAMES),
    "kmnist": lambda root: write_idx_set(root, "KMNIST", MNIST_NAMES),
    "emnist-balanced": lambda root: write_idx_set(root, "EMNIST", emnist_names("balanced"), 47, transpose=True),
    "emnist-letters": lambda root: write_idx_set(root, "EMNIST", emnist_names("letters"), 26, transpose=True,
                                                 offset=1),
    "cifar10": write_cifar10,
    "svhn": write_svhn,
    "smallnorb": write_smallnorb,
    "folder": write_folder,
}
# (channels, input size the model sees, classes) of each data set with its own settings
SHAPES = {"fashion-mnist": (1, 28, 10), "kmnist": (1, 28, 10), "emnist-balanced": (1, 28, 47),
          "emnist-letters": (1, 28, 26), "cifar10": (3, 24, 10), "svhn": (3, 32, 10), "smallnorb": (2, 32, 5),
          "folder": (3, 28, 3)}


def config(name, root, **extra):
    cfg = cn.default_config(DATASET=name, DATA_DIR=str(root))
    cfg.update(extra)
    return cfg


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_each_loader_reads_its_own_format(name, tmp_path):
    """load_split on files written in the data set's format: images uint8 in the data set's layout,
    labels from 0, the class names; EMNIST upright; SVHN's 10 is the digit 0."""
    written = WRITERS[name](str(tmp_path))
    cfg = config(name, tmp_path)
    images, labels, classes = load_split(cfg, True)
    channels, _, n_classes = SHAPES[name]
    assert images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert len(classes) == n_classes and int(labels.min()) == 0 and int(labels.max()) < n_classes
    stored = {"cifar10": 32, "svhn": 32, "smallnorb": 48, "folder": 28}.get(name, 28)
    if channels == 1:
        assert tuple(images.shape[1:]) == (stored, stored)
    else:
        assert tuple(images.shape[1:]) == (channels, stored, stored)
    if name.startswith("emnist"):
        raw_images, raw_labels = written[emnist_names(name.split("-")[1])[0][0]]
        assert torch.equal(images, torch.from_numpy(raw_images))  # transposed on disk, upright here
        assert labels.tolist() == (raw_labels.astype(int) - (name == "emnist-letters")).tolist()
    if name == "svhn":
        assert labels.tolist() == (np.arange(N_TRAIN) % 10).tolist()
    if name == "smallnorb":  # 96 -> 48 by 2x2 averages
        dat = data.read_norb_matrix(str(tmp_path / "smallnorb" / "smallnorb-5x46789x9x18x6x2x96x96-training-dat.mat"))
        box = dat.float().reshape(N_TRAIN, 2, 48, 2, 48, 2).mean((3, 5))
        assert (images.float() - box).abs().max() <= 0.5 + 1e-4
    test_images, test_labels, _ = load_split(dict(cfg, CLASS_NAMES=classes, IMAGE_CHANNELS=channels), False)
    assert len(test_labels) == {"folder": 9}.get(name, N_TEST)


def expected_parameters(channels, size, classes, conv1=256, types=32, pdim=8, ddim=16, kernel=9):
    grid = ((size - kernel + 1) - kernel) // 2 + 1
    children = types * grid * grid
    pixels = channels * size * size
    return (channels * kernel * kernel * conv1 + conv1 + conv1 * kernel * kernel * types * pdim + types * pdim
            + classes * children * ddim * pdim
            + ddim * classes * 512 + 512 + 512 * 1024 + 1024 + 1024 * pixels + pixels)


@pytest.mark.parametrize("name", ["mnist"] + sorted(WRITERS) + ["multimnist"])
def test_the_model_follows_each_data_set(name):
    """Input channels, size (after the crop) and classes from the data set, PrimaryCaps grid and
    capsule count following; MNIST keeps its 8,215,568 parameters."""
    cfg = nominal_data_settings(config(name, "unused"))
    model = cn.build_model(cfg)
    nominal = {"mnist": (1, 28, 10), "multimnist": (1, 36, 10), "folder": (3, 28, 10)}  # folder: DATA_SETS' shape
    channels, size, classes = nominal.get(name) or SHAPES[name]
    settings = cn.DATASET_SETTINGS[name]
    arch = {"conv1": settings.get("CONV1_CHANNELS", 256), "types": settings.get("PRIMARY_CAPS", 32),
            "pdim": settings.get("PRIMARY_DIM", 8), "ddim": settings.get("DIGIT_DIM", 16)}
    assert (model.in_channels, model.image_size, model.num_classes) == (channels, size, classes)
    assert sum(p.numel() for p in model.parameters()) == expected_parameters(channels, size, classes, **arch)
    if name == "mnist":
        assert sum(p.numel() for p in model.parameters()) == 8_215_568
    model.eval()
    with torch.no_grad():
        lengths, recon = model(torch.rand(2, channels, size, size))
    assert lengths.shape == (2, classes) and recon.shape == (2, channels, size, size)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """Every data set's small files under one DATA_DIR (their layouts do not collide)."""
    root = tmp_path_factory.mktemp("datasets")
    for write in WRITERS.values():
        write(str(root))
    return str(root)


def tiny(data_dir, run_dir, name, *extra, epochs=1):
    """Flags of a one-epoch run on the CPU (also where CUDA is: numbers are compared on the CPU)."""
    return ["--dataset", name, "--data-dir", data_dir, "--run-dir", run_dir, "--no-visdom", "--epochs", epochs,
            "--no-compile", "--device", "cpu", *SMALL_ARCH, *SMALL_BATCHES, *extra]


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_every_data_set_trains_an_epoch_from_the_command_line(name, data_root, tmp_path):
    """One epoch on the data set's files: exit 0, the start-up line with the data set's shape, a
    metrics row, and a checkpoint that records what the data decided."""
    run = str(tmp_path / "run")
    done = run_main(tiny(data_root, run, name))
    assert done.returncode == 0, describe(done)
    channels, size, classes = SHAPES[name]
    assert f"; {name}: " in done.stdout and f"{channels}x{size}x{size} input" in done.stdout
    assert f"{classes} classes" in done.stdout
    assert [r["epoch"] for r in read_rows(run)] == [1]
    config_saved = torch.load(os.path.join(run, "last.pt"), map_location="cpu", weights_only=True)["config"]
    assert (config_saved["IMAGE_CHANNELS"], config_saved["NUM_CLASSES"]) == (channels, classes)
    assert len(config_saved["CLASS_NAMES"]) == classes


def test_crops_and_flips_are_drawn_for_training_images_only(data_root):
    """cifar10's BatchLoss: in training every call draws new crops and flips; at test the central
    24x24 crop, always the same."""
    cfg = nominal_data_settings(config("cifar10", data_root))
    images, labels, _ = load_split(cfg, False)
    seen = []
    model = cn.build_model(dict(cfg, CONV1_CHANNELS=8, PRIMARY_CAPS=2, DECODER_HIDDEN1=16, DECODER_HIDDEN2=32))
    step = cn.BatchLoss(model, cn.CapsuleLoss(), torch.device("cpu"), None, 0, False, crop=24, flip=True)
    model.forward = lambda x, labels=None, objects=1: (seen.append(x.clone()), model.capsules(x)[0].norm(dim=-1),
                                                      torch.zeros_like(x))[1:]
    model.train()
    step((images[:8], labels[:8]))
    step((images[:8], labels[:8]))
    model.eval()
    step((images[:8], labels[:8]))
    step((images[:8], labels[:8]))
    assert all(x.shape == (8, 3, 24, 24) for x in seen)
    assert not torch.equal(seen[0], seen[1])
    centre = images[:8, :, 4:28, 4:28].float() / 255
    assert torch.equal(seen[2], centre) and torch.equal(seen[3], centre)


def test_an_ensemble_averages_the_capsule_lengths(data_root, tmp_path):
    """--eval-only --resume A --resume B on the CPU: each model's accuracy and the ensemble's, whose
    predictions are the argmax of the two models' mean lengths (recomputed here on the CPU, with
    the same arithmetic, so that they agree to 1e-6)."""
    runs = [str(tmp_path / f"run{k}") for k in (1, 2)]
    for seed, run in enumerate(runs):
        done = run_main(tiny(data_root, run, "fashion-mnist", "--seed", seed))
        assert done.returncode == 0, describe(done)
    out = str(tmp_path / "eval")
    done = run_main(["--eval-only", "--resume", os.path.join(runs[0], "last.pt"), "--resume",
                     os.path.join(runs[1], "last.pt"), "--run-dir", out, "--device", "cpu"])
    assert done.returncode == 0, describe(done)
    assert "model 1 (" in done.stdout and "model 2 (" in done.stdout and "ensemble of 2: test accuracy" in done.stdout
    with open(os.path.join(out, "eval.json"), encoding="utf-8") as f:
        result = json.load(f)
    lengths = []
    for run in runs:
        ckpt = runtime.load_checkpoint(os.path.join(run, "last.pt"))
        cfg = dict(cn.default_config(), **ckpt["config"])
        model = cn.build_model(cfg)
        runtime.load_weights(model, ckpt["model"])
        images, labels, _ = load_split(cfg, False)
        with torch.no_grad(), runtime.autocast(torch.device("cpu"), runtime.amp_dtype(torch.device("cpu"), True)):
            lengths.append(model.eval()(data.to_float_images(images))[0].float())
    ensemble = 100.0 * float((torch.stack(lengths).mean(0).argmax(1) == labels).float().mean())
    assert result["test_accuracy"] == pytest.approx(ensemble, abs=1e-6)
    assert [m["test_accuracy"] for m in result["members"]] == pytest.approx(
        [100.0 * float((x.argmax(1) == labels).float().mean()) for x in lengths], abs=1e-6)


def test_predict_on_png_files_of_a_drawn_digit(tiny_mnist, tmp_path):
    """--predict on a PNG of a dark digit drawn on white: inverted (and said so), a class printed
    with every capsule length, predictions.json, and the input beside its reconstruction."""
    from PIL import Image, ImageDraw

    run = str(tmp_path / "run")
    done = run_main(["--data-dir", tiny_mnist["root"], "--run-dir", run, "--no-visdom", "--epochs", 1,
                       "--no-compile", "--device", "cpu", *SMALL_ARCH, *SMALL_BATCHES])
    assert done.returncode == 0, describe(done)
    drawn = Image.new("L", (120, 120), 255)
    ImageDraw.Draw(drawn).line([(60, 15), (60, 105)], fill=0, width=14)  # a "1"
    paths = [str(tmp_path / "one.png"), str(tmp_path / "light.png")]
    drawn.save(paths[0])
    Image.new("RGB", (40, 30), (0, 0, 0)).save(paths[1])  # already light-on-dark: not inverted
    done = run_main(["--predict", *paths, "--resume", os.path.join(run, "last.pt")])
    assert done.returncode == 0, describe(done)
    assert f"{paths[0]}: class " in done.stdout and "inverted" in done.stdout.split("\n")[0]
    with open(os.path.join(run, "predictions.json"), encoding="utf-8") as f:
        predictions = json.load(f)
    assert [p["inverted"] for p in predictions] == [True, False]
    for p in predictions:
        assert len(p["lengths"]) == 10 and p["class_name"] == max(p["lengths"], key=p["lengths"].get)
        assert Image.open(p["picture"]).size == (2 * 28 + 3 * 2, 28 + 2 * 2)


def one_line_error(done, fragment, run):
    assert done.returncode == 2, describe(done)
    assert fragment in done.stderr, describe(done)
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert not os.path.exists(run)


@pytest.mark.parametrize("name, damage, fragment", [
    ("cifar10", lambda root: os.remove(os.path.join(root, "cifar-10-batches-py", "data_batch_3")),
     "cannot load CIFAR-10 from"),
    ("svhn", lambda root: os.remove(os.path.join(root, "test_32x32.mat")), "cannot load SVHN from"),
    ("smallnorb", lambda root: open(os.path.join(root, "smallnorb", "smallnorb-5x46789x9x18x6x2x96x96-training-cat.mat"),
                                    "wb").write(b"junk"), "not a NORB binary matrix"),
    ("fashion-mnist", lambda root: os.remove(os.path.join(root, "FashionMNIST", "raw", "t10k-images-idx3-ubyte")),
     "cannot load FashionMNIST from"),
    ("folder", lambda root: open(os.path.join(root, "train", "dog", "broken.png"), "wb").write(b"not a png"),
     "cannot read image"),
    ("folder", lambda root: os.makedirs(os.path.join(root, "train", "empty")), "class empty in"),
    ("folder", lambda root: [os.rename(os.path.join(root, "train", c), os.path.join(root, c)) for c in
                             ("cat", "dog", "owl")], "has no class subfolders"),
])
def test_bad_data_is_one_line_and_nothing_written(name, damage, fragment, tmp_path):
    root = str(tmp_path / "data")
    WRITERS[name](root)
    damage(root)
    run = str(tmp_path / "run")
    one_line_error(run_main(tiny(root, run, name)), fragment, run)


def test_images_too_small_name_the_smallest_size(tmp_path):
    root = str(tmp_path / "data")
    write_folder(root)
    run = str(tmp_path / "run")
    one_line_error(run_main(tiny(root, run, "folder", "--image-size", 16)),
                   "16x16 images are too small for Conv1 and PrimaryCaps (9x9 kernels, stride 2): the smallest "
                   "size that works is 17x17", run)


def test_a_grey_folder_is_one_channel(tmp_path):
    """IMAGE_CHANNELS 0: 3 if any training image has colour, else 1."""
    root = str(tmp_path / "data")
    write_folder(root, colour=False)
    images, _, _ = load_split(config("folder", root), True)
    assert images.dim() == 3
    write_folder(str(tmp_path / "colour"))
    images, _, _ = load_split(config("folder", str(tmp_path / "colour")), True)
    assert images.shape[1] == 3


@pytest.mark.parametrize("version", ["python", "binary"])
def test_cifar10_reads_either_official_version_pixel_for_pixel(version, tmp_path):
    """The binary records and the pickled batches give the same images (red, green, blue planes of
    32 rows) and labels, in the files' order, whichever version is in DATA_DIR."""
    written, labels = write_cifar10(str(tmp_path), version)
    images, read_labels, classes = load_split(config("cifar10", tmp_path), True)
    assert torch.equal(images, torch.from_numpy(written)) and read_labels.tolist() == labels.tolist()
    assert classes[0] == "airplane" and classes[9] == "truck"
    test_images, test_labels, _ = load_split(config("cifar10", tmp_path), False)
    assert torch.equal(test_images, torch.from_numpy(colour_images(N_TEST, 3, 32, 10, seed=4)[0]))


def test_cifar10_prefers_a_complete_binary_version_and_falls_back_to_the_python_one(tmp_path):
    write_cifar10(str(tmp_path), "python")
    write_cifar10(str(tmp_path), "binary")
    first = tmp_path / "cifar-10-batches-bin" / "data_batch_1.bin"
    first.write_bytes(bytes([7]) + bytes(3072) + first.read_bytes()[3073:])  # the binary copy's first image differs
    images, labels, _ = load_split(config("cifar10", tmp_path), True)
    assert int(labels[0]) == 7 and int(images[0].sum()) == 0
    os.remove(first)  # incomplete binary version: the python one is read
    images, labels, _ = load_split(config("cifar10", tmp_path), True)
    assert int(labels[0]) == 0 and int(images[0].sum()) > 0


@pytest.mark.parametrize("damage, fragment", [
    (lambda root: os.remove(os.path.join(root, "cifar-10-batches-bin", "test_batch.bin")),
     "test_batch.bin missing"),
    (lambda root: open(os.path.join(root, "cifar-10-batches-bin", "data_batch_2.bin"), "ab").write(b"xx"),
     "data_batch_2.bin: ValueError: 36,878 bytes is not a whole number of 3,073-byte records"),
    (lambda root: open(os.path.join(root, "cifar-10-batches-bin", "data_batch_4.bin"), "r+b").write(b"\x0c"),
     "data_batch_4.bin: ValueError: labels outside 0..9"),
])
def test_a_broken_binary_cifar10_is_one_line(damage, fragment, tmp_path):
    root = str(tmp_path / "data")
    write_cifar10(root, "binary")
    damage(root)
    run = str(tmp_path / "run")
    one_line_error(run_main(tiny(root, run, "cifar10")), fragment, run)

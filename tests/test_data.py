"""Data: MNIST IDX files (capsnet.data.load_idx: read directly, or through torchvision) and
device-side batching."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import N_TEST, N_TRAIN, ROOT
from capsnet import data  # noqa: E402


def load_mnist(root, train, limit=0):
    """MNIST's images and labels through data.load_idx."""
    return data.load_idx("MNIST", root, train, limit)[:2]


def test_tiny_idx_files_load_with_shapes_dtypes_and_values(tiny_mnist):
    """load_mnist returns uint8 (N, 28, 28) images and int64 (N,) labels equal to the files."""
    for train, key, n in ((True, "train", N_TRAIN), (False, "test", N_TEST)):
        images, labels = load_mnist(tiny_mnist["root"], train)
        assert images.shape == (n, 28, 28) and images.dtype == torch.uint8
        assert labels.shape == (n,) and labels.dtype == torch.int64
        assert images.device.type == "cpu" and labels.device.type == "cpu"
        want_images, want_labels = tiny_mnist[key]
        assert np.array_equal(images.numpy(), want_images)
        assert np.array_equal(labels.numpy(), want_labels.astype(np.int64))


@pytest.mark.parametrize("kind", ["MNIST", "FashionMNIST", "KMNIST"])
def test_the_direct_reader_gives_what_torchvision_gives(tiny_mnist, tmp_path, kind):
    """The four uncompressed files are read without torchvision, into the tensors (values, shapes,
    dtypes) and class names that torchvision's loader gives for the same files."""
    import torchvision.datasets

    raw = tmp_path / kind / "raw"
    shutil.copytree(tiny_mnist["raw"], raw)
    for train in (True, False):
        reference = getattr(torchvision.datasets, kind)(str(tmp_path), train=train, download=False)
        direct = data.load_idx(kind, str(tmp_path), train)
        assert direct[0].dtype == reference.data.dtype and direct[1].dtype == reference.targets.dtype
        assert torch.equal(direct[0], reference.data) and torch.equal(direct[1], reference.targets)
        assert direct[2] == list(reference.classes)


def test_reading_mnist_does_not_import_torchvision(tiny_mnist):
    """A process that loads MNIST's uncompressed files never imports torchvision."""
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); from capsnet import data\n"
            f"images = data.load_idx('MNIST', {tiny_mnist['root']!r}, True)[0]\n"
            "print(len(images), 'torchvision' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(N_TRAIN), "False"]


def test_a_file_cut_short_or_too_long_is_named(tmp_path):
    """read_idx checks the byte count against the header's sizes, either way, and names the file."""
    path = tmp_path / "t10k-images-idx3-ubyte"
    header = (0x00000803).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in (2, 28, 28))
    for body, why in ((bytes(2 * 784 - 1), "cut short"), (bytes(2 * 784 + 5), "more than it says")):
        path.write_bytes(header + body)
        with pytest.raises(ValueError, match=f"t10k-images-idx3-ubyte holds .* 2x28x28 .*{why}"):
            data.read_idx(str(path))
    path.write_bytes(header + bytes(range(256)) * 6 + bytes(32))
    assert torch.equal(data.read_idx(str(path)).flatten()[:256], torch.arange(256, dtype=torch.uint8))
    path.write_bytes(b"\0\0\x0d\x01" + bytes(8))
    with pytest.raises(ValueError, match="not an IDX file of unsigned bytes"):
        data.read_idx(str(path))


def test_limit_takes_the_first_n(tiny_mnist):
    """limit=N keeps the first N examples in file order; 0 (or more than there are) keeps all."""
    images, labels = load_mnist(tiny_mnist["root"], True, limit=37)
    want_images, want_labels = tiny_mnist["train"]
    assert images.shape == (37, 28, 28)
    assert np.array_equal(images.numpy(), want_images[:37])
    assert np.array_equal(labels.numpy(), want_labels[:37])
    assert len(load_mnist(tiny_mnist["root"], False, limit=0)[1]) == N_TEST
    assert len(load_mnist(tiny_mnist["root"], False, limit=10_000)[1]) == N_TEST


def test_loading_downloads_nothing(tiny_mnist):
    """With the four raw files present, nothing else appears in the data directory."""
    load_mnist(tiny_mnist["root"], True)
    assert sorted(os.listdir(tiny_mnist["raw"])) == sorted(data.MNIST_FILES)


def test_to_float_images():
    """uint8 (B, 28, 28) -> float (B, 1, 28, 28) scaled to [0, 1]."""
    u8 = torch.tensor([[[0, 255], [51, 102]]], dtype=torch.uint8)
    x = data.to_float_images(u8)
    assert x.shape == (1, 1, 2, 2) and x.dtype == torch.float32
    torch.testing.assert_close(x[0, 0], torch.tensor([[0.0, 1.0], [0.2, 0.4]]))


def test_device_batches_cover_every_example_once():
    """DeviceBatches: ceil(N / batch) batches; unshuffled in order, shuffled a permutation,
    images and labels kept together."""
    images = torch.arange(23).view(23, 1, 1).expand(23, 28, 28).to(torch.uint8)
    labels = torch.arange(23)
    ordered = list(data.DeviceBatches(images, labels, 5, shuffle=False))
    assert len(data.DeviceBatches(images, labels, 5, shuffle=False)) == 5
    assert [len(b[1]) for b in ordered] == [5, 5, 5, 5, 3]
    assert torch.equal(torch.cat([b[1] for b in ordered]), labels)
    torch.manual_seed(0)
    shuffled = list(data.DeviceBatches(images, labels, 5, shuffle=True))
    got = torch.cat([b[1] for b in shuffled])
    assert sorted(got.tolist()) == list(range(23)) and not torch.equal(got, labels)
    for imgs, lbls in shuffled:
        assert torch.equal(imgs[:, 0, 0].long(), lbls)

"""Data: MNIST IDX files through torchvision (capsnet.data.load_idx) and device-side batching."""

import os

import numpy as np
import torch

from conftest import N_TEST, N_TRAIN
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

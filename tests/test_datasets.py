"""Data sets beyond MNIST, each tested on small files in its own format written here."""

import gzip
import struct

import numpy as np
import pytest
import torch

from conftest import cn


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
    got = cn.read_norb_matrix(str(tmp_path / "dat.mat"))  # finds the .gz when only it exists
    assert got.dtype == torch.uint8 and tuple(got.shape) == (6, 2, 96, 96)
    assert np.array_equal(got.numpy(), images)
    cat = cn.read_norb_matrix(str(tmp_path / "cat.mat"))
    assert cat.dtype == torch.int32 and cat.tolist() == labels.tolist()


def test_read_norb_matrix_names_the_bad_file(tmp_path):
    with pytest.raises(cn.UsageError, match="missing.mat"):
        cn.read_norb_matrix(str(tmp_path / "missing.mat"))
    write_norb(tmp_path / "short.mat", np.zeros((4, 2, 8, 8), np.uint8))
    with open(tmp_path / "short.mat", "r+b") as f:
        f.truncate(100)
    with pytest.raises(cn.UsageError, match=r"short.mat: .*bytes of data for a 4x2x8x8 uint8 matrix"):
        cn.read_norb_matrix(str(tmp_path / "short.mat"))
    (tmp_path / "text.mat").write_bytes(b"hello, this is not a matrix")
    with pytest.raises(cn.UsageError, match="not a NORB binary matrix"):
        cn.read_norb_matrix(str(tmp_path / "text.mat"))


def test_random_crop_flip_crops_and_flips_each_image_on_its_own():
    """Every output is a size x size window of its own image, mirrored or not; offsets and flips
    differ between images, and the same seed gives the same batch."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    torch.manual_seed(1)
    out = cn.random_crop_flip(images, 24, flip=True)
    torch.manual_seed(1)
    assert torch.equal(out, cn.random_crop_flip(images, 24, flip=True))
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
    plain = cn.random_crop_flip(images, 24, flip=False)
    assert not torch.equal(plain, out)
    assert torch.equal(cn.center_crop(images, 24), images[:, :, 4:28, 4:28])

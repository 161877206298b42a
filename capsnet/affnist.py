"""Expanded MNIST and affNIST (paper, sec. 5.2): the trainer's data sets "expanded-mnist" and
"affnist".

Training (both): every MNIST training digit placed at a uniformly random position on a 40x40
black canvas, a new position per digit in every epoch, drawn on the device from torch's
default generator (PlacedBatches: saved in checkpoints, so a resumed run draws what the
uninterrupted one would). The test sets:
    expanded-mnist  the MNIST test digits, each at a fixed random position drawn once from
                    EXPANDED_TEST_SEED.
    affnist         the real affNIST test set when its official files are in
                    DATA_DIR/affNIST (test.mat, or test_batches/1.mat ... 32.mat: 320,000
                    images, 32 random affine transformations of each MNIST test digit); else
                    an affNIST-like stand-in generated from the 10,000 MNIST test digits with
                    transformations drawn as affNIST documents (affine_like), once, from
                    AFFNIST_LIKE_SEED. The data object's name says which: "affNIST" or
                    "affNIST-like (generated)"; so do the lines and files with its results.
"""

import os

import numpy as np
import torch

from capsnet.runtime import UsageError

CANVAS = 40  # affNIST's images, and the expanded MNIST's: 40x40
DIGIT = 28  # an MNIST digit's image
EXPANDED_TEST_SEED = 5240  # expanded-mnist's fixed test positions come from this seed, whatever SEED is
AFFNIST_LIKE_SEED = 5241  # the generated affNIST-like test set likewise
MNIST_TEST_ROWS = 10_000  # fixed draws are made for at least this many rows: --test-size N takes the first N
AFFNIST_DIR = "affNIST"  # DATA_DIR/affNIST/test.mat or DATA_DIR/affNIST/test_batches/{1..32}.mat
TEST_BATCHES = 32
AFFNIST_NAME, GENERATED_NAME = "affNIST", "affNIST-like (generated)"

# The affine transformations affNIST documents (Tieleman's affNIST page), drawn uniformly and
# independently per image: rotation at most 20 degrees either way; shear at most 0.2 either way
# (x' = x + shear * y); horizontal and vertical scale factors each between 0.8 and 1.2; then a
# translation placing the transformed digit anywhere in the 40x40 image where none of its ink is
# cut off. The page gives the ranges, not the order: here scale, then shear, then rotation, about
# the centre of the 28x28 digit.
ROTATION_DEGREES = 20.0
SHEAR = 0.2
SCALE = (0.8, 1.2)


def place(digits, offsets, canvas=CANVAS):
    """Each digit (n, h, w) uint8 on a black canvas x canvas image, its top-left pixel at offsets
    (n, 2) (row, column) -> (n, canvas, canvas), on the digits' device."""
    n, h, w = digits.shape
    device = digits.device
    out = digits.new_zeros((n, canvas, canvas))
    rows = (offsets[:, :1] + torch.arange(h, device=device))[:, :, None]  # (n, h, 1)
    cols = (offsets[:, 1:] + torch.arange(w, device=device))[:, None, :]  # (n, 1, w)
    out[torch.arange(n, device=device)[:, None, None], rows, cols] = digits
    return out


def draw_offsets(n, generator=None, device=None, canvas=CANVAS, digit=DIGIT):
    """Uniform top-left positions (n, 2) in 0..canvas - digit, from `generator` (None: the
    device's default generator)."""
    return torch.randint(0, canvas - digit + 1, (n, 2), generator=generator, device=device)


def fixed_offsets(n, seed=EXPANDED_TEST_SEED):
    """The test positions of n digits: drawn on the CPU from `seed` for max(n, MNIST_TEST_ROWS)
    rows, the first n taken, so the same digit has the same place whatever --test-size is."""
    return draw_offsets(max(n, MNIST_TEST_ROWS), torch.Generator().manual_seed(seed))[:n]


class PlacedBatches:
    """Training batches of digits placed on the canvas as they are used: (images uint8 (B, 40, 40),
    labels (B,)). A pass's plan (new positions for every digit and a new order, drawn from the
    device's default generator) is saved in a mid-epoch checkpoint, as DeviceBatches' order is."""

    def __init__(self, digits, labels, batch_size, canvas=CANVAS):
        self.digits, self.labels, self.batch_size, self.canvas = digits, labels, batch_size, canvas
        self.rows = len(labels)

    def __len__(self):
        return -(-self.rows // self.batch_size)

    def plan(self):
        device = self.labels.device
        return {"offsets": draw_offsets(self.rows, device=device, canvas=self.canvas, digit=self.digits.shape[-1]),
                "order": torch.randperm(self.rows, device=device)}

    def batches(self, plan, start=0):
        """The batches of a pass drawn as `plan` says, from batch `start` on."""
        for first in range(start * self.batch_size, self.rows, self.batch_size):
            idx = plan["order"][first:first + self.batch_size]
            yield place(self.digits[idx], plan["offsets"][idx], self.canvas), self.labels[idx]

    def __iter__(self):
        return self.batches(self.plan())


def affine_draws(n, seed=AFFNIST_LIKE_SEED):
    """The random part of affine_like for n digits, float64 (n,) each, on the CPU from `seed`
    (drawn for max(n, MNIST_TEST_ROWS) rows, the first n taken): rotation in degrees, shear,
    horizontal and vertical scale, and the translation's place in its allowed range (0..1) along
    rows and columns."""
    u = torch.rand((max(n, MNIST_TEST_ROWS), 6), generator=torch.Generator().manual_seed(seed),
                   dtype=torch.float64)[:n]
    lo, hi = SCALE
    return {"rotation": (u[:, 0] * 2 - 1) * ROTATION_DEGREES, "shear": (u[:, 1] * 2 - 1) * SHEAR,
            "scale_x": lo + u[:, 2] * (hi - lo), "scale_y": lo + u[:, 3] * (hi - lo),
            "place_y": u[:, 4], "place_x": u[:, 5]}


def affine_matrices(draws):
    """The 2x2 matrices A = rotation @ shear @ scale, acting on (x, y) column vectors -> (n, 2, 2)."""
    a = torch.deg2rad(draws["rotation"])
    cos, sin = torch.cos(a), torch.sin(a)
    sx, sy, k = draws["scale_x"], draws["scale_y"], draws["shear"]
    # [[cos, -sin], [sin, cos]] @ [[1, k], [0, 1]] @ [[sx, 0], [0, sy]]
    return torch.stack([torch.stack([cos * sx, (cos * k - sin) * sy], -1),
                        torch.stack([sin * sx, (sin * k + cos) * sy], -1)], -2)


def ink_box(digits):
    """The first and last row and column holding ink of every digit (n, h, w) -> (n, 4) int64
    (top, bottom, left, right); an empty digit's box is the whole image."""
    n, h, w = digits.shape
    rows, cols = digits.amax(2) > 0, digits.amax(1) > 0  # (n, h), (n, w)
    r, c = torch.arange(h).expand(n, h), torch.arange(w).expand(n, w)
    top = torch.where(rows, r, h).amin(1)
    bottom = torch.where(rows, r, -1).amax(1)
    left = torch.where(cols, c, w).amin(1)
    right = torch.where(cols, c, -1).amax(1)
    empty = bottom < 0
    return torch.stack([torch.where(empty, 0, top), torch.where(empty, h - 1, bottom),
                        torch.where(empty, 0, left), torch.where(empty, w - 1, right)], 1)


def affine_like(digits, seed=AFFNIST_LIKE_SEED, canvas=CANVAS, chunk=2000):
    """An affNIST-like test set: each digit uint8 (n, 28, 28) (CPU) transformed by its own random
    affine map as affNIST documents (affine_draws), placed where its ink stays inside the
    canvas -> uint8 (n, canvas, canvas). Bilinear sampling, zero outside the digit. The draws come
    from a seeded CPU generator; the images are computed in float64 with elementwise operations
    (no threaded reductions) and rounded to bytes, so machines agree: a last-bit difference in a
    sine or cosine would have to fall exactly on a rounding boundary to change a pixel."""
    digits = digits.cpu()
    draws = affine_draws(len(digits), seed)
    out = [affine_chunk(digits[k:k + chunk], {name: v[k:k + chunk] for name, v in draws.items()}, canvas)
           for k in range(0, len(digits), chunk)]
    return torch.cat(out) if out else digits.new_zeros((0, canvas, canvas))


def affine_chunk(digits, draws, canvas):
    n, h, w = digits.shape
    A = affine_matrices(draws)  # (n, 2, 2), on (x, y)
    cy, cx = (h - 1) / 2, (w - 1) / 2  # the digit's centre, in pixel-centre coordinates
    box = ink_box(digits).to(torch.float64)
    # where the corners of the ink's box go, relative to the transformed centre
    ys = torch.stack([box[:, 0], box[:, 0], box[:, 1], box[:, 1]], 1) - cy  # (n, 4)
    xs = torch.stack([box[:, 2], box[:, 3], box[:, 2], box[:, 3]], 1) - cx
    new_x = A[:, 0, 0, None] * xs + A[:, 0, 1, None] * ys
    new_y = A[:, 1, 0, None] * xs + A[:, 1, 1, None] * ys
    # the transformed centre goes where every corner lands inside 0..canvas-1 (the middle if nowhere)
    centre = []
    for low, high, place in ((new_y.amin(1), new_y.amax(1), draws["place_y"]),
                             (new_x.amin(1), new_x.amax(1), draws["place_x"])):
        first, room = -low, (canvas - 1) - high + low
        centre.append(torch.where(room >= 0, first + place * room.clamp(min=0), (canvas - 1 - high - low) / 2))
    ty, tx = (c.view(n, 1, 1) for c in centre)
    # output pixel (y, x) shows the digit at A^-1 ((x, y) - t) + c
    det = A[:, 0, 0] * A[:, 1, 1] - A[:, 0, 1] * A[:, 1, 0]
    inv = torch.stack([torch.stack([A[:, 1, 1], -A[:, 0, 1]], -1), torch.stack([-A[:, 1, 0], A[:, 0, 0]], -1)], -2)
    inv = inv / det.view(n, 1, 1)
    grid = torch.arange(canvas, dtype=torch.float64)
    dy, dx = grid.view(1, canvas, 1) - ty, grid.view(1, 1, canvas) - tx  # (n, canvas, 1), (n, 1, canvas)
    src_x = inv[:, 0, 0].view(n, 1, 1) * dx + inv[:, 0, 1].view(n, 1, 1) * dy + cx
    src_y = inv[:, 1, 0].view(n, 1, 1) * dx + inv[:, 1, 1].view(n, 1, 1) * dy + cy
    return bilinear(digits, src_y, src_x)


def bilinear(digits, src_y, src_x):
    """Bilinear samples of digits uint8 (n, h, w) at float64 coordinates (n, H, W), zero outside
    the digit -> uint8 (n, H, W), rounded to the nearest byte."""
    n, h, w = digits.shape
    flat = digits.reshape(n, h * w).to(torch.float64)
    y0, x0 = torch.floor(src_y), torch.floor(src_x)
    wy, wx = src_y - y0, src_x - x0

    def tap(y, x):
        inside = (y >= 0) & (y < h) & (x >= 0) & (x < w)
        idx = (y.clamp(0, h - 1) * w + x.clamp(0, w - 1)).long().reshape(n, -1)
        return flat.gather(1, idx).view_as(y) * inside

    top = tap(y0, x0) * (1 - wx) + tap(y0, x0 + 1) * wx
    bottom = tap(y0 + 1, x0) * (1 - wx) + tap(y0 + 1, x0 + 1) * wx
    return (top * (1 - wy) + bottom * wy).round().clamp(0, 255).to(torch.uint8)


def affnist_files(data_dir):
    """The official affNIST test files in DATA_DIR/affNIST -> their paths: [test.mat] (the whole
    test set), else test_batches/1.mat ... 32.mat; None if neither is there. Some batches but not
    all are a UsageError."""
    root = os.path.join(data_dir, AFFNIST_DIR)
    whole = os.path.join(root, "test.mat")
    if os.path.isfile(whole):
        return [whole]
    batches = [os.path.join(root, "test_batches", f"{k}.mat") for k in range(1, TEST_BATCHES + 1)]
    found = [os.path.isfile(path) for path in batches]
    if not any(found):
        return None
    if not all(found):
        missing = [os.path.basename(p) for p, ok in zip(batches, found) if not ok]
        raise UsageError(f"affnist: {os.path.join(root, 'test_batches')} lacks {', '.join(missing)} (expected "
                         f"1.mat ... {TEST_BATCHES}.mat, as test_batches.zip holds them, or the whole set as "
                         f"{whole})")
    return batches


def read_affnist_mat(path):
    """One official affNIST file (MATLAB v5, read with scipy): the struct affNISTdata, whose field
    image is uint8 (1600, N), a 40x40 image per column, pixel index row * 40 + column, and
    label_int (1, N) the digits 0..9 (its other fields, label_one_of_n, affine_transform,
    human_readable_transform, ..., are not read) -> images uint8 (N, 40, 40), labels int64 (N,).
    Raises UsageError naming the file and what is wrong with it."""
    import scipy.io

    def fail(reason):
        return UsageError(f"cannot read affNIST from {path} (expected the struct affNISTdata with fields image, "
                          f"1600 x N bytes, and label_int, 1 x N digits, as the official .mat files): {reason}")

    try:
        mat = scipy.io.loadmat(path, variable_names=["affNISTdata"])
    except Exception as e:  # scipy raises many types for files that are not MATLAB v5
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [""]
        raise fail(f"{type(e).__name__}: {lines[0]}") from None
    data = mat.get("affNISTdata")
    names = getattr(getattr(data, "dtype", None), "names", None) or ()
    missing = [name for name in ("image", "label_int") if name not in names]
    if data is None or missing or data.size != 1:
        raise fail("no affNISTdata struct" if data is None or not names else
                   f"affNISTdata has no field {', '.join(missing)}" if missing else "affNISTdata is not one struct")
    image, labels = np.asarray(data["image"].flat[0]), np.asarray(data["label_int"].flat[0]).reshape(-1)
    if image.ndim != 2 or image.shape[0] != CANVAS * CANVAS:
        raise fail(f"image has shape {image.shape}, expected (1600, N)")
    if len(labels) != image.shape[1]:
        raise fail(f"{len(labels)} labels for {image.shape[1]} images")
    if image.size and (image.min() < 0 or image.max() > 255):
        raise fail("image values outside 0..255")
    if len(labels) and (labels.min() < 0 or labels.max() > 9 or np.any(labels != np.round(labels))):
        raise fail("label_int values outside the digits 0..9")
    images = torch.from_numpy(np.ascontiguousarray(image.T).astype(np.uint8)).reshape(-1, CANVAS, CANVAS)
    return images, torch.from_numpy(labels.astype(np.int64))


def read_affnist(paths, limit=0):
    """The test images and labels of the official files `paths`, in order; with `limit`, the
    first `limit` (only the files needed are read)."""
    images, labels, count = [], [], 0
    for path in paths:
        batch_images, batch_labels = read_affnist_mat(path)
        images.append(batch_images)
        labels.append(batch_labels)
        count += len(batch_labels)
        if limit and count >= limit:
            break
    images, labels = torch.cat(images), torch.cat(labels)
    return (images[:limit], labels[:limit]) if limit else (images, labels)

"""Data for capsule_network.py: the readers (MNIST-format sets, CIFAR-10, SVHN,
smallNORB, image folders), batches on the device, the per-image training shift (paper, sec. 5),
crops and flips, and MultiMNIST (sec. 6): pairs of digits composed on the device."""

import contextlib
import copy
import io
import math
import os

import torch
import torch.nn.functional as F

from capsnet.affnist import (AFFNIST_NAME, CANVAS, GENERATED_NAME, PlacedBatches, affine_like, affnist_files,
                             fixed_offsets, place, read_affnist)
from capsnet.decoders import deconv_base_grid
from capsnet.efficient import efficient_grid
from capsnet.runtime import UsageError, part_of

MULTIMNIST_CANVAS = 36  # paper, sec. 6: a 28x28 digit shifted by up to 4 px in a 36x36 image


MULTIMNIST_TEST_SEED = 20171026  # the fixed test pairs are drawn from this seed, whatever SEED is


# What each data set is: how its files are read (`reader`, load_split; `split` for EMNIST), how
# many objects an image holds, and its (channels, image size, classes) as stored, for synthetic
# data (bench.py; folder: a typical one). The paper's settings for each are the script's
# DATASET_SETTINGS.
DATA_SETS = {
    "mnist": {"shape": (1, 28, 10), "reader": "MNIST", "objects": 1},
    "fashion-mnist": {"shape": (1, 28, 10), "reader": "FashionMNIST", "objects": 1},
    "kmnist": {"shape": (1, 28, 10), "reader": "KMNIST", "objects": 1},
    # torchvision's EMNIST images stand transposed (load_split turns them upright); the letters'
    # labels start at 1 (load_split makes them 0..25)
    "emnist-balanced": {"shape": (1, 28, 47), "reader": "EMNIST", "split": "balanced", "objects": 1},
    "emnist-letters": {"shape": (1, 28, 26), "reader": "EMNIST", "split": "letters", "objects": 1},
    "cifar10": {"shape": (3, 32, 10), "reader": "cifar10", "objects": 1},
    "svhn": {"shape": (3, 32, 10), "reader": "svhn", "objects": 1},
    "smallnorb": {"shape": (2, 96, 5), "reader": "smallnorb", "objects": 1},
    "folder": {"shape": (3, 28, 10), "reader": "folder", "objects": 1},
    "multimnist": {"shape": (1, 36, 10), "reader": "MNIST", "objects": 2},
    # sec. 5.2 (capsnet/affnist.py): MNIST digits at a new random place on a 40x40 canvas every
    # epoch; tested on the same at fixed places, or on affNIST (its files in DATA_DIR/affNIST,
    # else a generated affNIST-like set)
    "expanded-mnist": {"shape": (1, 40, 10), "reader": "MNIST", "canvas": 40, "objects": 1},
    "affnist": {"shape": (1, 40, 10), "reader": "MNIST", "canvas": 40, "objects": 1},
}


MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


# The class names torchvision gives the MNIST-format sets read here without it (load_idx)
IDX_CLASSES = {
    "MNIST": ["0 - zero", "1 - one", "2 - two", "3 - three", "4 - four", "5 - five", "6 - six", "7 - seven",
              "8 - eight", "9 - nine"],
    "FashionMNIST": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                     "Ankle boot"],
    "KMNIST": ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"],
}


def load_idx(kind, data_dir, train, limit=0, split=None):
    """An MNIST-format data set (MNIST, FashionMNIST, KMNIST, EMNIST with `split`) from its IDX
    files in DATA_DIR/<kind>/raw -> (images uint8 (N, 28, 28), labels int64 (N,), class names), on
    the CPU, as torchvision stores them. When the four files are there uncompressed (not EMNIST),
    they are read here, the same bytes into the same tensors as torchvision's loader, without the
    CPU that importing torchvision costs every process (about 0.4 s, results/README.md); otherwise
    torchvision reads them (it also downloads them, or unpacks the official .gz files). Raises
    UsageError (one line) if the files are missing, cannot be downloaded, or are corrupt."""
    raw = os.path.join(data_dir, kind, "raw")
    if kind == "EMNIST":
        expected = [f"emnist-{split}-{part}-{kind_}-ubyte" for part in ("train", "test")
                    for kind_ in ("images-idx3", "labels-idx1")]
    else:
        expected = list(MNIST_FILES)
    try:
        for name in expected:  # torchvision's own check of a wrong header is a bare assert
            check_idx_header(os.path.join(raw, name))
        if kind in IDX_CLASSES and all(os.path.isfile(os.path.join(raw, name)) for name in expected):
            images_file, labels_file = expected[:2] if train else expected[2:]
            images, labels = read_idx(os.path.join(raw, images_file)), read_idx(os.path.join(raw, labels_file))
            labels, classes = labels.long(), list(IDX_CLASSES[kind])
        else:
            images, labels, classes = torchvision_idx(kind, data_dir, train, split)
        if images.dim() != 3 or tuple(images.shape[1:]) != (28, 28) or images.dtype != torch.uint8:
            raise ValueError(f"images have shape {tuple(images.shape)}, expected (N, 28, 28) uint8")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"{len(labels)} labels for {len(images)} images")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
            raise ValueError(f"labels outside 0..{len(classes) - 1}")
    except Exception as e:  # torchvision raises many types here; all mean "no usable data"
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        reason = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"  # e.g. which file, and why
        raise UsageError(f"cannot load {kind} from {raw} (expected {', '.join(expected)}, or .gz of them, "
                         f"or a network connection to download them): {type(e).__name__}: {reason}") from None
    if limit:
        images, labels = images[:limit], labels[:limit]
    return images, labels, classes


def torchvision_idx(kind, data_dir, train, split):
    """load_idx through torchvision's data set class (download, the official .gz files) -> images, int64 labels, classes."""
    import torchvision.datasets

    chatter = io.StringIO()  # torchvision prints its download attempts; load_idx reports one line
    with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        dataset = getattr(torchvision.datasets, kind)(data_dir, train=train, download=True,
                                                      **({"split": split} if split else {}))
    return dataset.data, dataset.targets.long(), list(dataset.classes)


def read_idx(path):
    """One IDX file of unsigned bytes, the MNIST format (the bytes 0, 0, 8 (unsigned bytes) and D, the
    number of dimensions; D big-endian 32-bit sizes; the values, row-major) -> uint8 tensor of that shape.
    Raises ValueError naming the file if it is not one or is cut short."""
    name = os.path.basename(path)
    with open(path, "rb") as f:
        data = bytearray(f.read())
    dims = data[3] if len(data) >= 4 else 0
    header = 4 + 4 * dims
    if data[:3] != b"\0\0\x08" or not 1 <= dims <= 3 or len(data) < header:
        raise ValueError(f"{name} is not an IDX file of unsigned bytes")
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    count, found = math.prod(shape), len(data) - header
    if found != count:
        raise ValueError(f"{name} holds {found:,} bytes after its header, which says {'x'.join(map(str, shape))} "
                         f"({count:,} bytes): {'cut short' if found < count else 'more than it says'}")
    if count == 0:
        return torch.zeros(shape, dtype=torch.uint8)
    return torch.frombuffer(data, dtype=torch.uint8, offset=header).view(shape)


def check_idx_header(path):
    """Raise ValueError naming the file if `path` exists and does not start with the magic number
    of an IDX file of unsigned bytes (0x0803 images, 0x0801 labels)."""
    if not os.path.isfile(path):
        return
    with open(path, "rb") as f:
        magic = int.from_bytes(f.read(4), "big")
    expected = 0x0803 if "images" in os.path.basename(path) else 0x0801
    if magic != expected:
        raise ValueError(f"{os.path.basename(path)} is not an IDX file of its kind (its first 4 bytes are "
                         f"{magic:#010x}, expected {expected:#010x})")


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def read_cifar10(data_dir, train):
    """CIFAR-10 from either official version in DATA_DIR -> images uint8 (N, 3, 32, 32), labels int64,
    class names, in the files' order: the binary version (cifar-10-batches-bin/data_batch_1.bin ...
    data_batch_5.bin, test_batch.bin: records of 1 label byte and 3,072 pixel bytes, red, green,
    blue planes of 32x32 rows) when all its files for the split are there, else the python version
    (cifar-10-batches-py/data_batch_1 ... 5, test_batch: pickled dicts of b"data" (N, 3072) uint8
    and b"labels"). Read here rather than through torchvision, whose loader insists on the MD5
    sums of the real files and has no binary reader. Raises UsageError (one line) if neither
    version is complete and readable."""
    stems = [f"data_batch_{k}" for k in range(1, 6)] if train else ["test_batch"]
    binary = os.path.join(data_dir, "cifar-10-batches-bin")
    python = os.path.join(data_dir, "cifar-10-batches-py")
    if all(os.path.isfile(os.path.join(binary, f"{stem}.bin")) for stem in stems):
        reader, folder, names = read_cifar10_bin, binary, [f"{stem}.bin" for stem in stems]
    elif os.path.isdir(python) or not os.path.isdir(binary):
        reader, folder, names = read_cifar10_pickle, python, stems
    else:
        missing = [f"{stem}.bin" for stem in stems if not os.path.isfile(os.path.join(binary, f"{stem}.bin"))]
        raise UsageError(f"cannot load CIFAR-10 from {binary}: {', '.join(missing)} missing (expected "
                         f"data_batch_1.bin ... data_batch_5.bin and test_batch.bin, or the python version "
                         f"in {python})")
    images, labels = [], []
    for name in names:
        path = os.path.join(folder, name)
        try:
            data, batch_labels = reader(path)
            if len(batch_labels) != len(data):
                raise ValueError(f"{len(batch_labels)} labels for {len(data)} images")
            if len(batch_labels) and not 0 <= int(batch_labels.min()) <= int(batch_labels.max()) <= 9:
                raise ValueError("labels outside 0..9")
        except (OSError, EOFError, KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise UsageError(f"cannot load CIFAR-10 from {folder} (expected data_batch_1 ... data_batch_5 and "
                             f"test_batch, of the binary version in cifar-10-batches-bin or the python version "
                             f"in cifar-10-batches-py): {name}: {type(e).__name__}: {e}") from None
        images.append(data)
        labels.append(batch_labels)
    return torch.cat(images), torch.cat(labels), list(CIFAR10_CLASSES)


def read_cifar10_bin(path):
    """One file of CIFAR-10's binary version: records of 1 label byte + 3 x 32 x 32 pixel bytes."""
    raw = torch.frombuffer(bytearray(open(path, "rb").read()), dtype=torch.uint8)
    record = 1 + 3 * 32 * 32
    if len(raw) == 0 or len(raw) % record:
        raise ValueError(f"{len(raw):,} bytes is not a whole number of {record:,}-byte records")
    raw = raw.view(-1, record)
    return raw[:, 1:].reshape(-1, 3, 32, 32).clone(), raw[:, 0].long()


def read_cifar10_pickle(path):
    """One file of CIFAR-10's python version: a pickled dict of b"data" (N, 3072) and b"labels"."""
    import pickle

    import numpy as np

    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except pickle.UnpicklingError as e:
        raise ValueError(f"not a pickle: {e}") from None
    data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return torch.from_numpy(data.copy()), torch.as_tensor(np.asarray(batch[b"labels"], dtype=np.int64))


def read_svhn(data_dir, train):
    """SVHN's cropped digits, DATA_DIR/train_32x32.mat and test_32x32.mat as torchvision keeps them
    (MATLAB files, read with scipy: X (32, 32, 3, N) uint8, y (N, 1) with 10 for the digit 0) ->
    images uint8 (N, 3, 32, 32), labels 0..9, class names. Read here rather than through
    torchvision, whose loader insists on the MD5 sums of the real files."""
    path = os.path.join(data_dir, f"{'train' if train else 'test'}_32x32.mat")
    try:
        import scipy.io
    except ImportError:
        raise UsageError("svhn needs scipy to read its .mat files: pip install scipy") from None
    try:
        mat = scipy.io.loadmat(path)
        images = torch.from_numpy(mat["X"]).permute(3, 2, 0, 1).contiguous()  # (N, 3, 32, 32)
        labels = torch.from_numpy(mat["y"].astype("int64")).flatten() % 10
        if images.dtype != torch.uint8 or tuple(images.shape[1:]) != (3, 32, 32) or len(labels) != len(images):
            raise ValueError(f"X {tuple(mat['X'].shape)} {mat['X'].dtype}, y {tuple(mat['y'].shape)}: expected "
                             f"X (32, 32, 3, N) uint8 and y (N, 1)")
    except (OSError, ValueError, KeyError, TypeError, NotImplementedError) as e:
        raise UsageError(f"cannot load SVHN from {path} (expected train_32x32.mat and test_32x32.mat in "
                         f"{data_dir}): {type(e).__name__}: {e}") from None
    return images, labels, [str(k) for k in range(10)]


SMALLNORB_FILES = {True: "smallnorb-5x46789x9x18x6x2x96x96-training", False: "smallnorb-5x01235x9x18x6x2x96x96-testing"}


def read_smallnorb(data_dir, train):
    """smallNORB from DATA_DIR/smallnorb: the -dat.mat (N, 2, 96, 96) stereo pairs and -cat.mat (N,)
    classes of the split (or their .gz) -> images uint8 (N, 2, 96, 96), labels, class names."""
    stem = os.path.join(data_dir, "smallnorb", SMALLNORB_FILES[train])
    images, labels = read_norb_matrix(stem + "-dat.mat"), read_norb_matrix(stem + "-cat.mat")
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 2 or labels.shape != images.shape[:1]:
        raise UsageError(f"{stem}-dat.mat / -cat.mat: expected (N, 2, H, W) uint8 images and (N,) classes, got "
                         f"{tuple(images.shape)} {images.dtype} and {tuple(labels.shape)}")
    if len(labels) and (labels.min() < 0 or labels.max() > 4):
        raise UsageError(f"{stem}-cat.mat: classes outside 0..4")
    return images, labels.long(), ["animal", "human", "airplane", "truck", "car"]


NORB_TYPES = {0x1E3D4C55: "uint8", 0x1E3D4C54: "<i4", 0x1E3D4C56: "<i2", 0x1E3D4C51: "<f4",
              0x1E3D4C53: "<f8"}  # magic number -> element type of a NORB binary matrix


def read_norb_matrix(path):
    """A NORB "binary matrix" file (smallNORB's -dat.mat, -cat.mat, -info.mat), or its .gz, as a
    tensor. The format (little-endian int32s): magic number (element type), ndim, then
    max(3, ndim) sizes (the unused ones are 1), then the elements in row-major order.
    Raises UsageError naming the file if it is missing, cut short or not such a file."""
    import gzip

    import numpy as np

    name = path if os.path.exists(path) or not os.path.exists(path + ".gz") else path + ".gz"
    try:
        with (gzip.open if name.endswith(".gz") else open)(name, "rb") as f:
            raw = f.read()
        if len(raw) < 20:
            raise ValueError(f"not a NORB binary matrix (only {len(raw)} bytes)")
        magic, ndim = np.frombuffer(raw[:8], "<i4")
        if int(magic) & 0xFFFFFFFF not in NORB_TYPES or not 0 < ndim <= 16:
            raise ValueError(f"not a NORB binary matrix (magic number {int(magic) & 0xFFFFFFFF:#x})")
        header = 8 + 4 * max(3, int(ndim))
        shape = tuple(int(d) for d in np.frombuffer(raw[8:header], "<i4")[:ndim])
        dtype = np.dtype(NORB_TYPES[int(magic) & 0xFFFFFFFF])
        count = math.prod(shape)
        if len(raw) - header != count * dtype.itemsize:
            raise ValueError(f"{len(raw) - header} bytes of data for a {'x'.join(map(str, shape))} "
                             f"{dtype.name} matrix ({count * dtype.itemsize} bytes)")
        return torch.from_numpy(np.frombuffer(raw, dtype, count, header).reshape(shape).copy())
    except (OSError, EOFError, ValueError) as e:
        raise UsageError(f"cannot read {name}: {e}") from None


def read_image(path, size, mode):
    """One image file through PIL, converted to `mode` ("L" or "RGB") and resized to size x size
    (bilinear) -> uint8 (size, size) or (3, size, size). PIL raises OSError or ValueError."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image.convert(mode).resize((size, size), Image.BILINEAR), dtype=np.uint8)
    x = torch.from_numpy(array.copy())
    return x.permute(2, 0, 1) if x.dim() == 3 else x


def read_images_as_data(paths, size, channels, dark_on_light):
    """Image files converted as a data set's images are (--predict): size x size, `channels`
    channels; with `dark_on_light` (the MNIST-like sets, light digits on black) an image brighter
    than mid-grey on average is inverted -> (images uint8 (N, C, size, size), inverted flags)."""
    images, inverted = [], []
    for path in paths:
        try:
            x = read_image(path, size, "L" if channels != 3 else "RGB")
        except (OSError, ValueError) as e:
            raise UsageError(f"--predict: cannot read image {path}: {type(e).__name__}: {e}") from None
        x = x if x.dim() == 3 else x.unsqueeze(0).repeat(channels, 1, 1)  # (C, H, W)
        flip = dark_on_light and x.float().mean() > 127.5
        images.append(255 - x if flip else x)
        inverted.append(bool(flip))
    return torch.stack(images), inverted


def read_folder(data_dir, train, size, classes=None):
    """Your own images: torchvision's ImageFolder over DATA_DIR/train/<class>/* (or test), every
    file PIL reads, converted to RGB and resized to size x size -> images uint8 (N, 3, size, size),
    labels, class names (sorted folder names; a test set takes the training set's `classes`).
    Each problem is one UsageError naming the folder or the file."""
    from torchvision.datasets import ImageFolder

    root = os.path.join(data_dir, "train" if train else "test")
    layout = f"{os.path.join(data_dir, 'train')}/<class>/<image> and {os.path.join(data_dir, 'test')}/<class>/<image>"
    if not os.path.isdir(root):
        raise UsageError(f"folder: no directory {root} (expected {layout})")
    try:
        found = ImageFolder(root, is_valid_file=lambda path: not os.path.basename(path).startswith("."))
    except FileNotFoundError as e:
        text = str(e)
        if "class folder" in text:
            raise UsageError(f"folder: {root} has no class subfolders (expected {layout})") from None
        empty = text.split("classes", 1)[-1].split(".")[0].strip() if "classes" in text else "?"
        raise UsageError(f"folder: class {empty} in {root} has no images") from None
    if classes is None:
        classes = found.classes
    unknown = sorted(set(found.classes) - set(classes))
    if unknown:
        raise UsageError(f"folder: {root} has classes the training set does not have: {', '.join(unknown)}")
    images, labels = [], []
    for path, index in found.samples:
        try:
            images.append(read_image(path, size, "RGB"))
        except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
            raise UsageError(f"folder: cannot read image {path}: {type(e).__name__}: {e}") from None
        labels.append(classes.index(found.classes[index]))
    return torch.stack(images), torch.tensor(labels, dtype=torch.long), list(classes)


def resize_images(images, size, chunk=2048):
    """uint8 (N, C, H, W) -> uint8 (N, C, size, size): box averages where H and W are multiples of
    size (smallNORB's 96 -> 48), else antialiased bilinear."""
    N, C, H, W = images.shape
    if (H, W) == (size, size):
        return images
    mode = {"mode": "area"} if H % size == 0 and W % size == 0 else {"mode": "bilinear", "antialias": True,
                                                                         "align_corners": False}
    out = torch.empty((N, C, size, size), dtype=torch.uint8)
    for k in range(0, N, chunk):
        part = F.interpolate(images[k:k + chunk].float(), size=(size, size), **mode)
        out[k:k + chunk] = part.round_().clamp_(0, 255).to(torch.uint8)
    return out


def load_split(cfg, train):
    """One split of cfg's data set, as the model sees it before any crop -> (images uint8, (N, H, W)
    for one channel or (N, C, H, W), labels int64 (N,), class names), on the CPU. Needs
    cfg["CLASS_NAMES"] and cfg["IMAGE_CHANNELS"] for a folder's test split (the training set's).
    """
    spec = DATA_SETS[cfg["DATASET"]]
    reader, data_dir = spec["reader"], cfg["DATA_DIR"]
    if reader == "folder":
        known = cfg["CLASS_NAMES"] if not train and cfg["CLASS_NAMES"] else None
        images, labels, classes = read_folder(data_dir, train, cfg["IMAGE_SIZE"], known)
        channels = cfg["IMAGE_CHANNELS"] or (3 if (images[:, 0] != images[:, 1]).any()
                                             or (images[:, 1] != images[:, 2]).any() else 1)
        if channels == 1:  # ITU-R 601-2 luma, as PIL's convert("L")
            r, g, b = images.int().unbind(1)
            images = ((r * 299 + g * 587 + b * 114 + 500) // 1000).to(torch.uint8)
    elif reader in ("cifar10", "svhn", "smallnorb"):
        images, labels, classes = {"cifar10": read_cifar10, "svhn": read_svhn,
                                   "smallnorb": read_smallnorb}[reader](data_dir, train)
    else:
        images, labels, classes = load_idx(reader, data_dir, train, split=spec.get("split"))
        if reader == "EMNIST":
            images = images.transpose(1, 2).contiguous()  # torchvision's EMNIST images stand transposed
        if spec.get("split") == "letters":  # labels 1..26 (0 is "N/A") -> 0..25
            labels, classes = labels - 1, classes[1:]
    limit = cfg["TRAIN_SIZE"] if train else cfg["TEST_SIZE"]
    if limit:
        images, labels = images[:limit], labels[:limit]
    if cfg["IMAGE_SIZE"] and reader != "folder" and cfg["DATASET"] != "multimnist":
        images = resize_images(images if images.dim() == 4 else images.unsqueeze(1), cfg["IMAGE_SIZE"])
        images = images.squeeze(1) if images.shape[1] == 1 else images
    return images, labels, classes


class DeviceBatches:
    """Batches by index slicing of a device-side permutation of a data set that lives on the device."""

    def __init__(self, images, labels, batch_size, shuffle):
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle = batch_size, shuffle
        self.rows = len(labels)

    def __len__(self):
        return math.ceil(len(self.labels) / self.batch_size)

    def first_rows(self, n):
        """The first n images and labels."""
        return self.images[:n], self.labels[:n]

    def shard(self, rank, world):
        """Part `rank` of `world` contiguous parts, in the same order (the test pass under torchrun)."""
        if world == 1:
            return self
        rows = part_of(self.rows, rank, world)
        return DeviceBatches(self.images[rows], self.labels[rows], self.batch_size, self.shuffle)

    def plan(self):
        """A new pass's order of the rows, drawn from the device's default generator (None: the
        stored order). Saved in a mid-epoch checkpoint, so that a resumed pass goes on in it."""
        return {"order": torch.randperm(self.rows, device=self.labels.device)} if self.shuffle else None

    def batches(self, plan, start=0):
        """The batches of a pass in `plan`'s order, from batch `start` on."""
        order = plan["order"] if plan else None
        for first in range(start * self.batch_size, self.rows, self.batch_size):
            idx = slice(first, first + self.batch_size) if order is None else order[first:first + self.batch_size]
            yield self.images[idx], self.labels[idx]

    def __iter__(self):
        return self.batches(self.plan())


def random_shift(images, max_shift):
    """Shift each image by its own random (dy, dx) in [-max_shift, max_shift], zero padding.
    images (B, C, H, W) -> (B, C, H, W), on the images' device."""
    if max_shift == 0:
        return images
    B, C, H, W = images.shape
    m = max_shift
    padded = F.pad(images, (m, m, m, m))  # (B, C, H+2m, W+2m)
    offsets = torch.randint(0, 2 * m + 1, (2, B, 1), device=images.device)  # top-left corner per image
    rows = (offsets[0] + torch.arange(H, device=images.device)).unsqueeze(2)  # (B, H, 1)
    cols = (offsets[1] + torch.arange(W, device=images.device)).unsqueeze(1)  # (B, 1, W)
    batch = torch.arange(B, device=images.device).view(B, 1, 1)
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)  # (B, C, H, W)


def random_crop_flip(images, size, flip):
    """Training augmentation of the paper's CIFAR10 and smallNORB set-ups (sec. 7): for each image
    its own random size x size crop and, if `flip`, a left-right flip with probability 1/2, drawn
    on the images' device. images (B, C, H, W) -> (B, C, size, size)."""
    B, C, H, W = images.shape
    device = images.device
    top = torch.randint(0, H - size + 1, (B, 1, 1), device=device)
    left = torch.randint(0, W - size + 1, (B, 1, 1), device=device)
    cols = torch.arange(size, device=device).view(1, 1, size).expand(B, 1, size)
    if flip:
        mirrored = torch.rand(B, 1, 1, device=device) < 0.5
        cols = torch.where(mirrored, size - 1 - cols, cols)
    rows = top + torch.arange(size, device=device).view(1, size, 1)  # (B, size, 1)
    batch = torch.arange(B, device=device).view(B, 1, 1)
    return images.permute(0, 2, 3, 1)[batch, rows, left + cols].permute(0, 3, 1, 2)


def random_brightness_contrast(images, max_delta=63 / 255, contrast=(0.2, 1.8)):
    """The authors' CIFAR10 distortions (input_data/cifar10/cifar10_input.py), per image, on the
    images' device, in their order: a brightness change uniform in [-max_delta, max_delta] added to
    every pixel (63 on their 0..255 scale), then each channel's contrast scaled around its mean by a
    factor uniform in `contrast`. Clamped to [0, 1] at the end (theirs are not clamped; here the
    decoder draws these pixels through a sigmoid). images (B, C, H, W) in [0, 1] -> the same shape."""
    B, dev = len(images), images.device
    delta = (torch.rand(B, 1, 1, 1, device=dev) * 2 - 1) * max_delta
    factor = contrast[0] + torch.rand(B, 1, 1, 1, device=dev) * (contrast[1] - contrast[0])
    images = images + delta
    mean = images.mean(dim=(2, 3), keepdim=True)
    return ((images - mean) * factor + mean).clamp_(0, 1)


def standardize(images):
    """Per-image standardisation (TensorFlow's per_image_standardization, the authors' CIFAR10 input):
    each image minus the mean of all its values, divided by their standard deviation, or by
    1/sqrt(values) where that is larger (a flat image stays finite). (B, C, H, W) -> the same."""
    flat = images.flatten(1).float()
    mean = flat.mean(1)
    std = flat.std(1, unbiased=False).clamp(min=flat.shape[1] ** -0.5)
    return ((images.float() - mean.view(-1, 1, 1, 1)) / std.view(-1, 1, 1, 1)).to(images.dtype)


def center_crop(images, size):
    """The central size x size part of every image (test images of the crop set-ups)."""
    H, W = images.shape[-2:]
    top, left = (H - size) // 2, (W - size) // 2
    return images[..., top:top + size, left:left + size]


def to_float_images(images_u8, crop=0):
    """uint8 (B, H, W) (one channel) or (B, C, H, W) -> float (B, C, H, W) in [0, 1]; with `crop`, the
    central crop x crop part (what the model sees of a test image)."""
    images = (images_u8.unsqueeze(1) if images_u8.dim() == 3 else images_u8).float().div_(255.0)
    return center_crop(images, crop) if crop else images


def multimnist_draw(labels, max_shift=4, generator=None):
    """The random part of MultiMNIST (sec. 6): for each row k, a partner of another class and the two
    digits' offsets. labels (N,) -> sources int64 (N, 2) (rows [k, partner]) and shifts int64
    (N, 2, 2) ((dy, dx) of each digit, each in [-max_shift, max_shift]), on the labels' device,
    from `generator` (None: torch's default generator of that device)."""
    labels = labels.long()
    N, device = len(labels), labels.device
    if N and (labels == labels[0]).all():
        raise ValueError("multimnist_pairs needs images of at least two classes")
    partner = torch.randint(0, N, (N,), device=device, generator=generator)
    while True:  # draw again where the partner has the same class (about 1 row in 10 for MNIST)
        same = (labels[partner] == labels).nonzero().flatten()
        if not len(same):
            break
        partner[same] = torch.randint(0, N, (len(same),), device=device, generator=generator)
    shifts = torch.randint(-max_shift, max_shift + 1, (N, 2, 2), device=device, generator=generator)
    return torch.stack([torch.arange(N, device=device), partner], 1), shifts


def multimnist_compose(images, sources, shifts):
    """MultiMNIST images from drawn rows: images uint8 (N, H, W), sources (n, 2), shifts (n, 2, 2) ->
    composites uint8 (n, 36, 36) and parts uint8 (n, 2, 36, 36): each part is its digit alone,
    offset by its shift from the centre of the canvas; composite = min(part 0 + part 1, 255)."""
    n, (_, H, W), device = len(sources), images.shape, images.device
    margin = (MULTIMNIST_CANVAS - H) // 2
    span = torch.arange(MULTIMNIST_CANVAS, device=device)
    src = images[sources]  # (n, 2, H, W)
    # canvas pixel (y, x) shows source pixel (y - margin - dy, x - margin - dx), where that is inside it
    ys = span - margin - shifts[:, :, 0, None]  # (n, 2, canvas)
    xs = span - margin - shifts[:, :, 1, None]
    inside = ((ys >= 0) & (ys < H))[..., :, None] & ((xs >= 0) & (xs < W))[..., None, :]
    row = torch.arange(n, device=device)[:, None, None, None]
    which = torch.arange(2, device=device)[None, :, None, None]
    parts = src[row, which, ys.clamp(0, H - 1)[..., :, None], xs.clamp(0, W - 1)[..., None, :]] * inside
    composites = (parts[:, 0].int() + parts[:, 1].int()).clamp_(max=255).to(torch.uint8)
    return composites, parts


def multimnist_pairs(images, labels, max_shift=4, generator=None, chunk=8192):
    """MultiMNIST (paper, sec. 6): each image overlaid on a partner of another class.

    images uint8 (N, 28, 28), labels (N,) -> composites uint8 (N, 36, 36), parts uint8
    (N, 2, 36, 36) and pair_labels int64 (N, 2). Row k pairs image k (part 0, label 0) with a
    random image of another class from the same tensors (part 1, label 1). Each part is its digit
    alone in the canvas, at its own random offset of up to `max_shift` pixels in each direction
    from the centre (zero elsewhere); composites = min(part 0 + part 1, 255), pixel by pixel.
    All randomness comes from `generator` (on the tensors' device) and is drawn before any image
    is built, so the result does not depend on `chunk`, the rows built at a time."""
    N, H, W = images.shape
    margin = (MULTIMNIST_CANVAS - H) // 2
    if H != W or not 0 <= max_shift <= margin:
        raise ValueError(f"multimnist_pairs needs square images of at most {MULTIMNIST_CANVAS - 2 * max_shift} "
                         f"pixels and 0 <= max_shift <= {margin}")
    sources, shifts = multimnist_draw(labels, max_shift, generator)
    built = [multimnist_compose(images, sources[k:k + chunk], shifts[k:k + chunk]) for k in range(0, N, chunk)]
    composites = torch.cat([c for c, _ in built]) if built else images.new_zeros((0, MULTIMNIST_CANVAS) * 2)
    parts = torch.cat([p for _, p in built]) if built else images.new_zeros((0, 2) + (MULTIMNIST_CANVAS,) * 2)
    return composites, parts, labels.long()[sources]


class PairBatches:
    """MultiMNIST batches, composed on the device as they are used: (composites uint8 (B, 36, 36),
    pair_labels (B, 2), parts uint8 (B, 2, 36, 36)). Made from the digits of one MNIST split.

    Training (`fixed` False) draws new partners and shifts at every pass, from torch's default
    generator of the device, and visits the rows in a new order: that generator's state is saved in
    every checkpoint, so a resumed run draws what the uninterrupted run would. A test set (`fixed`
    True) draws `repeats` rows per digit once, on the CPU from MULTIMNIST_TEST_SEED: the same pairs
    in every epoch, every run, on every device."""

    def __init__(self, images, labels, batch_size, max_shift, fixed, repeats=1):
        self.images, self.digit_labels = images, labels.long()
        self.batch_size, self.max_shift, self.fixed = batch_size, max_shift, fixed
        self.rows = len(labels) * (repeats if fixed else 1)
        self.table = None
        if fixed:
            generator = torch.Generator().manual_seed(MULTIMNIST_TEST_SEED)
            drawn = [multimnist_draw(self.digit_labels.cpu(), max_shift, generator) for _ in range(repeats)]
            self.table = tuple(torch.cat(t).to(images.device) for t in zip(*drawn))

    def __len__(self):
        return math.ceil(self.rows / self.batch_size)

    def rows_at(self, idx, table):
        sources, shifts = table[0][idx], table[1][idx]
        composites, parts = multimnist_compose(self.images, sources, shifts)
        return composites, self.digit_labels[sources], parts

    def shard(self, rank, world):
        """Part `rank` of `world` contiguous parts of the fixed test rows (the test pass under torchrun)."""
        if world == 1:
            return self
        part = copy.copy(self)
        rows = part_of(self.rows, rank, world)
        part.table = tuple(t[rows] for t in self.table)
        part.rows = len(part.table[0])
        return part

    def first_rows(self, n):
        """The first n rows of a fixed (test) set."""
        return self.rows_at(slice(0, n), self.table)

    def plan(self):
        """A training pass's partners, shifts and order of rows, drawn from the device's default
        generator (None for the fixed test set); saved in a mid-epoch checkpoint."""
        if self.fixed:
            return None
        sources, shifts = multimnist_draw(self.digit_labels, self.max_shift)
        return {"sources": sources, "shifts": shifts,
                "order": torch.randperm(self.rows, device=self.digit_labels.device)}

    def batches(self, plan, start=0):
        """The batches of a pass drawn as `plan` says, from batch `start` on."""
        table, order = (self.table, None) if plan is None else ((plan["sources"], plan["shifts"]), plan["order"])
        for first in range(start * self.batch_size, self.rows, self.batch_size):
            idx = slice(first, first + self.batch_size) if order is None else order[first:first + self.batch_size]
            yield self.rows_at(idx, table)

    def __iter__(self):
        return self.batches(self.plan())


class DeviceData:
    """A data set as the trainer uses it: training and test batches on the device (DeviceBatches or
    PairBatches), its name, class names, channels, image size as stored and as the model sees it
    (after a crop), and the objects per image (2 for MultiMNIST's digits, else 1)."""

    def __init__(self, name, train, test, classes, channels, input_size, objects):
        self.name, self.train, self.test, self.classes = name, train, test, classes
        self.channels, self.image_size, self.objects = channels, input_size, objects

    def describe(self):
        if self.objects == 1:
            sizes = f"{self.train.rows:,} training and " if self.train else ""
            return f"{sizes}{self.test.rows:,} test images"
        sizes = f"{self.train.rows:,} training pairs (new partners and shifts every epoch) and " if self.train else ""
        return f"{sizes}{self.test.rows:,} fixed test pairs"


def load_data(cfg, device, train=True):
    """cfg's data set on `device` -> Data (without training batches if not `train`). Records what
    the data decides in cfg (saved in checkpoints, so that the model can be rebuilt without the
    data): NUM_CLASSES, IMAGE_CHANNELS, IMAGE_SIZE (as stored) and CLASS_NAMES."""
    if DATA_SETS[cfg["DATASET"]].get("canvas"):  # expanded-mnist, affnist: digits on a 40x40 canvas
        return load_placed(cfg, device, train)
    splits = {}
    for split in ("train", "test") if train else ("test",):
        images, labels, classes = load_split(cfg, split == "train")
        if split == "train" or not cfg["CLASS_NAMES"]:
            resolve_data_settings(cfg, images, classes)
        images, labels = images.to(device), labels.to(device)
        batch_size = cfg["BATCH_SIZE"] if split == "train" else cfg["EVAL_BATCH_SIZE"]
        if cfg["DATASET"] != "multimnist":
            splits[split] = DeviceBatches(images, labels, batch_size, shuffle=split == "train")
            continue
        if len(labels) and (labels == labels[0]).all():
            raise UsageError(f"multimnist needs {split} digits of at least two classes; the first "
                             f"{len(labels)} are all {int(labels[0])} (raise --{split}-size)")
        splits[split] = PairBatches(images, labels, batch_size, cfg["MULTIMNIST_SHIFT"], fixed=split == "test",
                                    repeats=cfg["MULTIMNIST_TEST_PAIRS"])
    return DeviceData(cfg["DATASET"], splits.get("train"), splits["test"], cfg["CLASS_NAMES"], cfg["IMAGE_CHANNELS"],
                      input_size(cfg), DATA_SETS[cfg["DATASET"]]["objects"])


def mnist_classes():
    return list(IDX_CLASSES["MNIST"])


def load_placed(cfg, device, train=True):
    """expanded-mnist or affnist (cfg["DATASET"]) on `device` -> DeviceData named by its test set:
    "expanded-mnist", "affNIST" (the official files) or "affNIST-like (generated)". Records
    NUM_CLASSES, IMAGE_CHANNELS, IMAGE_SIZE (40) and CLASS_NAMES in cfg as load_data does. A model
    of another input size (an MNIST checkpoint: 28x28) is refused with one line: its capsules'
    W_ij and the baseline's first fully connected layer belong to the positions of a 28x28 input,
    and a central 28x28 crop of a 40x40 image cuts digits off."""
    name = cfg["DATASET"]
    if cfg["IMAGE_SIZE"] not in (0, CANVAS):
        raise UsageError(f"--dataset {name} has {CANVAS}x{CANVAS} images, but this model takes "
                         f"{cfg['IMAGE_SIZE']}x{cfg['IMAGE_SIZE']} ones (IMAGE_SIZE): a model trained on 28x28 MNIST "
                         f"cannot read them (its weights belong to the 28x28 positions; a crop cuts digits off); "
                         f"train on --dataset expanded-mnist and evaluate that checkpoint with --dataset affnist")
    if cfg["CROP_SIZE"]:
        raise UsageError(f"--dataset {name}: its digits lie anywhere in the {CANVAS}x{CANVAS} image; leave "
                         f"--crop-size 0")
    plain = dict(cfg, IMAGE_SIZE=0)  # the MNIST digits as stored, 28x28
    train_batches = None
    if train:
        if cfg["MAX_SHIFT"]:
            raise UsageError(f"--max-shift does not apply to {name}: its training digits are placed anywhere in the "
                             f"{CANVAS}x{CANVAS} image every epoch; leave it 0")
        digits, labels, classes = load_split(plain, True)
        resolve_data_settings(cfg, digits.new_zeros((0, CANVAS, CANVAS)), classes)
        train_batches = PlacedBatches(digits.to(device), labels.to(device), cfg["BATCH_SIZE"])
    files = affnist_files(cfg["DATA_DIR"]) if name == "affnist" else None
    if files:
        images, labels = read_affnist(files, cfg["TEST_SIZE"])
        classes, test_name = mnist_classes(), AFFNIST_NAME
    else:
        digits, labels, classes = load_split(plain, False)
        if name == "affnist":
            images, test_name = affine_like(digits), GENERATED_NAME
        else:
            images, test_name = place(digits, fixed_offsets(len(digits))), name
    if not cfg["CLASS_NAMES"]:
        resolve_data_settings(cfg, images[:0], classes)
    test = DeviceBatches(images.to(device), labels.to(device), cfg["EVAL_BATCH_SIZE"], shuffle=False)
    return DeviceData(test_name, train_batches, test, cfg["CLASS_NAMES"], cfg["IMAGE_CHANNELS"], CANVAS, 1)


def resolve_data_settings(cfg, images, classes):
    """NUM_CLASSES, IMAGE_CHANNELS, IMAGE_SIZE and CLASS_NAMES from the data (one split's images as
    load_split returns them); a value given explicitly must agree. Then validate_shape(cfg)."""
    channels = 1 if images.dim() == 3 else images.shape[1]
    size = MULTIMNIST_CANVAS if cfg["DATASET"] == "multimnist" else images.shape[-1]
    if cfg["NUM_CLASSES"] not in (0, len(classes)):
        raise UsageError(f"--num-classes {cfg['NUM_CLASSES']}: {cfg['DATASET']} has {len(classes)} classes "
                         f"(leave it 0 to follow the data)")
    if cfg["IMAGE_CHANNELS"] not in (0, channels):
        raise UsageError(f"--image-channels {cfg['IMAGE_CHANNELS']}: {cfg['DATASET']} images have {channels} "
                         f"(only folder converts)")
    cfg.update(NUM_CLASSES=len(classes), IMAGE_CHANNELS=channels, IMAGE_SIZE=size, CLASS_NAMES=list(classes))
    validate_shape(cfg)


def nominal_data_settings(cfg):
    """What load_data would decide, from the data set's `shape` in DATA_SETS (for synthetic data: bench.py); values
    given explicitly (IMAGE_SIZE, IMAGE_CHANNELS, NUM_CLASSES) are kept."""
    channels, size, classes = DATA_SETS[cfg["DATASET"]]["shape"]
    if cfg["DATASET"] == "multimnist":
        cfg["IMAGE_SIZE"] = size
    cfg.update(NUM_CLASSES=cfg["NUM_CLASSES"] or classes, IMAGE_CHANNELS=cfg["IMAGE_CHANNELS"] or channels,
               IMAGE_SIZE=cfg["IMAGE_SIZE"] or size)
    cfg["CLASS_NAMES"] = cfg["CLASS_NAMES"] or [str(k) for k in range(cfg["NUM_CLASSES"])]
    validate_shape(cfg)
    return cfg


def input_size(cfg):
    """The side of the images the model sees: the crop, or the image."""
    return cfg["CROP_SIZE"] or cfg["IMAGE_SIZE"]


def smallest_input(kernel_size):
    """The smallest image side that leaves a 1x1 PrimaryCaps grid: Conv1 and PrimaryCaps (stride 2)."""
    return 2 * kernel_size - 1


def validate_shape(cfg):
    """Raise UsageError for images too small for Conv1 + PrimaryCaps, or a crop larger than them."""
    size, smallest = input_size(cfg), smallest_input(cfg["KERNEL_SIZE"])
    if cfg["CROP_SIZE"] > cfg["IMAGE_SIZE"]:
        raise UsageError(f"--crop-size {cfg['CROP_SIZE']} is larger than the {cfg['IMAGE_SIZE']}x{cfg['IMAGE_SIZE']} "
                         f"images")
    if cfg.get("MODEL") == "efficient-capsnet":
        if efficient_grid(size) < 1:
            raise UsageError(f"{size}x{size} images are too small for Efficient-CapsNet's four convolutions: the "
                             f"smallest size that works is 11x11 (--image-size 11 or more)")
    elif size < smallest and cfg.get("MODEL") != "baseline-cnn":  # the CNN baselines pad: any size
        raise UsageError(f"{size}x{size} images are too small for Conv1 and PrimaryCaps ({cfg['KERNEL_SIZE']}x"
                         f"{cfg['KERNEL_SIZE']} kernels, stride 2): the smallest size that works is {smallest}x"
                         f"{smallest} (--image-size {smallest} or more)")
    if cfg.get("DECODER") == "deconv" and deconv_base_grid(size) is None:
        raise UsageError(f"--decoder deconv reconstructs 18x18 images and larger, not {size}x{size}: use --decoder fc")

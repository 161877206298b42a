"""Sec. 5.2's comparison as a picture: the first COUNT images of the affNIST test set (its official
files in DATA_DIR/affNIST) or of the generated affNIST-like set, each with CapsNet's reconstruction
(the decoder reading the longest capsule, as at test) and both models' predicted classes; the title
names the test set.
    python results/paper-comparisons/affnist_figure.py DATA_DIR CAPSNET.pt CNN.pt OUT.png [COUNT]"""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from trained import trained  # noqa: E402
from capsnet import data  # noqa: E402


def predictions(path, data_dir, count):
    """(test set name, images (count, 1, 40, 40), labels, predicted classes, reconstructions or None)
    of the checkpoint at `path` on the first `count` affNIST(-like) test images."""
    cfg, model, _ = trained(path, DATA_DIR=data_dir, DATASET="affnist", TEST_SIZE=count)
    test_data = data.load_data(cfg, torch.device("cpu"), train=False)
    images_u8, labels = next(iter(test_data.test))
    images = data.to_float_images(images_u8, cfg["CROP_SIZE"])
    with torch.no_grad():
        scores, recon = model(images)
    recon = None if recon is None else recon.view_as(images)
    return test_data.name, images[:count], labels[:count], scores[:count].argmax(1), recon


def draw(data_dir, capsnet_path, cnn_path, out, count=10):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name, images, labels, caps_pred, recon = predictions(capsnet_path, data_dir, count)
    _, _, cnn_labels, cnn_pred, _ = predictions(cnn_path, data_dir, count)
    assert torch.equal(labels, cnn_labels), "the two models saw different test images"
    fig, axes = plt.subplots(2, count, figsize=(1.3 * count, 3.2))
    for k in range(count):
        for row, picture in enumerate((images[k, 0], recon[k, 0])):
            axes[row, k].imshow(picture.numpy(), cmap="gray", vmin=0, vmax=1)
            axes[row, k].set_xticks([])
            axes[row, k].set_yticks([])
        axes[0, k].set_title(f"digit {int(labels[k])}", fontsize=9)
        marks = ["" if int(p[k]) == int(labels[k]) else " (wrong)" for p in (caps_pred, cnn_pred)]
        axes[1, k].set_xlabel(f"CapsNet {int(caps_pred[k])}{marks[0]}\nCNN {int(cnn_pred[k])}{marks[1]}", fontsize=8)
    axes[0, 0].set_ylabel("input", fontsize=9)
    axes[1, 0].set_ylabel("CapsNet's\nreconstruction", fontsize=9)
    fig.suptitle(f"the first {count} images of the {name} test set: each model's predicted class", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"wrote {out} ({name}: CapsNet {int((caps_pred == labels).sum())}/{count} right, "
          f"CNN {int((cnn_pred == labels).sum())}/{count})")


if __name__ == "__main__":
    if len(sys.argv) not in (5, 6):
        sys.exit(__doc__)
    draw(*sys.argv[1:5], *(int(a) for a in sys.argv[5:]))

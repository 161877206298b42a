"""The paper's convolutional baselines (Sabour et al. 2017), trained and evaluated by the same
trainer as the capsule models: MODEL = "baseline-cnn" in capsule_network.py.

Two layouts (docs/paper-comparisons.md says where each choice comes from):

    sec5        sec. 5's MNIST baseline: three 5x5 convolutions of 256, 256 and 128 channels,
                stride 1, zero padding that keeps the size ("SAME"), no pooling; fully connected
                layers of 328 and 192 units; dropout; a linear layer to the classes.
                35,445,522 parameters on MNIST (the paper: 35.4M).
    conv-model  the authors' released baseline (Sarasra/models, research/capsules/models/
                conv_model.py): two 5x5 convolutions of 512 and 256 channels, each followed by a
                2x2 max-pool of stride 2; one fully connected layer of 1024 units; dropout; the
                class layer. Their MultiMNIST baseline (24,535,306 parameters at 36x36) and the
                pooled CNN that sec. 5.2 compares on affNIST (29,516,042 at 40x40): sec. 5.2
                names only "MaxPooling and DropOut", and this is the authors' one pooled CNN.

BASELINE_LAYERS = "auto" takes the paper's baseline for the data set: conv-model for MultiMNIST
and for the 40x40 digits of sec. 5.2 (expanded-mnist, affnist), sec5 for the others.
Every layer is followed by a ReLU but the class layer. The class scores are the logits: the
trainer's accuracy is their argmax (MultiMNIST: the two largest), and BaselineLoss is softmax
cross-entropy for one label, and for two labels the authors' sigmoid cross-entropy against the
multi-hot targets divided by the number of labels (layers.py, evaluate: labels / 2.0).

The model has the attributes the trainer touches on a capsule model (record_routing,
logit_changes) but no capsules and no routing to compile: figure code asks hasattr(model, "capsules").
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from capsnet.data import DATA_SETS

LAYERS = {
    "sec5": {"convs": (256, 256, 128), "pool": False, "hidden": (328, 192)},
    "conv-model": {"convs": (512, 256), "pool": True, "hidden": (1024,)},
}
KERNEL = 5  # every convolution: 5x5, stride 1, padded to keep the size (paper sec. 5; conv_model.py)


def resolve_layers(name, spec=None):
    """BASELINE_LAYERS -> a key of LAYERS. "auto" follows the data set (`spec`, its entry of the
    data.DATA_SETS): conv-model for two digits per image (sec. 6) or digits on a larger canvas
    (sec. 5.2's pooled CNN), sec5 otherwise."""
    if name == "auto":
        spec = spec or {}
        return "conv-model" if spec.get("objects", 1) > 1 or spec.get("canvas") else "sec5"
    return name


def feature_size(layers, image_size):
    """The side of the last convolution's map: "SAME" convolutions keep it, each pool halves it
    (rounding up, as TensorFlow's SAME pooling)."""
    for _ in LAYERS[layers]["convs"]:
        if LAYERS[layers]["pool"]:
            image_size = math.ceil(image_size / 2)
    return image_size


class BaselineCNN(nn.Module):
    """A baseline of LAYERS: images (B, C, H, W) in [0, 1] -> (class logits (B, classes), None)."""
    standardize = False  # STANDARDIZE: per-image standardisation of the input (set by build_model)
    recon_detach = False  # no decoder: the trainer's flag has nothing to detach

    def __init__(self, layers="sec5", num_classes=10, image_size=28, in_channels=1, dropout=0.5, init="torch"):
        super().__init__()
        if layers not in LAYERS:
            raise ValueError(f"layers must be one of {', '.join(LAYERS)}, not {layers!r}")
        spec = LAYERS[layers]
        self.layers, self.num_classes, self.image_size = layers, num_classes, image_size
        self.in_channels, self.dropout_rate = in_channels, dropout
        channels, convs = in_channels, []
        for width in spec["convs"]:
            convs.append(nn.Conv2d(channels, width, KERNEL, padding=KERNEL // 2))
            channels = width
        self.convs = nn.ModuleList(convs)
        self.pool = nn.MaxPool2d(2, 2, ceil_mode=True) if spec["pool"] else None
        width, hidden = channels * feature_size(layers, image_size) ** 2, []
        for units in spec["hidden"]:
            hidden.append(nn.Linear(width, units))
            width = units
        self.hidden = nn.ModuleList(hidden)
        self.dropout = nn.Dropout(dropout)
        self.classes = nn.Linear(width, num_classes)
        if init == "authors":
            self.init_as_authors()
        self.record_routing = False  # the trainer switches routing diagnostics on and off: nothing to record
        self.logit_changes = []

    @torch.no_grad()
    def init_as_authors(self):
        """The authors' initialisers (variables.py, with conv_model.py's standard deviations):
        truncated normals cut at 2 standard deviations, 0.05 for the convolutions and 0.1 for
        the fully connected layers; every bias 0.1."""
        for layer in [*self.convs, *self.hidden, self.classes]:
            std = 0.05 if isinstance(layer, nn.Conv2d) else 0.1
            nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
            layer.bias.fill_(0.1)

    def describe(self):
        """'baseline CNN (sec5: ...): N parameters', for the start-up line."""
        spec = LAYERS[self.layers]
        convs = "-".join(map(str, spec["convs"])) + " 5x5 convolutions" + (", each max-pooled 2x2" if spec["pool"]
                                                                             else "")
        fc = "-".join(map(str, spec["hidden"]))
        return (f"baseline CNN ({self.layers}: {convs}, fully connected {fc}, dropout {self.dropout_rate:g}, "
                f"{self.num_classes} classes): {sum(p.numel() for p in self.parameters()):,} parameters")

    def forward(self, images, labels=None, objects=1):
        """images (B, C, H, W) -> (logits (B, classes), None). `labels` and `objects` are the
        capsule models' arguments (the decoder's mask): a CNN has no use for them."""
        x = images
        if self.standardize:
            from capsnet.data import standardize

            x = standardize(x)
        for conv in self.convs:
            x = F.relu(conv(x))
            if self.pool is not None:
                x = self.pool(x)
        x = x.flatten(1)
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.classes(self.dropout(x)), None


class BaselineLoss(nn.Module):
    """The baselines' loss, called as the trainer calls CapsuleLoss: (images, labels, scores,
    reconstructions). Labels (B,): softmax cross-entropy (paper, sec. 5). Multi-hot labels (B, J)
    (MultiMNIST): sigmoid cross-entropy of every class against its label divided by the labels
    present (0.5 for each of two digits, as layers.py's labels / 2.0), averaged over batch and
    classes. Images and reconstructions are not used."""

    def forward(self, images, labels, scores, reconstructions=None):
        scores = scores.float()
        if labels.dim() == 1:
            return F.cross_entropy(scores, labels)
        present = labels.to(scores.dtype)
        return F.binary_cross_entropy_with_logits(scores, present / present.sum(1, keepdim=True).clamp(min=1))


def build_baseline(cfg):
    """BaselineCNN from a run's settings (after the data decided classes, channels, size)."""
    size = cfg["CROP_SIZE"] or cfg["IMAGE_SIZE"]
    return BaselineCNN(resolve_layers(cfg["BASELINE_LAYERS"], DATA_SETS[cfg["DATASET"]]), cfg["NUM_CLASSES"], size,
                       cfg["IMAGE_CHANNELS"], cfg["BASELINE_DROPOUT"], cfg["INIT"])


def baseline_line(model, device, amp, data):
    """The start-up line of a baseline run (the capsule models' line names their capsule grid)."""
    return (f"{model.describe()} on {device} ({amp}); {data.name}: {data.describe()}, "
            f"{data.channels}x{data.image_size}x{data.image_size} input")

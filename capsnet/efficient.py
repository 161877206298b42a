"""Efficient-CapsNet (Mazzia, Salvetti & Chiaberge, "Efficient-CapsNet: capsule network with
self-attention routing", Scientific Reports 11, 2021), as its authors' code builds it for MNIST
(EscVM/Efficient-CapsNet: models/efficient_capsnet_graph_mnist.py, utils/layers.py,
utils/pre_process_mnist.py, config.json).

    four convolutions (ReLU, then batch norm) -> a depthwise convolution over the whole grid that
    is left: 16 primary capsules of 8 dimensions, their squash -> FCCaps: votes W_ij u_i for every
    class j, self-attention routing, their squash -> 10 class capsules of 16 dimensions

161,824 trainable parameters at MNIST's shape. The class scores, the masked decoder and the loss
are the paper's CapsNet's (capsule_network.py: EfficientCapsNet takes CapsuleNet's forward and
decode); the script's MODEL constant picks this network.

Where this module departs from their code, and why:
- the norm inside both squashes has its epsilon under the root, so that squash(0) has a finite
  gradient (theirs adds it to the norm: the gradient at 0 is NaN);
- BatchNorm's momentum and epsilon are Keras's defaults (0.99 moving average, 1e-3), their
  initialisations are Keras's he_normal / glorot_uniform / glorot_normal, restated here;
- efficient_augment draws the same distributions on the device, but rotates and squishes with
  bilinear sampling (theirs: OpenCV's bilinear warp, and a Lanczos resize for the squish).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


CONVS = ((32, 5, 1), (64, 3, 1), (64, 3, 1), (128, 3, 2))  # (filters, kernel, stride), valid padding
PRIMARY_CAPS, PRIMARY_DIM = 16, 8  # 128 channels of the depthwise convolution = 16 capsules x 8


def efficient_grid(image_size):
    """The grid the four convolutions leave (28 -> 24 -> 22 -> 20 -> 9); the depthwise kernel covers it."""
    for _, kernel, stride in CONVS:
        image_size = (image_size - kernel) // stride + 1
    return image_size


def efficient_squash(s, dim=-1, eps=1e-20):
    """Their squash: v = (1 - 1/exp(||s||)) s / ||s|| (eps = their 10e-21, under the root here)."""
    norm = torch.sqrt((s * s).sum(dim=dim, keepdim=True) + eps)
    return s * (-torch.expm1(-norm) / norm)  # 1 - e^-n, exact for small n


def self_attention_routing(u_hat, bias):
    """FCCaps' routing as coded: votes u_hat (B, J, I, E) of child i for class j, bias (J, I, 1)
    -> class capsules v (B, J, E) and couplings c (B, J, I).

    For each class j, child i's logit is its vote's agreement with all votes for j:
    A_ij = sum_k u_hat[j|i] . u_hat[j|k] / sqrt(E); c_ij = softmax over the classes j of A_ij,
    plus the learned bias after the softmax (so c need not sum to 1); s_j = sum_i c_ij u_hat[j|i]."""
    total = u_hat.sum(dim=2)  # (B, J, E) = sum_k u_hat[j|k]
    logits = torch.einsum("bjie,bje->bji", u_hat, total) / math.sqrt(u_hat.shape[-1])  # (B, J, I) = A_ij
    c = logits.softmax(dim=1) + bias.squeeze(-1)  # (B, J, I), softmax over the classes j
    s = torch.einsum("bji,bjie->bje", c, u_hat)  # (B, J, E) = sum_i c_ij u_hat[j|i]
    return efficient_squash(s), c


def fc_caps(W, u, bias):
    """FCCaps: primary capsules u (B, I, D), W (J, I, D, E) -> v (B, J, E), c (B, J, I)."""
    u_hat = torch.einsum("bid,jide->bjie", u, W)  # (B, J, I, E) = u_hat[j|i] = W_ij u_i
    return self_attention_routing(u_hat, bias)


def keras_normal_(weight, fan_in, fan_out=None):
    """Keras's he_normal (fan_out None) or glorot_normal: a normal cut at 2 standard deviations,
    scaled so that its standard deviation is sqrt(2 / fan_in), or sqrt(2 / (fan_in + fan_out))."""
    std = math.sqrt(2.0 / (fan_in if fan_out is None else fan_in + fan_out)) / 0.87962566103423978
    nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


class EfficientBody(nn.Module):
    """Efficient-CapsNet up to the class capsules; `decoder` maps the masked capsules to pixels.
    It has the attributes the trainer reads from CapsuleNet (grid, num_primary, ...): its 16 primary
    capsules sit on a 1x1 grid, since the depthwise kernel covers the whole grid."""

    def __init__(self, decoder, num_classes=10, image_size=28, in_channels=1, digit_dim=16):
        super().__init__()
        grid = efficient_grid(image_size)
        if grid < 1:
            raise ValueError(f"{image_size}x{image_size} images are too small for Efficient-CapsNet's "
                             f"convolutions: the smallest is 11x11")
        self.num_classes, self.digit_dim = num_classes, digit_dim
        self.image_size, self.in_channels = image_size, in_channels
        self.primary_caps, self.primary_dim, self.grid = PRIMARY_CAPS, PRIMARY_DIM, 1
        self.num_primary = PRIMARY_CAPS
        self.conv_grid = grid  # the depthwise kernel's size
        channels, layers = in_channels, []
        for filters, kernel, stride in CONVS:
            layers.append(nn.Conv2d(channels, filters, kernel, stride))
            channels = filters
        self.convs = nn.ModuleList(layers)
        # Keras's BatchNormalization defaults: moving averages x0.99 (momentum 0.01 here), eps 1e-3
        self.norms = nn.ModuleList(nn.BatchNorm2d(conv.out_channels, eps=1e-3, momentum=0.01) for conv in layers)
        self.primary = nn.Conv2d(channels, channels, grid, groups=channels)  # depthwise, with bias
        self.W = nn.Parameter(torch.empty(num_classes, PRIMARY_CAPS, PRIMARY_DIM, digit_dim))  # (J, I, D, E)
        self.bias = nn.Parameter(torch.zeros(num_classes, PRIMARY_CAPS, 1))  # (J, I, 1), after the softmax
        self.decoder = decoder
        self.init_as_authors()
        self.record_routing, self.logit_changes = False, []  # no iterative routing: nothing to record
        self.eager_routing = self.routing = fc_caps  # fast.use_compiled_routing may swap in a compiled one

    @torch.no_grad()
    def init_as_authors(self):
        """Their code's initialisations (Keras): convolutions he_normal, the depthwise one
        glorot_uniform, W he_normal over Keras's fans of a (J, I, D, E) tensor, biases 0; the fully
        connected decoder he_normal, its last layer glorot_normal."""
        for conv in self.convs:
            keras_normal_(conv.weight, conv.weight[0].numel())
            conv.bias.zero_()
        area = self.primary.weight[0].numel()  # one channel's kernel: fan_in area, fan_out area x 128
        limit = math.sqrt(6.0 / (area + area * self.primary.out_channels))
        nn.init.uniform_(self.primary.weight, -limit, limit)
        self.primary.bias.zero_()
        J, I, D, E = self.W.shape
        keras_normal_(self.W, D * J * I)
        linears = [m for m in self.decoder.modules() if isinstance(m, nn.Linear)]
        for k, layer in enumerate(linears):
            last = k == len(linears) - 1
            keras_normal_(layer.weight, layer.in_features, layer.out_features if last else None)
            layer.bias.zero_()

    def routing_to_compile(self):
        """What torch.compile compiles (fast.use_compiled_routing): FCCaps' votes and routing."""
        return fc_caps

    def primary_capsules(self, images):
        """images (B, C, H, W) -> squashed primary capsules (B, 16, 8)."""
        x = images
        for conv, norm in zip(self.convs, self.norms):
            x = norm(F.relu(conv(x)))  # their order: the activation, then batch norm
        x = self.primary(x)  # (B, 128, 1, 1)
        return efficient_squash(x.reshape(len(x), PRIMARY_CAPS, PRIMARY_DIM).float())  # capsule n: channels 8n..8n+7

    def capsules(self, images):
        """images -> class capsules v (B, J, E) and couplings c (B, I, J), in fp32, as CapsuleNet."""
        u = self.primary_capsules(images)
        with torch.autocast(device_type=u.device.type, enabled=False):
            v, c = self.routing(self.W.float(), u, self.bias.float())
        return v, c.transpose(1, 2)


def efficient_augment(images):
    """Their MNIST training augmentation (utils/pre_process_mnist.py), per image, on the images'
    device, (B, C, H, W) in [0, 1], in their order: with probability 1/2 a rotation by
    clip(N(0, 0.33), +-0.9999) x 30 degrees; shifts in x and y toward a random side by a fraction
    a = min(|N(0, 0.33)|, 0.9999) of the empty margin; a squish of the width by 1 + floor(a x W/4)
    pixels (1..7 at 28); a 4x4 patch erased, its corner in rows and columns 4..H-6 (4..22 at 28)."""
    B, dev = len(images), images.device
    clipped = (0.33 * torch.randn(B, 2, device=dev)).clamp(-0.9999, 0.9999)
    images = rotate(images, torch.where(clipped[:, 1] > 0, 0.0, clipped[:, 0] * 30.0))
    amount = (0.33 * torch.randn(B, 2, device=dev)).abs().clamp(max=0.9999)
    images = margin_shift(images, amount, torch.rand(B, 2, device=dev) < 0.5)
    amount = (0.33 * torch.randn(B, 2, device=dev)).abs().clamp(max=0.9999)
    images = squish(images, torch.floor(amount[:, 0] * (images.shape[-1] / 4)) + 1, torch.floor(amount[:, 1] * 2))
    return erase(images, torch.floor(torch.rand(B, 2, device=dev) * (images.shape[-2] - 9)).long() + 4)


def resample(images, x_src, y_src):
    """Bilinear samples of images (B, C, H, W) at pixel coordinates x_src, y_src (B, H, W), zero outside."""
    H, W = images.shape[-2:]
    grid = torch.stack([x_src * (2 / W) - 1, y_src * (2 / H) - 1], -1)  # grid_sample's [-1, 1] units
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def pixel_centres(images):
    H, W = images.shape[-2:]
    y, x = torch.meshgrid(torch.arange(H, device=images.device) + 0.5, torch.arange(W, device=images.device) + 0.5,
                          indexing="ij")
    return x, y  # (H, W) each


def rotate(images, degrees):
    """Each image turned by its angle (B,) in degrees about the image centre (their coin: half of
    the angles are 0, the others clip(N(0, 0.33), +-1) x 30)."""
    H, W = images.shape[-2:]
    x, y = pixel_centres(images)
    a = torch.deg2rad(degrees).view(-1, 1, 1)
    dx, dy = x - W / 2, y - H / 2
    return resample(images, W / 2 + a.cos() * dx - a.sin() * dy, H / 2 + a.sin() * dx + a.cos() * dy)


def margin_shift(images, amount, toward_start):
    """Whole-pixel shifts within the empty margins: for x and y (amount, toward_start (B, 2)), the
    ink moves floor(amount x margin) toward the start (left, top) or floor(amount x (margin + 1))
    toward the end; with amount < 1 the ink stays inside the image."""
    B, C, H, W = images.shape
    ink = images.sum(1) > 0  # (B, H, W)
    shifts = []
    for axis, filled, size in ((0, ink.any(1), W), (1, ink.any(2), H)):  # columns, then rows
        idx = torch.arange(size, device=images.device).expand_as(filled)
        before = torch.where(filled, idx, size).min(1).values.clamp(max=size - 1)  # empty lines at the start
        after = (size - 1 - torch.where(filled, idx, -1).max(1).values).clamp(max=size - 1)
        shifts.append(torch.where(toward_start[:, axis], torch.floor(-amount[:, axis] * before),
                                  torch.floor(amount[:, axis] * (after + 1))).long())
    src_x = torch.arange(W, device=images.device).view(1, 1, W) - shifts[0].view(B, 1, 1)  # out[y, x] = in[y - dy, x - dx]
    src_y = torch.arange(H, device=images.device).view(1, H, 1) - shifts[1].view(B, 1, 1)
    inside = ((src_y >= 0) & (src_y < H) & (src_x >= 0) & (src_x < W)).unsqueeze(1)
    flat = (src_y.clamp(0, H - 1) * W + src_x.clamp(0, W - 1)).view(B, 1, H * W).expand(B, C, H * W)
    return images.flatten(2).gather(2, flat).view(B, C, H, W) * inside


def squish(images, width_cut, offset_extra):
    """The width resized from W to W - width_cut (B,), the result placed floor(width_cut / 2) +
    offset_extra (0 or 1) columns from the left (their squish: a Lanczos resize, bilinear here)."""
    W = images.shape[-1]
    x, y = pixel_centres(images)
    offset = (torch.floor(width_cut / 2) + offset_extra).view(-1, 1, 1)
    scale = (W / (W - width_cut)).view(-1, 1, 1)
    return resample(images, (x - offset) * scale, y.expand(len(images), -1, -1))


def erase(images, corner):
    """A 4x4 patch of every image set to 0, its top-left pixel at corner (B, 2) (row, column)."""
    H, W = images.shape[-2:]
    r = torch.arange(H, device=images.device).view(1, H, 1) - corner[:, 0].view(-1, 1, 1)
    c = torch.arange(W, device=images.device).view(1, 1, W) - corner[:, 1].view(-1, 1, 1)
    patch = (r >= 0) & (r < 4) & (c >= 0) & (c < 4)  # (B, H, W)
    return images * ~patch.unsqueeze(1)

"""Reconstruction decoders other than the paper's fully connected one (Fig. 2)."""

import torch.nn as nn


def deconv_base_grid(size):
    """The side g of the 10 x g x g map the deconvolution decoder starts from, for size x size
    images: 6 up to MNIST's 28 and beyond, smaller below (its three transposed convolutions grow
    g to 2g + 14 + k, k >= 1); None below 18x18, which it cannot reach."""
    g = min(6, (size - 16) // 2)
    return g if g >= 1 else None


class DeconvDecoder(nn.Module):
    """ethanleet/CapsNet's deconvolution decoder: the masked capsules (B, J * E) -> Linear -> ReLU ->
    (B, 10, g, g) -> ConvTranspose 10 -> 32 (9x9, stride 2) -> ReLU -> 32 -> 64 (9x9) -> ReLU ->
    64 -> C (k x k) -> sigmoid -> (B, C, size, size). At MNIST's shape g = 6, k = 2 (6 -> 19 -> 27
    -> 28): 250,121 parameters, against the fully connected decoder's 1,411,344. `batch_norm`
    (DECODER_BN): batch norm before each ReLU, as ethanleet's code places it (after the linear
    layer and after every transposed convolution but the last)."""

    def __init__(self, in_features, channels, size, batch_norm=False):
        super().__init__()
        g = deconv_base_grid(size)
        if g is None:
            raise ValueError(f"the deconv decoder reaches 18x18 images and larger, not {size}x{size}")
        self.grid = g
        def norm(kind, n):
            return [kind(n)] if batch_norm else []

        self.fc = nn.Sequential(nn.Linear(in_features, 10 * g * g), *norm(nn.BatchNorm1d, 10 * g * g),
                                nn.ReLU(inplace=True))
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(10, 32, 9, stride=2), *norm(nn.BatchNorm2d, 32), nn.ReLU(inplace=True),  # 2g + 7
            nn.ConvTranspose2d(32, 64, 9), *norm(nn.BatchNorm2d, 64), nn.ReLU(inplace=True),  # 2g + 15
            nn.ConvTranspose2d(64, channels, size - 2 * g - 14), nn.Sigmoid(),  # (B, C, size, size)
        )

    def forward(self, masked):
        x = self.fc(masked).reshape(-1, 10, self.grid, self.grid)  # (B, 10, g, g)
        return self.deconv(x)

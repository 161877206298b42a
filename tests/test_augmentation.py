"""Training-time augmentation: a random shift of up to 2 pixels per image, never at test time."""

import torch
import torch.nn as nn

from conftest import cn
from capsnet import data  # noqa: E402


def shifted(image, dy, dx):
    """image (C, H, W) moved down by dy and right by dx, zero fill."""
    C, H, W = image.shape
    out = torch.zeros_like(image)
    out[:, max(dy, 0):H + min(dy, 0), max(dx, 0):W + min(dx, 0)] = \
        image[:, max(-dy, 0):H + min(-dy, 0), max(-dx, 0):W + min(-dx, 0)]
    return out


def find_shifts(inputs, outputs, max_shift):
    """For each image: the (dy, dx) in [-max_shift, max_shift]^2 that maps input to output exactly."""
    found = []
    for x, y in zip(inputs, outputs):
        matches = [(dy, dx) for dy in range(-max_shift, max_shift + 1) for dx in range(-max_shift, max_shift + 1)
                   if torch.equal(shifted(x, dy, dx), y)]
        assert len(matches) == 1, f"no (or no unique) shift within {max_shift} px explains the output: {matches}"
        found.append(matches[0])
    return found


def nonzero_images(B, C=1, H=28, W=28, seed=0):
    """Images with no zero pixel, so that every shift gives a different result."""
    return 0.1 + torch.rand(B, C, H, W, generator=torch.Generator().manual_seed(seed))


def test_each_image_is_a_zero_filled_shift_of_at_most_two_pixels():
    """Every output image is its own input shifted by |dy|, |dx| <= 2 with zero fill; shape kept."""
    torch.manual_seed(0)
    x = nonzero_images(64, C=2)
    y = data.random_shift(x, 2)
    assert y.shape == x.shape and y.dtype == x.dtype
    shifts = find_shifts(x, y, 2)
    assert len(set(shifts)) >= 8, f"shifts look per-batch, not per-image: {sorted(set(shifts))}"


def test_every_shift_in_range_occurs():
    """Over a large batch all 25 shifts in [-2, 2]^2 occur (offsets cover the full range)."""
    torch.manual_seed(1)
    x = nonzero_images(400, H=8, W=8)
    shifts = find_shifts(x, data.random_shift(x, 2), 2)
    assert set(shifts) == {(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)}


def test_max_shift_one_and_zero():
    """max_shift bounds the shift; max_shift 0 returns the images unchanged."""
    torch.manual_seed(2)
    x = nonzero_images(32)
    assert all(abs(dy) <= 1 and abs(dx) <= 1 for dy, dx in find_shifts(x, data.random_shift(x, 1), 1))
    assert torch.equal(data.random_shift(x, 0), x)


class Recorder(nn.Module):
    """Stands in for CapsuleNet: records what the BatchLoss feeds it."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(10))
        self.calls = []

    def forward(self, images, labels=None):
        self.calls.append((images.detach().clone(), labels))
        B = images.shape[0]
        lengths = torch.sigmoid(self.bias).expand(B, 10)
        return lengths, images.mean() * torch.zeros_like(images) + 0.5


def digit_sample(tiny_mnist, n=16):
    images, labels = tiny_mnist["train"]
    return torch.from_numpy(images[:n].copy()), torch.from_numpy(labels[:n].astype("int64"))


def test_stepper_shifts_training_images_but_never_test_images(tiny_mnist):
    """BatchLoss: in train mode the model gets per-image shifted images and the labels; in eval mode
    the plain images and no labels (the decoder then masks with the longest capsule)."""
    torch.manual_seed(3)
    model = Recorder()
    stepper = cn.BatchLoss(model, cn.CapsuleLoss(), torch.device("cpu"), None, max_shift=2, channels_last=False)
    images_u8, labels = digit_sample(tiny_mnist)
    plain = data.to_float_images(images_u8)

    model.eval()
    for _ in range(2):
        loss, lengths = stepper((images_u8, labels))
        seen, seen_labels = model.calls.pop()
        assert torch.equal(seen, plain)
        assert seen_labels is None
    assert lengths.shape == (16, 10) and not lengths.requires_grad

    model.train()
    loss, _ = stepper((images_u8, labels))
    seen, seen_labels = model.calls.pop()
    assert torch.equal(seen_labels, labels)
    shifts = find_shifts(plain, seen, 2)
    assert any(s != (0, 0) for s in shifts)
    assert len(set(shifts)) > 1
    # the reconstruction target is the image the model saw (shifted), not the original
    recon = torch.full_like(seen, 0.5)
    expected = cn.CapsuleLoss()(seen, labels, torch.sigmoid(model.bias).expand(16, 10), recon)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert model.bias.grad is not None


def test_stepper_with_real_model_is_deterministic_only_in_eval_mode(tiny_mnist):
    """With the real (small) CapsuleNet: eval calls on the same batch agree exactly; train-mode
    calls differ because each sees newly shifted images."""
    from conftest import small_model

    torch.manual_seed(4)
    model = small_model(w_init_std=0.5)
    stepper = cn.BatchLoss(model, cn.CapsuleLoss(), torch.device("cpu"), None, max_shift=2, channels_last=True)
    sample = digit_sample(tiny_mnist, 8)
    with torch.no_grad():
        model.eval()
        a, b = stepper(sample)[1], stepper(sample)[1]
        assert torch.equal(a, b)
        model.train()
        c, d = stepper(sample)[1], stepper(sample)[1]
    assert not torch.equal(c, d)

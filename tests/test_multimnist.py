"""multimnist_pairs: the paper's MultiMNIST examples (sec. 6), built from MNIST-like tensors."""

import pytest
import torch

from conftest import cn, make_digits


def digits(n=60, seed=1):
    images, labels = make_digits(n, seed)
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype("int64"))


def placed(digit, dy, dx):
    """The 28x28 digit alone in a 36x36 canvas, shifted by (dy, dx) from the centre."""
    canvas = torch.zeros(36, 36, dtype=torch.uint8)
    canvas[4 + dy:4 + dy + 28, 4 + dx:4 + dx + 28] = digit
    return canvas


def test_shapes_dtypes_and_two_different_labels():
    images, labels = digits()
    composites, parts, pair_labels = cn.multimnist_pairs(images, labels, generator=torch.Generator().manual_seed(0))
    assert composites.shape == (60, 36, 36) and composites.dtype == torch.uint8
    assert parts.shape == (60, 2, 36, 36) and parts.dtype == torch.uint8
    assert pair_labels.shape == (60, 2) and pair_labels.dtype == torch.int64
    assert torch.equal(pair_labels[:, 0], labels)  # row k starts from image k
    assert (pair_labels[:, 0] != pair_labels[:, 1]).all()


def test_each_part_is_its_digit_shifted_by_at_most_4_pixels_and_the_composite_is_the_clipped_sum():
    images, labels = digits(40)
    composites, parts, pair_labels = cn.multimnist_pairs(images, labels, generator=torch.Generator().manual_seed(3))
    offsets = [(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)]
    seen = set()
    for k in range(40):
        # part 0 is image k; part 1 is some image of the partner's class, found among the inputs
        matches0 = [o for o in offsets if torch.equal(parts[k, 0], placed(images[k], *o))]
        assert matches0, k
        candidates = (labels == pair_labels[k, 1]).nonzero().flatten().tolist()
        matches1 = [(j, o) for j in candidates for o in offsets if torch.equal(parts[k, 1], placed(images[j], *o))]
        assert matches1, k
        seen.update([matches0[0], matches1[0][1]])
        expected = (parts[k, 0].int() + parts[k, 1].int()).clamp(max=255).to(torch.uint8)
        assert torch.equal(composites[k], expected)
    assert len(seen) > 20  # the offsets vary


def test_the_same_generator_state_gives_the_same_pairs_whatever_the_chunk_size():
    images, labels = digits()
    first = cn.multimnist_pairs(images, labels, generator=torch.Generator().manual_seed(7))
    again = cn.multimnist_pairs(images, labels, generator=torch.Generator().manual_seed(7), chunk=7)
    other = cn.multimnist_pairs(images, labels, generator=torch.Generator().manual_seed(8))
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other[0])


def test_max_shift_zero_centres_every_digit_and_bad_inputs_are_refused():
    images, labels = digits(20)
    _, parts, pair_labels = cn.multimnist_pairs(images, labels, max_shift=0, generator=torch.Generator().manual_seed(0))
    for k in range(20):
        assert torch.equal(parts[k, 0], placed(images[k], 0, 0))
    with pytest.raises(ValueError, match="two classes"):
        cn.multimnist_pairs(images[:1].repeat(5, 1, 1), labels[:1].repeat(5))
    with pytest.raises(ValueError, match="max_shift"):
        cn.multimnist_pairs(images, labels, max_shift=5)

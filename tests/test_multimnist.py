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


def test_margin_loss_with_two_hot_targets_by_hand():
    """Both classes of an image are present (m+ term), the others absent (lambda x m- term)."""
    lengths = torch.tensor([[0.95, 0.2, 0.05], [0.5, 0.85, 0.3]])
    targets = torch.tensor([[1, 1, 0], [0, 1, 1]])
    loss = cn.CapsuleLoss(recon_weight=0.0)
    zeros = torch.zeros(2, 1, 2, 2)
    row0 = 0.0 + (0.9 - 0.2) ** 2 + 0.0  # 0.95 above m+, 0.2 below it; 0.05 below m-
    row1 = 0.5 * (0.5 - 0.1) ** 2 + (0.9 - 0.85) ** 2 + (0.9 - 0.3) ** 2
    assert loss(zeros, targets, lengths, zeros).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    # one-hot targets as indices or as a (B, J) matrix give the same loss
    indices = torch.tensor([0, 1])
    assert loss(zeros, indices, lengths, zeros).item() == pytest.approx(
        loss(zeros, torch.nn.functional.one_hot(indices, 3), lengths, zeros).item())


def test_reconstruction_errors_of_the_two_digits_add_up():
    """Reconstructions (B, 2, 1, H, W) against the two parts (B, 2, 1, H, W): the summed squared
    errors of both digits, times RECON_WEIGHT."""
    parts = torch.zeros(1, 2, 1, 2, 2)
    recon = torch.zeros(1, 2, 1, 2, 2)
    recon[0, 0, 0, 0, 0], recon[0, 1, 0, 1, 1] = 0.5, 0.25
    loss = cn.CapsuleLoss(m_plus=0.0, m_minus=1.0, recon_weight=0.5)  # margin terms vanish
    lengths = torch.full((1, 3), 0.5)
    assert loss(parts, torch.tensor([[1, 1, 0]]), lengths, recon).item() == pytest.approx(0.5 * (0.25 + 0.0625))


def test_two_digit_scores_on_hand_made_lengths():
    lengths = torch.tensor([[0.9, 0.8, 0.1, 0.0],   # top two {0, 1}: both right
                            [0.9, 0.1, 0.8, 0.0],   # {0, 2} against {0, 1}: one right
                            [0.1, 0.2, 0.9, 0.8],   # {2, 3} against {0, 1}: none
                            [0.2, 0.9, 0.1, 0.8]])  # {1, 3} against {3, 1}: both, in the other order
    pair_labels = torch.tensor([[0, 1], [0, 1], [0, 1], [3, 1]])
    both, any_ = cn.two_digit_scores(lengths, pair_labels)
    assert both.tolist() == [True, False, False, True]
    assert any_.tolist() == [True, True, False, True]


def test_the_decoder_runs_once_per_digit_masked_by_that_digits_capsule():
    """At 36x36 the PrimaryCaps grid is 10x10 (3,200 capsules); with two labels per image the
    reconstructions are (B, 2, 1, 36, 36), each the decoder of that digit's capsule alone; without
    labels, the two longest capsules are decoded."""
    torch.manual_seed(0)
    model = cn.CapsuleNet(16, 4, decoder_hidden=(32, 64), image_size=36).eval()
    assert model.grid == 10 and model.num_primary == 4 * 10 * 10
    x = torch.rand(3, 1, 36, 36)
    pair = torch.tensor([[1, 7], [0, 3], [9, 2]])
    with torch.no_grad():
        lengths, recon = model(x, pair)
        v, _ = model.capsules(x)
        assert recon.shape == (3, 2, 1, 36, 36)
        for k in range(2):
            torch.testing.assert_close(recon[:, k], model.decode(v, pair[:, k]))
        lengths, predicted = model(x, digits=2)
        top = lengths.topk(2, dim=1).indices
        for k in range(2):
            torch.testing.assert_close(predicted[:, k], model.decode(v, top[:, k]))

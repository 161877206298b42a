"""MultiMNIST (paper, sec. 6): the pairs, the two-digit loss and scores, the decoder per digit, and
`--dataset multimnist` through the command line (training, exact resume, --eval-only, Fig. 5)."""

import json
import os

import pytest
import torch

from conftest import cn, copy_run, describe, load_pt, make_digits, model_config, read_rows, run_main, train_args
from capsnet import data, figures, meters  # noqa: E402


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
    model = cn.CapsuleNet(model_config(conv1_channels=16, primary_caps=4, decoder_hidden=(32, 64), image_size=36)).eval()
    assert model.grid == 10 and model.num_primary == 4 * 10 * 10
    x = torch.rand(3, 1, 36, 36)
    pair = torch.tensor([[1, 7], [0, 3], [9, 2]])
    with torch.no_grad():
        lengths, recon = model(x, pair)
        v, _ = model.capsules(x)
        assert recon.shape == (3, 2, 1, 36, 36)
        for k in range(2):
            torch.testing.assert_close(recon[:, k], model.decode(v, pair[:, k]))
        lengths, predicted = model(x, objects=2)
        top = lengths.topk(2, dim=1).indices
        for k in range(2):
            torch.testing.assert_close(predicted[:, k], model.decode(v, top[:, k]))


def test_matched_predictions_order_the_two_longest_capsules_like_the_labels():
    """Position k holds label k where that label is among the two longest capsules, else the other
    predicted class; `swapped` says the order is the reverse of the lengths' order."""
    lengths = torch.zeros(5, 10)
    lengths[0, [3, 5]] = torch.tensor([0.9, 0.8])  # labels (3, 5): in order
    lengths[1, [3, 5]] = torch.tensor([0.8, 0.9])  # labels (3, 5): the longest is the second label
    lengths[2, [5, 7]] = torch.tensor([0.9, 0.8])  # labels (3, 5): only 5 found, as the longest
    lengths[3, [3, 7]] = torch.tensor([0.7, 0.9])  # labels (3, 5): only 3 found, second longest
    lengths[4, [1, 2]] = torch.tensor([0.9, 0.8])  # labels (3, 5): neither
    labels = torch.tensor([[3, 5]] * 5)
    classes, swapped = meters.matched_predictions(lengths, labels)
    assert classes.tolist() == [[3, 5], [3, 5], [7, 5], [3, 7], [1, 2]]
    assert swapped.tolist() == [False, True, True, True, False]


def test_the_fixed_test_pairs_do_not_depend_on_the_seed_or_the_pass():
    """PairBatches(fixed=True): the same pairs in every pass and whatever torch's generators did
    before; `repeats` rows per digit; training batches are new pairs at every pass, drawn from
    torch's default generator (so a restored RNG state draws them again)."""
    images, labels = digits(60)
    torch.manual_seed(1)
    a = data.PairBatches(images, labels, 25, 4, fixed=True, repeats=2)
    torch.manual_seed(2)
    b = data.PairBatches(images, labels, 25, 4, fixed=True, repeats=2)
    assert a.rows == 120 and len(a) == 5
    first, again, other = list(a), list(a), list(b)
    for x, y, z in zip(first, again, other):
        for p, q, r in zip(x, y, z):
            assert torch.equal(p, q) and torch.equal(p, r)
    composites, pair_labels, parts = (torch.cat(t) for t in zip(*first))
    assert composites.shape == (120, 36, 36) and parts.shape == (120, 2, 36, 36)
    assert torch.equal(pair_labels[:60, 0], labels) and torch.equal(pair_labels[60:, 0], labels)
    assert not torch.equal(composites[:60], composites[60:])  # the second repeat has other partners
    assert torch.equal(composites, (parts[:, 0].int() + parts[:, 1].int()).clamp(max=255).to(torch.uint8))

    train = data.PairBatches(images, labels, 25, 4, fixed=False)
    torch.manual_seed(5)
    one = [t.clone() for t in next(iter(train))]
    two = next(iter(train))
    torch.manual_seed(5)
    three = next(iter(train))
    assert not torch.equal(one[0], two[0])
    assert all(torch.equal(p, q) for p, q in zip(one, three))


def test_the_test_loss_compares_each_reconstruction_with_its_own_digit():
    """At test time the BatchLoss reconstructs from the two longest capsules and compares the one
    matched to label k (matched_predictions) with part k. The decoder is replaced by one that
    paints class c as the flat image c / 10, so the loss can be written down by hand."""
    torch.manual_seed(0)
    images, labels = digits(20)
    composites, parts, pair_labels = cn.multimnist_pairs(images, labels, generator=torch.Generator().manual_seed(0))
    model = cn.CapsuleNet(model_config(conv1_channels=8, primary_caps=2, decoder_hidden=(16, 32), image_size=36)).eval()
    model.decode = lambda v, classes: (classes.float() / 10)[:, None, None, None].expand(-1, 1, 36, 36)
    step = cn.BatchLoss(model, cn.CapsuleLoss(), torch.device("cpu"), None, 0, False)
    with torch.no_grad():
        loss, lengths = step((composites, pair_labels, parts))
    matched, _ = meters.matched_predictions(lengths, pair_labels)
    present = torch.zeros(20, 10).scatter_(1, pair_labels, 1.0)
    margin = (present * (0.9 - lengths).clamp(min=0) ** 2
              + 0.5 * (1 - present) * (lengths - 0.1).clamp(min=0) ** 2).sum(1)
    error = ((matched.float() / 10)[:, :, None, None] - parts.float() / 255) ** 2  # (20, 2, 36, 36)
    expected = (margin + 0.0005 * error.sum((1, 2, 3))).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_fig5_tiles_overlay_the_two_reconstructions_in_red_and_green():
    """fig5_tiles: grey inputs; red and green channels are the decoder's outputs from the capsules
    matched to the two labels; the forced column uses a class that is neither label nor predicted."""
    torch.manual_seed(0)
    images, labels = digits(20)
    composites, _, pair_labels = cn.multimnist_pairs(images, labels, generator=torch.Generator().manual_seed(0))
    model = cn.CapsuleNet(model_config(conv1_channels=8, primary_caps=2, decoder_hidden=(16, 32), image_size=36)).eval()
    tiles = figures.fig5_tiles(model, composites[:6], pair_labels[:6])
    x = data.to_float_images(composites[:6])
    assert torch.equal(tiles["inputs"], x.repeat(1, 3, 1, 1))
    with torch.no_grad():
        v, _ = model.capsules(x)
        red = model.decode(v, tiles["predicted"][:, 0])
    torch.testing.assert_close(tiles["recon"][:, :1], red)
    assert (tiles["recon"][:, 2] == 0).all() and (tiles["forced"][:, 2] == 0).all()
    for k in range(6):
        assert int(tiles["absent"][k]) not in pair_labels[k].tolist() + tiles["predicted"][k].tolist()
    assert tiles["grid"].shape[0] == 3 and tiles["grid"].shape[1] == 3 * 36 + 4 * 2
    assert figures.fig5_caption(tiles).count("L:(") == 6


@pytest.fixture(scope="module")
def pair_run(tiny_mnist, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("multimnist") / "run")
    done = run_main(train_args(tiny_mnist["root"], run_dir, "--dataset", "multimnist", epochs=2))
    assert done.returncode == 0, describe(done)
    return {"dir": run_dir, "process": done, "data": tiny_mnist}


def test_a_multimnist_run_reports_both_scores(pair_run):
    """--dataset multimnist: exit 0, the data set's settings and the 36x36 model announced, and
    metrics rows with test_accuracy (both digits right) <= test_accuracy_any (at least one)."""
    out = pair_run["process"].stdout
    assert "data set multimnist (the paper's settings for it): MAX_SHIFT=0, LR_DECAY=0.996" in out
    assert "200 training pairs" in out and "100 fixed test pairs" in out and "10x10 grid of 400 primary" in out
    rows = read_rows(pair_run["dir"])
    assert [r["epoch"] for r in rows] == [1, 2]
    for row in rows:
        for mode in ("train", "test"):
            assert 0 <= row[f"{mode}_accuracy"] <= row[f"{mode}_accuracy_any"] <= 100
    assert rows[1]["lr"] == pytest.approx(1e-3 * 0.996)
    assert load_pt(os.path.join(pair_run["dir"], "last.pt"))["config"]["DATASET"] == "multimnist"


def test_a_multimnist_run_resumes_exactly(pair_run, tmp_path):
    """--resume continues with the same training pairs as an uninterrupted run: epoch 3 agrees."""
    resumed = copy_run(pair_run["dir"], tmp_path / "resumed")
    done = run_main(["--resume", os.path.join(resumed, "last.pt"), "--epochs", 3])
    assert done.returncode == 0, describe(done)
    straight = str(tmp_path / "straight")
    done = run_main(train_args(pair_run["data"]["root"], straight, "--dataset", "multimnist", epochs=3))
    assert done.returncode == 0, describe(done)
    a, b = read_rows(resumed), read_rows(straight)
    assert [r["epoch"] for r in a] == [1, 2, 3]
    for key in ("train_loss", "train_accuracy", "train_accuracy_any", "test_loss", "test_accuracy",
                "test_accuracy_any"):
        assert a[2][key] == pytest.approx(b[2][key], rel=1e-6), key
    ra, rb = load_pt(os.path.join(resumed, "last.pt")), load_pt(os.path.join(straight, "last.pt"))
    for name in ra["model"]:
        torch.testing.assert_close(ra["model"][name], rb["model"][name], rtol=0, atol=1e-7, msg=name)


def test_eval_only_and_visualize_on_the_fixed_test_pairs(pair_run, tmp_path):
    """--eval-only scores the same test pairs as the training run's last epoch (another process);
    --visualize writes fig5.png."""
    run = copy_run(pair_run["dir"], tmp_path / "run")
    done = run_main(["--resume", os.path.join(run, "last.pt"), "--eval-only"])
    assert done.returncode == 0, describe(done)
    assert "both digits right" in done.stdout and "at least one right" in done.stdout
    with open(os.path.join(run, "eval.json"), encoding="utf-8") as f:
        result = json.load(f)
    last = read_rows(run)[-1]
    assert result["dataset"] == "multimnist" and result["test_images"] == 100
    assert result["test_accuracy"] == pytest.approx(last["test_accuracy"], abs=1e-9)
    assert result["test_accuracy_any"] == pytest.approx(last["test_accuracy_any"], abs=1e-9)
    assert result["test_loss"] == pytest.approx(last["test_loss"], rel=1e-5)
    assert sum(map(sum, result["confusion"])) == 200  # both digits of every test pair
    done = run_main(["--resume", os.path.join(run, "last.pt"), "--visualize", "--recon-images", 4])
    assert done.returncode == 0, describe(done)
    assert os.path.getsize(os.path.join(run, "fig5.png")) > 1000


@pytest.mark.parametrize("argv, fragment", [
    (["--dataset", "cifar100"], "--dataset must be one of mnist, fashion-mnist, kmnist, emnist-balanced, "
                                "emnist-letters, cifar10, svhn, smallnorb, folder, multimnist, expanded-mnist, affnist, not 'cifar100'"),
    (["--dataset", "multimnist", "--max-shift", "2"], "--max-shift does not apply to multimnist"),
    (["--dataset", "multimnist", "--multimnist-shift", "5"], "--multimnist-shift must be in [0, 4]"),
    (["--dataset", "multimnist", "--multimnist-test-pairs", "0"], "--multimnist-test-pairs must be >= 1"),
])
def test_bad_multimnist_settings_are_one_line_errors(argv, fragment, tmp_path):
    done = run_main(["--run-dir", tmp_path / "run", "--no-visdom", *argv])
    assert done.returncode == 2 and fragment in done.stderr, describe(done)
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()

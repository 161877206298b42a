"""MODEL = "baseline-cnn" (capsnet/baseline.py): the paper's CNN baselines, their parameter counts,
their loss, and the trainer's modes with them."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from capsnet import baseline, fast
from conftest import cn, describe, read_rows, run_main, train_args

BASELINE = ["--model", "baseline-cnn"]


def baseline_model(seed=0, **cfg):
    torch.manual_seed(seed)
    return cn.build_model(dict(cn.default_config(), MODEL="baseline-cnn", **cfg))


def count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("dataset, layers, expected", [
    ("mnist", "sec5", 35_445_522),  # the paper, sec. 5: 35.4M
    ("multimnist", "conv-model", 24_535_306),  # conv_model.py at 36x36
    ("affnist", "conv-model", 29_516_042),  # sec. 5.2's pooled CNN at 40x40
])
def test_the_parameter_counts(dataset, layers, expected):
    """BASELINE_LAYERS auto takes each data set's baseline; its parameters, counted exactly."""
    model = baseline_model(DATASET=dataset)
    assert model.layers == layers and count(model) == expected


def test_the_layers_are_the_papers_and_the_authors():
    """sec5: 5x5 convolutions of 256, 256, 128 channels, stride 1, padded to keep 28x28, no pooling,
    then 328 and 192 units and the 10 classes; conv-model: 512 and 256 channels, each max-pooled
    2x2, then 1024 units (36 -> 18 -> 9 at MultiMNIST's size)."""
    sec5 = baseline_model()
    assert [(c.out_channels, c.kernel_size, c.stride, c.padding) for c in sec5.convs] == \
        [(256, (5, 5), (1, 1), (2, 2)), (256, (5, 5), (1, 1), (2, 2)), (128, (5, 5), (1, 1), (2, 2))]
    assert sec5.pool is None
    assert [(h.in_features, h.out_features) for h in sec5.hidden] == [(128 * 28 * 28, 328), (328, 192)]
    assert (sec5.classes.in_features, sec5.classes.out_features) == (192, 10)
    pooled = baseline_model(DATASET="multimnist")
    assert [c.out_channels for c in pooled.convs] == [512, 256] and pooled.pool is not None
    assert [(h.in_features, h.out_features) for h in pooled.hidden] == [(256 * 9 * 9, 1024)]
    assert count(baseline_model(BASELINE_LAYERS="conv-model")) == 16_146_698  # at MNIST's 28x28


def test_forward_gives_class_logits_and_no_reconstruction():
    """The trainer's call: model(images, labels or None[, objects]) -> (scores (B, classes), None);
    dropout acts in training only."""
    model = baseline_model(IMAGE_SIZE=12)
    x = torch.rand(4, 1, 12, 12)
    with torch.no_grad():
        model.eval()
        scores, recon = model(x, None)
        again, _ = model(x, torch.arange(4), objects=1)
        assert scores.shape == (4, 10) and recon is None and torch.equal(scores, again)
        model.train()
        assert not torch.equal(model(x)[0], model(x)[0])  # dropout


def test_the_capsule_only_attributes_do_not_crash():
    """The trainer sets and reads record_routing and logit_changes; COMPILE (on, or auto's trial)
    leaves a model without routing as it is and chooses eager; figure code tells a baseline by its
    lack of capsules."""
    model = baseline_model(IMAGE_SIZE=12)
    assert model.record_routing is False and model.logit_changes == []
    for setting in (True, "auto"):
        choice = fast.CompileChoice(model, torch.device("cpu"), setting)
        assert choice.choice == "eager" and fast.compiled_routing(model) is None
    assert not hasattr(model, "capsules") and not hasattr(model, "decode") and not hasattr(model, "routing")


def test_the_loss_is_cross_entropy_and_for_two_digits_the_authors_sigmoid():
    """One label: softmax cross-entropy. Two labels (multi-hot): sigmoid cross-entropy against
    the targets / 2 (layers.py: labels / 2.0), averaged over batch and classes."""
    g = torch.Generator().manual_seed(0)
    scores, labels = torch.randn(5, 10, generator=g), torch.tensor([0, 3, 9, 1, 1])
    loss = cn.build_loss(dict(cn.default_config(), MODEL="baseline-cnn"))
    assert isinstance(loss, baseline.BaselineLoss)
    torch.testing.assert_close(loss(None, labels, scores, None), F.cross_entropy(scores, labels))
    present = F.one_hot(torch.tensor([[0, 3], [2, 7], [9, 1], [4, 5], [6, 8]]), 10).sum(1)
    targets = present / 2.0
    expected = -(targets * F.logsigmoid(scores) + (1 - targets) * F.logsigmoid(-scores)).mean()
    torch.testing.assert_close(loss(None, present, scores, None), expected)


def test_the_authors_initialisation():
    """INIT authors: truncated normals (0.05 convolutions, 0.1 fully connected), biases 0.1."""
    model = baseline_model(IMAGE_SIZE=12, INIT="authors")
    for layer in [*model.convs, *model.hidden, model.classes]:
        std = 0.05 if isinstance(layer, torch.nn.Conv2d) else 0.1
        assert layer.weight.abs().max() <= 2 * std and torch.all(layer.bias == 0.1)


@pytest.mark.parametrize("flags, message", [
    (["--compile", "on"], "--model baseline-cnn has none"),
    (["--baseline-layers", "vgg"], "--baseline-layers must be auto, sec5 or conv-model"),
    (["--baseline-dropout", "1"], "--baseline-dropout must be in [0, 1)"),
])
def test_bad_settings_are_one_line(tiny_mnist, tmp_path, flags, message):
    done = run_main(train_args(tiny_mnist["root"], str(tmp_path / "run"), *BASELINE, *flags, epochs=1))
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_train_evaluate_visualize_export(tiny_mnist, tmp_path):
    """A tiny run of the sec5 baseline (12x12 images, so it is quick) through the trainer, then
    --eval-only and --eval-only of its exported weights, --visualize (curves, no capsule
    figures), and --predict: the class probabilities and the input alone."""
    run = str(tmp_path / "run")
    small = ["--image-size", "12", "--train-size", "40", "--test-size", "20"]
    done = run_main(train_args(tiny_mnist["root"], run, *BASELINE, *small, epochs=1))
    assert done.returncode == 0, describe(done)
    assert "baseline CNN (sec5" in done.stdout and "8,575,762 parameters" in done.stdout
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert rows[0]["routing_logit_change"] == [] and rows[0]["compile"] == "eager"
    last = os.path.join(run, "last.pt")
    done = run_main(["--eval-only", "--resume", last, "--device", "cpu"])
    assert done.returncode == 0 and "mnist: test accuracy" in done.stdout, describe(done)
    exported = str(tmp_path / "weights.pt")
    assert run_main(["--export-weights", exported, "--resume", last]).returncode == 0
    done = run_main(["--eval-only", "--resume", exported, "--device", "cpu", "--data-dir", tiny_mnist["root"],
                     "--run-dir", str(tmp_path / "eval"), "--test-size", "20"])
    assert done.returncode == 0 and "mnist: test accuracy" in done.stdout, describe(done)
    done = run_main(["--visualize", "--resume", last, "--device", "cpu"])
    assert done.returncode == 0 and "no capsule figures" in done.stdout, describe(done)
    assert os.path.exists(os.path.join(run, "curves.png")) and not os.path.exists(os.path.join(run, "couplings.png"))
    picture = str(tmp_path / "digit.png")
    Image.fromarray(tiny_mnist["test"][0][0]).save(picture)
    done = run_main(["--predict", picture, "--resume", last, "--device", "cpu"])
    assert done.returncode == 0 and "digit.png: class " in done.stdout and "(probability " in done.stdout, describe(done)
    saved = json.load(open(os.path.join(run, "predictions.json")))[0]
    assert abs(sum(saved["probabilities"].values()) - 1) < 1e-3 and "lengths" not in saved
    assert Image.open(saved["picture"]).size == (12, 12)  # the 12x12 input alone


@pytest.mark.parametrize("training", [True, False])
def test_multimnist_steps_with_two_labels(training):
    """The trainer's MultiMNIST step with the conv-model baseline: the two-label loss, no
    reconstructions to match at test, the two largest scores as its answer."""
    cfg = dict(cn.default_config(), MODEL="baseline-cnn", DATASET="multimnist", AMP=False)
    torch.manual_seed(0)
    model = cn.build_model(cfg)
    model.train(training)
    step = cn.BatchLoss(model, cn.build_loss(cfg), torch.device("cpu"), None, 0, False)
    g = torch.Generator().manual_seed(1)
    digits = torch.randint(0, 256, (4, 28, 28), generator=g, dtype=torch.uint8)
    composites, parts, pair_labels = cn.multimnist_pairs(digits, torch.tensor([0, 1, 2, 3]), generator=g)
    with torch.set_grad_enabled(training):
        loss, scores = step((composites, pair_labels, parts))
    assert scores.shape == (4, 10) and torch.isfinite(loss)
    present = F.one_hot(pair_labels, 10).sum(1).float()
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(scores, present / 2))


@pytest.mark.parametrize("dataset", ["mnist", "multimnist"])
def test_visdoms_epoch_view_shows_the_test_images_alone(tiny_mnist, dataset):
    """What Visdom gets after an epoch of a baseline: the first test images, no reconstructions,
    no capsule figures (Fig. 4, masks, couplings, Fig. 5 need capsules)."""
    from capsnet.figures import epoch_views

    cfg = cn.default_config(MODEL="baseline-cnn", DATASET=dataset, DATA_DIR=tiny_mnist["root"], TEST_SIZE=20,
                            RECON_IMAGES=4)
    data = cn.load_data(cfg, torch.device("cpu"), train=False)
    model = cn.build_model(cfg).eval()
    grid, figures, caption = epoch_views(model, data, cfg, torch.device("cpu"), None)
    size = cfg["IMAGE_SIZE"]
    assert grid.shape == (3, size + 4, 4 * (size + 2) + 2) and figures is None and caption is None


def test_two_processes_train_the_baseline_as_one(tiny_mnist, tmp_path):
    """torchrun with 2 gloo processes trains the baseline CNN as one process does (dropout off, so
    that the two runs draw nothing the world size could change): the same metrics, and the same
    weights to 1e-4 (the gradient of a 12x12 sec5 network's first fully connected layer is summed in
    another order over two shards, and Adam scales its smallest entries up)."""
    from test_distributed import same_rows, same_weights, two_processes

    small = [*BASELINE, "--image-size", "12", "--train-size", "40", "--test-size", "20", "--baseline-dropout", "0"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    done = run_main(train_args(tiny_mnist["root"], one, *small, epochs=1))
    assert done.returncode == 0, describe(done)
    done = two_processes(train_args(tiny_mnist["root"], two, *small, epochs=1))
    assert done.returncode == 0, describe(done)
    assert "torchrun: 2 processes (gloo)" in done.stdout and "baseline CNN (sec5" in done.stdout
    same_rows(read_rows(two), read_rows(one))
    same_weights(os.path.join(two, "last.pt"), os.path.join(one, "last.pt"), tolerance=1e-4)


def test_bench_times_the_baseline(tmp_path):
    """bench.py --model baseline-cnn: this model timed through the trainer's configuration, its
    parameter count in the report, no decoder named."""
    from test_benchmark import TINY, run_bench

    out = tmp_path / "b.json"
    done = run_bench([*TINY, "--model", "baseline-cnn", "--image-size", "12", "--no-benchmark-baseline",
                      "--no-benchmark-direct", "--json", out], tmp_path)
    assert done.returncode == 0, describe(done)
    result = json.loads(out.read_text())
    assert result["model"] == "baseline-cnn" and result["decoder"] is None
    assert result["parameters"] == sum(p.numel() for p in baseline_model(IMAGE_SIZE=12).parameters())
    assert result["train_images_per_s"] > 0 and "baseline-cnn (8,575,762 parameters)" in done.stdout

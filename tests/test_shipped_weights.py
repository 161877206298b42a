"""results/capsnet-mnist.pt, the weights of the complete MNIST run (results/README.md): the file
the project ships loads into the model the script builds from it and classifies real MNIST test
digits (the first 200 of the test set, committed in tests/fixtures) as the run did."""

import json
import os

import pytest
import torch

from conftest import ROOT, cn
from capsnet import data, runtime  # noqa: E402

SHIPPED = os.path.join(ROOT, "results", "capsnet-mnist.pt")


@pytest.fixture(scope="module")
def shipped():
    assert os.path.isfile(SHIPPED), f"{SHIPPED} is missing: it is part of the project (results/README.md)"
    return runtime.load_checkpoint(SHIPPED)


def test_the_shipped_file_is_small_fp16_weights_with_the_models_constants(shipped):
    assert os.path.getsize(SHIPPED) < 20 * 2**20
    assert set(shipped) - {"path"} == {"model", "config", "epoch"} and shipped["epoch"] == 100
    assert all(v.dtype == torch.float16 for v in shipped["model"].values() if v.is_floating_point())
    assert set(shipped["config"]) <= set(cn.MODEL_KEYS) and shipped["config"]["DATASET"] == "mnist"


def test_it_loads_into_the_model_built_from_it_and_evaluates_random_images(shipped):
    """The constants saved with the weights build the 8,215,728-parameter model (the paper's
    8,215,568 and the authors' code's 160 capsule biases); it takes the weights and maps random
    images to lengths in [0, 1) and reconstructions in [0, 1]."""
    cfg = dict(cn.default_config(), **shipped["config"])
    if not cfg["IMAGE_SIZE"]:  # weights exported before the data's shape was saved with them
        data.nominal_data_settings(cfg)
    model = cn.build_model(cfg)
    runtime.load_weights(model, shipped["model"])
    assert sum(p.numel() for p in model.parameters()) == 8_215_728
    model.eval()
    images = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lengths, recon = model(images)
    assert lengths.shape == (4, 10) and recon.shape == (4, 1, 28, 28)
    assert ((lengths >= 0) & (lengths < 1)).all() and ((recon >= 0) & (recon <= 1)).all()


def test_eval_only_of_the_shipped_file_classifies_real_digits(real_digits, tmp_path):
    """--eval-only --resume results/capsnet-mnist.pt on 200 real test digits: the run's model gets
    them all right (a model 0.31% wrong over 10,000 gets at least 198 of 200 here; random weights
    get about 10%) with the small test loss of a trained model (the run's over 10,000: 0.0028
    under its own loss, the authors' half-mean)."""
    assert cn.main(["--eval-only", "--resume", SHIPPED, "--data-dir", real_digits, "--device", "cpu",
                    "--run-dir", str(tmp_path / "eval"), "--no-visdom"]) == 0
    with open(tmp_path / "eval" / "eval.json", encoding="utf-8") as f:
        result = json.load(f)
    assert result["test_images"] == 200 and result["checkpoint_epoch"] == 100
    assert result["test_accuracy"] >= 99.0 and result["test_loss"] < 0.03, result

"""DECODER = "deconv" (ethanleet/CapsNet's transposed convolutions) and CONV1_LEAKY (soskek's
leaky ReLU on Conv1)."""

import os

import pytest
import torch
import torch.nn.functional as F

from conftest import cn, describe, load_pt, read_rows, run_main, small_model, train_args


def test_the_deconv_decoder_has_ethanleets_parameter_counts():
    """250,121 parameters at MNIST's shape (the fully connected one: 1,411,344); 7,054,345 for the
    whole CapsNet with it."""
    fc, deconv = cn.CapsuleNet(), cn.CapsuleNet(cn.CapsNetConfig(decoder="deconv"))
    assert sum(p.numel() for p in fc.decoder.parameters()) == 1_411_344
    assert sum(p.numel() for p in deconv.decoder.parameters()) == 250_121
    assert sum(p.numel() for p in deconv.parameters()) == 7_054_345


@pytest.mark.parametrize("channels, size", [(1, 28), (3, 24), (2, 32), (1, 36)])  # MNIST, CIFAR10, smallNORB crops
def test_the_deconv_decoder_reconstructs_each_data_sets_shape(channels, size):
    model = small_model(decoder="deconv", image_channels=channels, image_size=size)
    with torch.no_grad():
        lengths, recon = model(torch.rand(2, channels, size, size))
    assert recon.shape == (2, channels, size, size) and ((recon >= 0) & (recon <= 1)).all()


def test_images_the_deconv_decoder_cannot_reach_are_one_line():
    cfg = dict(cn.default_config(), DECODER="deconv", IMAGE_SIZE=17, IMAGE_CHANNELS=1, NUM_CLASSES=10)
    with pytest.raises(cn.UsageError, match="--decoder deconv reconstructs 18x18 images and larger, not 17x17"):
        cn.nominal_data_settings(cfg)


def test_conv1_leaky_is_a_leaky_relu_on_conv1_in_every_convolution_path():
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0)) - 0.3
    for dft, gemm in ((True, False), (False, True), (False, False)):
        model = small_model(conv1_leaky=0.05, dft_conv=dft, gemm_weight_grad=gemm, cpu_malloc_tuning=False).train()
        u = model.primary_capsules(x)
        with torch.no_grad():
            h = F.leaky_relu(model.conv1(x), 0.05)
            assert (h < 0).any()  # the leak matters on these inputs
            pre = F.conv2d(h, model.primary.weight, model.primary.bias, 2)  # (B, T*D, 6, 6)
            pre = pre.reshape(3, model.primary_caps, 8, 6, 6).permute(0, 1, 3, 4, 2).reshape(3, -1, 8)
        torch.testing.assert_close(u.detach(), cn.squash(pre), rtol=1e-4, atol=1e-5)
    plain = small_model(cpu_malloc_tuning=False)
    assert not torch.allclose(plain.primary_capsules(x), small_model(conv1_leaky=0.05,
                                                                     cpu_malloc_tuning=False).primary_capsules(x))


def test_a_tiny_deconv_run_with_a_leaky_conv1_trains_resumes_and_evaluates(tiny_mnist, tmp_path):
    run = str(tmp_path / "run")
    small = ["--train-size", 60, "--test-size", 50]
    done = run_main(train_args(tiny_mnist["root"], run, "--decoder", "deconv", "--conv1-leaky", 0.05, *small, epochs=1))
    assert done.returncode == 0, describe(done)
    last = os.path.join(run, "last.pt")
    assert load_pt(last)["config"]["DECODER"] == "deconv" and "decoder.deconv.0.weight" in load_pt(last)["model"]
    done = run_main(["--resume", last, "--epochs", 2])
    assert done.returncode == 0 and [r["epoch"] for r in read_rows(run)] == [1, 2], describe(done)
    done = run_main(["--eval-only", "--resume", last])
    assert done.returncode == 0 and "test accuracy" in done.stdout, describe(done)


def test_decoder_batch_norm_sits_where_ethanleets_code_puts_it_and_is_counted():
    """DECODER_BN: a BatchNorm before each hidden ReLU (fc: after both hidden Linear layers; deconv:
    after its Linear and after each transposed convolution but the last), never on the output;
    2 parameters per normalised feature or channel; the same for Efficient-CapsNet's decoder."""
    def layers(model):
        return [type(m).__name__ for m in model.decoder.modules() if not isinstance(m, torch.nn.Sequential)
                and m is not model.decoder]

    plain, normed = cn.CapsuleNet(), cn.CapsuleNet(cn.CapsNetConfig(decoder_bn=True))
    assert layers(normed) == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear", "Sigmoid"]
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(normed) - count(plain) == 2 * (512 + 1024) and count(normed) == 8_218_640
    deconv = cn.CapsuleNet(cn.CapsNetConfig(decoder="deconv", decoder_bn=True))
    assert layers(deconv) == ["Linear", "BatchNorm1d", "ReLU", "ConvTranspose2d", "BatchNorm2d", "ReLU",
                              "ConvTranspose2d", "BatchNorm2d", "ReLU", "ConvTranspose2d", "Sigmoid"]
    assert sum(p.numel() for p in deconv.decoder.parameters()) == 250_121 + 2 * (10 * 6 * 6 + 32 + 64)
    for decoder in ("fc", "deconv"):
        cfg = cn.default_config(MODEL="efficient-capsnet", DECODER=decoder)
        with_bn = cn.build_model(dict(cfg, DECODER_BN=True))
        extra = 2 * (512 + 1024) if decoder == "fc" else 2 * (360 + 32 + 64)
        assert count(with_bn) - count(cn.build_model(cfg)) == extra
        with torch.no_grad():
            lengths, recon = with_bn.eval()(torch.rand(2, 1, 28, 28))
        assert recon.shape == (2, 1, 28, 28)
    # the flag reaches the model; without it the layers keep the names checkpoints were saved with
    assert [k for k in cn.build_model(cn.default_config(DECODER_BN=True)).state_dict() if "decoder.1." in k]
    assert [k for k in plain.state_dict() if k.startswith("decoder.")] == [
        f"decoder.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")]

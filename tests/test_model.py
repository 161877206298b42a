"""CapsuleNet: the paper's architecture (Fig. 1, 2) with the script's default constants."""

import pytest
import torch

from conftest import cn, small_model


@pytest.mark.parametrize("B", [1, 3])
def test_forward_shapes_and_ranges(full_model, B):
    """forward -> lengths (B, 10) in [0, 1) and reconstructions (B, 1, 28, 28) in [0, 1]."""
    x = torch.rand(B, 1, 28, 28, generator=torch.Generator().manual_seed(B))
    with torch.no_grad():
        lengths, recon = full_model(x)
    assert lengths.shape == (B, 10) and recon.shape == (B, 1, 28, 28)
    assert lengths.dtype == torch.float32
    assert ((lengths >= 0) & (lengths < 1)).all()
    assert ((recon >= 0) & (recon <= 1)).all()


def test_parameter_count(full_model):
    """8,215,568 parameters in all; 6,804,224 without the decoder (Conv1 + PrimaryCaps + W_ij)."""
    total = sum(p.numel() for p in full_model.parameters())
    no_decoder = sum(p.numel() for n, p in full_model.named_parameters() if not n.startswith("decoder."))
    assert total == 8_215_568
    assert no_decoder == 6_804_224
    assert full_model.num_primary == 1152 and full_model.grid == 6
    assert tuple(full_model.W.shape) == (10, 1152, 16, 8)


def test_primary_capsules_group_channels_at_one_pixel(full_model):
    """Capsule (type t, row r, col c) is squash of channels t*8..t*8+7 of the PrimaryCaps conv at
    pixel (r, c), and has index i = t*36 + r*6 + c."""
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        u = full_model.primary_capsules(x)
        conv = full_model.primary(torch.relu(full_model.conv1(x)))  # the plain convolutions
    assert conv.shape == (2, 32 * 8, 6, 6)
    assert u.shape == (2, 1152, 8)
    expected = torch.empty_like(u)
    for t in range(32):
        for r in range(6):
            for c in range(6):
                expected[:, t * 36 + r * 6 + c] = cn.squash(conv[:, t * 8:t * 8 + 8, r, c])
    torch.testing.assert_close(u, expected, rtol=1e-5, atol=1e-6)


def test_lengths_are_capsule_norms_without_softmax(full_model):
    """Class scores are the lengths of the digit capsules from model.capsules (no softmax)."""
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        v, c = full_model.capsules(x)
        lengths, _ = full_model(x)
    assert v.shape == (3, 10, 16) and c.shape == (3, 1152, 10)
    torch.testing.assert_close(lengths, v.norm(dim=-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c.sum(2), torch.ones(3, 1152))


def test_decoder_uses_the_label_capsule_when_labels_are_given(digit_batch):
    """forward(x, labels) reconstructs from the capsule of `labels` alone (training masking)."""
    model = small_model(w_init_std=2.0)  # long capsules, so different masks decode differently
    x, _ = digit_batch
    with torch.no_grad():
        v, _ = model.capsules(x)
        labels = (v.norm(dim=-1).argmax(1) + 3) % 10  # deliberately not the winners
        _, recon = model(x, labels)
        torch.testing.assert_close(recon, model.decode(v, labels), rtol=1e-5, atol=1e-6)
        other = model.decode(v, (labels + 1) % 10)
    assert (recon - other).flatten(1).abs().max(1).values.min() > 1e-6  # every image differs


def test_decoder_uses_the_longest_capsule_without_labels(digit_batch):
    """forward(x) reconstructs from the longest capsule (test-time masking)."""
    model = small_model(w_init_std=2.0)
    x, _ = digit_batch
    with torch.no_grad():
        v, _ = model.capsules(x)
        lengths, recon = model(x)
        winners = v.norm(dim=-1).argmax(1)
        torch.testing.assert_close(recon, model.decode(v, winners), rtol=1e-5, atol=1e-6)
        assert torch.equal(lengths.argmax(1), winners)
        not_winners = model.decode(v, (winners + 1) % 10)
    assert (recon - not_winners).flatten(1).abs().max(1).values.min() > 1e-5


def test_decode_sees_only_the_masked_capsule():
    """decode(v, k) depends on capsule k only: changing the other capsules changes nothing."""
    model = small_model()
    g = torch.Generator().manual_seed(0)
    v = 0.3 * torch.randn(4, 10, 16, generator=g)
    classes = torch.tensor([0, 3, 9, 3])
    w = 0.3 * torch.randn(4, 10, 16, generator=g)
    w[torch.arange(4), classes] = v[torch.arange(4), classes]
    with torch.no_grad():
        a, b = model.decode(v, classes), model.decode(w, classes)
        c = model.decode(w, (classes + 1) % 10)
    assert a.shape == (4, 1, 28, 28)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_build_model_follows_the_config():
    """build_model(cfg) uses the layer-size constants."""
    cfg = dict(cn.default_config(), CONV1_CHANNELS=16, PRIMARY_CAPS=4, DIGIT_DIM=12,
               DECODER_HIDDEN1=32, DECODER_HIDDEN2=64, ROUTING_ITERATIONS=2)
    model = cn.build_model(cfg)
    assert model.conv1.out_channels == 16
    assert model.primary.out_channels == 4 * 8
    assert tuple(model.W.shape) == (10, 4 * 36, 12, 8)
    assert model.config.routing_iterations == 2
    assert [m.out_features for m in model.decoder if isinstance(m, torch.nn.Linear)] == [32, 64, 784]
    lengths, recon = model(torch.rand(2, 1, 28, 28))
    assert lengths.shape == (2, 10) and recon.shape == (2, 1, 28, 28)


def test_backward_reaches_every_parameter(digit_batch):
    """The loss gradient reaches Conv1, PrimaryCaps, W_ij and the decoder."""
    model = small_model().train()
    x, labels = digit_batch
    lengths, recon = model(x, labels)
    cn.CapsuleLoss()(x, labels, lengths, recon).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name

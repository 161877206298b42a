"""The authors' released code's choices (Sarasra/models, research/capsules), each against a plain
restatement of their formula on a small input, and --preset authors."""

import pytest
import torch
import torch.nn.functional as F

from conftest import cn, small_model
from capsnet import runtime  # noqa: E402


def authors_margin_loss(labels_one_hot, raw_logits, margin=0.4, downweight=0.5):
    """layers._margin_loss: shift the lengths by 0.5, a margin of 0.4 on each side, per class."""
    logits = raw_logits - 0.5
    positive_cost = labels_one_hot * (logits < margin).double() * (logits - margin) ** 2
    negative_cost = (1 - labels_one_hot) * (logits > -margin).double() * (logits + margin) ** 2
    return 0.5 * positive_cost + downweight * 0.5 * negative_cost  # (B, classes)


def test_half_mean_margin_is_the_authors_loss():
    """evaluate() takes reduce_mean of _margin_loss over batch and classes; reconstruction() adds
    0.0005 x the batch mean of the summed squared error."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.rand(6, 10, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 10, (6,), generator=g)
    images = torch.rand(6, 1, 5, 5, generator=g, dtype=torch.float64)
    recons = torch.rand(6, 1, 5, 5, generator=g, dtype=torch.float64)
    one_hot = F.one_hot(labels, 10).double()
    expected = authors_margin_loss(one_hot, lengths).mean() + 0.0005 * ((recons - images) ** 2).flatten(1).sum(1).mean()
    loss = cn.CapsuleLoss(margin_reduction="half-mean")(images, labels, lengths, recons)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-9)
    # and it is 1/20 of eq. 4's margin term for 10 classes, the reconstruction term unchanged
    paper = cn.CapsuleLoss(recon_weight=0.0)(images, labels, lengths, recons)
    torch.testing.assert_close(cn.CapsuleLoss(recon_weight=0.0, margin_reduction="half-mean")(
        images, labels, lengths, recons), paper / 20)


def authors_update_routing(votes, biases, num_routing):
    """layers._update_routing for a fully connected layer: votes (B, I, J, E), biases (J, E)."""
    B, I, J, E = votes.shape
    logits = torch.zeros(B, I, J, dtype=votes.dtype)
    for _ in range(num_routing):
        route = torch.softmax(logits, dim=2)
        preactivate = (route[..., None] * votes).sum(1) + biases  # (B, J, E)
        norm = preactivate.norm(dim=2, keepdim=True)
        activation = preactivate / norm * (norm ** 2 / (1 + norm ** 2))
        logits = logits + (votes * activation[:, None]).sum(3)
    return activation


@pytest.mark.parametrize("children_last", [False, True])
def test_digit_caps_bias_is_the_authors_routing(children_last):
    """The bias added to s_j before the squash, in the reference and the factored routing, equals
    the authors' routing loop (fp64), and the factored form's gradients equal the reference's."""
    g = torch.Generator().manual_seed(1)
    J, I, E, D, B = 4, 9, 5, 3, 2
    W = torch.randn(J, I, E, D, generator=g, dtype=torch.float64, requires_grad=True)
    u = torch.randn(B, I, D, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(J, E, generator=g, dtype=torch.float64, requires_grad=True)
    u_hat = torch.einsum("jied,bid->bije", W, u)  # (B, I, J, E)
    expected = authors_update_routing(u_hat, bias, 3)
    v_ref, _ = cn.dynamic_routing(u_hat, 3, bias=bias)
    torch.testing.assert_close(v_ref, expected)
    v, _, _ = cn.factored_routing(W, u, 3, False, children_last=children_last, bias=bias)
    torch.testing.assert_close(v, expected)
    probe = torch.randn(B, J, E, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((v * probe).sum(), (W, u, bias))
    grads_ref = torch.autograd.grad((v_ref * probe).sum(), (W, u, bias))
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want)
    without = cn.factored_routing(W, u, 3, False, children_last=children_last)[0]
    assert not torch.allclose(without, v)  # the bias changes the result


@pytest.mark.parametrize("path", ["dft", "gemm", "plain"])
def test_primary_scale_is_a_one_iteration_routing_over_the_types(path):
    """conv_slim_capsule(num_routing=1) over the 32 types: softmax of zero logits over the types
    (1/T each) x the convolution, summed over the single input capsule, + the bias, then the squash.
    Every way the PrimaryCaps convolution is computed gives it."""
    model = small_model(primary_scale=1 / 4, dft_conv=path == "dft", gemm_weight_grad=path == "gemm",
                        cpu_malloc_tuning=False).train()
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    u = model.primary_capsules(x)  # (B, I, D)
    with torch.no_grad():
        votes = F.conv2d(F.relu(model.conv1(x)), model.primary.weight, None, 2)  # (B, T*D, 6, 6)
        B, T, D = 3, model.primary_caps, model.primary_dim
        votes = votes.reshape(B, 1, T, D, 6, 6)  # (B, input_dim=1, T, D, H, W), as their _depthwise_conv3d
        route = torch.softmax(torch.zeros(B, 1, T, 6, 6), dim=2)  # 1/T each
        pre = (route[:, :, :, None] * votes).sum(1) + model.primary.bias.reshape(T, D, 1, 1)  # (B, T, D, 6, 6)
        norm = pre.norm(dim=2, keepdim=True)
        expected = pre / norm * (norm ** 2 / (1 + norm ** 2))
        expected = expected.permute(0, 1, 3, 4, 2).reshape(B, T * 36, D)  # (B, I, D), as the model orders them
    torch.testing.assert_close(u.detach(), expected, rtol=1e-4, atol=1e-5)
    assert route[0, 0, 0, 0, 0].item() == 1 / T


def test_authors_init():
    """Truncated normals cut at 2 std (TensorFlow's truncated_normal_initializer): Conv1 std 0.05,
    PrimaryCaps, W_ij and decoder 0.1; every bias 0.1, the DigitCaps bias too."""
    model = small_model(init="authors", digit_caps_bias=True)
    linears = [m for m in model.decoder if isinstance(m, torch.nn.Linear)]
    for w, std in [(model.conv1.weight, 0.05), (model.primary.weight, 0.1), (model.W, 0.1),
                   *((m.weight, 0.1) for m in linears)]:
        assert w.abs().max() <= 2 * std
        # a normal truncated at +-2 std has a standard deviation of 0.88 of the untruncated one
        assert abs(w.std().item() / std - 0.880) < 0.08, (w.shape, w.std().item())
    for b in (model.conv1.bias, model.primary.bias, model.digit_bias, *(m.bias for m in linears)):
        assert torch.equal(b, torch.full_like(b, 0.1))
    default = small_model()
    assert default.digit_bias is None and default.W.std().item() < 0.02  # N(0, 0.01), untruncated
    assert not torch.equal(default.conv1.bias, torch.full_like(default.conv1.bias, 0.1))


def test_authors_preset_combines_with_a_schedule_and_shows_in_the_model_line():
    parser = cn.build_parser()
    cfg, origin = cn.configure(cn.flags_given(parser.parse_args(["--preset", "mnist-2h,authors"])))
    assert (cfg["EPOCHS"], cfg["LR_DECAY"]) == (30, 0.88)
    assert (cfg["INIT"], cfg["PRIMARY_SCALE"], cfg["DIGIT_CAPS_BIAS"], cfg["MARGIN_REDUCTION"]) == \
        ("authors", 0.03125, True, "half-mean")
    assert cn.settings_lines(cfg, origin, cn.file_constants()) == [
        "preset mnist-2h: EPOCHS=30, LR_DECAY=0.88",
        "preset authors: MARGIN_REDUCTION=half-mean, DIGIT_CAPS_BIAS=True, PRIMARY_SCALE=0.03125, INIT=authors"]
    assert cn.authors_choices(cfg) == ["INIT=authors", "PRIMARY_SCALE=0.03125", "DIGIT_CAPS_BIAS=True",
                                       "MARGIN_REDUCTION=half-mean"]
    assert cn.authors_choices(cn.default_config()) == []
    model = cn.build_model(cfg)
    assert model.digit_bias is not None and model.config.primary_scale == 0.03125
    assert sum(p.numel() for p in model.parameters()) == \
        sum(p.numel() for p in cn.build_model(cn.default_config()).parameters()) + 160
    assert isinstance(cn.build_loss(cfg), cn.CapsuleLoss) and cn.build_loss(cfg).margin_reduction == "half-mean"


def test_bad_authors_values_are_usage_errors():
    parser = cn.build_parser()
    for argv, text in [(["--init", "xavier"], "--init must be torch or authors"),
                       (["--margin-reduction", "mean"], "--margin-reduction must be sum or half-mean"),
                       (["--primary-scale", "0"], "--primary-scale must be > 0")]:
        with pytest.raises(runtime.UsageError, match=text):
            cn.configure(cn.flags_given(parser.parse_args(argv)))

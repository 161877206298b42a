"""dynamic_routing (Procedure 1): u_hat (B, I, J, E) -> v (B, J, E), couplings c (B, I, J)."""

import types

import pytest
import torch

from conftest import cn, describe, load_pt, model_config, run_main, small_model, train_args
from capsnet import fast, runtime  # noqa: E402


def reference_routing(u_hat, iterations):
    """Procedure 1 written out literally (float64, exact squash) for comparison."""
    B, I, J, E = u_hat.shape
    b = torch.zeros(B, I, J, dtype=u_hat.dtype)
    for r in range(iterations):
        c = torch.softmax(b, dim=2)  # over parents j
        s = (c[..., None] * u_hat).sum(1)  # (B, J, E)
        n2 = (s * s).sum(-1, keepdim=True)
        v = n2 / (1 + n2) * s / n2.sqrt()
        b = b + (u_hat * v[:, None]).sum(-1)
    return v, c


def random_u_hat(B=2, I=12, J=5, E=4, seed=0):
    return torch.randn(B, I, J, E, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("iterations", [1, 2, 3, 5])
def test_shapes_and_couplings_sum_to_one(iterations):
    """v is (B, J, E), c is (B, I, J), and every child's couplings sum to 1 over the parents."""
    u = random_u_hat()
    v, c = cn.dynamic_routing(u, iterations)
    assert v.shape == (2, 5, 4) and c.shape == (2, 12, 5)
    torch.testing.assert_close(c.sum(2), torch.ones(2, 12, dtype=u.dtype))
    assert (c > 0).all()
    assert (v.norm(dim=-1) < 1).all()


@pytest.mark.parametrize("iterations", [1, 3])
def test_matches_procedure_1(iterations):
    """The result equals a literal implementation of Procedure 1."""
    u = random_u_hat(B=3, I=20, J=10, E=16, seed=1)
    v, c = cn.dynamic_routing(u, iterations)
    v_ref, c_ref = reference_routing(u, iterations)
    torch.testing.assert_close(v, v_ref, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(c, c_ref, rtol=1e-6, atol=1e-8)


def test_one_iteration_is_uniform():
    """With a single iteration c_ij = 1/J and v_j = squash(mean over parents' share of sum_i u_hat)."""
    u = random_u_hat(J=5)
    v, c = cn.dynamic_routing(u, 1)
    torch.testing.assert_close(c, torch.full_like(c, 1 / 5))
    torch.testing.assert_close(v, cn.squash(u.sum(1) / 5))


def agreeing_u_hat(B=4, I=32, J=10, E=16, seed=0):
    """Every child predicts the same vector for parent 0 (agreement) and independent random
    vectors of the same size for the other parents."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(B, I, J, E, generator=g)
    u = u / u.norm(dim=-1, keepdim=True)
    shared = torch.randn(B, 1, E, generator=g)
    u[:, :, 0] = (shared / shared.norm(dim=-1, keepdim=True)).expand(B, I, E)
    return u


def test_agreeing_predictions_win_the_couplings():
    """Routing by agreement moves coupling towards the parent all children agree on."""
    J = 10
    u = agreeing_u_hat(J=J)
    _, c1 = cn.dynamic_routing(u, 1)
    v3, c3 = cn.dynamic_routing(u, 3)
    assert c3[:, :, 0].mean() > 1 / J
    assert c3[:, :, 0].mean() > c1[:, :, 0].mean() + 0.01
    assert (c3[:, :, 0] > c3[:, :, 1:].max(dim=2).values).all()  # every child, every example
    lengths = v3.norm(dim=-1)
    assert (lengths.argmax(1) == 0).all()
    assert (lengths < 1).all()


@pytest.mark.parametrize("iterations", [1, 3, 4])
def test_logit_changes_get_one_scalar_per_iteration(iterations):
    """A `logit_changes` list receives `iterations` detached scalars, the mean |u_hat . v| of each
    iteration, and passing it does not change the result."""
    u = random_u_hat(seed=3).requires_grad_(True)
    changes = []
    v, c = cn.dynamic_routing(u, iterations, changes)
    v_plain, c_plain = cn.dynamic_routing(u, iterations)
    assert len(changes) == iterations
    assert all(t.dim() == 0 and not t.requires_grad and torch.isfinite(t) and t >= 0 for t in changes)
    torch.testing.assert_close(v, v_plain)
    torch.testing.assert_close(c, c_plain)
    # the last entry is the (unused) update computed from the final v
    last = (u.detach() * v.detach()[:, None]).sum(-1).abs().mean()
    torch.testing.assert_close(changes[-1], last)


def test_gradients_flow_through_routing():
    """v is differentiable with respect to u_hat (the W matrices learn through it)."""
    u = random_u_hat().requires_grad_(True)
    v, _ = cn.dynamic_routing(u, 3)
    v.norm(dim=-1).sum().backward()
    assert torch.isfinite(u.grad).all() and u.grad.abs().sum() > 0


@pytest.mark.parametrize("iterations", [1, 2, 3])
@pytest.mark.parametrize("record", [False, True])
def test_factored_routing_equals_routing_on_u_hat(iterations, record):
    """factored_routing(W, u) (the factored DigitCaps the model runs) gives the same v, c, recorded
    logit changes and gradients as dynamic_routing on u_hat_j|i = W_ij u_i."""
    g = torch.Generator().manual_seed(iterations)
    J, I, E, D, B = 10, 4 * 36, 16, 8, 3
    W = (0.3 * torch.randn(J, I, E, D, generator=g, dtype=torch.float64)).requires_grad_(True)
    u = cn.squash(torch.randn(B, I, D, generator=g, dtype=torch.float64)).requires_grad_(True)

    v, c, changes = cn.factored_routing(W, u, iterations, record)
    ref_changes = [] if record else None
    u_hat = torch.einsum("jied,bid->bije", W, u)  # (B, I, J, E)
    v_ref, c_ref = cn.dynamic_routing(u_hat, iterations, ref_changes)
    assert v.shape == (B, J, E) and c.shape == (B, I, J)
    torch.testing.assert_close(v, v_ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(c, c_ref, rtol=1e-9, atol=1e-12)
    if record:
        assert changes.shape == (iterations,)
        torch.testing.assert_close(changes, torch.stack(ref_changes), rtol=1e-9, atol=1e-12)
    else:
        assert changes is None

    grads = torch.autograd.grad(v.norm(dim=-1).sum(), (W, u))
    ref_grads = torch.autograd.grad(v_ref.norm(dim=-1).sum(), (W, u))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("leaky", [False, True])
@pytest.mark.parametrize("children_last", [False, True])
def test_routing_as_written_equals_the_factored_layer(leaky, children_last):
    """ROUTING_IMPL reference (routing_as_written: u_hat built, then dynamic_routing) and the default
    factored_routing give the same v, c, logit changes and gradients (fp64), leaky or not."""
    g = torch.Generator().manual_seed(7)
    J, I, E, D, B = 10, 4 * 36, 16, 8, 3
    W = (0.3 * torch.randn(J, I, E, D, generator=g, dtype=torch.float64)).requires_grad_(True)
    u = cn.squash(torch.randn(B, I, D, generator=g, dtype=torch.float64)).requires_grad_(True)
    fast = cn.factored_routing(W, u, 3, True, children_last=children_last, leaky=leaky)
    reference = cn.routing_as_written(W, u, 3, True, leaky=leaky)
    for got, want in zip(fast, reference):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    probe = torch.randn(B, J, E, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((fast[0] * probe).sum() + fast[1].sum(), (W, u))
    ref_grads = torch.autograd.grad((reference[0] * probe).sum() + reference[1].sum(), (W, u))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("iterations", [1, 3])
def test_leaky_routing_sends_part_of_each_child_nowhere(iterations):
    """ROUTING_LEAKY: an extra parent with logit 0 in each child's softmax, dropped afterwards.
    The couplings to the real parents sum to less than 1 (1 - the leak's share), the first
    iteration's are 1/(J+1), and the outputs differ from plain routing's."""
    g = torch.Generator().manual_seed(5)
    J, I, E, D, B = 10, 4 * 36, 16, 8, 3
    W = 0.3 * torch.randn(J, I, E, D, generator=g, dtype=torch.float64)
    u = cn.squash(torch.randn(B, I, D, generator=g, dtype=torch.float64))
    u_hat = torch.einsum("jied,bid->bije", W, u)
    v, c = cn.dynamic_routing(u_hat, iterations, leaky=True)
    total = c.sum(-1)
    assert (total < 1 - 1e-6).all() and (total > 0).all()
    if iterations == 1:
        torch.testing.assert_close(c, torch.full_like(c, 1 / (J + 1)))
    # by hand: the couplings are exp(b_j) / (1 + sum_k exp(b_k)) of the same logits as plain routing's
    b = torch.randn(B, I, J, generator=g, dtype=torch.float64)
    torch.testing.assert_close(cn.parent_softmax(b, 2, leaky=True), b.exp() / (1 + b.exp().sum(2, keepdim=True)))
    v_plain, c_plain = cn.dynamic_routing(u_hat, iterations)
    torch.testing.assert_close(c_plain.sum(-1), torch.ones(B, I, dtype=torch.float64))
    assert not torch.allclose(v, v_plain)


@pytest.mark.parametrize("impl", ["factored", "reference"])
def test_the_model_runs_the_routing_it_is_built_with(impl, monkeypatch):
    """CapsuleNet(routing_impl=...) calls that routing: a change to dynamic_routing shows in the
    reference model's output only; both give the same output unchanged."""
    torch.manual_seed(0)
    kw = dict(conv1_channels=8, primary_caps=2, decoder_hidden=(16, 32))
    model = cn.CapsuleNet(model_config(routing_impl=impl, **kw)).eval()
    torch.manual_seed(0)
    other = cn.CapsuleNet(model_config(routing_impl="reference" if impl == "factored" else "factored", **kw)).eval()
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model.capsules(x)[0], other.capsules(x)[0], rtol=1e-5, atol=1e-6)
        monkeypatch.setattr(cn, "dynamic_routing", lambda u_hat, *a, **k: (u_hat.sum(1) * 0, u_hat[..., 0] * 0))
        changed = model.capsules(x)[0]
    assert (changed.abs().max() == 0) == (impl == "reference")


def test_the_model_routes_leakily_when_asked():
    """CapsuleNet(routing_leaky=True): the couplings of an image sum to less than 1 per child."""
    torch.manual_seed(0)
    model = cn.CapsuleNet(model_config(conv1_channels=8, primary_caps=2, decoder_hidden=(16, 32),
                                       routing_leaky=True)).eval()
    with torch.no_grad():
        _, c = model.capsules(torch.rand(2, 1, 28, 28))
    assert (c.sum(-1) < 1 - 1e-6).all()


@pytest.mark.parametrize("children_last", [False, True])
def test_bf16_products_keep_the_routing_to_bf16_precision(children_last):
    """ROUTING_BF16, factored_routing(product_dtype=torch.bfloat16): the three matrix products read
    bf16, the rest stays fp32. v, c, the logit changes and both gradients come out fp32, within
    bf16's precision of the exact routing (fp64), and more than 10x further from it than the fp32
    layer (so the products do run in bf16)."""
    g = torch.Generator().manual_seed(3)
    J, I, E, D, B = 10, 4 * 36, 16, 8, 4
    W64 = 0.1 * torch.randn(J, I, E, D, generator=g, dtype=torch.float64)
    u64 = cn.squash(torch.randn(B, I, D, generator=g, dtype=torch.float64))
    probe = torch.randn(B, J, E, generator=g, dtype=torch.float64)

    def run(dtype, product_dtype=None):
        W, u = W64.to(dtype).requires_grad_(), u64.to(dtype).requires_grad_()
        v, c, changes = cn.factored_routing(W, u, 3, True, children_last=children_last, product_dtype=product_dtype)
        grads = torch.autograd.grad((v * probe.to(dtype)).sum() + (c ** 2).sum(), (W, u))
        return v, c, changes, *grads

    exact, fp32, bf16 = run(torch.float64), run(torch.float32), run(torch.float32, torch.bfloat16)
    for name, want, a, b in zip(("v", "c", "logit changes", "dW", "du"), exact, fp32, bf16):
        assert b.dtype == torch.float32, name
        scale = want.abs().max()
        err32, err16 = ((a.double() - want).abs().max() / scale).item(), ((b.double() - want).abs().max() / scale).item()
        assert err16 < 3e-2 and err16 > 10 * err32, (name, err16, err32)


def test_the_model_routes_in_bf16_when_asked():
    """CapsuleNet(routing_bf16=True) runs factored_routing with bf16 products, eager and compiled (its
    layout for compiled code); its capsules stay fp32, near the fp32 model's with the same weights.
    With the routing as written (ROUTING_IMPL reference) it is a ValueError."""
    plain, low = small_model(), small_model(routing_bf16=True)
    low.load_state_dict(plain.state_dict())
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        (v, c), (v16, c16) = plain.capsules(x), low.capsules(x)
    assert v16.dtype == c16.dtype == torch.float32 and not torch.equal(v16, v)
    torch.testing.assert_close(v16, v, rtol=3e-2, atol=2e-3)
    torch.testing.assert_close(c16, c, rtol=3e-2, atol=2e-3)
    fast.use_compiled_routing(low)
    layer = fast.compiled_routing(low).eager
    assert layer.func is cn.factored_routing
    assert layer.keywords == {"product_dtype": torch.bfloat16, "children_last": True}
    fast.use_compiled_routing(plain)
    assert fast.compiled_routing(plain).eager.keywords == {"children_last": True}
    with pytest.raises(ValueError, match="ROUTING_BF16"):
        small_model(routing_impl="reference", routing_bf16=True)


def test_routing_bf16_flag_shows_in_the_model_line_and_stays_on_when_resumed(tiny_mnist, tmp_path):
    """--routing-bf16 trains, says so in the model line, is saved in the checkpoint and kept by
    --resume; with --routing-impl reference or Efficient-CapsNet it is one usage error."""
    run_dir = str(tmp_path / "run")
    done = run_main(train_args(tiny_mnist["root"], run_dir, "--routing-bf16", epochs=1))
    assert done.returncode == 0, describe(done)
    assert "routing products in bf16 (ROUTING_BF16)" in done.stdout
    assert load_pt(f"{run_dir}/last.pt")["config"]["ROUTING_BF16"] is True
    done = run_main(train_args(tiny_mnist["root"], run_dir, "--resume", f"{run_dir}/last.pt", epochs=2))
    assert done.returncode == 0 and "routing products in bf16" in done.stdout, describe(done)
    parser = cn.build_parser()
    for argv in (["--routing-bf16", "--routing-impl", "reference"], ["--routing-bf16", "--model", "efficient-capsnet"]):
        with pytest.raises(runtime.UsageError, match="--routing-bf16 is an option of the paper's CapsNet"):
            cn.configure(cn.flags_given(parser.parse_args(argv)))
    data = types.SimpleNamespace(name="mnist", describe=lambda: "", channels=1, image_size=28)
    assert "routing products" not in cn.model_line(small_model(), "cpu", "fp32", data)

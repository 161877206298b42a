"""squash (eq. 1): v = ||s||^2 / (1 + ||s||^2) * s / ||s||."""

import pytest
import torch

from conftest import cn


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [0.1, 0.5, 1.0, 3.0, 10.0, 100.0])
def test_length_is_squashed_norm(scale, dtype):
    """||squash(s)|| == ||s||^2 / (1 + ||s||^2) for vectors of many sizes."""
    g = torch.Generator().manual_seed(int(scale * 10))
    s = scale * torch.randn(6, 5, 8, generator=g, dtype=dtype)
    v = cn.squash(s)
    assert v.shape == s.shape and v.dtype == dtype
    n2 = (s * s).sum(-1)
    torch.testing.assert_close(v.norm(dim=-1), n2 / (1 + n2), rtol=1e-5, atol=0)
    assert (v.norm(dim=-1) < 1).all()


def test_direction_is_kept():
    """squash only rescales: cosine(s, squash(s)) == 1 and the scale factor is positive."""
    s = torch.randn(50, 16, dtype=torch.float64) * torch.logspace(-1, 2, 50, dtype=torch.float64)[:, None]
    v = cn.squash(s)
    cos = torch.nn.functional.cosine_similarity(s, v, dim=-1)
    torch.testing.assert_close(cos, torch.ones(50, dtype=torch.float64), rtol=0, atol=1e-12)


def test_zero_vector_value_and_gradient_are_finite():
    """At s = 0 the output is 0 and the gradient is finite (no 0/0 from the norm)."""
    s = torch.zeros(3, 8, requires_grad=True)
    v = cn.squash(s)
    assert torch.equal(v, torch.zeros(3, 8))
    (v.sum() + (v * v).sum()).backward()
    assert torch.isfinite(s.grad).all()


def test_batch_with_one_zero_vector():
    """One zero capsule in a batch neither becomes NaN nor poisons the others' values or gradients."""
    s = torch.randn(4, 8, dtype=torch.float64)
    s[2] = 0
    s.requires_grad_(True)
    v = cn.squash(s)
    assert torch.isfinite(v).all()
    assert torch.equal(v[2], torch.zeros(8, dtype=torch.float64))
    n2 = (s.detach() ** 2).sum(-1)
    keep = [0, 1, 3]
    torch.testing.assert_close(v.detach().norm(dim=-1)[keep], (n2 / (1 + n2))[keep], rtol=1e-6, atol=0)
    v.norm(dim=-1).sum().backward()  # lengths are what the loss uses
    assert torch.isfinite(s.grad).all()
    assert s.grad[keep].abs().sum() > 0


def test_dim_argument():
    """squash(s, dim=d) squashes along d: the same as moving d last, squashing, moving it back."""
    s = torch.randn(8, 5, 3, dtype=torch.float64)
    v0 = cn.squash(s, dim=0)
    expected = cn.squash(s.permute(1, 2, 0), dim=-1).permute(2, 0, 1)
    torch.testing.assert_close(v0, expected)
    n2 = (s * s).sum(0)
    torch.testing.assert_close(v0.norm(dim=0), n2 / (1 + n2), rtol=1e-6, atol=0)
    # and it is not what squashing along the last dimension gives
    assert not torch.allclose(v0, cn.squash(s, dim=-1))

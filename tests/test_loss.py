"""CapsuleLoss: margin loss (eq. 4) summed over classes + 0.0005 x summed squared error, batch mean."""

import torch

from conftest import cn

LENGTHS = [[0.95, 0.30, 0.05],
           [0.20, 0.50, 0.70]]
LABELS = [0, 2]
IMAGES = [[[0.0, 1.0], [0.5, 0.25]],
          [[1.0, 1.0], [0.0, 0.0]]]
RECONS = [[[0.1, 0.8], [0.5, 0.0]],
          [[0.5, 1.0], [0.0, 0.2]]]


def as_tensors():
    return (torch.tensor(IMAGES).unsqueeze(1), torch.tensor(LABELS), torch.tensor(LENGTHS),
            torch.tensor(RECONS).unsqueeze(1))


def test_hand_computed_example_with_paper_constants():
    """m+ = 0.9, m- = 0.1, lambda = 0.5, recon weight 0.0005, mean over the batch."""
    # example 0, label 0: present 0.95 >= 0.9 -> 0; absent 0.30 -> 0.5*0.2^2; absent 0.05 < 0.1 -> 0
    margin0 = 0.0 + 0.5 * (0.30 - 0.1) ** 2 + 0.0
    # example 1, label 2: absent 0.20 -> 0.5*0.1^2; absent 0.50 -> 0.5*0.4^2; present 0.70 -> 0.2^2
    margin1 = 0.5 * (0.20 - 0.1) ** 2 + 0.5 * (0.50 - 0.1) ** 2 + (0.9 - 0.70) ** 2
    sse0 = 0.1 ** 2 + 0.2 ** 2 + 0.0 ** 2 + 0.25 ** 2
    sse1 = 0.5 ** 2 + 0.0 ** 2 + 0.0 ** 2 + 0.2 ** 2
    expected = ((margin0 + 0.0005 * sse0) + (margin1 + 0.0005 * sse1)) / 2
    loss = cn.CapsuleLoss()(*as_tensors())
    assert loss.dim() == 0
    assert abs(loss.item() - expected) < 1e-7, (loss.item(), expected)


def test_hand_computed_example_with_other_constants():
    """The constructor's m+, m-, lambda and recon weight are the ones used."""
    m_plus, m_minus, lam, w = 0.8, 0.2, 1.0, 0.1
    margin0 = 0.0 + lam * (0.30 - m_minus) ** 2 + 0.0
    margin1 = 0.0 + lam * (0.50 - m_minus) ** 2 + (m_plus - 0.70) ** 2
    sse0 = 0.1 ** 2 + 0.2 ** 2 + 0.25 ** 2
    sse1 = 0.5 ** 2 + 0.2 ** 2
    expected = ((margin0 + w * sse0) + (margin1 + w * sse1)) / 2
    loss = cn.CapsuleLoss(m_plus, m_minus, lam, w)(*as_tensors())
    assert abs(loss.item() - expected) < 1e-6, (loss.item(), expected)


def test_build_loss_reads_the_constants():
    """build_loss(cfg) passes M_PLUS, M_MINUS, LAMBDA_ABSENT and RECON_WEIGHT through."""
    cfg = dict(cn.default_config(), M_PLUS=0.8, M_MINUS=0.2, LAMBDA_ABSENT=1.0, RECON_WEIGHT=0.1)
    direct = cn.CapsuleLoss(0.8, 0.2, 1.0, 0.1)(*as_tensors())
    assert torch.equal(cn.build_loss(cfg)(*as_tensors()), direct)
    defaults = cn.build_loss(cn.default_config())
    assert (defaults.m_plus, defaults.m_minus, defaults.lambda_absent, defaults.recon_weight) == \
        (0.9, 0.1, 0.5, 0.0005)


def test_batch_mean_and_ten_classes():
    """With 10 classes the margin sums over classes; repeating the batch leaves the mean unchanged."""
    lengths = torch.full((1, 10), 0.05)
    lengths[0, 4] = 0.6
    lengths[0, 7] = 0.35
    images = torch.zeros(1, 1, 28, 28)
    recon = torch.zeros(1, 1, 28, 28)
    recon[0, 0, 3, 4] = 0.5
    expected = (0.9 - 0.6) ** 2 + 0.5 * (0.35 - 0.1) ** 2 + 0.0005 * 0.5 ** 2
    loss_fn = cn.CapsuleLoss()
    one = loss_fn(images, torch.tensor([4]), lengths, recon)
    assert abs(one.item() - expected) < 1e-7
    many = loss_fn(images.repeat(5, 1, 1, 1), torch.tensor([4] * 5), lengths.repeat(5, 1), recon.repeat(5, 1, 1, 1))
    assert abs(many.item() - expected) < 1e-7


def test_bf16_inputs_are_computed_in_fp32():
    """Lengths and reconstructions from bf16 autocast are upcast: the loss is fp32."""
    images, labels, lengths, recon = as_tensors()
    loss = cn.CapsuleLoss()(images, labels, lengths.bfloat16(), recon.bfloat16())
    assert loss.dtype == torch.float32
    ref = cn.CapsuleLoss()(images, labels, lengths.bfloat16().float(), recon.bfloat16().float())
    assert torch.equal(loss, ref)

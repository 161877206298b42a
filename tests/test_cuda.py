"""CUDA: forward/backward, a BatchLoss training step and the visualisations on the GPU."""

import pytest
import torch

from conftest import cn, small_model
from capsnet import figures, runtime  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_cuda
def test_cuda_forward_backward_and_train_step(digit_batch):
    """On CUDA (bf16 autocast where supported, channels_last): forward shapes, finite loss,
    gradients for every parameter and an Adam step that changes the weights."""
    device = torch.device("cuda")
    cfg = cn.default_config()
    model = cn.model_to_device(small_model(), cfg, device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    dtype = runtime.amp_dtype(device, True)
    stepper = cn.BatchLoss(model, cn.CapsuleLoss(), device, dtype, 2, True)
    x, labels = digit_batch
    images_u8 = (x[:, 0] * 255).round().to(torch.uint8).to(device)
    labels = labels.to(device)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.zero_grad()
    loss, lengths = stepper((images_u8, labels))
    assert lengths.shape == (8, 10) and lengths.device.type == "cuda"
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    optimizer.step()
    assert any(not torch.equal(before[n], p.detach()) for n, p in model.named_parameters())
    model.eval()
    with torch.no_grad():
        eval_loss, eval_lengths = stepper((images_u8, labels))
    assert torch.isfinite(eval_loss) and ((eval_lengths >= 0) & (eval_lengths < 1)).all()


@needs_cuda
def test_cuda_visualisations(digit_batch):
    """perturbation_grid, class_mask_grid and coupling_maps work on CUDA tensors."""
    model = small_model(w_init_std=1.0).cuda()
    x = digit_batch[0].cuda()
    assert figures.perturbation_grid(model, x).shape == (8, 16, 11, 1, 28, 28)
    assert figures.class_mask_grid(model, x).shape == (8, 10, 1, 28, 28)
    maps = figures.coupling_maps(model, x[:1])
    torch.testing.assert_close(maps.sum(0), torch.ones(4, 6, 6, device="cuda"))

"""Reconstructions from the primary capsules (capsnet/primary.py): what the decoder reads, that it
learns, and what each row of the figure decodes."""

import torch

from conftest import small_model
from capsnet import primary


def test_the_decoder_reads_each_primary_capsule_times_its_coupling_to_the_predicted_class(digit_batch):
    """x_i = c_ij* u_i, with u the squashed primary capsules and c the couplings of the last routing
    iteration, computed here from the model's own parts."""
    model = small_model(w_init_std=0.5)
    images, _ = digit_batch
    x, coupling, predicted = primary.scaled_capsules(model, images)
    with torch.no_grad():
        u = model.primary_capsules(images)
        v, c = model.capsules(images)
    assert torch.equal(predicted, v.norm(dim=-1).argmax(1))
    want = torch.stack([u[n] * c[n, :, predicted[n]].unsqueeze(-1) for n in range(len(images))])
    torch.testing.assert_close(x, want)
    torch.testing.assert_close(coupling, torch.stack([c[n, :, predicted[n]] for n in range(len(images))]))
    assert x.shape == (len(images), model.num_primary, 8)


def test_the_decoder_learns_and_each_row_decodes_one_capsule_alone(digit_batch, monkeypatch):
    """Training lowers the summed squared error; in the figure, the decoder's inputs are all the
    scaled capsules, then the row's capsule alone at SCALES x its scaled value, every other capsule 0,
    for the capsules of the largest |c_ij* u_i|."""
    model = small_model(w_init_std=0.5)
    images, _ = digit_batch
    decoder, errors = primary.train_decoder(model, images.repeat(4, 1, 1, 1), epochs=6, batch=8)
    assert len(errors) == 6 and errors[-1] < 0.7 * errors[0]
    seen = []
    decoder.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].detach()))
    tiles, chosen = primary.figure(model, decoder, images[:2], rows=3)
    assert tiles.shape == (2 * 3, 2 + len(primary.SCALES), 1, 28, 28)
    x, coupling, _ = primary.scaled_capsules(model, images[:2])
    torch.testing.assert_close(seen[0], x.flatten(1))
    strongest = x[1].norm(dim=-1).topk(3).indices.tolist()
    last = seen[-1].view(len(primary.SCALES), model.num_primary, 8)  # image 1's third row
    i = strongest[2]
    for k, scale in enumerate(primary.SCALES):
        torch.testing.assert_close(last[k, i], x[1, i] * scale)
        assert last[k].abs().sum() == last[k, i].abs().sum()  # nothing else
    grid = model.grid
    assert chosen[1]["capsules"][2] == (i // (grid * grid), i // grid % grid, i % grid, round(float(coupling[1, i]), 4))
    assert torch.equal(tiles[:, 0], images[:2].repeat_interleave(3, 0))

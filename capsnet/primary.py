"""Reconstructions from the primary capsules of a trained CapsuleNet, the figure ethanleet/CapsNet's
README shows (its code does not): a small decoder learns, on the frozen network, to redraw an image
from its primary capsules, each scaled by its routing coefficient to the predicted class; then each
row of the figure decodes one primary capsule alone, its coefficient rising from left to right.

What the decoder reads: x_i = c_ij* u_i for every primary capsule i (u_i its 8 squashed values,
c_ij* its coupling to the predicted class j* after the last routing iteration), flattened, I x 8
numbers (9,216 for MNIST) - what the predicted class capsule receives from each child, before W_ij.
It is the paper's decoder in shape (512 and 1024 ReLU units, a sigmoid layer of pixels), trained with
the summed squared error (the paper's reconstruction loss) by Adam. Training also drops a random
share of the capsules from each input (keeping each with a probability drawn per image from
KEEP_RANGE), so that the decoder learns to draw from a few capsules as well as from all of them:
without it, one capsule alone is far from anything it was trained on.
"""

import json
import os
import sys

import torch
import torch.nn as nn

from capsnet.data import load_split, standardize, to_float_images

TRAIN_IMAGES = 10000  # the first training images the decoder learns from
EPOCHS = 5  # passes over them, batch BATCH
BATCH = 100
LR = 1e-3
KEEP_RANGE = (0.01, 1.0)  # a training input keeps each capsule with a probability drawn uniformly from this
ROWS = 6  # capsules shown per test image: those with the largest |c_ij* u_i|
SCALES = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)  # the coefficient of a row's capsule, x c_ij*, left to right


def scaled_capsules(model, images):
    """images (B, C, H, W) in [0, 1] -> (x (B, I, D): each primary capsule times its coupling to the
    predicted class, those couplings (B, I), the predicted classes (B,)), without gradients."""
    with torch.no_grad():
        u = model.primary_capsules(standardize(images) if model.config.standardize else images)  # (B, I, D)
        v, c = model.capsules(images)  # c (B, I, J)
        predicted = v.norm(dim=-1).argmax(1)
        coupling = c.gather(2, predicted.view(-1, 1, 1).expand(-1, c.shape[1], 1))  # (B, I, 1)
    return u * coupling, coupling.squeeze(-1), predicted


def make_decoder(inputs, pixels):
    return nn.Sequential(nn.Linear(inputs, 512), nn.ReLU(inplace=True), nn.Linear(512, 1024), nn.ReLU(inplace=True),
                         nn.Linear(1024, pixels), nn.Sigmoid())


def train_decoder(model, images, epochs=EPOCHS, batch=BATCH, seed=0):
    """A decoder from the frozen `model`'s scaled primary capsules to `images` (N, C, H, W) in [0, 1]
    -> (decoder, the mean summed squared error of each epoch)."""
    model.eval()
    device = images.device
    x = torch.cat([scaled_capsules(model, images[k:k + batch])[0] for k in range(0, len(images), batch)])
    x = x.flatten(1)  # (N, I * D)
    targets = images.flatten(1)
    g = torch.Generator(device=device).manual_seed(seed)
    decoder = make_decoder(x.shape[1], targets.shape[1]).to(device)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=LR)
    capsules, dim = model.num_primary, model.primary_dim
    low, high = KEEP_RANGE
    errors = []
    for _ in range(epochs):
        order, total = torch.randperm(len(x), generator=g, device=device), 0.0
        for k in range(0, len(x), batch):
            rows = order[k:k + batch]
            keep = low + (high - low) * torch.rand(len(rows), 1, generator=g, device=device)
            mask = (torch.rand(len(rows), capsules, generator=g, device=device) < keep).repeat_interleave(dim, 1)
            error = ((decoder(x[rows] * mask) - targets[rows]) ** 2).sum(1)
            optimizer.zero_grad()
            error.mean().backward()
            optimizer.step()
            total += float(error.detach().sum())
        errors.append(total / len(x))
    return decoder.eval(), errors


def figure(model, decoder, images, rows=ROWS, scales=SCALES):
    """For each test image (N, C, H, W) in [0, 1]: `rows` rows, one per primary capsule of the
    largest |c_ij* u_i|; in each, the input, the reconstruction from all capsules, then the capsule
    alone at `scales` x its coupling. -> (tiles (N * rows, 2 + len(scales), C, H, W), and for each
    image its predicted class and the chosen capsules' (type, row, column, coupling))."""
    x, coupling, predicted = scaled_capsules(model, images)  # (N, I, D), (N, I)
    strength = x.norm(dim=-1)  # (N, I): |c_ij* u_i|
    C, H, W = images.shape[1:]
    tiles, chosen = [], []
    grid = model.grid
    with torch.no_grad():
        everything = decoder(x.flatten(1)).view(-1, C, H, W)
        for n in range(len(images)):
            strongest = strength[n].topk(rows).indices
            picked = []
            for i in strongest.tolist():
                alone = torch.zeros(len(scales), *x.shape[1:], device=x.device)
                alone[:, i] = x[n, i] * torch.tensor(scales, device=x.device).view(-1, 1)
                drawn = decoder(alone.flatten(1)).view(-1, C, H, W)
                tiles.append(torch.cat([images[n:n + 1], everything[n:n + 1], drawn]))
                picked.append((i // (grid * grid), i // grid % grid, i % grid, round(float(coupling[n, i]), 4)))
            chosen.append({"class": int(predicted[n]), "capsules": picked})
    return torch.stack(tiles), chosen


def write_primary_figure(model, data, cfg, out, images=3):
    """--visualize's primary-capsule figure for a trained capsule model on single-object data: the
    decoder trained on the first TRAIN_IMAGES training images (central crops), then `images` test
    images, one of each of the first classes -> the paths written: primary_capsules.png (rows:
    capsules; columns: the input, all capsules, the capsule alone at SCALES x its coupling) and
    primary_capsules.json (each row's capsule: type, grid row and column, coupling; the decoder's
    error per epoch). Shown in Visdom too when a server answers."""
    from torchvision.utils import make_grid, save_image

    from capsnet.figures import for_display, one_per_class

    device = next(model.parameters()).device
    train_images = load_split(dict(cfg, TRAIN_SIZE=min(cfg["TRAIN_SIZE"] or TRAIN_IMAGES, TRAIN_IMAGES)), True)[0]
    train_images = to_float_images(train_images.to(device), cfg["CROP_SIZE"])
    print(f"primary capsules: training a decoder on {len(train_images):,} training images ({EPOCHS} epochs)",
          flush=True)
    decoder, errors = train_decoder(model, train_images)
    test_images, test_labels = data.test.first_rows(data.test.rows)
    chosen_u8, _ = one_per_class(test_images, test_labels, cfg["NUM_CLASSES"])
    tiles, chosen = figure(model, decoder, to_float_images(chosen_u8[:images], cfg["CROP_SIZE"]))
    grid = make_grid(for_display(tiles.flatten(0, 1)).cpu(), nrow=tiles.shape[1], padding=2, pad_value=0.5)
    os.makedirs(out, exist_ok=True)
    paths = [os.path.join(out, "primary_capsules.png"), os.path.join(out, "primary_capsules.json")]
    save_image(grid, paths[0])
    with open(paths[1], "w", encoding="utf-8") as f:
        json.dump({"what": "per row: the input, the reconstruction from every primary capsule x its coupling to the "
                           "predicted class, then one capsule alone at these multiples of its coupling",
                   "scales": list(SCALES), "train_images": len(train_images), "epochs": EPOCHS,
                   "decoder_error_per_epoch": [round(e, 3) for e in errors], "images": chosen}, f, indent=1)
    show_in_visdom(grid, cfg)
    return paths


def show_in_visdom(grid, cfg):
    """The figure in the run's Visdom environment, if VISDOM is on and a server answers."""
    from capsnet.visdom_plots import visdom_reachable

    if not cfg["VISDOM"] or not visdom_reachable(cfg["VISDOM_SERVER"], cfg["VISDOM_PORT"]):
        return
    try:
        import visdom

        vis = visdom.Visdom(server=f"http://{cfg['VISDOM_SERVER']}", port=cfg["VISDOM_PORT"], env=cfg["VISDOM_ENV"],
                            raise_exceptions=True, use_incoming_socket=False)
        vis.image(grid.numpy(), win=f"{cfg['VISDOM_ENV']}_primary_capsules",
                  opts={"title": "primary capsules: each row one capsule alone, its coupling rising to the right"})
    except Exception as e:  # Visdom is an extra here: the PNG is written
        print(f"warning: the primary-capsule figure did not reach Visdom ({type(e).__name__})", file=sys.stderr)


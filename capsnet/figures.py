"""Figures from a trained model: Fig. 4 (perturbed capsule dimensions), reconstructions under
every class mask, routing couplings, Fig. 5 (MultiMNIST), the PNG charts of a run's metrics,
and --predict's output."""

import importlib.util
import json
import os
import sys

import torch
import torch.nn.functional as F

from capsnet.data import to_float_images
from capsnet.efficient import rotate
from capsnet.meters import matched_predictions
from capsnet.runtime import autocast, read_metrics


@torch.no_grad()
def perturbation_grid(model, images, steps=11, span=0.25):
    """Fig. 4: for each image, every dimension of its winning digit capsule set to v_d + delta,
    delta in [-span, span] (11 steps of 0.05), decoded. images (N, 1, 28, 28) -> (N, E, steps, 1, 28, 28)."""
    v, _ = model.capsules(images)  # (N, J, E)
    N, J, E = v.shape
    winner = (v * v).sum(-1).argmax(1)  # (N,)
    deltas = torch.linspace(-span, span, steps, device=v.device)  # (S,)
    vv = v[:, None, None].expand(N, E, steps, J, E).clone()  # (N, E, S, J, E)
    dims = torch.arange(E, device=v.device)
    vv[torch.arange(N)[:, None, None], dims[None, :, None], torch.arange(steps)[None, None, :],
       winner[:, None, None], dims[None, :, None]] += deltas  # add delta to dim d of the winner
    classes = winner[:, None, None].expand(N, E, steps).reshape(-1)
    out = model.decode(vv.reshape(-1, J, E), classes)  # (N*E*S, 1, 28, 28)
    return out.reshape(N, E, steps, *out.shape[1:])


@torch.no_grad()
def class_mask_grid(model, images):
    """Reconstruction of every image from the capsule of every class: (N, 1, 28, 28) -> (N, J, 1, 28, 28)."""
    v, _ = model.capsules(images)  # (N, J, E)
    N, J, _ = v.shape
    classes = torch.arange(J, device=v.device).repeat(N)  # (N*J,)
    out = model.decode(v.repeat_interleave(J, dim=0), classes)
    return out.reshape(N, J, *out.shape[1:])


@torch.no_grad()
def coupling_maps(model, image):
    """Couplings c_ij of one image, (1, 1, 28, 28) -> (J, T=32, 6, 6); they sum to 1 over J."""
    _, c = model.capsules(image)  # (1, I, J), I ordered (type, row, col)
    J = c.shape[2]
    return c[0].t().reshape(J, model.primary_caps, model.grid, model.grid)


def one_per_class(images, labels, num_classes):
    """The first image of every class present (in class order): (K, 28, 28) uint8, (K,)."""
    picks = [int((labels == k).nonzero()[0]) for k in range(num_classes) if (labels == k).any()]
    picks = torch.tensor(picks, dtype=torch.long, device=labels.device)
    return images[picks], labels[picks]


def for_display(images):
    """Images (..., C, H, W) as make_grid shows them: one or three channels (of a stereo pair, the
    first camera's image)."""
    return images[..., :1, :, :] if images.shape[-3] == 2 else images


def visual_figures(model, images_u8, labels, num_classes, crop=0, most=10):
    """All capsule figures as CHW float images in [0, 1] (CPU), for PNG files and Visdom: for the
    first test image of each of the first `most` classes (test images centre-cropped by `crop`)."""
    from torchvision.utils import make_grid

    was_training = model.training
    model.eval()
    digits, _ = one_per_class(images_u8, labels, num_classes)
    x = to_float_images(digits[:most], crop)
    pert = for_display(perturbation_grid(model, x))  # (K, E, S, C, H, W)
    per_digit = [make_grid(p.flatten(0, 1).float().cpu(), nrow=p.shape[1], padding=1, pad_value=0.5)
                 for p in pert]
    masks = for_display(class_mask_grid(model, x))  # (K, J, C, H, W)
    maps = coupling_maps(model, x[:1]).float().cpu()  # (J, T, 6, 6)
    scaled = (maps - maps.min()) / (maps.max() - maps.min()).clamp_min(1e-12)  # smallest black, largest white
    scale = max(4, 24 // maps.shape[-1])  # a 6x6 grid 4x; a 1x1 one (Efficient-CapsNet) 24x
    panels = [make_grid(F.interpolate(m.unsqueeze(1), scale_factor=scale, mode="nearest"), nrow=8, padding=1,
                        pad_value=0.3) for m in scaled]
    model.train(was_training)
    return {
        "fig4_per_digit": per_digit,
        "fig4": make_grid(torch.stack(per_digit), nrow=5, padding=6, pad_value=1.0),
        "class_masks": make_grid(torch.cat([for_display(x).cpu().unsqueeze(1), masks.float().cpu()], 1).flatten(0, 1),
                                 nrow=masks.shape[1] + 1, padding=2, pad_value=0.5),
        "couplings": make_grid(torch.stack(panels), nrow=5, padding=6, pad_value=1.0),
        "coupling_maps": maps,
    }


@torch.no_grad()
def fig5_tiles(model, composites_u8, pair_labels):
    """Fig. 5 (sec. 6) for two-digit images: composites uint8 (N, H, W), labels (N, 2) -> dict of
    'inputs', 'recon' and 'forced' (N, 3, H, W) RGB in [0, 1] (CPU), 'labels' and 'predicted' (N, 2),
    'absent' (N,) and 'grid' (all tiles, one column per image). recon overlays the decoder's output
    from the two longest capsules, matched to the labels: red for the first label's digit, green
    for the second's. forced is the paper's "*" column: red from the first label's capsule, green
    from the longest capsule of a class that is neither a label nor predicted."""
    from torchvision.utils import make_grid

    was_training = model.training
    model.eval()
    images = to_float_images(composites_u8)
    v, _ = model.capsules(images)  # (N, J, E)
    lengths = (v * v).sum(-1)
    predicted, _ = matched_predictions(lengths, pair_labels)
    taken = F.one_hot(torch.cat([pair_labels, predicted], 1), v.shape[1]).sum(1) > 0  # (N, J)
    absent = lengths.masked_fill(taken, -1.0).argmax(1)  # (N,)

    def overlay(red, green):
        rg = torch.cat([model.decode(v, red), model.decode(v, green)], 1).float()  # (N, 2, H, W)
        return torch.cat([rg, torch.zeros_like(rg[:, :1])], 1).cpu()  # (N, 3, H, W)

    tiles = {"inputs": images.repeat(1, 3, 1, 1).cpu(), "recon": overlay(predicted[:, 0], predicted[:, 1]),
             "forced": overlay(pair_labels[:, 0], absent)}
    model.train(was_training)
    grid = make_grid(torch.cat([tiles["inputs"], tiles["recon"], tiles["forced"]]), nrow=len(images), padding=2,
                     pad_value=0.5)
    return dict(tiles, grid=grid, labels=pair_labels.cpu(), predicted=predicted.cpu(), absent=absent.cpu())


def fig5_caption(tiles):
    """The paper's L:(labels) R:(reconstructed) pairs of fig5_tiles(), column by column."""
    return "  ".join(f"L:({a},{b}) R:({c},{d})" for (a, b), (c, d) in
                     zip(tiles["labels"].tolist(), tiles["predicted"].tolist()))


def plot_fig5_png(tiles, path):
    """fig5_tiles() as a labelled picture (matplotlib): per image, L:(labels) above the input,
    R:(predicted) above the red/green reconstruction, R:(label, *absent) above the forced one."""
    from matplotlib.figure import Figure

    n = len(tiles["labels"])
    fig = Figure(figsize=(1.1 * n + 0.4, 4.0), dpi=120, layout="constrained")
    axes = fig.subplots(3, n, squeeze=False)
    for k in range(n):
        (a, b), (c, d) = tiles["labels"][k].tolist(), tiles["predicted"][k].tolist()
        titles = (f"L:({a},{b})", f"R:({c},{d})", f"R:({a},*{int(tiles['absent'][k])})")
        for row, (name, title) in enumerate(zip(("inputs", "recon", "forced"), titles)):
            ax = axes[row, k]
            ax.imshow(tiles[name][k].permute(1, 2, 0).numpy(), interpolation="nearest")
            wrong = row == 1 and (c, d) != (a, b)
            ax.set_title(title, fontsize=8, color="tab:red" if wrong else "black")
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("Fig. 5: input (top); reconstructions from the two longest capsules, red = first label's digit, "
                 "green = second's (middle); * = from a class not in the image (bottom)", fontsize=8)
    fig.savefig(path)


def plot_curves_png(rows, path):
    """Test accuracy (top) and train/test loss (bottom, log scale) per epoch from metrics.jsonl rows,
    drawn with matplotlib (no display needed)."""
    curves_figure([("", rows)]).savefig(path)


def plot_runs_png(runs, path):
    """Several runs' curves in one picture: runs [(label, metrics rows), ...], one colour each."""
    curves_figure(runs).savefig(path)


def curves_figure(runs):
    """The matplotlib Figure of plot_curves_png (one run, titled with its final epoch) or of
    plot_runs_png (several; the legend gives each one's final epoch). Runs may use different loss
    formulas (the authors' half-mean margin loss, eq. 4's sum): each is drawn in its own units."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    fig = Figure(figsize=(8, 6) if len(runs) == 1 else (9, 7), dpi=120, layout="constrained")
    accuracy, loss = fig.subplots(2, 1, sharex=True)
    for k, (label, rows) in enumerate(runs):
        epochs, last = [r["epoch"] for r in rows], rows[-1]
        if len(runs) == 1:
            colors, names = {"test": "tab:red", "train": "tab:blue"}, {"test": "test", "train": "train"}
            accuracy.set_title(f"final epoch {epochs[-1]}: {last['test_accuracy']:.2f}% test accuracy, "
                               f"test loss {last['test_loss']:.4f}")
        else:
            colors = {"test": f"C{k}", "train": f"C{k}"}
            names = {"test": f"{label}: test, final {last['test_loss']:.4f}", "train": f"{label}: train"}
        accuracy.plot(epochs, [r["test_accuracy"] for r in rows], "o-", ms=3, color=colors["test"],
                      label="test" if len(runs) == 1 else f"{label}: final epoch {last['test_accuracy']:.2f}%")
        loss.plot(epochs, [r["test_loss"] for r in rows], "o-", ms=3, color=colors["test"], label=names["test"])
        loss.plot(epochs, [r["train_loss"] for r in rows], "o-" if len(runs) == 1 else "--", ms=3,
                  color=colors["train"], alpha=1 if len(runs) == 1 else 0.6, label=names["train"])
    accuracy.set_ylabel("test accuracy (%)")
    if len(runs) > 1:  # several good runs: the last points differ by hundredths of a percent
        accuracy.set_ylim(bottom=max(accuracy.get_ylim()[0], 98.0))
    loss.set_yscale("log")
    loss.yaxis.set_major_locator(LogLocator(subs=(1, 2, 3, 5)))  # round values: 0.01, 0.02, 0.03, 0.05, 0.1
    loss.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    loss.yaxis.set_minor_formatter(NullFormatter())
    loss.set_ylabel("loss (margin + 0.0005 x SSE)" if len(runs) == 1 else "loss (each run's own formula)")
    loss.set_xlabel("epoch")
    loss.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (accuracy, loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=None if len(runs) == 1 else 8)
    return fig


def plot_routing_png(rows, path):
    """Appendix A: mean |change of b_ij| per routing iteration, per epoch (matplotlib)."""
    rows = [r for r in rows if r.get("routing_logit_change")]
    if not rows:
        return False
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 4), dpi=120, layout="constrained")
    ax = fig.subplots()
    epochs = [r["epoch"] for r in rows]
    for it in range(len(rows[0]["routing_logit_change"])):
        ax.plot(epochs, [r["routing_logit_change"][it] for r in rows], "o-", ms=3, label=f"iteration {it + 1}")
    ax.set_title("mean |change of the routing logits b_ij| per iteration (Appendix A)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean |change of b_ij|")
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path)
    return True


def epoch_views(model, data, cfg, device, dtype):
    """What Visdom shows of the model after an epoch -> (grid, figures, caption): the first
    RECON_IMAGES test images above their reconstructions and, if VISUALIZE_EVERY_EPOCH, the capsule
    figures (visual_figures); for two-digit images, Fig. 5 and its caption instead."""
    from torchvision.utils import make_grid

    n = min(cfg["RECON_IMAGES"], data.test.rows)
    if not hasattr(model, "capsules"):  # a CNN baseline (capsnet/baseline.py): the test images alone
        images = to_float_images(data.test.first_rows(n)[0], cfg["CROP_SIZE"])
        return make_grid(for_display(images).cpu(), nrow=n, padding=2, pad_value=0.5), None, None
    if data.objects != 1:
        tiles = fig5_tiles(model, *data.test.first_rows(n)[:2])
        return tiles["grid"], None, fig5_caption(tiles)
    test_images, test_labels = data.test.first_rows(data.test.rows)
    with torch.no_grad(), autocast(device, dtype):
        images = to_float_images(test_images[:n], cfg["CROP_SIZE"])
        _, recon = model(images)
    grid = make_grid(for_display(torch.cat([images, recon.float()])).cpu(), nrow=n, padding=2, pad_value=0.5)
    figures = None
    if cfg["VISUALIZE_EVERY_EPOCH"]:
        figures = visual_figures(model, test_images, test_labels, cfg["NUM_CLASSES"], cfg["CROP_SIZE"])
        if importlib.util.find_spec("matplotlib") is not None:  # the rotation sweep, drawn as for rotation.png
            names = cfg["CLASS_NAMES"] or list(range(cfg["NUM_CLASSES"]))
            figures["rotation"] = rotation_image(*class_rotation(model, test_images, test_labels, names,
                                                                 cfg["CROP_SIZE"]), names)
    return grid, figures, None


@torch.no_grad()
def rotation_sweep(model, images, step=10):
    """ethanleet/CapsNet's rotation sweep: each image (K, C, H, W) in [0, 1] turned about its centre
    by 0, step, ..., 360 - step degrees (bilinear, black outside) and passed through the model ->
    (angles (A,), lengths (K, A, J), rotated images and their reconstructions from the longest
    capsule, both (K, A, C, H, W)). It shows what a network trained on upright digits makes of
    turned ones."""
    was_training = model.training
    model.eval()
    K, C, H, W = images.shape
    angles = torch.arange(0, 360, step, dtype=torch.float32)
    A = len(angles)  # the resampler of Efficient-CapsNet's rotation augmentation, every image at every angle
    rotated = rotate(images.repeat_interleave(A, 0), angles.to(images.device).repeat(K)).reshape(K, A, C, H, W)
    lengths, recon = model(rotated.flatten(0, 1))
    model.train(was_training)
    return angles, lengths.float().reshape(K, len(angles), -1), rotated, recon.float().reshape(rotated.shape)


def plot_rotation_png(sweep, labels, class_names, path):
    """rotation_sweep's result as a PNG: for each image, every class capsule's length against the
    angle (its own class drawn thick), and beneath it the strip of reconstructions."""
    rotation_figure(sweep, labels, class_names).savefig(path)


def rotation_image(sweep, labels, class_names):
    """rotation_figure as a CHW float image in [0, 1] (for Visdom)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(rotation_figure(sweep, labels, class_names, dpi=60))
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3]  # (H, W, 3) uint8
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255


def rotation_figure(sweep, labels, class_names, dpi=100):
    from matplotlib.figure import Figure

    angles, lengths, _, recon = sweep
    K, J = lengths.shape[0], lengths.shape[2]
    fig = Figure(figsize=(12, 2.8 * K), dpi=dpi, layout="constrained")
    axes = fig.subplots(2 * K, 1, gridspec_kw={"height_ratios": [3, 1] * K})
    colours = [f"C{j % 10}" for j in range(J)]
    for k in range(K):
        plot, strip = axes[2 * k], axes[2 * k + 1]
        for j in range(J):
            plot.plot(angles, lengths[k, :, j], color=colours[j], lw=2.5 if j == labels[k] else 0.8,
                      label=str(class_names[j]))
        plot.set_xlim(-5, 355)
        plot.set_ylim(0, 1)
        plot.set_ylabel("capsule length")
        plot.set_title(f"a test {class_names[labels[k]]} turned in steps of {int(angles[1] - angles[0])} degrees")
        plot.grid(alpha=0.3)
        if k == 0:
            plot.legend(ncol=min(J, 10), fontsize=7, loc="upper right")
        row = for_display(recon[k]).cpu()  # (A, C, H, W)
        row = torch.cat(list(row), dim=-1)  # (C, H, A * W)
        strip.imshow(row.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray" if row.shape[0] == 1 else None,
                     vmin=0, vmax=1, aspect="equal")
        strip.set_axis_off()
    axes[-2].set_xlabel("angle (degrees)")
    return fig


def class_rotation(model, images_u8, labels, class_names, crop, most=10):
    """rotation_sweep of the first test image of each of the first `most` classes -> (the sweep,
    those images' labels): what rotation.png and the Visdom window draw."""
    digits, picked = one_per_class(images_u8, labels, len(class_names))
    return rotation_sweep(model, to_float_images(digits[:most], crop)), picked[:most].tolist()


def rotation_png(model, images_u8, labels, class_names, crop, path):
    """class_rotation drawn as a PNG."""
    plot_rotation_png(*class_rotation(model, images_u8, labels, class_names, crop), class_names, path)


def write_figures(model, data, cfg, out):
    """--visualize's PNG files in `out` -> their paths: Fig. 4 per class, class masks, couplings and
    the rotation sweep (one-object data), or Fig. 5 (two digits); curves and routing from out's
    metrics.jsonl. Without matplotlib, what needs it is left out, with one warning."""
    from torchvision.utils import save_image

    os.makedirs(out, exist_ok=True)
    written = []
    if not hasattr(model, "capsules"):
        print("the model has no capsules (--model baseline-cnn): no capsule figures, only the run's curves")
    elif data.objects == 1:
        test_images, test_labels = data.test.first_rows(data.test.rows)
        figures = visual_figures(model, test_images, test_labels, cfg["NUM_CLASSES"], cfg["CROP_SIZE"])
        _, digit_labels = one_per_class(test_images, test_labels, cfg["NUM_CLASSES"])
        for grid, label in zip(figures["fig4_per_digit"], digit_labels.tolist()):
            written.append(os.path.join(out, f"fig4_digit{label}.png"))
            save_image(grid, written[-1])
        for name in ("class_masks", "couplings"):
            written.append(os.path.join(out, f"{name}.png"))
            save_image(figures[name], written[-1])
        if importlib.util.find_spec("matplotlib") is not None:  # the rotation sweep, one test image per class
            written.append(os.path.join(out, "rotation.png"))
            rotation_png(model, test_images, test_labels, cfg["CLASS_NAMES"] or list(range(cfg["NUM_CLASSES"])),
                         cfg["CROP_SIZE"], written[-1])
    else:  # Fig. 5: pairs of the fixed test set and their reconstructions
        written.append(os.path.join(out, "fig5.png"))
        tiles = fig5_tiles(model, *data.test.first_rows(min(cfg["RECON_IMAGES"], data.test.rows))[:2])
        if importlib.util.find_spec("matplotlib") is None:
            save_image(tiles["grid"], written[-1])  # the same tiles, without the labels written on them
        else:
            plot_fig5_png(tiles, written[-1])
    rows = read_metrics(out)
    if rows and importlib.util.find_spec("matplotlib") is None:
        print("warning: matplotlib is not installed, so curves.png and routing_logit_change.png are not drawn "
              "(pip install matplotlib)", file=sys.stderr)
    elif rows:
        written.append(os.path.join(out, "curves.png"))
        plot_curves_png(rows, written[-1])
        if plot_routing_png(rows, os.path.join(out, "routing_logit_change.png")):
            written.append(os.path.join(out, "routing_logit_change.png"))
    return written


def write_predictions(paths, images, recon, lengths, names, inverted, run_dir):
    """--predict's output for image files `paths` (their model inputs `images`, reconstructions
    and capsule lengths; `inverted`: which were turned light-on-dark first): the predicted class
    and every class's length printed, in run_dir/predictions.json, and run_dir/predict_<name>.png,
    the input beside its reconstruction. A model without capsules (the CNN baselines: `recon`
    None, `lengths` its class scores) gets its softmax probabilities and the input alone."""
    from torchvision.utils import make_grid, save_image

    os.makedirs(run_dir, exist_ok=True)
    predictions = []
    score = "capsule length"
    if recon is None:  # a CNN baseline: its class probabilities
        lengths, score = lengths.float().softmax(1), "probability"
    for k, path in enumerate(paths):
        best = int(lengths[k].argmax())
        stem = os.path.splitext(os.path.basename(path))[0]
        picture = os.path.join(run_dir, f"predict_{stem}.png")
        shown = [images[k]] if recon is None else [images[k], recon[k]]
        save_image(make_grid(for_display(torch.stack(shown)).cpu(), nrow=2, padding=2, pad_value=0.5), picture)
        predictions.append({"image": path, "class": best, "class_name": names[best], "inverted": inverted[k],
                            "lengths" if recon is not None else "probabilities":
                                {name: round(float(v), 4) for name, v in zip(names, lengths[k])},
                            "picture": picture})
        note = " (a dark digit on a light background: inverted first, as MNIST's are light on black)" \
            if inverted[k] else ""
        print(f"{path}: class {names[best]} ({score} {float(lengths[k, best]):.3f}){note}")
        print("  " + "  ".join(f"{name}: {float(v):.3f}" for name, v in zip(names, lengths[k])))
    with open(os.path.join(run_dir, "predictions.json"), "w", encoding="utf-8") as f:
        json.dump(predictions, f, indent=1)
    print(f"wrote {os.path.join(run_dir, 'predictions.json')} and the predict_*.png pictures")
    return predictions

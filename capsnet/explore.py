"""--explore: a trained model's class capsules, live in Visdom (Efficient-CapsNet's perturbation
notebook, the paper's Fig. 4 one dimension at a time). Change any dimension of a test image's
class capsule and the reconstruction and the capsule lengths redraw; beside them, the test
images the model gets wrong. With --no-visdom, the same pictures as PNG files (docs/explore.md).

A change adds delta_d to dimension d of the capsule v_j of the class j shown (the predicted one
unless another is chosen); the decoder sees that capsule alone (model.decode masks the others),
and the bar chart shows every class's length with v_j's new one. The capsules of all test images
are computed once at start, so a change runs the decoder alone."""

import math
import sys
import time

import torch
import torch.nn.functional as F

from capsnet.data import DATA_SETS, load_data, to_float_images
from capsnet.figures import for_display
from capsnet.runtime import UsageError, load_weights, setup_process
from capsnet.visdom_plots import visdom_reachable

DELTA_SPAN = 0.30  # the controls offer each dimension a change of -DELTA_SPAN..DELTA_SPAN ...
DELTA_STEP = 0.05  # ... in steps of DELTA_STEP (the paper's Fig. 4: -0.25..0.25 by 0.05)
GALLERY_MOST = 100  # the misclassified test images drawn, the most confident mistakes first
SHOW_SIDE = 224  # images are drawn enlarged (nearest neighbour) to about this many pixels wide
SERVER_HINT = "python -m visdom.server -port {port} -bind_local"


def delta_values(span=DELTA_SPAN, step=DELTA_STEP):
    """The changes a dimension's control offers: -span, -span + step, ..., span."""
    steps = round(2 * span / step)
    return [round(-span + k * step, 10) for k in range(steps + 1)]


def add_explore_flags(parser):
    """--explore and its --explore-* flags, for capsule_network.py's build_parser."""
    parser.add_argument("--explore", action="store_true",
                        help="with --resume: change the dimensions of a test image's class capsule in Visdom "
                             "and watch the reconstruction and capsule lengths redraw, beside the misclassified "
                             "test images (Ctrl-C stops); with --no-visdom: those pictures as PNGs in RUN_DIR "
                             "(docs/explore.md)")
    parser.add_argument("--explore-index", metavar="N", type=int, default=0,
                        help="with --explore: the test image shown first (default: 0)")
    parser.add_argument("--explore-class", metavar="K", type=int, default=None,
                        help="with --explore: the class whose capsule is shown and changed (default: the "
                             "predicted one)")
    parser.add_argument("--explore-change", metavar="D=V,...", default="",
                        help="with --explore: add V to dimension D (0-based) of that capsule, e.g. 4=0.25,7=-0.1")


def parse_changes(text, dims):
    """'4=0.25,7=-0.1' -> {4: 0.25, 7: -0.1}, for capsules of `dims` dimensions (0-based)."""
    changes = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        name, _, value = part.partition("=")
        try:
            d, delta = int(name), float(value)
        except ValueError:
            raise UsageError(f"--explore-change takes DIMENSION=VALUE pairs, comma-separated (e.g. 4=0.25,7=-0.1), "
                             f"not {part!r}") from None
        if not 0 <= d < dims:
            raise UsageError(f"--explore-change {part}: the capsules have {dims} dimensions, 0..{dims - 1}")
        if not math.isfinite(delta):
            raise UsageError(f"--explore-change {part}: the value must be a finite number")
        changes[d] = delta
    return changes


def grid_index(delta, values):
    """The position of `delta` among a control's `values`, or None if it is not one of them."""
    for k, v in enumerate(values):
        if abs(v - delta) < 1e-6:  # (deltas are held in float32)
            return k
    return None


def capsule_lengths(v):
    """Class scores as the model's forward computes them: v (..., J, E) -> lengths (..., J)."""
    return torch.sqrt((v * v).sum(-1) + 1e-12)


@torch.no_grad()
def all_capsules(model, images_u8, crop=0, batch=100, progress=False):
    """The class capsules (N, J, E) of test images uint8 (N, [C,] H, W), in fp32 on the CPU."""
    starts = range(0, len(images_u8), batch)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="capsules of the test images", leave=False, unit="batch", file=sys.stderr)
    out = []
    for first in starts:
        v, _ = model.capsules(to_float_images(images_u8[first:first + batch], crop))
        out.append(v.float().cpu())
    return torch.cat(out)


class Explorer:
    """One view of a model's test capsules: test image `index`, the class whose capsule is shown
    (`chosen`; None: the predicted one) and the change added to each of its dimensions (`deltas`).
    The capsules of every test image are computed once (all_capsules); a view runs the decoder."""

    def __init__(self, model, images_u8, labels, names, crop=0, batch=100, progress=False):
        self.model, self.images_u8, self.crop = model, images_u8, crop
        self.labels = labels.cpu().long()
        self.names = [str(n) for n in names]
        self.v = all_capsules(model, images_u8, crop, batch, progress)  # (N, J, E)
        self.lengths = capsule_lengths(self.v)  # (N, J)
        self.predicted = self.lengths.argmax(1)  # (N,)
        self.index, self.chosen = 0, None
        self.deltas = torch.zeros(self.v.shape[2])

    @property
    def rows(self):
        return len(self.labels)

    @property
    def shown(self):
        """The class whose capsule is shown: the chosen one, else the predicted one."""
        return int(self.predicted[self.index]) if self.chosen is None else self.chosen

    def changes(self):
        """{dimension: delta} of the dimensions changed."""
        return {d: round(float(x), 6) for d, x in enumerate(self.deltas) if x != 0}

    def capsules(self):
        """The test image's capsules (J, E) with the change added to the shown class's capsule."""
        v = self.v[self.index].clone()
        v[self.shown] += self.deltas
        return v

    def image(self):
        """The test image as the model sees it (C, H, W) in [0, 1] (the central crop where there is one)."""
        return to_float_images(self.images_u8[self.index:self.index + 1], self.crop)[0].float().cpu()

    @torch.no_grad()
    def reconstruction(self):
        """The decoder's image (C, H, W) from the shown class's (changed) capsule alone."""
        device = next(self.model.parameters()).device
        out = self.model.decode(self.capsules()[None].to(device), torch.tensor([self.shown], device=device))
        return out[0].float().cpu().clamp(0, 1)

    def view(self):
        """What a redraw shows: the reconstruction, every class's length before and after the change,
        the class shown, and lines of text saying what is shown."""
        i, j = self.index, self.shown
        after = capsule_lengths(self.capsules())
        label, predicted = int(self.labels[i]), int(self.predicted[i])
        changed = ", ".join(f"{d}: {x:+.2f}" for d, x in self.changes().items()) or "none"
        lines = [f"test image {i}: class {self.names[label]}, predicted {self.names[predicted]} "
                 f"(length {float(self.lengths[i, predicted]):.3f})" + ("" if label == predicted else ": wrong"),
                 f"the capsule of {self.names[j]}" + (" (the predicted class)" if self.chosen is None else "")
                 + f"; changed dimensions: {changed}",
                 f"its length {float(self.lengths[i, j]):.3f} -> {float(after[j]):.3f}"]
        return {"reconstruction": self.reconstruction(), "before": self.lengths[i], "after": after, "class": j,
                "lines": lines}

    def misclassified(self):
        """Every test image the model gets wrong, the most confident mistake (longest predicted
        capsule) first: dicts of index, label, predicted and the two classes' lengths."""
        wrong = (self.predicted != self.labels).nonzero().flatten()
        rows = [{"index": int(i), "label": int(self.labels[i]), "predicted": int(self.predicted[i]),
                 "label_length": round(float(self.lengths[i, self.labels[i]]), 4),
                 "predicted_length": round(float(self.lengths[i, self.predicted[i]]), 4)} for i in wrong]
        return sorted(rows, key=lambda r: (-r["predicted_length"], r["index"]))

    def next_misclassified(self):
        """The index of the misclassified test image after the current one, in the gallery's order."""
        order = [r["index"] for r in self.misclassified()]
        if not order:
            return self.index
        return order[(order.index(self.index) + 1) % len(order)] if self.index in order else order[0]


def enlarged(image):
    """An image (C, H, W) in [0, 1] as drawn: one or three channels (for_display), nearest-neighbour
    enlarged to about SHOW_SIDE pixels wide -> numpy float (C, H', W')."""
    image = for_display(image)
    scale = max(1, SHOW_SIDE // image.shape[-1])
    return F.interpolate(image[None], scale_factor=scale, mode="nearest")[0].clamp(0, 1).numpy()


def top_of(lengths):
    """The bar chart's top: 1, or above the longest capsule (a changed capsule is not squashed again,
    as in Fig. 4, and may be longer than 1)."""
    return max(1.0, math.ceil(float(max(lengths)) * 10) / 10)


def figure_pixels(fig):
    """A matplotlib Figure as a CHW float image in [0, 1] (for Visdom)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].transpose(2, 0, 1).astype(np.float32) / 255


def lengths_figure(before, after, shown, names):
    """The bar chart as a matplotlib Figure: every class's capsule length with the change, the
    shown class in orange, its length without the change dashed."""
    from matplotlib.figure import Figure

    J = len(names)
    fig = Figure(figsize=(max(4.0, 0.4 * J + 1.2), 3.0), dpi=100, layout="constrained")
    ax = fig.subplots()
    ax.bar(range(J), after.tolist(), color=["tab:orange" if j == shown else "tab:blue" for j in range(J)])
    ax.bar([shown], [float(before[shown])], fill=False, edgecolor="black", linestyle="--",
           label=f"capsule of {names[shown]} without the change")
    ax.set_xticks(range(J), names, rotation=90 if max(map(len, names)) > 2 else 0)
    ax.set_ylim(0, top_of(after))
    ax.set_ylabel("capsule length")
    ax.set_title(f"capsule lengths; {names[shown]}: {float(before[shown]):.3f} -> {float(after[shown]):.3f}",
                 fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    return fig


def gallery_figure(explorer, most=GALLERY_MOST):
    """The misclassified test images (the first `most`, most confident first) as a matplotlib
    Figure: each with its index, true and predicted class and the capsule lengths of both."""
    from matplotlib.figure import Figure

    wrong = explorer.misclassified()
    shown, names = wrong[:most], explorer.names
    head = (f"{len(wrong)} of {explorer.rows:,} test images misclassified"
            + (f"; the {len(shown)} most confident mistakes" if len(shown) < len(wrong) else "")
            + ", longest predicted capsule first")
    cols = min(10, max(1, len(shown)))
    rows = max(1, -(-len(shown) // cols))
    fig = Figure(figsize=(max(6.0, 1.2 * cols), 1.5 * rows + 0.5), dpi=72, layout="constrained")
    fig.suptitle(head + "\n(index; true class and its length; predicted class and its length)", fontsize=9)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    if not shown:
        axes[0, 0].text(0.0, 0.5, "none", fontsize=12)
    for ax, r in zip(axes.flat, shown):
        image = for_display(to_float_images(explorer.images_u8[r["index"]:r["index"] + 1], explorer.crop)[0].cpu())
        ax.imshow(image.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray" if image.shape[0] == 1 else None,
                  vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"#{r['index']}\ntrue {names[r['label']]} {r['label_length']:.2f}\n"
                     f"pred {names[r['predicted']]} {r['predicted_length']:.2f}", fontsize=8, color="tab:red")
    return fig


class LiveExplorer:
    """An Explorer in Visdom: a controls pane (vis.properties) and the windows it redraws. `vis` is
    a visdom.Visdom client (or anything with its properties, image, bar and register_event_handler
    methods); on_event takes the events Visdom sends for the controls pane:
    {'event_type': 'PropertyUpdate', 'propertyId': row, 'value': new value, 'target': ..., 'eid': ...}."""

    def __init__(self, explorer, vis, env, gallery=None, out=sys.stdout):
        self.ex, self.vis, self.env, self.gallery, self.out = explorer, vis, env, gallery, out
        self.win = {name: f"{env}_{name}" for name in ("controls", "status", "input", "reconstruction", "lengths",
                                                       "misclassified")}
        self.values = delta_values()
        E = explorer.v.shape[2]
        # the controls' rows, in order: what each propertyId is
        self.rows = ["index", "class"] + [("dimension", d) for d in range(E)] + ["reset", "next"]
        self.seconds = None  # how long the last redraw took (computing and sending)

    def controls(self):
        """The properties of the controls pane, with the view's current values."""
        ex = self.ex
        props = [{"type": "number", "name": f"test image (0..{ex.rows - 1})", "value": str(ex.index)},
                 {"type": "select", "name": "class capsule shown",
                  "value": 0 if ex.chosen is None else ex.chosen + 1,
                  "values": [f"predicted ({ex.names[ex.predicted[ex.index]]})"] + ex.names}]
        for d, delta in enumerate(ex.deltas.tolist()):
            k = grid_index(delta, self.values)
            props.append({"type": "select", "name": f"dimension {d}", "value": k,
                          "values": [f"{v:+.2f}" for v in self.values]})
        props.append({"type": "button", "name": "every dimension back to 0", "value": "reset"})
        props.append({"type": "button", "name": "the next misclassified image", "value": "next"})
        return props

    def send_controls(self):
        self.vis.properties(self.controls(), win=self.win["controls"], env=self.env,
                            opts={"title": "controls", "width": 360, "height": 34 * len(self.rows) + 40})

    def start(self):
        """Draw every window (the gallery last), then listen to the controls."""
        self.draw(everything=True)
        if self.gallery is not None:
            _, H, W = self.gallery.shape
            self.vis.image(self.gallery, win=self.win["misclassified"], env=self.env,
                           opts={"title": "misclassified test images", "width": W + 20, "height": H + 30})
        self.vis.register_event_handler(self.on_event, self.win["controls"])

    def draw(self, everything=False):
        """Send (with `everything`, the input image,) the reconstruction, the bar chart, the controls and
        the text saying what is shown: in this order Visdom's page lays them out well (in rows, in the
        order they first arrive)."""
        import html

        import numpy as np

        ex, view = self.ex, self.ex.view()
        if everything:
            self.vis.image(enlarged(ex.image()), win=self.win["input"], env=self.env, opts={"title": "test image"})
        self.vis.image(enlarged(view["reconstruction"]), win=self.win["reconstruction"], env=self.env,
                       opts={"title": "reconstruction from the capsule shown"})
        j, after = view["class"], view["after"].numpy()
        bars = np.zeros((len(after), 2))
        bars[:, 0], bars[j, 0], bars[j, 1] = after, 0.0, after[j]
        self.vis.bar(bars, win=self.win["lengths"], env=self.env,
                     opts={"title": f"capsule lengths; {ex.names[j]}: {float(view['before'][j]):.3f} -> "
                                    f"{float(after[j]):.3f}",
                           "rownames": ex.names, "legend": ["other classes", f"{ex.names[j]}, changed"],
                           "stacked": True, "ytickmin": 0, "ytickmax": top_of(after), "ylabel": "capsule length",
                           "width": 440, "height": 330})
        self.send_controls()
        self.vis.text("<br>".join(html.escape(line) for line in view["lines"]), win=self.win["status"], env=self.env,
                      opts={"title": "what is shown", "width": 2 * SHOW_SIDE + 430, "height": 90})
        return view

    def apply(self, row, value):
        """Change the view as control `row` asks -> (what changed, in words; whether the input changed).
        A value the control cannot have raises ValueError."""
        ex, what = self.ex, self.rows[row]
        if what == "index":
            index = float(value)
            if index != int(index) or not 0 <= index < ex.rows:
                raise ValueError(f"test image {value!r}: give a whole number 0..{ex.rows - 1}")
            ex.index = int(index)
            return f"test image {ex.index}", True
        if what == "next":
            ex.index = ex.next_misclassified()
            return f"test image {ex.index}", True
        if what == "reset":
            ex.deltas.zero_()
            return "every dimension back to 0", False
        k = int(value)
        if what == "class":
            if not 0 <= k <= len(ex.names):
                raise ValueError(f"class choice {value!r}")
            ex.chosen = None if k == 0 else k - 1
            return f"the capsule of {ex.names[ex.shown]}", False
        d = what[1]
        if not 0 <= k < len(self.values):
            raise ValueError(f"dimension {d}: choice {value!r}")
        ex.deltas[d] = self.values[k]
        return f"dimension {d} {self.values[k]:+.2f}", False

    def on_event(self, event):
        """A Visdom event of the controls pane: change the view and redraw what it changes. Nothing
        here raises: a bad value or a failed request is one warning line."""
        if event.get("event_type") != "PropertyUpdate":
            return
        started = time.perf_counter()
        try:
            try:
                what, new_input = self.apply(int(event["propertyId"]), event.get("value"))
            except (ValueError, TypeError, IndexError, KeyError) as e:
                print(f"warning: explore: ignored {e}", file=sys.stderr, flush=True)
                self.send_controls()  # the pane shows the values in force again
                return
            self.draw(everything=new_input)
            self.seconds = time.perf_counter() - started
            print(f"{what}: redrawn in {1000 * self.seconds:.0f} ms", file=self.out, flush=True)
        except Exception as e:  # the server went away, or a request failed
            print(f"warning: explore: the redraw failed ({type(e).__name__}: {e})", file=sys.stderr, flush=True)


def connect(server, port):
    """A Visdom client that receives events (its socket up), quiet; or UsageError naming the command."""
    import contextlib
    import io
    import logging

    hint = SERVER_HINT.format(port=port)
    if not visdom_reachable(server, port):
        raise UsageError(f"--explore: no Visdom server answers at {server}:{port}; start one with: {hint} "
                         f"(or write the pictures as PNGs with --no-visdom)")
    import visdom

    logging.getLogger("visdom").setLevel(logging.CRITICAL)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        vis = visdom.Visdom(server=f"http://{server}", port=port, raise_exceptions=True)
    if not vis.socket_alive:
        raise UsageError(f"--explore: the Visdom server at {server}:{port} answers, but its event socket does not "
                         f"(the controls need it); restart it with: {hint}")
    return vis


def send_as_browser(server, port, env, row, value):
    """Send the PropertyUpdate event that Visdom's page sends when control `row` of the controls
    pane of `env` gets `value` (a string, as the page sends it): through the server's /socket, which
    forwards it to the explorer. For scripts and tests (results/explore-screenshot.sh)."""
    import json

    import websocket  # websocket-client, a dependency of visdom

    ws = websocket.create_connection(f"ws://{server}:{port}/socket", timeout=10)
    try:
        ws.send(json.dumps({"cmd": "forward_to_vis", "data": {
            "target": f"{env}_controls", "eid": env, "event_type": "PropertyUpdate", "propertyId": row,
            "value": value}}))
    finally:
        ws.close()


def write_pictures(explorer, run_dir):
    """--explore --no-visdom: the view's pictures in run_dir -> their paths, and explore.json."""
    import json
    import os

    from torchvision.utils import save_image

    os.makedirs(run_dir, exist_ok=True)
    view = explorer.view()
    paths = {name: os.path.join(run_dir, f"explore_{name}.png")
             for name in ("input", "reconstruction", "lengths", "misclassified")}
    save_image(torch.from_numpy(enlarged(explorer.image())), paths["input"])
    save_image(torch.from_numpy(enlarged(view["reconstruction"])), paths["reconstruction"])
    lengths_figure(view["before"], view["after"], view["class"], explorer.names).savefig(paths["lengths"])
    gallery_figure(explorer).savefig(paths["misclassified"])
    i, wrong = explorer.index, explorer.misclassified()
    summary = {"index": i, "label": int(explorer.labels[i]), "predicted": int(explorer.predicted[i]),
               "class": view["class"], "changes": explorer.changes(), "description": view["lines"],
               "lengths_before": [round(float(x), 6) for x in view["before"]],
               "lengths": [round(float(x), 6) for x in view["after"]],
               "test_images": explorer.rows, "misclassified_count": len(wrong), "misclassified": wrong,
               "pictures": paths}
    paths["json"] = os.path.join(run_dir, "explore.json")
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    return paths


def load_explorer(cfg, ckpt, build_model, index=0, progress=False):
    """The Explorer of checkpoint `ckpt`'s model (`build_model(cfg)`, on cfg's device, in eval mode)
    on the test split of cfg's data set, at test image `index` ->
    (explorer, the data set's name)."""
    device, _ = setup_process(cfg)
    data = load_data(cfg, device, train=False)
    if not 0 <= index < data.test.rows:
        raise UsageError(f"--explore-index {index}: the test set has images 0..{data.test.rows - 1}")
    model = build_model(cfg).to(device)
    load_weights(model, ckpt["model"])
    model.eval()
    images, labels = data.test.first_rows(data.test.rows)
    names = cfg["CLASS_NAMES"] or list(range(cfg["NUM_CLASSES"]))
    explorer = Explorer(model, images, labels, names, cfg["CROP_SIZE"], cfg["EVAL_BATCH_SIZE"], progress)
    explorer.index = index
    return explorer, data.name


def run_explore(cfg, ckpt, build_model, flags):
    """--explore: the checkpoint `ckpt`'s model (built by `build_model(cfg)`) on the test split of
    cfg's data set, at the view `flags` asks for (--explore-index,
    --explore-class, --explore-change): served in Visdom until Ctrl-C, or with --no-visdom written
    as PNGs into RUN_DIR (a checkpoint's VISDOM, the setting its training ran with, does not count)."""
    import importlib.util

    objects = DATA_SETS[cfg["DATASET"]]["objects"]
    if objects != 1:
        raise UsageError(f"--explore shows one object's capsule per image; {cfg['DATASET']}'s test images hold "
                         f"{objects} digits each (see --visualize's Fig. 5 for them)")
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--explore draws its bar chart and gallery with matplotlib: pip install matplotlib")
    changes = parse_changes(flags.explore_change, cfg["DIGIT_DIM"])
    live = flags.VISDOM is not False  # Visdom unless --no-visdom is given now (not a training run's setting)
    if live:
        values = delta_values()
        off = [f"{d}={x:g}" for d, x in changes.items() if grid_index(x, values) is None]
        if off:
            raise UsageError(f"--explore-change {','.join(off)}: the Visdom controls offer {values[0]:+.2f}.."
                             f"{values[-1]:+.2f} in steps of {DELTA_STEP:.2f} (any value with --no-visdom)")
    if flags.explore_class is not None and not 0 <= flags.explore_class < cfg["NUM_CLASSES"]:
        raise UsageError(f"--explore-class {flags.explore_class}: the model has classes 0..{cfg['NUM_CLASSES'] - 1}")
    vis = connect(cfg["VISDOM_SERVER"], cfg["VISDOM_PORT"]) if live else None
    started = time.perf_counter()
    explorer, name = load_explorer(cfg, ckpt, build_model, flags.explore_index, progress=True)
    print(f"{name}: the capsules of {explorer.rows:,} test images in {time.perf_counter() - started:.1f} s; "
          f"{len(explorer.misclassified())} misclassified")
    explorer.chosen = flags.explore_class
    for d, x in changes.items():
        explorer.deltas[d] = x
    if not live:
        paths = write_pictures(explorer, cfg["RUN_DIR"])
        print("wrote " + ", ".join(paths.values()))
        return paths
    env = f"{cfg['VISDOM_ENV']}_explore"
    live_view = LiveExplorer(explorer, vis, env, figure_pixels(gallery_figure(explorer)))
    live_view.start()
    print(f"Visdom: explore at http://{cfg['VISDOM_SERVER']}:{cfg['VISDOM_PORT']}/env/{env} (Ctrl-C stops)",
          flush=True)
    while True:  # the controls' events arrive on the Visdom client's thread; Ctrl-C ends this
        time.sleep(1.0)


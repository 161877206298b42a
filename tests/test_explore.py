"""--explore (capsnet/explore.py): the controls' event handler driven with the events Visdom sends,
checked against the capsule with the change applied, computed here; the misclassified gallery
against a plain evaluation of the same checkpoint; the PNG form; a run against a real Visdom
server (windows, an event sent as the browser sends it, Ctrl-C); the one-line refusals."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import SCRIPT, describe, run_main, small_model
import capsule_network as cn
from capsnet import explore
from capsnet.data import to_float_images
from test_visdom import free_port, start_server, stop_server

pytestmark = pytest.mark.filterwarnings("ignore:The 'warn' method is deprecated:DeprecationWarning")
DIMS = 16


class RecordingVisdom:
    """Stands in for visdom.Visdom: records every window sent, as (method, win, payload, opts)."""

    def __init__(self):
        self.sent, self.history, self.handlers = [], [], {}

    def record(self, *what):
        self.sent.append(what)
        self.history.append(what)

    def properties(self, data, win=None, env=None, opts=None):
        self.record("properties", win, data, opts)

    def image(self, img, win=None, env=None, opts=None):
        self.record("image", win, np.array(img), opts)

    def bar(self, X, win=None, env=None, opts=None):
        self.record("bar", win, np.array(X), opts)

    def text(self, text, win=None, env=None, opts=None):
        self.record("text", win, text, opts)

    def register_event_handler(self, handler, target):
        self.handlers.setdefault(target, []).append(handler)

    def last(self, win):
        """The latest payload sent to window `win`."""
        return [s for s in self.history if s[1] == win][-1]

    def take(self):
        sent, self.sent = self.sent, []
        return sent


def event(row, value, env="t_explore"):
    """What Visdom's page sends when control `row` of the controls pane gets `value` (a string)."""
    return {"event_type": "PropertyUpdate", "propertyId": row, "value": value, "target": f"{env}_controls",
            "eid": env, "pane_data": {"content": []}}


def config_of(ckpt_path, data_root, *flags):
    args = cn.build_parser().parse_args(["--resume", ckpt_path, "--data-dir", data_root, "--device", "cpu",
                                         "--explore", *flags])
    ckpt = cn.load_checkpoint(ckpt_path)
    return cn.configure(cn.flags_given(args), ckpt, ckpt_path)[0], ckpt


@pytest.fixture(scope="module")
def trained(trained_run):
    """The tiny trained checkpoint's Explorer on tiny MNIST's 100 test images."""
    last = os.path.join(trained_run["dir"], "last.pt")
    cfg, ckpt = config_of(last, trained_run["data"]["root"])
    ex, _ = explore.load_explorer(cfg, ckpt, cn.build_model)
    return {"explorer": ex, "cfg": cfg, "ckpt": ckpt, "path": last, "root": trained_run["data"]["root"]}


@pytest.fixture
def live(trained):
    """A LiveExplorer of the trained model, started against a RecordingVisdom, at image 0, unchanged."""
    ex = trained["explorer"]
    ex.index, ex.chosen = 0, None
    ex.deltas.zero_()
    vis = RecordingVisdom()
    view = explore.LiveExplorer(ex, vis, "t_explore")
    view.start()
    vis.take()
    return view, vis


def decoder_inputs(model):
    """A list that receives every input of model.decoder (forward pre-hook) -> (list, hook handle)."""
    seen = []
    handle = model.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    return seen, handle


def expected_decoder_input(ex, index, j, deltas):
    """The masked decoder input computed here: class j's capsule of image `index` plus `deltas`,
    every other class's capsule zero, flattened (J * E)."""
    v = ex.v[index]
    J, E = v.shape
    masked = torch.zeros(J, E)
    masked[j] = v[j] + torch.tensor(deltas, dtype=torch.float32)
    return masked.flatten()


def test_delta_values_and_changes():
    """The controls offer -0.30..0.30 by 0.05 (13 values, 0 among them); --explore-change parses
    DIMENSION=VALUE pairs and refuses what is not one, in one UsageError each."""
    values = explore.delta_values()
    assert len(values) == 13 and values[0] == -0.30 and values[-1] == 0.30 and values[6] == 0.0
    assert explore.grid_index(0.25, values) == 11 and explore.grid_index(0.27, values) is None
    assert explore.parse_changes("4=0.25, 7=-0.1", 16) == {4: 0.25, 7: -0.1}
    assert explore.parse_changes("", 16) == {}
    for bad, fragment in (("4", "DIMENSION=VALUE"), ("x=1", "DIMENSION=VALUE"), ("16=0.1", "0..15"),
                          ("3=nan", "finite")):
        with pytest.raises(cn.UsageError, match=fragment):
            explore.parse_changes(bad, 16)


def test_changing_a_dimension_decodes_the_changed_capsule(trained, live):
    """A PropertyUpdate of dimension 4's control (value 11: +0.25), then of dimension 7's (2: -0.20):
    the decoder's input is the predicted class's capsule plus those changes, every other capsule
    masked; the reconstruction, bar chart, controls and text are redrawn (not the input image); the
    bars are every class's length, the changed class's its new length."""
    view, vis = live
    ex = trained["explorer"]
    j = int(ex.predicted[0])
    seen, hook = decoder_inputs(ex.model)
    try:
        view.on_event(event(2 + 4, "11"))
        view.on_event(event(2 + 7, "2"))
    finally:
        hook.remove()
    deltas = [0.0] * DIMS
    deltas[4], deltas[7] = 0.25, -0.20
    want = expected_decoder_input(ex, 0, j, deltas)
    assert torch.allclose(seen[-1][0], want, atol=1e-6)
    sent = vis.take()
    redrawn = [(kind, win) for kind, win, _, _ in sent]
    assert redrawn == 2 * [("image", "t_explore_reconstruction"), ("bar", "t_explore_lengths"),
                           ("properties", "t_explore_controls"), ("text", "t_explore_status")]
    with torch.no_grad():
        recon = ex.model.decoder(want[None]).reshape(1, 28, 28)
    image = [s for s in sent if s[1] == "t_explore_reconstruction"][-1][2]
    assert image.shape == (1, 224, 224)
    assert np.allclose(image, F.interpolate(recon[None], scale_factor=8, mode="nearest")[0].numpy(), atol=1e-5)
    bars = vis.last("t_explore_lengths")[2]
    lengths = ex.lengths[0].clone()
    lengths[j] = want.reshape(-1, DIMS)[j].norm()
    assert np.allclose(bars.sum(1), lengths.numpy(), atol=1e-5)
    assert bars[j, 0] == 0 and np.count_nonzero(bars[:, 1]) == 1 and bars[j, 1] == pytest.approx(float(lengths[j]))
    controls = vis.last("t_explore_controls")[2]
    assert [c["value"] for c in controls[2:2 + DIMS]] == [6, 6, 6, 6, 11, 6, 6, 2] + [6] * 8
    assert "4: +0.25, 7: -0.20" in vis.last("t_explore_status")[2]
    assert view.seconds is not None and view.seconds < 5


def test_changing_the_index_and_the_class(trained, live):
    """The index control shows another test image (input redrawn) and keeps the changes; the
    class control shows another class's capsule (the decoder then sees that one), and 0 goes back
    to the predicted class."""
    view, vis = live
    ex = trained["explorer"]
    view.on_event(event(2 + 3, "0"))  # dimension 3: -0.30
    vis.take()
    seen, hook = decoder_inputs(ex.model)
    try:
        view.on_event(event(0, "5"))
        assert [win for _, win, _, _ in vis.take()][0] == "t_explore_input"
        deltas = [0.0] * DIMS
        deltas[3] = -0.30
        j5 = int(ex.predicted[5])
        assert torch.allclose(seen[-1][0], expected_decoder_input(ex, 5, j5, deltas), atol=1e-6)
        other = (j5 + 1) % 10
        view.on_event(event(1, str(other + 1)))
        assert torch.allclose(seen[-1][0], expected_decoder_input(ex, 5, other, deltas), atol=1e-6)
        bars = vis.last("t_explore_lengths")[2]
        assert bars[other, 1] > 0 and bars[j5, 1] == 0
        assert vis.last("t_explore_controls")[2][1]["value"] == other + 1
        view.on_event(event(1, "0"))
        assert torch.allclose(seen[-1][0], expected_decoder_input(ex, 5, j5, deltas), atol=1e-6)
    finally:
        hook.remove()
    expected_input = F.interpolate(to_float_images(ex.images_u8[5:6]).cpu(), scale_factor=8, mode="nearest")[0]
    view.on_event(event(0, "5"))
    assert np.allclose(vis.last("t_explore_input")[2], expected_input.numpy())


def test_reset_gives_the_models_own_reconstruction(trained, live):
    """After changes, the reset button puts every dimension back to 0: the reconstruction is then
    the model's own (its forward pass, decoder masked by the longest capsule)."""
    view, vis = live
    ex = trained["explorer"]
    for row, value in ((2 + 0, "12"), (2 + 15, "1"), (0, "7")):
        view.on_event(event(row, value))
    view.on_event(event(2 + DIMS, "clicked"))
    assert ex.changes() == {}
    with torch.no_grad():
        lengths, recon = ex.model(to_float_images(ex.images_u8[7:8]))
    assert int(lengths.argmax()) == ex.shown
    want = F.interpolate(recon, scale_factor=8, mode="nearest")[0].numpy()
    assert np.allclose(vis.last("t_explore_reconstruction")[2], want, atol=1e-5)
    assert all(c["value"] == 6 for c in vis.last("t_explore_controls")[2][2:2 + DIMS])


def test_bad_values_and_other_events(trained, live, capsys):
    """A value no control can have (not a whole number, out of range) is one warning line, and the
    controls are sent again with the values in force; events of other kinds are ignored."""
    view, vis = live
    ex = trained["explorer"]
    for value in ("abc", "2.5", str(ex.rows), ""):
        view.on_event(event(0, value))
        assert [kind for kind, *_ in vis.take()] == ["properties"]
        assert ex.index == 0
    view.on_event(event(2, "13"))
    assert [kind for kind, *_ in vis.take()] == ["properties"]
    view.on_event({"event_type": "KeyPress", "key": "a", "target": "t_explore_controls"})
    assert vis.take() == []
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 5 and all(line.startswith("warning: explore: ignored") for line in err), err


def plain_evaluation(model, images_u8):
    """Labels predicted by the model's forward pass, and their lengths."""
    with torch.no_grad():
        lengths, _ = model(to_float_images(images_u8))
    return lengths.argmax(1), lengths


def test_gallery_is_every_mistake_of_a_plain_evaluation(trained, tmp_path):
    """The misclassified list holds exactly the test images that a plain forward pass gets wrong,
    with their true and predicted classes and both lengths, the longest predicted capsule first;
    its (true, predicted) counts are the off-diagonal of --eval-only's confusion matrix; the
    next-misclassified button walks it in that order."""
    ex = trained["explorer"]
    predicted, lengths = plain_evaluation(ex.model, ex.images_u8)
    wrong = (predicted != ex.labels).nonzero().flatten().tolist()
    rows = ex.misclassified()
    assert sorted(r["index"] for r in rows) == wrong and wrong, "the tiny model should get some wrong"
    for r in rows:
        i = r["index"]
        assert (r["label"], r["predicted"]) == (int(ex.labels[i]), int(predicted[i]))
        assert r["predicted_length"] == pytest.approx(float(lengths[i, predicted[i]]), abs=1e-4)
        assert r["label_length"] == pytest.approx(float(lengths[i, ex.labels[i]]), abs=1e-4)
    assert [r["predicted_length"] for r in rows] == sorted((r["predicted_length"] for r in rows), reverse=True)
    done = run_main(["--eval-only", "--resume", trained["path"], "--data-dir", trained["root"], "--no-amp",
                     "--device", "cpu", "--run-dir", tmp_path / "eval"])
    assert done.returncode == 0, describe(done)
    with open(tmp_path / "eval" / "eval.json", encoding="utf-8") as f:
        confusion = np.array(json.load(f)["confusion"])
    counts = np.zeros_like(confusion)
    for r in rows:
        counts[r["label"], r["predicted"]] += 1
    assert (counts == confusion - np.diag(np.diag(confusion))).all()
    vis = RecordingVisdom()
    view = explore.LiveExplorer(ex, vis, "t_explore")
    ex.index = 0 if 0 not in wrong else next(i for i in range(ex.rows) if i not in wrong)
    visited = []
    for _ in range(len(rows)):
        view.on_event(event(2 + DIMS + 1, "clicked"))
        visited.append(ex.index)
    assert visited == [r["index"] for r in rows]


def test_no_visdom_writes_the_pictures(trained, tmp_path):
    """--explore --no-visdom: input, reconstruction, bar chart and gallery as PNGs in RUN_DIR, and
    explore.json with the view's numbers (any change value, also one between the controls' steps)."""
    run_dir = tmp_path / "pictures"
    done = run_main(["--explore", "--resume", trained["path"], "--data-dir", trained["root"], "--no-visdom",
                     "--device", "cpu", "--run-dir", run_dir, "--explore-index", 3,
                     "--explore-change", "4=0.25,7=-0.13"])
    assert done.returncode == 0, describe(done)
    from PIL import Image

    for name in ("input", "reconstruction", "lengths", "misclassified"):
        assert Image.open(run_dir / f"explore_{name}.png").size[0] > 100, name
    with open(run_dir / "explore.json", encoding="utf-8") as f:
        summary = json.load(f)
    ex = trained["explorer"]
    j = int(ex.predicted[3])
    deltas = [0.0] * DIMS
    deltas[4], deltas[7] = 0.25, -0.13
    capsule = expected_decoder_input(ex, 3, j, deltas).reshape(-1, DIMS)[j]
    assert summary["index"] == 3 and summary["class"] == j and summary["changes"] == {"4": 0.25, "7": -0.13}
    assert summary["lengths"][j] == pytest.approx(float(capsule.norm()), abs=1e-5)
    assert summary["lengths_before"] == pytest.approx(ex.lengths[3].tolist(), abs=1e-5)
    assert summary["misclassified"] == ex.misclassified()
    recon = np.asarray(Image.open(run_dir / "explore_reconstruction.png").convert("L"), dtype=np.float32) / 255
    with torch.no_grad():
        want = ex.model.decoder(expected_decoder_input(ex, 3, j, deltas)[None]).reshape(28, 28)
    want = want.repeat_interleave(8, 0).repeat_interleave(8, 1).numpy()
    assert np.abs(recon - want).max() < 1.5 / 255


@pytest.mark.parametrize("kind", ["efficient-capsnet", "colour", "stereo"])
def test_other_models_and_colour_images(kind, tmp_path):
    """Efficient-CapsNet's capsules and decoder, and CapsNets of 3-channel images (drawn in colour)
    and of 2-channel stereo pairs (smallNORB's: the first camera's image drawn): the decoder sees
    the changed capsule alone, and the pictures are written."""
    torch.manual_seed(0)
    if kind == "efficient-capsnet":
        cfg = dict(cn.default_config(), MODEL="efficient-capsnet", IMAGE_SIZE=28, IMAGE_CHANNELS=1, NUM_CLASSES=10)
        model, images = cn.build_model(cfg).eval(), torch.randint(0, 256, (12, 28, 28), dtype=torch.uint8)
    else:
        stored = 3 if kind == "colour" else 2
        model = small_model(image_channels=stored)
        images = torch.randint(0, 256, (12, stored, 28, 28), dtype=torch.uint8)
    ex = explore.Explorer(model, images, torch.arange(12) % 10, [str(k) for k in range(10)], batch=5)
    vis = RecordingVisdom()
    view = explore.LiveExplorer(ex, vis, "t_explore", gallery=explore.figure_pixels(explore.gallery_figure(ex)))
    view.start()
    seen, hook = decoder_inputs(model)
    try:
        view.on_event(event(2 + 9, "12"))
    finally:
        hook.remove()
    deltas = [0.0] * DIMS
    deltas[9] = 0.30
    assert torch.allclose(seen[-1][0], expected_decoder_input(ex, 0, int(ex.predicted[0]), deltas), atol=1e-6)
    channels = 3 if kind == "colour" else 1
    assert vis.last("t_explore_input")[2].shape == (channels, 224, 224)
    assert vis.last("t_explore_reconstruction")[2].shape == (channels, 224, 224)
    assert vis.last("t_explore_misclassified")[2].shape[0] == 3
    paths = explore.write_pictures(ex, str(tmp_path))
    assert all(os.path.exists(p) for p in paths.values())


def test_multimnist_is_refused_in_one_line(tmp_path):
    """A MultiMNIST model: --explore says in one line that its images hold two digits, exit 2,
    before any data is read."""
    cfg = cn.default_config(DATASET="multimnist")
    path = tmp_path / "multimnist.pt"
    torch.save({"model": {}, "config": {k: cfg[k] for k in cn.MODEL_KEYS}}, path)
    done = run_main(["--explore", "--resume", path, "--data-dir", tmp_path / "none", "--run-dir", tmp_path / "run"])
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, describe(done)
    assert "--explore shows one object's capsule per image; multimnist's test images hold 2 digits" in lines[0]
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("flags, fragment", [
    (["--explore-change", "4=0.27"], "the Visdom controls offer -0.30..+0.30 in steps of 0.05"),
    (["--explore-change", "20=0.1"], "the capsules have 16 dimensions"),
    (["--explore-class", "10", "--no-visdom"], "--explore-class 10: the model has classes 0..9"),
    (["--explore-index", "100", "--no-visdom"], "--explore-index 100: the test set has images 0..99"),
])
def test_refusals_are_one_line(trained, flags, fragment, tmp_path):
    """What --explore cannot show or do is one error line and exit 2."""
    done = run_main(["--explore", "--resume", trained["path"], "--data-dir", trained["root"], "--device", "cpu",
                     "--run-dir", tmp_path / "run", *flags])
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and fragment in lines[0], describe(done)


def test_explore_needs_resume_and_a_server(trained, capsys, tmp_path):
    """--explore without --resume, and --explore with no Visdom server: one line each, exit 2; the
    second says how to start a server."""
    assert cn.main(["--explore"]) == 2
    assert capsys.readouterr().err.strip() == "capsule_network.py: error: --explore needs --resume PATH"
    port = free_port()
    done = run_main(["--explore", "--resume", trained["path"], "--data-dir", trained["root"],
                     "--visdom-server", "127.0.0.1", "--visdom-port", port, "--run-dir", tmp_path / "run"])
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, describe(done)
    assert f"python -m visdom.server -port {port} -bind_local" in lines[0] and "--no-visdom" in lines[0]


def window(client, win, env):
    text = client.get_window_data(win=win, env=env)
    return json.loads(text) if text else None


def test_against_a_real_visdom_server(trained, tmp_path):
    """capsule_network.py --explore against a visdom.server on a free port: every window appears;
    a PropertyUpdate sent as the browser sends it (through the server's /socket) is handled and
    redrawn; Ctrl-C (SIGINT) ends it with exit 130 and one line."""
    import visdom

    proc, port = start_server(tmp_path / "env", tmp_path / "server.log")
    out, err = open(tmp_path / "out", "w+"), open(tmp_path / "err", "w+")
    run = subprocess.Popen([sys.executable, SCRIPT, "--explore", "--resume", trained["path"], "--data-dir",
                            trained["root"], "--device", "cpu", "--visdom-server", "127.0.0.1", "--visdom-port",
                            str(port), "--visdom-env", "t", "--run-dir", str(tmp_path / "run")], stdout=out, stderr=err,
                           env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1"))
    env = "t_explore"
    try:
        deadline = time.monotonic() + 120
        while "Visdom: explore at" not in open(tmp_path / "out").read():
            assert run.poll() is None and time.monotonic() < deadline, open(tmp_path / "err").read()[-3000:]
            time.sleep(0.2)
        client = visdom.Visdom(server="http://127.0.0.1", port=port, use_incoming_socket=False,
                               raise_exceptions=True)
        wins = {name: window(client, f"{env}_{name}", env) for name in
                ("controls", "status", "input", "reconstruction", "lengths", "misclassified")}
        assert all(wins.values()), [k for k, v in wins.items() if not v]
        controls = wins["controls"]["content"]
        assert [c["name"] for c in controls[2:2 + DIMS]] == [f"dimension {d}" for d in range(DIMS)]
        assert controls[2]["values"][0] == "-0.30" and controls[2]["values"][-1] == "+0.30"
        assert wins["lengths"]["content"]["data"][0]["type"] == "bar"
        before = wins["reconstruction"]["content"]["src"]
        explore.send_as_browser("127.0.0.1", port, env, 2 + 4, "11")
        deadline = time.monotonic() + 30
        while "dimension 4 +0.25: redrawn in" not in open(tmp_path / "out").read():
            assert time.monotonic() < deadline, open(tmp_path / "err").read()[-3000:]
            time.sleep(0.1)
        assert window(client, f"{env}_controls", env)["content"][2 + 4]["value"] == 11
        assert "4: +0.25" in window(client, f"{env}_status", env)["content"]
        assert window(client, f"{env}_reconstruction", env)["content"]["src"] != before
        run.send_signal(signal.SIGINT)
        try:
            code = run.wait(timeout=60)
        except subprocess.TimeoutExpired:  # PYTHONFAULTHANDLER: SIGABRT writes every thread's stack to err
            run.send_signal(signal.SIGABRT)
            run.wait(timeout=30)
            pytest.fail("--explore did not end within 60 s of SIGINT:\n" + open(tmp_path / "err").read()[-6000:])
        assert code == 130
    finally:
        if run.poll() is None:
            run.kill()
        stop_server(proc)
    lines = open(tmp_path / "err").read().replace("\r", "\n").strip().splitlines()
    assert lines[-1] == "interrupted" and "Traceback" not in "".join(lines)

"""Visdom: the live plots reach a real visdom.server; without a server (or when it goes away)
training goes on with one warning line.

The server needs visdom's JS/CSS assets offline; if it does not start, run once, from the
project root (as .ci/run does):
    ../shared/tools/visdom-offline-assets .venv/bin/python
"""

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import N_TEST, SCRIPT, copy_run, describe, read_rows, run_main, train_args
from capsnet import visdom_plots  # noqa: E402

ENV = "testenv"
pytestmark = pytest.mark.filterwarnings("ignore:The 'warn' method is deprecated:DeprecationWarning")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accepts(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def start_server(env_path, log_path, timeout=60):
    """python -m visdom.server on a free local port -> (process, port); fails the test if it does
    not accept connections within `timeout` seconds."""
    port = free_port()
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "visdom.server", "-port", str(port), "-bind_local",
                             "-env_path", str(env_path)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if accepts(port):
            return proc, port
        time.sleep(0.25)
    stop_server(proc)
    log.close()
    with open(log_path, encoding="utf-8", errors="replace") as f:
        tail = f.read()[-2000:]
    pytest.fail("visdom.server did not start (offline assets missing? run, from the project root: "
                f"../shared/tools/visdom-offline-assets {sys.executable}):\n{tail}")


def stop_server(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def visdom_server(tmp_path_factory):
    base = tmp_path_factory.mktemp("visdom")
    proc, port = start_server(base / "env", base / "server.log")
    yield port
    stop_server(proc)


@pytest.fixture(scope="module")
def logged_run(visdom_server, tiny_mnist, tmp_path_factory):
    """A 2-epoch run that logs to the live server (second epoch appends to the line plots), with a
    point in the live windows every 2 of the 10 batches of an epoch."""
    run_dir = str(tmp_path_factory.mktemp("visdom_run") / "run")
    args = [a for a in train_args(tiny_mnist["root"], run_dir, epochs=2) if a != "--no-visdom"]
    done = run_main(args + ["--visdom-server", "127.0.0.1", "--visdom-port", visdom_server,
                              "--visdom-env", ENV, "--progress-every", 2])
    assert done.returncode == 0, describe(done)
    return {"dir": run_dir, "process": done, "port": visdom_server}


_clients = {}


def window(port, title, env=ENV):
    """The JSON of window f"{env}_{title}" as the server holds it."""
    import visdom

    if port not in _clients:
        _clients[port] = visdom.Visdom(server="http://127.0.0.1", port=port, use_incoming_socket=False,
                                       raise_exceptions=True)
    text = _clients[port].get_window_data(win=f"{env}_{title}", env=env)
    assert text, f"no window {env}_{title!r} in env {env!r}"
    return json.loads(text)


def traces(win):
    return {t["name"]: t for t in win["content"]["data"]}


def visdom_warnings(stderr):
    """Lines of stderr that warn about Visdom (tqdm's carriage returns split into lines)."""
    return [line for line in stderr.replace("\r", "\n").splitlines()
            if "warning" in line.lower() and "visdom" in line.lower()]


def test_run_announces_the_plots_and_warns_about_nothing(logged_run):
    """With a server the run prints the plots' URL and no Visdom warning or traceback."""
    done = logged_run["process"]
    assert f"http://127.0.0.1:{logged_run['port']}/env/{ENV}" in done.stdout
    assert visdom_warnings(done.stderr) == [] and "Traceback" not in done.stderr


@pytest.mark.parametrize("title, pairs", [
    ("loss", {"train": "train_loss", "test": "test_loss"}),
    ("accuracy", {"train": "train_accuracy", "test": "test_accuracy"}),
    ("learning rate", {"lr": "lr"}),
])
def test_line_plots_hold_the_metrics(logged_run, title, pairs):
    """loss / accuracy / learning-rate windows hold one point per epoch per series, equal to
    metrics.jsonl (the second epoch appended to the series the first created)."""
    rows = read_rows(logged_run["dir"])
    win = window(logged_run["port"], title)
    assert win["type"] == "plot" and win["title"] == title
    series = traces(win)
    assert set(series) == set(pairs)
    for name, key in pairs.items():
        assert series[name]["x"] == [1, 2], name
        assert series[name]["y"] == pytest.approx([r[key] for r in rows], rel=1e-9), name


@pytest.mark.parametrize("title, key", [("training loss, live", "train_loss"),
                                        ("training accuracy, live", "train_accuracy")])
def test_live_windows_get_a_point_every_progress_every_batches(logged_run, title, key):
    """The live windows hold one point every 2 batches at x = fractional epoch (0.2, 0.4, ... 2.0),
    each the mean of those 2 batches alone: an epoch's 5 points average to its metrics value."""
    rows = read_rows(logged_run["dir"])
    series = traces(window(logged_run["port"], title))["train"]
    assert series["x"] == pytest.approx([k / 5 for k in range(1, 11)])
    for epoch, row in enumerate(rows):
        points = series["y"][5 * epoch:5 * epoch + 5]
        assert sum(points) / 5 == pytest.approx(row[key], rel=1e-4), epoch


def test_live_window_has_points_before_the_first_epoch_ends(visdom_server, tiny_mnist, tmp_path):
    """While epoch 1 is still training (no metrics row yet), the live loss window already holds
    points: a new user sees the plots move during the first epoch."""
    run_dir = str(tmp_path / "run")
    args = [a for a in train_args(tiny_mnist["root"], run_dir, "--batch-size", 2, "--progress-every", 5,
                                  "--no-compile", epochs=1) if a != "--no-visdom"]
    env = f"{ENV}_live"
    trainer = subprocess.Popen([sys.executable, SCRIPT, *map(str, args), "--visdom-server", "127.0.0.1",
                                "--visdom-port", str(visdom_server), "--visdom-env", env],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"))
    import visdom

    client = visdom.Visdom(server="http://127.0.0.1", port=visdom_server, use_incoming_socket=False,
                           raise_exceptions=True)
    metrics = os.path.join(run_dir, "metrics.jsonl")
    seen = None
    try:
        deadline = time.monotonic() + 240
        while trainer.poll() is None and time.monotonic() < deadline:
            try:  # before the run's first point the env does not exist (visdom 0.3.0's server then answers 500)
                text = client.get_window_data(win=f"{env}_training loss, live", env=env)
            except Exception:
                text = None
            if text:
                seen = (traces(json.loads(text))["train"]["x"], os.path.exists(metrics))
                break
            time.sleep(0.05)
        out, err = trainer.communicate(timeout=240)
    finally:
        if trainer.poll() is None:
            trainer.kill()
    assert trainer.returncode == 0, err[-3000:]
    assert seen is not None, "the live window never appeared"
    xs, epoch_done = seen
    assert xs and all(0 < x < 1 for x in xs) and not epoch_done, seen


def test_routing_plot_has_one_series_per_iteration(logged_run):
    """The Appendix A window has series 'iteration 1..3' with the rows' routing_logit_change."""
    rows = read_rows(logged_run["dir"])
    series = traces(window(logged_run["port"], "routing logit change"))
    assert set(series) == {"iteration 1", "iteration 2", "iteration 3"}
    for k in range(3):
        assert series[f"iteration {k + 1}"]["y"] == pytest.approx([r["routing_logit_change"][k] for r in rows])


def test_confusion_heatmap_counts_the_test_set(logged_run):
    """The test confusion matrix is a 10x10 heatmap of counts summing to the test set size,
    rows the true classes, its diagonal the last epoch's correct predictions."""
    win = window(logged_run["port"], "confusion matrix (test)")
    data = win["content"]["data"][0]
    assert data["type"] == "heatmap"
    z = data["z"]
    assert len(z) == 10 and all(len(row) == 10 for row in z)
    assert sum(map(sum, z)) == N_TEST
    assert [sum(row) for row in z] == [N_TEST // 10] * 10
    last = read_rows(logged_run["dir"])[-1]
    assert sum(z[k][k] for k in range(10)) == round(last["test_accuracy"] * N_TEST / 100)


def png_of(win):
    from PIL import Image

    assert win["type"] == "image"
    src = win["content"]["src"]
    assert src.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))


def test_reconstruction_image_shows_sixteen_test_images_over_their_reconstructions(logged_run):
    """The image window is a PNG grid of 16 test images (top row) and reconstructions (bottom)."""
    img = png_of(window(logged_run["port"], "test images (top) and reconstructions (bottom)"))
    assert img.size == (16 * (28 + 2) + 2, 2 * (28 + 2) + 2)


@pytest.mark.parametrize("title", [
    "Fig. 4: each of the 16 dimensions perturbed by -0.25..0.25",
    "reconstruction under every class mask (rows: digits, cols: masks)",
    "couplings c_ij of one test image (per class: the primary capsule types on their grid; min black, max white)",
    "rotation sweep: capsule lengths of a test image per class turned through 360 degrees, reconstructions beneath",
])
def test_capsule_figures_are_sent_every_epoch(logged_run, title):
    """With VISUALIZE_EVERY_EPOCH the Fig. 4, class-mask and coupling images are in Visdom."""
    img = png_of(window(logged_run["port"], title))
    assert min(img.size) > 28


def test_a_multimnist_run_sends_fig5_and_the_at_least_one_digit_score(visdom_server, tiny_mnist, tmp_path):
    """--dataset multimnist: Fig. 5 (16 test pairs over their red/green reconstructions and the
    forced "*" row, captioned with labels and predictions) replaces the reconstruction window, and
    the accuracy window has a series for at least one digit right."""
    run_dir = str(tmp_path / "run")
    args = [a for a in train_args(tiny_mnist["root"], run_dir, "--dataset", "multimnist", epochs=1)
            if a != "--no-visdom"]
    done = run_main(args + ["--visdom-server", "127.0.0.1", "--visdom-port", visdom_server,
                              "--visdom-env", "testpairs"])
    assert done.returncode == 0, describe(done)
    assert visdom_warnings(done.stderr) == [] and "Traceback" not in done.stderr
    row = read_rows(run_dir)[-1]
    series = traces(window(visdom_server, "accuracy", "testpairs"))
    assert series["test, at least one digit"]["y"] == pytest.approx([row["test_accuracy_any"]])
    assert series["test"]["y"] == pytest.approx([row["test_accuracy"]])
    win = window(visdom_server, visdom_plots.FIG5_TITLE, "testpairs")
    assert png_of(win).size == (16 * (36 + 2) + 2, 3 * (36 + 2) + 2)
    assert json.dumps(win).count("L:(") == 16


def test_no_server_one_warning_and_training_goes_on(tiny_mnist, tmp_path):
    """Visdom enabled but nothing listening: exit 0, exactly one warning line (about Visdom),
    no traceback, and the epoch is trained and recorded."""
    port = free_port()
    assert not accepts(port)
    run_dir = str(tmp_path / "run")
    args = [a for a in train_args(tiny_mnist["root"], run_dir, epochs=1) if a != "--no-visdom"]
    done = run_main(args + ["--visdom-server", "127.0.0.1", "--visdom-port", port])
    assert done.returncode == 0, describe(done)
    assert "Traceback" not in done.stderr
    warnings = visdom_warnings(done.stderr)
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("warning: no Visdom server answers at") and f"127.0.0.1:{port}" in warnings[0]
    assert [r["epoch"] for r in read_rows(run_dir)] == [1]


def test_server_that_goes_away_mid_run_gives_one_warning(tiny_mnist, tmp_path):
    """The server dies after the first epoch was logged: one 'stopped answering' warning, no
    traceback, and the remaining epochs are trained."""
    proc, port = start_server(tmp_path / "env", tmp_path / "server.log")
    run_dir = str(tmp_path / "run")
    args = [a for a in train_args(tiny_mnist["root"], run_dir, epochs=3) if a != "--no-visdom"]
    metrics = os.path.join(run_dir, "metrics.jsonl")
    trainer = subprocess.Popen([sys.executable, SCRIPT, *map(str, args), "--visdom-server", "127.0.0.1",
                                "--visdom-port", str(port), "--visdom-env", ENV],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"))
    try:
        deadline = time.monotonic() + 240
        while not (os.path.exists(metrics) and read_rows(run_dir)):
            assert trainer.poll() is None and time.monotonic() < deadline, "no epoch finished"
            time.sleep(0.01)
        trainer.send_signal(signal.SIGSTOP)  # hold it while the server goes away
        rows_at_kill = len(read_rows(run_dir))
        stop_server(proc)
        trainer.send_signal(signal.SIGCONT)
        out, err = trainer.communicate(timeout=240)
    finally:
        if trainer.poll() is None:
            trainer.kill()
        stop_server(proc)
    assert rows_at_kill < 3, "the run finished before the server could be stopped"
    assert trainer.returncode == 0, err[-3000:]
    assert "Traceback" not in err
    warnings = visdom_warnings(err)
    assert len(warnings) == 1 and warnings[0].startswith("warning: Visdom stopped answering"), warnings
    assert [r["epoch"] for r in read_rows(run_dir)] == [1, 2, 3]


def test_requests_leave_from_a_thread_of_their_own_in_order(capsys):
    """log_progress returns at once while the server is slow; flush() waits until the queued
    requests went out, in the order logged; a request that fails is one warning, and what was
    queued after it is dropped."""
    plots = visdom_plots.VisdomPlots({"VISDOM": False})
    plots.enabled, plots.live_loss, plots.live_accuracy = True, "loss window", "accuracy window"
    sent = []

    def slow_lines(logger, epoch, values):
        time.sleep(0.2)
        if epoch == 3:
            raise ConnectionError("gone")
        sent.append((logger, epoch))

    plots._lines = slow_lines
    started = time.perf_counter()
    for epoch in (1, 2):
        plots.log_progress(epoch, 0.5, 90.0)
    assert time.perf_counter() - started < 0.15 and sent == []
    plots.flush()
    assert sent == [("loss window", 1), ("accuracy window", 1), ("loss window", 2), ("accuracy window", 2)]
    plots.log_progress(3, 0.5, 90.0)
    plots.log_progress(4, 0.5, 90.0)
    plots.flush()
    assert len(sent) == 4 and not plots.enabled
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: Visdom stopped answering (ConnectionError); training goes on without live plots"]


def test_visualize_sends_the_primary_capsule_figure_to_visdom(visdom_server, trained_run, tmp_path):
    """--visualize with a Visdom server: the primary-capsule figure (capsnet/primary.py) is also an
    image window of the run's environment, the same pixels as primary_capsules.png."""
    from PIL import Image

    run = copy_run(trained_run["dir"], tmp_path / "vis")
    done = run_main(["--visualize", "--resume", os.path.join(run, "last.pt"), "--visdom", "--visdom-server",
                     "127.0.0.1", "--visdom-port", visdom_server, "--visdom-env", "primaryenv"])
    assert done.returncode == 0, describe(done)
    assert not visdom_warnings(done.stderr)
    win = window(visdom_server, "primary_capsules", env="primaryenv")
    assert win["type"] == "image" and "primary capsules" in win["title"]
    import base64
    import io

    sent = Image.open(io.BytesIO(base64.b64decode(win["content"]["src"].split(",", 1)[1]))).convert("RGB")
    written = Image.open(os.path.join(run, "primary_capsules.png")).convert("RGB")
    assert sent.size == written.size  # the same pixels, each rounded (save_image) or cut (Visdom) to 8 bits
    assert max(abs(a - b) for a, b in zip(sent.tobytes(), written.tobytes())) <= 1

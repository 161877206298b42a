"""Faults: resuming on other hardware (the RNG state per device), divergence, resume pitfalls,
stop signals (mid-epoch checkpoints), out of memory."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import SCRIPT, cn, copy_run, describe, load_pt, read_rows, run_main, train_args, write_mnist
from capsnet import fast, runtime  # noqa: E402  (conftest puts the project on the path)


def test_rng_state_holds_the_cpus_and_this_devices_generator_only():
    assert set(runtime.rng_state(torch.device("cpu"))) == {"cpu"}


def test_a_checkpoint_with_more_gpu_states_than_this_machine_has_resumes(monkeypatch):
    """An older checkpoint holds every visible GPU's state (here 4): on the CPU the CPU generator
    alone is restored; on GPU 1 (simulated) that GPU gets the first saved state, the one the
    training process (rank 0 under torchrun, whose draws every rank shares) drew from."""
    torch.manual_seed(3)
    saved_cpu = torch.get_rng_state()
    expected = torch.rand(3)
    state = {"cpu": saved_cpu, "cuda": [torch.full((16,), k, dtype=torch.uint8) for k in range(4)]}
    torch.manual_seed(99)
    runtime.set_rng_state(state, torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected)

    calls = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: calls.append((s, device)))
    runtime.set_rng_state(state, torch.device("cuda", 1))
    assert len(calls) == 1 and torch.equal(calls[0][0], state["cuda"][0]) and calls[0][1] == torch.device("cuda", 1)
    calls.clear()
    runtime.set_rng_state(dict(state, cuda=state["cuda"][2]), torch.device("cuda", 0))  # this version's format
    assert torch.equal(calls[0][0], state["cuda"][2]) and calls[0][1] == torch.device("cuda", 0)


# ---- divergence, resume pitfalls ----


def one_line_error(done, code, *fragments):
    """Exit `code` and one line on stderr besides the progress bar it cleared (tqdm's \r updates)."""
    lines = [line for line in done.stderr.splitlines()  # a slow machine's bar says s/batch instead
             if line.strip() and "batch/s" not in line and "s/batch" not in line]
    assert done.returncode == code and len(lines) == 1, describe(done)
    assert "Traceback" not in done.stderr and all(f in lines[0] for f in fragments), describe(done)


def finite(path):
    return all(torch.isfinite(v).all() for v in load_pt(path)["model"].values() if v.is_floating_point())


@pytest.fixture(scope="module")
def one_epoch(tiny_mnist, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("one") / "run")
    done = run_main(train_args(tiny_mnist["root"], run, "--no-amp", epochs=1))
    assert done.returncode == 0, describe(done)
    return {"dir": run, "data": tiny_mnist["root"]}


def test_a_learning_rate_that_diverges_stops_the_run_with_exit_4(tiny_mnist, tmp_path):
    """--lr 1e20: the loss becomes NaN in epoch 1; one line names the epoch and the batch; no
    checkpoint is written."""
    run = str(tmp_path / "run")
    done = run_main(train_args(tiny_mnist["root"], run, "--lr", "1e20", epochs=2))
    one_line_error(done, 4, "the training loss became NaN or infinite at epoch 1, batch", "no checkpoint was written")
    assert not os.path.exists(os.path.join(run, "last.pt")) and not os.path.exists(os.path.join(run, "best.pt"))


def test_divergence_after_a_finite_epoch_keeps_its_checkpoint(one_epoch, tmp_path):
    """Resumed with --lr 1e20, epoch 2 diverges: exit 4, last.pt and best.pt still epoch 1 and finite,
    metrics.jsonl still one row."""
    run = copy_run(one_epoch["dir"], tmp_path / "run")
    last = os.path.join(run, "last.pt")
    done = run_main(["--resume", last, "--lr", "1e20", "--epochs", 2])
    one_line_error(done, 4, "at epoch 2, batch", f"{last} keeps epoch 1")
    assert load_pt(last)["epoch"] == 1 and finite(last) and finite(os.path.join(run, "best.pt"))
    assert [r["epoch"] for r in read_rows(run)] == [1]


def test_a_checkpoint_with_non_finite_weights_is_refused(one_epoch, tmp_path):
    run = copy_run(one_epoch["dir"], tmp_path / "run")
    last = os.path.join(run, "last.pt")
    ckpt = load_pt(last)
    ckpt["model"]["W"][0, 0, 0, 0] = float("nan")
    torch.save(ckpt, last)
    for argv in (["--resume", last, "--epochs", 2], ["--eval-only", "--resume", last]):
        one_line_error(run_main(argv), 2, "the checkpoint's weights are not finite (NaN or inf in W)")
    assert [r["epoch"] for r in read_rows(run)] == [1]


def test_lr_on_resume_restarts_the_schedule_from_it(one_epoch, tmp_path):
    """--lr on resume is applied (and said): epoch 2 trains at the new rate x LR_DECAY, as if the run
    had started with it, and the checkpoint records it."""
    run = copy_run(one_epoch["dir"], tmp_path / "run")
    done = run_main(["--resume", os.path.join(run, "last.pt"), "--lr", "0.0005", "--epochs", 2])
    assert done.returncode == 0, describe(done)
    assert "--lr 0.0005 (the checkpoint's 0.001): epoch 2 trains at 0.00048, as if the run had started at 0.0005" \
        in done.stdout
    rows = read_rows(run)
    assert rows[1]["lr"] == pytest.approx(0.0005 * 0.96)
    assert load_pt(os.path.join(run, "last.pt"))["config"]["LR"] == 0.0005


def test_resuming_an_older_checkpoint_never_destroys_later_history(one_epoch, tmp_path):
    """A 2-epoch run whose best.pt is epoch 1: --resume best.pt in its own directory is refused in one
    line (metrics and last.pt untouched); with --run-dir NEW it continues there, NEW's metrics
    starting with the run's epoch-1 row."""
    run = copy_run(one_epoch["dir"], tmp_path / "run")
    done = run_main(["--resume", os.path.join(run, "last.pt"), "--epochs", 2])
    assert done.returncode == 0, describe(done)
    best = os.path.join(run, "best.pt")
    ckpt = load_pt(best)
    if ckpt["epoch"] != 1:  # make best.pt the older checkpoint whatever the accuracies did
        torch.save(load_pt(os.path.join(one_epoch["dir"], "last.pt")), best)
    before = read_rows(run)
    one_line_error(run_main(["--resume", best, "--epochs", 3]), 2, "holds the same run up to epoch 2",
                   "--run-dir NEW_DIR")
    assert read_rows(run) == before and load_pt(os.path.join(run, "last.pt"))["epoch"] == 2
    new = str(tmp_path / "new")
    done = run_main(["--resume", best, "--epochs", 2, "--run-dir", new])
    assert done.returncode == 0, describe(done)
    rows = read_rows(new)
    assert [r["epoch"] for r in rows] == [1, 2] and rows[0] == before[0]
    assert read_rows(run) == before


@pytest.mark.parametrize("capability, expected", [((6, 1), None), ((7, 0), torch.float16), ((7, 5), torch.float16),
                                                  ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_bf16_autocast_only_where_the_gpu_runs_it_natively(monkeypatch, capability, expected):
    """A100 (8.0) and H100 (9.0) train in bf16; a V100 (7.0) or T4 (7.5) in fp16 with a gradient
    scaler; a P40 (6.1, no fp16 tensor cores) in fp32; the start-up text says which and why.
    Without AMP, fp32 everywhere."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    dtype, why = runtime.amp_choice(torch.device("cuda"), True)
    assert dtype == expected and f"{capability[0]}.{capability[1]}" in why
    assert ("no native bf16" in why) == (expected != torch.bfloat16)
    assert why.startswith({None: "fp32", torch.float16: "fp16 autocast with a gradient scaler",
                           torch.bfloat16: "bf16 autocast"}[expected])
    assert (runtime.loss_scaler(torch.device("cpu"), expected) is not None) == (expected == torch.float16)
    assert runtime.amp_choice(torch.device("cuda"), False) == (None, "fp32, --no-amp")


# ---- preemption: SIGTERM, SIGUSR1 and Ctrl-C write the position and stop ----

EXACT = ["--no-amp"]  # fp32 on every CPU: the resumed run equals the uninterrupted one to the last digit


def same_run(run_a, run_b):
    """The same metrics (all but the times) and the same weights, Adam state and RNG, exactly."""
    timeless = [{k: v for k, v in r.items() if "seconds" not in k and "per_s" not in k} for r in read_rows(run_a)]
    assert timeless == [{k: v for k, v in r.items() if "seconds" not in k and "per_s" not in k}
                        for r in read_rows(run_b)]
    a, b = load_pt(os.path.join(run_a, "last.pt")), load_pt(os.path.join(run_b, "last.pt"))
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for k, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][k][name]), (k, name)
    assert torch.equal(a["rng_state"]["cpu"], b["rng_state"]["cpu"]) and a["epoch"] == b["epoch"]
    assert "partial" not in a and "partial" not in b


@pytest.fixture(scope="module")
def straight_three(tiny_mnist, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("straight") / "run")
    done = run_main(train_args(tiny_mnist["root"], run, *EXACT, epochs=3))
    assert done.returncode == 0, describe(done)
    return run


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGUSR1, 138), (signal.SIGINT, 130)])
def test_a_stop_signal_mid_epoch_writes_the_position_and_resume_equals_the_uninterrupted_run(
        tiny_mnist, tmp_path, monkeypatch, straight_three, signum, code):
    """The signal arrives during batch 4 of epoch 2 (10 batches an epoch): the run finishes that
    batch, writes last.pt with the position (no temporary file left), says so in one line and exits
    128 + the signal; --resume then ends exactly where the uninterrupted 3-epoch run ends."""
    calls, real_call = [0], cn.BatchLoss.__call__

    def call(self, sample):
        calls[0] += 1
        if calls[0] == 16:  # epoch 1: calls 1-10, its test pass 11-12; epoch 2: 13 on
            os.kill(os.getpid(), signum)
        return real_call(self, sample)

    monkeypatch.setattr(cn.BatchLoss, "__call__", call)
    run = str(tmp_path / "run")
    done = run_main(train_args(tiny_mnist["root"], run, *EXACT, epochs=3))
    last = os.path.join(run, "last.pt")
    one_line_error(done, code, f"stopped by {signal.Signals(signum).name} in epoch 2 after batch 4 of 10",
                   f"continue with --resume {last}")
    ckpt = load_pt(last)
    assert ckpt["epoch"] == 1 and ckpt["partial"]["batch"] == 4 and len(ckpt["partial"]["plan"]["order"]) == 200
    assert [r["epoch"] for r in read_rows(run)] == [1] and not [f for f in os.listdir(run) if ".tmp" in f]
    monkeypatch.setattr(cn.BatchLoss, "__call__", real_call)
    done = run_main(["--resume", last])
    assert done.returncode == 0 and "resumed from epoch 1, batch 4 of epoch 2" in done.stdout, describe(done)
    same_run(run, straight_three)


def signal_at_call(monkeypatch, k, signum=signal.SIGTERM):
    """Send `signum` to this process during BatchLoss's k-th call (10 training batches an epoch, then
    2 test batches: calls 1-10 train epoch 1, 11-12 test it, 13 on are epoch 2); -> undo()."""
    calls, real_call = [0], cn.BatchLoss.__call__

    def call(self, sample):
        calls[0] += 1
        if calls[0] == k:
            os.kill(os.getpid(), signum)
        return real_call(self, sample)

    monkeypatch.setattr(cn.BatchLoss, "__call__", call)
    return lambda: monkeypatch.setattr(cn.BatchLoss, "__call__", real_call)


def signal_between_epochs(monkeypatch):
    """SIGTERM while epoch 1's row is printed: after its test pass, before its checkpoints."""
    real = cn.print_epoch

    def print_epoch(row, *args):
        if row["epoch"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(row, *args)

    monkeypatch.setattr(cn, "print_epoch", print_epoch)
    return lambda: monkeypatch.setattr(cn, "print_epoch", real)


@pytest.mark.parametrize("point, stopped, epoch", [
    ("first epoch", "in epoch 1 after batch 4 of 10", 0),
    ("test pass", "after epoch 1", 1),
    ("between epochs", "after epoch 1", 1),
])
def test_a_run_stopped_at_any_point_resumes_exactly(tiny_mnist, tmp_path, monkeypatch, straight_three, point,
                                                    stopped, epoch):
    """SIGTERM inside the first epoch (no epoch finished: last.pt holds epoch 0 and the position),
    inside the test pass of epoch 1, or between epochs 1 and 2 (the row printed, the checkpoints
    not yet written): exit 143 with one line, and `--resume auto` with the same flags (what a
    requeued job runs) ends exactly where the uninterrupted run ends."""
    run = str(tmp_path / "run")
    args = train_args(tiny_mnist["root"], run, *EXACT, "--resume", "auto", epochs=3)
    undo = signal_between_epochs(monkeypatch) if point == "between epochs" else \
        signal_at_call(monkeypatch, 4 if point == "first epoch" else 11)
    last = os.path.join(run, "last.pt")
    one_line_error(run_main(args), 143, f"stopped by SIGTERM {stopped}", f"continue with --resume {last}")
    ckpt = load_pt(last)
    assert ckpt["epoch"] == epoch and ("partial" in ckpt) == (point == "first epoch")
    assert (epoch == 0 and not os.path.exists(os.path.join(run, "metrics.jsonl"))) or \
        [r["epoch"] for r in read_rows(run)] == [1]
    undo()
    done = run_main(args)
    assert done.returncode == 0, describe(done)
    assert ("no epoch finished yet" in done.stdout) == (point == "first epoch"), describe(done)
    same_run(run, straight_three)


def test_a_position_with_non_finite_weights_is_never_written(one_epoch, tmp_path, monkeypatch):
    """A stop signal in epoch 2 whose step made a weight NaN (before any progress update saw it):
    the position is not written; exit 4 with one line naming the weight, and last.pt (and best.pt)
    keep epoch 1, finite."""
    run = copy_run(one_epoch["dir"], tmp_path / "run")
    calls, real = [0], cn.Trainer.on_update

    def on_update(self, state):
        calls[0] += 1
        if calls[0] == 3:  # epoch 2's third batch: its loss was finite, the weights after its step are not
            os.kill(os.getpid(), signal.SIGTERM)
            with torch.no_grad():
                self.model.W[0, 0, 0, 0] = float("nan")
        return real(self, state)

    monkeypatch.setattr(cn.Trainer, "on_update", on_update)
    last = os.path.join(run, "last.pt")
    before = os.path.getmtime(last)
    done = run_main(["--resume", last, "--epochs", 2])
    one_line_error(done, 4, "the weights became NaN or infinite (W) in epoch 2", f"{last} keeps epoch 1")
    assert os.path.getmtime(last) == before and "partial" not in load_pt(last) and finite(last)
    assert finite(os.path.join(run, "best.pt")) and [r["epoch"] for r in read_rows(run)] == [1]


def test_an_epoch_end_with_non_finite_weights_or_adam_state_writes_nothing(one_epoch, tmp_path):
    """RunRecord.end_epoch, whatever calls it: a checkpoint holding a NaN weight or a NaN in Adam's
    state is refused (NonFiniteLoss, exit 4) before the metrics row, best.pt or last.pt is written."""
    run = copy_run(one_epoch["dir"], tmp_path / "run")
    good = load_pt(os.path.join(run, "last.pt"))
    rows = read_rows(run)
    for where in ("model", "optimizer"):
        bad = load_pt(os.path.join(run, "last.pt"))
        state = bad["model"]["W"] if where == "model" else bad["optimizer"]["state"][0]["exp_avg"]
        state.view(-1)[0] = float("inf")
        record = runtime.RunRecord(run, runtime.Distributed({}), saved_epoch=1, best_accuracy=0.0)
        with pytest.raises(runtime.NonFiniteLoss, match="keeps epoch 1") as info:
            record.end_epoch(dict(rows[0], epoch=2, test_accuracy=100.0), lambda: dict(bad, epoch=2))
        assert ("W" if where == "model" else "Adam's exp_avg of parameter 0") in str(info.value)
        assert runtime.how_it_ended(info.value, {}, True)[0] == 4
        assert read_rows(run) == rows and load_pt(os.path.join(run, "best.pt"))["epoch"] == 1
        assert torch.equal(load_pt(os.path.join(run, "last.pt"))["model"]["W"], good["model"]["W"])


@pytest.fixture(scope="module")
def stopped_in_epoch_2(tiny_mnist, tmp_path_factory):
    """A run stopped by SIGTERM after batch 4 of epoch 2 (last.pt holds the position)."""
    run = str(tmp_path_factory.mktemp("stopped") / "run")
    with pytest.MonkeyPatch.context() as monkeypatch:
        signal_at_call(monkeypatch, 16)
        done = run_main(train_args(tiny_mnist["root"], run, *EXACT, epochs=3))
    assert done.returncode == 143, describe(done)
    return run


@pytest.mark.parametrize("flag, value", [("--batch-size", 40), ("--train-size", 100),
                                         ("--dataset", "fashion-mnist")])
def test_a_mid_epoch_resume_that_would_change_the_epochs_batches_is_refused(stopped_in_epoch_2, tmp_path, flag,
                                                                             value):
    """--resume of a position inside epoch 2 with a setting that orders or cuts that epoch otherwise:
    exit 2, one line naming the setting, nothing written; the same checkpoint resumes without it."""
    run = copy_run(stopped_in_epoch_2, tmp_path / "run")
    last = os.path.join(run, "last.pt")
    before = sorted(os.listdir(run)), read_rows(run)
    one_line_error(run_main(["--resume", last, flag, value]), 2,
                   f"the run stopped inside epoch 2, after batch 4; {flag} {value} (the checkpoint's ",
                   "would change that epoch's order and batches")
    assert (sorted(os.listdir(run)), read_rows(run)) == before and load_pt(last)["partial"]["batch"] == 4


def test_a_mid_epoch_resume_on_a_training_set_of_another_size_is_refused(stopped_in_epoch_2, tmp_path):
    """The same settings but a data directory whose training set has another size: one line."""
    run = copy_run(stopped_in_epoch_2, tmp_path / "run")
    other = write_mnist(str(tmp_path / "other"), n_train=120)["root"]
    one_line_error(run_main(["--resume", os.path.join(run, "last.pt"), "--data-dir", other]), 2,
                   "the epoch it stopped in was ordered over 200 training images, and the training set now has 120")


def test_export_writes_nothing_that_fp16_cannot_hold(one_epoch, tmp_path):
    """--export-weights of a weight beyond fp16's range: one line, no file."""
    path = str(tmp_path / "big.pt")
    ckpt = load_pt(os.path.join(one_epoch["dir"], "last.pt"))
    ckpt["model"]["W"][0, 0, 0, 0] = 1e6
    torch.save(ckpt, path)
    one_line_error(run_main(["--export-weights", tmp_path / "w.pt", "--resume", path]), 2,
                   "--export-weights: W is not finite in fp16")
    assert not os.path.exists(tmp_path / "w.pt")


FP16 = "fp16 autocast with a gradient scaler: compute capability 7.5 (faked on the CPU)"


def fp16_as_below_8_0(monkeypatch):
    """Train on the CPU as a GPU below compute capability 8.0 does: fp16 autocast with its gradient
    scaler (torch runs both on the CPU: torch.amp.GradScaler("cpu"))."""
    def choice(device, enabled):
        return (torch.float16, FP16) if enabled else (None, "fp32, --no-amp")

    monkeypatch.setattr(runtime, "amp_choice", choice)
    monkeypatch.setattr(cn, "amp_choice", choice)


def test_fp16_with_a_gradient_scaler_trains_and_resumes_mid_epoch_exactly(tiny_mnist, tmp_path, monkeypatch):
    """fp16 autocast (the routing and the loss in fp32): the start-up line says so, the scaler's state
    is in every checkpoint, and a run stopped inside epoch 2 resumes to the uninterrupted run's
    weights, Adam state and scaler state, exactly."""
    fp16_as_below_8_0(monkeypatch)
    straight, run = str(tmp_path / "straight"), str(tmp_path / "run")
    done = run_main(train_args(tiny_mnist["root"], straight, epochs=3))
    assert done.returncode == 0 and f"parameters on cpu ({FP16})" in done.stdout, describe(done)
    undo = signal_at_call(monkeypatch, 16)
    one_line_error(run_main(train_args(tiny_mnist["root"], run, epochs=3)), 143, "stopped by SIGTERM in epoch 2")
    stopped = load_pt(os.path.join(run, "last.pt"))
    assert stopped["partial"]["batch"] == 4 and stopped["scaler"]["scale"] > 0
    undo()
    done = run_main(["--resume", os.path.join(run, "last.pt")])
    assert done.returncode == 0, describe(done)
    same_run(run, straight)
    a, b = load_pt(os.path.join(run, "last.pt")), load_pt(os.path.join(straight, "last.pt"))
    assert a["scaler"] == b["scaler"] and a["scaler"]["_growth_tracker"] == 30  # 30 steps, none overflowed


def test_the_scaler_scales_the_training_loss_only(monkeypatch, digit_batch):
    """BatchLoss under fp16: training returns the loss times the scale (for the backward pass) while
    the loss it records (network.last, the metrics') is the plain one; evaluation is not scaled."""
    fp16_as_below_8_0(monkeypatch)
    cfg = dict(cn.default_config(), CONV1_CHANNELS=16, PRIMARY_CAPS=4, DECODER_HIDDEN1=32, DECODER_HIDDEN2=64)
    model = cn.build_model(cfg)
    network = cn.BatchLoss.for_run(model, dict(cfg, MAX_SHIFT=0), torch.device("cpu"))
    assert network.dtype == torch.float16 and isinstance(network.scaler, torch.amp.GradScaler)
    images = (digit_batch[0][:, 0] * 255).to(torch.uint8)
    model.train()
    scaled, _ = network((images, digit_batch[1]))
    assert scaled.item() == pytest.approx(network.last[0].item() * 65536.0, rel=1e-6)
    model.eval()
    with torch.no_grad():
        plain, _ = network((images, digit_batch[1]))
    assert plain.item() == pytest.approx(network.last[0].item()) and plain.item() < 10


def test_sigterm_from_outside_stops_within_seconds_and_resumes_exactly(tiny_mnist, tmp_path):
    """A real SIGTERM to a training process, wherever it lands after the first epoch: exit 143 within
    a few seconds, one 'stopped by SIGTERM' line, no traceback, no temporary file; resumed to
    the same epoch count, the run equals an uninterrupted one."""
    run = str(tmp_path / "run")
    args = train_args(tiny_mnist["root"], run, *EXACT, "--batch-size", 4, epochs=50)
    proc = subprocess.Popen([sys.executable, SCRIPT, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"))
    try:
        deadline = time.monotonic() + 240
        while not (os.path.exists(os.path.join(run, "metrics.jsonl")) and read_rows(run)):
            assert proc.poll() is None and time.monotonic() < deadline, "no epoch finished"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        out, err = proc.communicate(timeout=120)
        stopped_after = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143 and stopped_after < 10, (stopped_after, err[-3000:])
    assert "Traceback" not in err and "stopped by SIGTERM" in err and not [f for f in os.listdir(run) if ".tmp" in f]
    ckpt = load_pt(os.path.join(run, "last.pt"))
    epochs = ckpt["epoch"] + 1
    done = run_main(["--resume", os.path.join(run, "last.pt"), "--epochs", epochs])
    assert done.returncode == 0, describe(done)
    straight = str(tmp_path / "straight")
    done = run_main(train_args(tiny_mnist["root"], straight, *EXACT, "--batch-size", 4, epochs=epochs))
    assert done.returncode == 0, describe(done)
    same_run(run, straight)


# ---- out of memory: one line, exit code 3, never a compile failure ----

OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def test_out_of_memory_inside_the_compiled_layer_is_not_a_compile_failure(capsys):
    """An out-of-memory error that torch.compile wraps in its own exception type propagates: no
    'torch.compile failed' fallback to eager (which would not fit either)."""
    layer = fast.CompiledOrEager(lambda x: x)

    def compiled(x):
        try:
            raise OOM("CUDA out of memory. Tried to allocate 20.00 GiB")
        except OOM as e:
            raise RuntimeError("backend='inductor' raised an error") from e

    layer.fn = compiled
    with pytest.raises(RuntimeError) as info:
        layer(torch.ones(1))
    assert runtime.is_out_of_memory(info.value) and not layer.failed
    assert "torch.compile failed" not in capsys.readouterr().err
    assert not runtime.is_out_of_memory(RuntimeError("shape mismatch"))


def test_out_of_memory_mid_run_is_one_line_with_exit_3_and_the_checkpoint_intact(one_epoch, tmp_path, monkeypatch):
    run = copy_run(one_epoch["dir"], tmp_path / "run")
    real, calls = cn.factored_routing, [0]

    def layer(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            raise OOM("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.11 GiB total capacity)")
        return real(*args, **kwargs)

    monkeypatch.setattr(cn, "factored_routing", layer)
    last = os.path.join(run, "last.pt")
    done = run_main(["--resume", last, "--epochs", 2])
    one_line_error(done, 3, "out of memory (OutOfMemoryError) at --batch-size 20, --eval-batch-size 50: lower them")
    assert load_pt(last)["epoch"] == 1 and [r["epoch"] for r in read_rows(run)] == [1]

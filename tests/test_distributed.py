"""torchrun with DistributedDataParallel on the CPU (gloo, loopback only), tiny data (the tests of
what the processes compute start them with torchrun's environment but without its launcher,
`two_processes`): the same training as one process, one voice, resume across process counts, --resume auto, faults, two
"nodes" on this machine, and a batch the world size does not divide."""

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import torch

from conftest import ROOT, SCRIPT, describe, load_pt, read_rows, run_main, train_args

# An odd training set: 190 images in batches of 20 end with a batch of 10 (5 per process); shifts
# on; fp32, where the same sums in another order agree to about 1e-7 (bf16 autocast rounds the
# convolutions of a half batch differently from the whole batch's: the last test below).
ODD = ["--train-size", 190, "--max-shift", 2, "--no-amp"]
TOLERANCE = 1e-5


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(args, nproc=2, nnodes=1, node_rank=0, port=None, script=SCRIPT):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--nnodes", str(nnodes),
            "--node-rank", str(node_rank), "--master-addr", "127.0.0.1", "--master-port", str(port or free_port()),
            script, *map(str, args)]


def env():
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def torchrun(args, nproc=2, timeout=600):
    done = subprocess.run(torchrun_command(args, nproc), cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=timeout)
    return done


def two_processes(args, timeout=600):
    """The script in two processes with the environment torchrun gives its workers (RANK,
    WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), started here without
    torchrun's launcher process (rank 0 then holds the store every process meets at): for the tests
    about what the two processes compute, where the launcher adds only its start-up (about 3 s of
    CPU). What torchrun itself does (passing on signals, ending the job when a worker dies, exit
    codes, nodes) is tested through torchrun above and below. -> a CompletedProcess: both
    processes' output (rank 0's first), the first non-zero exit code or 0."""
    port, procs = free_port(), []
    files = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in range(2)]  # no pipe to fill
    try:
        for rank, (out, err) in enumerate(files):
            procs.append(subprocess.Popen([sys.executable, SCRIPT, *map(str, args)], cwd=ROOT, stdout=out, stderr=err,
                                          env=dict(env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                                                   LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                                   MASTER_PORT=str(port))))
        deadline = time.monotonic() + timeout
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        texts = []
        for stream in (0, 1):  # stdout, then stderr: rank 0's first
            for pair in files:
                pair[stream].seek(0)
            texts.append("".join(pair[stream].read() for pair in files))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for pair in files:
            for f in pair:
                f.close()
    code = next((proc.returncode for proc in procs if proc.returncode), 0)
    return subprocess.CompletedProcess(args, code, *texts)


def same_rows(a, b, tolerance=TOLERANCE):
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b]
    for x, y in zip(a, b):
        for key in ("lr", "train_loss", "train_accuracy", "test_loss", "test_accuracy"):
            assert x[key] == pytest.approx(y[key], rel=tolerance), (x["epoch"], key)


def same_weights(path_a, path_b, tolerance=TOLERANCE):
    a, b = load_pt(path_a)["model"], load_pt(path_b)["model"]
    assert a.keys() == b.keys() and not any(k.startswith("module.") for k in a)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=tolerance, atol=tolerance, msg=name)


@pytest.fixture(scope="module")
def one_and_two(tiny_mnist, tmp_path_factory):
    """The same 2-epoch run (seed 0, shifts on, a smaller last batch) in one process and in two."""
    base = tmp_path_factory.mktemp("ddp")
    one, two = str(base / "one"), str(base / "two")
    done_one = run_main(train_args(tiny_mnist["root"], one, *ODD, epochs=2))
    assert done_one.returncode == 0, describe(done_one)
    done_two = two_processes(train_args(tiny_mnist["root"], two, *ODD, epochs=2))
    assert done_two.returncode == 0, describe(done_two)
    return {"one": one, "two": two, "process": done_two, "data": tiny_mnist}


def test_two_processes_train_exactly_as_one(one_and_two):
    """Metrics rows and final weights of the 2-process run equal the 1-process run's (to 1e-5)."""
    same_rows(read_rows(one_and_two["two"]), read_rows(one_and_two["one"]))
    same_weights(os.path.join(one_and_two["two"], "last.pt"), os.path.join(one_and_two["one"], "last.pt"))


def test_only_rank_0_prints_and_writes(one_and_two):
    """One start-up line, one line per epoch, one metrics row per epoch, one set of checkpoints."""
    out = one_and_two["process"].stdout
    assert out.count("CapsNet: ") == 1 and out.count("torchrun: 2 processes (gloo)") == 1
    assert out.count("epoch 1/2 ") == 1 and out.count("epoch 2/2 ") == 1
    assert "Traceback" not in one_and_two["process"].stderr
    assert "Grad strides" not in one_and_two["process"].stderr
    assert [r["epoch"] for r in read_rows(one_and_two["two"])] == [1, 2]
    assert sorted(f for f in os.listdir(one_and_two["two"]) if not f.startswith(".")) == \
        ["best.pt", "last.pt", "metrics.jsonl"]


def test_a_checkpoint_of_two_processes_continues_in_one(one_and_two, tmp_path):
    """A 1-epoch run in 2 processes, continued in 1 (as on a machine with fewer GPUs), ends where the
    uninterrupted run ends (two processes continuing their own checkpoint: the mid-epoch test below)."""
    data = one_and_two["data"]["root"]
    a = str(tmp_path / "two_then_one")
    done = two_processes(train_args(data, a, *ODD, epochs=1))
    assert done.returncode == 0, describe(done)
    done = run_main(["--resume", os.path.join(a, "last.pt"), "--epochs", 2])
    assert done.returncode == 0, describe(done)
    same_rows(read_rows(a), read_rows(one_and_two["one"]))
    same_weights(os.path.join(a, "last.pt"), os.path.join(one_and_two["one"], "last.pt"))


def test_resume_auto_starts_fresh_then_continues(tiny_mnist, tmp_path):
    """--resume auto without RUN_DIR/last.pt starts a new run in RUN_DIR itself (no -2 folder);
    given again, it continues that run."""
    run = str(tmp_path / "job")
    done = run_main(train_args(tiny_mnist["root"], run, "--resume", "auto", epochs=1))
    assert done.returncode == 0, describe(done)
    assert "--resume auto: no" in done.stdout and not os.path.exists(run + "-2")
    done = run_main(train_args(tiny_mnist["root"], run, "--resume", "auto", epochs=2))
    assert done.returncode == 0, describe(done)
    assert "resumed from epoch 1" in done.stdout
    assert [r["epoch"] for r in read_rows(run)] == [1, 2] and not os.path.exists(run + "-2")


def worker_pids(parent):
    """{RANK: pid} of the worker processes torchrun started."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                continue
            with open(f"/proc/{name}/environ", "rb") as f:
                environ = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
            found[int(environ[b"RANK"])] = int(name)
        except (OSError, KeyError, ValueError, IndexError):
            continue
    return found


def test_a_killed_worker_ends_the_job_and_leaves_last_pt_intact(one_and_two, tmp_path):
    """kill -9 of rank 1 after the first checkpoint: torchrun ends the job with a non-zero exit,
    last.pt still loads, and resumed (in one process) to the next epoch it ends where an
    uninterrupted run of as many epochs ends (to 1e-5: fp32, ODD)."""
    run, data = str(tmp_path / "run"), one_and_two["data"]["root"]
    proc = subprocess.Popen(torchrun_command(train_args(data, run, *ODD, epochs=200)), cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not os.path.exists(os.path.join(run, "last.pt")) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        pids = worker_pids(proc.pid)
        assert 1 in pids, pids
        os.kill(pids[1], signal.SIGKILL)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    ckpt = load_pt(os.path.join(run, "last.pt"))
    assert ckpt["epoch"] >= 1 and len(read_rows(run)) >= ckpt["epoch"]
    done = run_main(["--resume", os.path.join(run, "last.pt"), "--epochs", ckpt["epoch"] + 1])
    assert done.returncode == 0, describe(done)
    straight = one_and_two["one"]  # 2 epochs
    if ckpt["epoch"] + 1 != 2:
        straight = str(tmp_path / "straight")
        done = run_main(train_args(data, straight, *ODD, epochs=ckpt["epoch"] + 1))
        assert done.returncode == 0, describe(done)
    same_rows(read_rows(run), read_rows(straight))
    same_weights(os.path.join(run, "last.pt"), os.path.join(straight, "last.pt"))


def test_two_nodes_on_the_loopback_address_train_an_epoch(tiny_mnist, tmp_path):
    """Two torchrun launches, --nnodes 2 --node-rank 0/1, one process each, meet on 127.0.0.1."""
    run, port = str(tmp_path / "run"), free_port()
    args = train_args(tiny_mnist["root"], run, epochs=1)
    nodes = [subprocess.Popen(torchrun_command(args, nproc=1, nnodes=2, node_rank=rank, port=port), cwd=ROOT,
                              env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (out, err) in zip(nodes, outputs):
        assert node.returncode == 0, f"{out[-2000:]}\n{err[-3000:]}"
    assert "torchrun: 2 processes (gloo)" in outputs[0][0] and outputs[1][0].count("epoch 1/1") == 0
    assert [r["epoch"] for r in read_rows(run)] == [1]


def test_a_batch_the_world_size_does_not_divide_is_one_line(tiny_mnist, tmp_path):
    """--batch-size 21 in 2 processes: rank 0 says why in one line, the processes exit with code 2,
    and nothing is written."""
    run = str(tmp_path / "run")
    done = two_processes(train_args(tiny_mnist["root"], run, "--batch-size", 21, epochs=1))
    assert done.returncode == 2, describe(done)
    ours = [line for line in done.stderr.splitlines() if line.startswith("capsule_network.py: error:")]
    assert ours == ["capsule_network.py: error: --batch-size 21 must be a multiple of the number of processes "
                    "(2): each one takes an equal share of every batch"]
    assert not os.path.exists(run)


def test_the_compiled_layer_works_under_ddp(one_and_two, tmp_path):
    """The compiled capsule layer (with the DFT convolution and fused Adam of the default mode), in
    2 processes: it compiles, trains, and its epoch equals the eager one-process epoch (fp32) to
    1e-4 (compiled code adds in another order)."""
    data = one_and_two["data"]["root"]
    two = str(tmp_path / "two")
    done = two_processes(train_args(data, two, *ODD, "--compile", epochs=1))
    assert done.returncode == 0, describe(done)
    assert "Traceback" not in done.stderr and "torch.compile failed" not in done.stderr
    rows = read_rows(two)
    assert rows[0]["compile"] == "compiled"
    same_rows(rows, read_rows(one_and_two["one"])[:1], tolerance=1e-4)


def test_multimnist_in_two_processes_trains_as_in_one(tiny_mnist, tmp_path):
    """The MultiMNIST pairs of every batch are drawn alike in every process and split: the same
    rows (both-right and at-least-one scores included) as one process."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    args = ["--dataset", "multimnist", "--no-amp", "--no-compile"]
    done = run_main(train_args(tiny_mnist["root"], one, *args, epochs=1))
    assert done.returncode == 0, describe(done)
    done = two_processes(train_args(tiny_mnist["root"], two, *args, epochs=1))
    assert done.returncode == 0, describe(done)
    a, b = read_rows(two), read_rows(one)
    same_rows(a, b)
    for key in ("train_accuracy_any", "test_accuracy_any"):
        assert a[0][key] == pytest.approx(b[0][key], rel=TOLERANCE), key


def test_two_processes_stopped_mid_epoch_resume_in_step(one_and_two, tmp_path):
    """SIGTERM to torchrun after epoch 1 (it passes the signal to its workers): the two processes
    agree to stop at the same batch boundary (they compare notes every --progress-every batches),
    rank 0 writes both processes' position, each exits 143; two processes resumed from that
    checkpoint end where the uninterrupted two-process run ends (the same permutation and shifts in every
    rank), to 1e-5."""
    data = one_and_two["data"]["root"]
    run = str(tmp_path / "stopped")
    args = train_args(data, run, *ODD, "--progress-every", 2, epochs=50)
    proc = subprocess.Popen(torchrun_command(args), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    err = []  # rank 0's progress bar is on torchrun's stderr: the signal goes when epoch 2 begins
    reader = threading.Thread(target=lambda: err.extend(iter(lambda: proc.stderr.read(1), "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 240
        while "epoch 2/50 train" not in "".join(err):
            assert proc.poll() is None and time.monotonic() < deadline, "epoch 2 never began: " + "".join(err)[-3000:]
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    err = "".join(err)
    assert "stopped by SIGTERM in epoch 2 after batch" in err, err[-4000:]
    assert "Traceback" not in err.split("stopped by SIGTERM")[0], err[-4000:]
    ckpt = load_pt(os.path.join(run, "last.pt"))
    assert ckpt["epoch"] == 1 and ckpt["partial"]["batch"] % 2 == 0 and len(ckpt["partial"]["stats"]) == 2
    done = two_processes(["--resume", os.path.join(run, "last.pt"), "--epochs", 2])
    assert done.returncode == 0, describe(done)
    reference = one_and_two["two"]
    same_rows(read_rows(run), read_rows(reference))
    same_weights(os.path.join(run, "last.pt"), os.path.join(reference, "last.pt"))


# ---- a fault in one process ends every process alike (capsnet/faults.py) ----
INJECT = os.path.join(ROOT, "tests", "inject_fault.py")


@pytest.mark.parametrize("fault, code, line", [
    ("nan", 4, "the training loss became NaN or infinite at epoch 2, batch 3 (learning rate 0.00096): the run "
               "diverged; {last} keeps epoch 1; lower --lr, or resume an earlier checkpoint"),
    ("oom", 3, "out of memory (OutOfMemoryError) at --batch-size 20, --eval-batch-size 50: lower them; the "
               "checkpoints written so far are intact"),
    ("data", 2, "cannot load MNIST: train-images-idx3-ubyte is cut short (injected)"),
])
def test_a_fault_in_one_process_ends_every_process_alike(tiny_mnist, tmp_path, fault, code, line):
    """A NaN loss, an out-of-memory error (in epoch 2, step 3) or a data error (at loading) in rank
    1 alone: both processes exit within seconds with the same code, rank 0 prints the one line,
    and what is written follows one process's rules (last.pt and the rows keep epoch 1, finite;
    nothing at all for the data error)."""
    run, mark = str(tmp_path / "run"), str(tmp_path / "fault-time")
    environ = dict(env(), CAPSNET_TEST_FAULT=fault, CAPSNET_TEST_FAULT_STEP="13", CAPSNET_TEST_FAULT_FILE=mark)
    command = torchrun_command(train_args(tiny_mnist["root"], run, "--no-amp", epochs=3), script=INJECT)
    done = subprocess.run(command, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=600)
    ended = time.time()
    with open(mark, encoding="utf-8") as f:
        took = ended - float(f.read())
    ours = [l for l in done.stderr.splitlines() if l.startswith("capsule_network.py: error:")]
    last = os.path.join(run, "last.pt")
    assert ours == ["capsule_network.py: error: " + line.format(last=last)], describe(done)
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", done.stderr)
    assert done.returncode != 0 and codes and set(codes) == {str(code)}, describe(done)
    assert 'capsule_network.py", line' not in done.stderr and took < 20, (took, describe(done))  # no worker traceback
    if fault == "data":
        assert not os.path.exists(run)
    else:
        ckpt = load_pt(last)
        assert ckpt["epoch"] == 1 and "partial" not in ckpt and [r["epoch"] for r in read_rows(run)] == [1]
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
        assert not [f for f in os.listdir(run) if ".tmp" in f]


# ---- GPUs under torchrun, faked on the CPU ----
def test_nccl_is_told_the_process_gpu_where_torch_can(monkeypatch):
    """Distributed.start on a GPU: init_process_group("nccl", device_id=that GPU) where this torch
    takes device_id (2.3 on); gloo on the CPU, without it."""
    import inspect

    import torch.distributed as tdist
    from capsnet import runtime

    takes, calls = "device_id" in inspect.signature(tdist.init_process_group).parameters, []
    monkeypatch.setattr(tdist, "init_process_group", lambda backend, **kw: calls.append((backend, kw)))
    world = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}  # no MASTER_ADDR: no store to meet at
    runtime.Distributed(world).start(torch.device("cuda", 1))
    runtime.Distributed(world).start(torch.device("cpu"))
    assert calls == [("nccl", {"device_id": torch.device("cuda", 1)} if takes else {}), ("gloo", {})]


def test_more_processes_than_gpus_is_one_line(monkeypatch):
    """torchrun --nproc-per-node 4 on a machine with 2 GPUs: refused in one line before any GPU is
    touched (each process used to share a GPU by LOCAL_RANK modulo the count); as many as the GPUs
    are fine."""
    from capsnet import runtime

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    four = runtime.Distributed({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4"})
    with pytest.raises(runtime.UsageError) as info:
        four.device(torch.device("cuda"))
    assert str(info.value) == ("torchrun started 4 processes on this machine, which has 2 GPUs: one process per GPU "
                               "(--nproc-per-node 2), or --device cpu")
    assert runtime.how_it_ended(info.value, {}, True)[0] == 2 and not chosen
    two = runtime.Distributed({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert two.device(torch.device("cuda")) == torch.device("cuda", 1) == chosen[0]

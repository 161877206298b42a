"""The process around capsule_network.py's training: one-line usage errors, devices and bf16,
the RNG state, Ctrl-C, atomic checkpoints, the metrics file, run directories, and torchrun's
process group (one process per GPU, or per CPU share)."""

import contextlib
import ctypes
import inspect
import json
import math
import os
import re
import shutil
import signal
import sys
import threading
import warnings

import torch

from capsnet.faults import WRITING, FaultBoard, OtherProcessFailed

DEVICES = ("auto", "cpu", "cuda", "mps")


class UsageError(Exception):
    """A bad constant, flag or input: reported as one line, exit code 2."""


def truncate_metrics(run_dir, last_epoch, source=None):
    """Rewrite run_dir's metrics.jsonl with the rows up to the checkpoint's epoch: drops rows of an
    epoch whose checkpoint was never written and a last line cut short by a crash. With `source`
    (another run directory: a run continued in a new one), the rows are that directory's."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(os.path.join(source or run_dir, "metrics.jsonl")):
        return
    kept = [r for r in read_metrics(source or run_dir) if r.get("epoch", math.inf) <= last_epoch]
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(path + ".tmp", path)


def resume_into(run_dir, ckpt_path, epoch):
    """Make `run_dir` ready to continue the checkpoint at `ckpt_path` (epoch `epoch`) without
    destroying history. Its own run's last.pt: the metrics rows past its epoch (of an epoch whose
    checkpoint was never written) are dropped. Another checkpoint of the same run directory that
    is older than its last.pt (best.pt, say) is refused: continuing there would overwrite the later
    epochs. Into a new run directory (--run-dir): it starts with the checkpoint's run's metrics rows
    up to that epoch."""
    run_dir, ckpt_path = os.path.abspath(run_dir), os.path.abspath(ckpt_path)
    source = os.path.dirname(ckpt_path)
    last = os.path.join(run_dir, "last.pt")
    if ckpt_path == last:
        truncate_metrics(run_dir, epoch)
        return
    later = [r["epoch"] for r in read_metrics(run_dir) if r.get("epoch", 0) > epoch]
    if os.path.exists(last):
        later.append(torch.load(last, map_location="cpu", weights_only=True, mmap=True).get("epoch", 0))
    if max(later, default=0) > epoch:
        raise UsageError(f"--resume {ckpt_path} (epoch {epoch}): {run_dir} holds the same run up to epoch "
                         f"{max(later)}, which continuing there would overwrite; continue in a new directory "
                         f"with --run-dir NEW_DIR")
    if source != run_dir:
        if any(os.path.exists(os.path.join(run_dir, f)) for f in ("metrics.jsonl", "best.pt")):
            raise UsageError(f"--run-dir {run_dir} holds another run: choose an empty directory to continue "
                             f"{ckpt_path} in (or --resume {last})")
        os.makedirs(run_dir, exist_ok=True)
        truncate_metrics(run_dir, epoch, source)


def fresh_run_dir(run_dir):
    """run_dir, or run_dir-2, -3, ... if it already holds a run: a new run never overwrites or
    mixes with an earlier one (continue that one with --resume)."""
    def holds_run(d):
        return any(os.path.exists(os.path.join(d, f)) for f in ("metrics.jsonl", "last.pt", "best.pt"))

    candidate, k = run_dir, 1
    while holds_run(candidate):
        k += 1
        candidate = f"{run_dir.rstrip(os.sep)}-{k}"
    if candidate != run_dir:
        print(f"{run_dir} holds an earlier run (continue it with --resume {os.path.join(run_dir, 'last.pt')}); "
              f"this run writes to {candidate}")
    return candidate


def read_metrics(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a crash or a full disk
                continue
    return rows


class Preempted(Exception):
    """SIGTERM, SIGUSR1 or Ctrl-C stopped training at a batch boundary, after a checkpoint of the
    position was written; `signum` gives the exit code, 128 + signum."""

    def __init__(self, signum, message):
        super().__init__(message)
        self.signum = signum


STOP_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None), signal.SIGINT)
                     if s is not None)


@contextlib.contextmanager
def stop_signals():
    """While training: SIGTERM (a scheduler's preemption, torchrun's teardown), SIGUSR1 (SLURM's
    warning before it) and Ctrl-C only note that the run should stop (the list yielded gets the
    signal); the trainer stops at the next batch boundary with a checkpoint. A second Ctrl-C
    stops at once (KeyboardInterrupt). Off the main thread: nothing is installed."""
    caught = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return

    def note(signum, frame):
        if signum == signal.SIGINT and caught:
            raise KeyboardInterrupt
        caught.append(signum)

    previous = {s: signal.signal(s, note) for s in STOP_SIGNALS}
    try:
        yield caught
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def is_out_of_memory(error):
    """Whether `error`, or an error it was raised from (torch.compile wraps them), is the CPU's or a
    GPU's allocator running out of memory."""
    while error is not None:
        if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError" or \
                "out of memory" in str(error).lower() or "can't allocate memory" in str(error).lower():
            return True
        error = error.__cause__ or error.__context__
    return False


def how_it_ended(error, where, training):
    """(exit code, the one line for stderr) of an error that ended capsule_network.py, or (None, None)
    for an unexpected one (its traceback then shows): 2 a usage error (a bad flag, file or value),
    3 out of memory (CPU or GPU, eager or compiled), 4 a diverged run (NonFiniteLoss), 128 + the
    signal for a stop signal, 130 Ctrl-C outside training. `where`: the run directory and batch
    sizes, as far as known."""
    name = "capsule_network.py: error:"
    if isinstance(error, UsageError):
        return 2, f"{name} {error}"
    if isinstance(error, OtherProcessFailed):  # Distributed.settle finds that process's line
        return 1, f"{name} {error}"
    if isinstance(error, NonFiniteLoss):
        return 4, f"{name} {error}"
    if isinstance(error, Preempted):
        return 128 + error.signum, f"\n{error}"
    if isinstance(error, KeyboardInterrupt):  # outside training, or a second Ctrl-C: at once
        last = os.path.join(where.get("run_dir", ""), "last.pt")
        return 130, (f"\ninterrupted: continue with --resume {last}" if "run_dir" in where and os.path.exists(last)
                     else "\ninterrupted" + (": no checkpoint was written" if training else ""))
    if is_out_of_memory(error):
        return 3, (f"{name} out of memory ({type(error).__name__}) at --batch-size {where.get('batch', '?')}, "
                   f"--eval-batch-size {where.get('eval_batch', '?')}: lower them; the checkpoints written so "
                   f"far are intact")
    return None, None


class NonFiniteLoss(Exception):
    """The training loss or the weights became NaN or infinite: the run stops (exit code 4)."""


def atomic_torch_save(obj, path):
    """Write to a temporary file in the same directory, fsync, then rename over `path`."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path):
    """A training checkpoint (dict with 'model', 'optimizer', ...) or weights alone (a state dict,
    possibly fp16). Raises UsageError with one line if the file is unusable."""
    if not os.path.isfile(path):
        raise UsageError(f"--resume: no checkpoint file at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"--resume: {path} is not a readable checkpoint ({type(e).__name__})") from None
    if isinstance(ckpt, dict) and "model" in ckpt:
        return dict(ckpt, path=path)
    if isinstance(ckpt, dict) and all(torch.is_tensor(v) for v in ckpt.values()):
        return {"model": ckpt, "path": path}
    raise UsageError(f"--resume: {path} holds neither a checkpoint nor a model state dict")


def first_non_finite(named):
    """The name of the first floating-point tensor of (name, tensor) pairs that holds a NaN or an
    infinity; None when none does."""
    return next((name for name, v in named if v.is_floating_point() and not torch.isfinite(v).all()), None)


def non_finite(ckpt):
    """The name of the first weight, or Adam state, of a checkpoint dict that is NaN or infinite;
    None when all are finite."""
    tensors = list(ckpt["model"].items())
    for index, state in ckpt.get("optimizer", {}).get("state", {}).items():
        tensors += [(f"Adam's {key} of parameter {index}", v) for key, v in state.items() if torch.is_tensor(v)]
    return first_non_finite(tensors)


def finite_weights(model):
    """Whether every parameter of `model` is finite (one device sync)."""
    return bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all())


def load_weights(model, state):
    """Load a state dict into `model`; weights that do not fit, or are not finite (a diverged
    run's), are one UsageError line."""
    name = first_non_finite(state.items())
    if name is not None:
        raise UsageError(f"--resume: the checkpoint's weights are not finite (NaN or inf in {name}): it "
                         f"comes from a diverged run; resume an earlier checkpoint or train again with a "
                         f"lower --lr")
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise UsageError(f"--resume: the weights do not fit this model's constants: {first}") from None


def part_of(n, rank, world):
    """Part `rank` of `world` contiguous parts of n rows, their sizes differing by at most one."""
    return slice(rank * n // world, (rank + 1) * n // world)


class Distributed:
    """The process group torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, ...); a plain `python capsule_network.py` is a world of one, and nothing here
    then does anything. Every process draws the same random numbers (the same seed, the same
    draws for the global batch), so each one can take its share of any batch by itself."""

    def __init__(self, environ=os.environ):
        self.environ = environ
        self.world = int(environ.get("WORLD_SIZE", "1"))
        self.rank = int(environ.get("RANK", "0"))
        self.local_rank = int(environ.get("LOCAL_RANK", "0"))
        self.local_world = int(environ.get("LOCAL_WORLD_SIZE", self.world))
        self.enabled = self.world > 1
        self.started, self.board = False, None  # board: the job's first fault (capsnet/faults.py)

    @property
    def main(self):
        return self.rank == 0

    def any(self, flag, device):
        """True on every process if `flag` is true on any (one collective; without torchrun, flag)."""
        if not self.enabled:
            return bool(flag)
        import torch.distributed as tdist

        box = torch.tensor([int(bool(flag))], device=device)
        tdist.all_reduce(box, op=tdist.ReduceOp.MAX)
        return bool(box.item())

    def earliest(self, index, device):
        """The smallest `index` >= 0 of all processes, or -1 where none has one (one collective;
        without torchrun, index): every process then stops at the same batch, with the same line."""
        if not self.enabled:
            return index
        import torch.distributed as tdist

        none = 2 ** 62
        box = torch.tensor([index if index >= 0 else none], device=device)
        tdist.all_reduce(box, op=tdist.ReduceOp.MIN)
        return -1 if int(box.item()) == none else int(box.item())

    def start(self, device):
        """Join the group: NCCL on CUDA, gloo on the CPU."""
        if self.enabled and not self.started:
            import torch.distributed as tdist

            bound = {}  # NCCL told this process's GPU at once (torch 2.3 on): no guess at the first barrier
            defined = tdist.distributed_c10d.init_process_group
            if device.type == "cuda" and "device_id" in inspect.signature(defined).parameters:
                bound["device_id"] = device
            tdist.init_process_group("nccl" if device.type == "cuda" else "gloo", **bound)
            self.started = True
            if "MASTER_ADDR" in self.environ:  # torchrun's store, where every process meets
                self.board = FaultBoard(self.environ, self.rank, self.world)

    def describe(self, device, batch):
        """The start-up line of a torchrun job."""
        return (f"torchrun: {self.world} processes ({'NCCL' if device.type == 'cuda' else 'gloo'}), each computing "
                f"{batch // self.world} of the {batch} images of every batch")

    def barrier(self):
        """Wait until every process is here: before they leave the group together (a process that
        tears down its connections while another still writes can abort that one's gloo threads)."""
        if self.started:
            import torch.distributed as tdist

            tdist.barrier()

    def stop(self):
        board, self.board = self.board, None
        if board is not None:
            board.close()
            if board.ending is not None:  # the job ends on a fault (settle): every process exits alike, now
                board.finish()
        if self.started:
            import torch.distributed as tdist

            tdist.destroy_process_group()
            self.started = False

    def device(self, device):
        """cuda -> cuda:LOCAL_RANK (and made current); other devices as they are. More processes on
        this machine (LOCAL_WORLD_SIZE) than it has GPUs: one UsageError line."""
        if self.enabled and device.type == "cuda":
            count = torch.cuda.device_count()
            if self.local_world > count:
                raise UsageError(f"torchrun started {self.local_world} processes on this machine, which has {count} "
                                 f"GPU{'s' * (count != 1)}: one process per GPU (--nproc-per-node {count}), or "
                                 f"--device cpu")
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        return device

    def own_rows(self, n):
        """This process's rows of a batch of n."""
        return part_of(n, self.rank, self.world)

    def gather(self, obj):
        """[obj of rank 0, obj of rank 1, ...] on every process."""
        if not self.enabled:
            return [obj]
        import torch.distributed as tdist

        every = [None] * self.world
        tdist.all_gather_object(every, obj)
        return every

    def from_main(self, obj):
        """Rank 0's obj, on every process."""
        if not self.enabled:
            return obj
        import torch.distributed as tdist

        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]


def together(dist, fn, *args):
    """fn(*args) in every process of `dist` (a Distributed), then one collective: if it raised in any
    process, every process raises (its own error, or OtherProcessFailed), so that none goes on
    alone into the next collective, or writes what one process would not. Without torchrun:
    fn(*args)."""
    if not dist.enabled:
        return fn(*args)
    try:
        result, error = fn(*args), None
    except Exception as e:  # noqa: BLE001 (raised again below, in every process)
        result, error = None, e
    failed = [rank for rank, bad in enumerate(dist.gather(error is not None)) if bad]
    if error is not None:
        raise error
    if failed:
        raise OtherProcessFailed(f"process {failed[0]} failed")
    return result


def settle(dist, error, code, line):
    """How this process ends: (exit code, one line) of how_it_ended for `error`; under torchrun
    the job's, the first fault any process posted (FaultBoard), so that every process ends
    alike. (None, None): this process's own unexpected error (its traceback shows; the others
    end with exit 1). Stop signals and Ctrl-C end each process by itself, as they are."""
    if dist.board is None or isinstance(error, (Preempted, KeyboardInterrupt)):
        return code, line
    dist.board.settled.set()
    if code is None or isinstance(error, OtherProcessFailed):  # another's fault reaching this process?
        found = dist.board.posted(FaultBoard.ACKS_WAIT if isinstance(error, OtherProcessFailed) else 3.0)
        if found is not None:
            return dist.board.post(*found[1:])
        if code is None:  # this process's own: the others end with exit 1 and a line that says where
            dist.board.post(1, f"capsule_network.py: error: process {dist.rank} failed with "
                               f"{type(error).__name__}; its traceback is on stderr")
            dist.board.ending = None  # the others are gone: this one ends as usual, with its traceback
            return None, None
    return dist.board.post(code, line)


NVIDIA_DRIVER_FILE = "/proc/driver/nvidia/version"  # the loaded NVIDIA kernel module's version line
_cuda_said = []  # what torch warned while finding out whether CUDA works (cuda_available)


def cuda_available():
    """torch.cuda.is_available(), with what torch warns while finding out (a driver too old for its
    CUDA, say) kept for unusable_gpu_line's one line instead of printed."""
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    _cuda_said.extend(str(w.message).strip() for w in said)
    return available


def resolve_device(name):
    if name == "auto":
        if cuda_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    available = {"cpu": True, "cuda": name == "cuda" and cuda_available(), "mps": torch.backends.mps.is_available()}
    if not available[name]:
        raise UsageError(f"--device {name} was asked for, but this machine has no {name.upper()} device")
    return torch.device(name)


def driver_version():
    """The NVIDIA driver's version ("550.54.14") from NVIDIA_DRIVER_FILE, or None."""
    try:
        with open(NVIDIA_DRIVER_FILE, encoding="utf-8") as f:
            found = re.search(r"Kernel Module(?: for [\w]+)?\s+(\d+(?:\.\d+)+)", f.read())
    except OSError:
        return None
    return found and found.group(1)


def wheel_index(driver):
    """A torch wheel index whose CUDA a driver of version `driver` runs (None: not known): CUDA 13.0
    needs driver 580, 12.8 needs 570, and CUDA 12 builds run on any 525 or newer."""
    major = int(driver.split(".")[0]) if driver else 0
    cuda = "cu130" if major >= 580 else "cu128" if major >= 570 else "cu126"
    note = "; drivers older than 525 need an update first" if driver and major < 525 else ""
    return f"https://download.pytorch.org/whl/{cuda}{note}"


def unusable_gpu_line():
    """One warning line when this machine has an NVIDIA GPU (nvidia-smi on the PATH, or the
    driver's NVIDIA_DRIVER_FILE) that this torch cannot use: the driver's version, what torch said,
    and what to install. None when there is no such GPU."""
    if not (shutil.which("nvidia-smi") or os.path.exists(NVIDIA_DRIVER_FILE)):
        return None
    driver = driver_version()
    build = f"torch {torch.__version__} (" + (f"built for CUDA {torch.version.cuda})" if torch.version.cuda
                                               else "a CPU-only build)")
    said = f" (torch: {_cuda_said[0].splitlines()[0]})" if _cuda_said else ""
    return (f"warning: this machine has an NVIDIA GPU (driver {driver or 'version unreadable'}) that {build} cannot "
            f"use{said}; training runs on the CPU. Install a torch build for the driver's CUDA, e.g. pip install "
            f"torch --index-url {wheel_index(driver)}")


def amp_dtype(device, enabled):
    """bf16 for autocast where the hardware runs it natively, else None (fp32)."""
    return amp_choice(device, enabled)[0]


def amp_choice(device, enabled):
    """(torch.bfloat16, torch.float16 or None, why) for autocast on `device`: bf16 only where it is
    native, so that it is faster and not an emulation: CUDA compute capability 8.0 or newer (Ampere
    on; older GPUs report bf16 support but run it in slow kernels), a CPU with avx512_bf16 or AMX.
    Below 8.0, from 7.0 (Volta, Turing: fp16 tensor cores), fp16 with a gradient scaler
    (loss_scaler: fp16's narrow range would flush small gradients to zero); older GPUs run fp16
    without tensor cores (Pascal's 6.1 at 1/64 of its fp32 rate), and train in fp32. The routing
    and the loss stay fp32 in every case."""
    if not enabled:
        return None, "fp32, --no-amp"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) >= (8, 0):
            return torch.bfloat16, f"bf16 autocast, native at compute capability {major}.{minor}"
        if major >= 7:
            return torch.float16, (f"fp16 autocast with a gradient scaler: compute capability {major}.{minor} has "
                                   f"fp16 tensor cores and no native bf16 (8.0 and newer do)")
        return None, (f"fp32: compute capability {major}.{minor} has no native bf16 (8.0 on) and no fp16 tensor "
                      f"cores (7.0 on)")
    if device.type == "cpu":
        # torch >= 2.5 says whether the CPU has avx512_bf16 or AMX; older releases cannot tell,
        # and train in fp32 (results/README.md measured them so)
        cpu = getattr(torch, "cpu", None)
        native = [getattr(cpu, n, lambda: False)() for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        if any(native):
            return torch.bfloat16, "bf16 autocast, native on this CPU (avx512_bf16 or AMX)"
        return None, "fp32: this CPU has no native bf16 (avx512_bf16 or AMX)"
    return None, f"fp32 on {device.type}"


def loss_scaler(device, dtype):
    """fp16 autocast's gradient scaler on `device` (torch.amp.GradScaler): the loss is scaled before
    the backward pass and the gradients unscaled before Adam, a step with an overflowed gradient
    skipped and the scale lowered. None for bf16 and fp32, which need none."""
    return torch.amp.GradScaler(device.type) if dtype == torch.float16 else None


class ScaledSteps:
    """The optimizer as torchnet's Engine steps it (zero_grad, step(closure)) under fp16's gradient
    scaler: the closure runs the scaled loss's backward, then scaler.step (Adam on the unscaled
    gradients, or nothing where one overflowed) and scaler.update."""

    def __init__(self, optimizer, scaler):
        self.optimizer, self.scaler = optimizer, scaler

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure):
        loss = closure()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss


def scaled_steps(optimizer, scaler, state=None):
    """What a training loop steps: the optimizer itself, or with fp16's `scaler` (its checkpointed
    `state` restored, so that a resumed run scales as the uninterrupted one) ScaledSteps."""
    if scaler is None:
        return optimizer
    if state:
        scaler.load_state_dict(state)
    return ScaledSteps(optimizer, scaler)


def autocast(device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def seed_everything(seed):
    torch.manual_seed(seed)  # seeds CPU, CUDA and MPS generators


def rng_state(device):
    """The generators this process draws from: the CPU's and, on a GPU, its own device's. Under
    torchrun every rank draws the same numbers (the same seed, the same draws for the global
    batch), so the state rank 0 saves is every rank's."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state, device):
    """Restore rng_state(device)'s generators on `device`, whatever device saved them: a checkpoint
    from a GPU resumes on the CPU (its CPU state alone), on another GPU or on fewer GPUs. Older
    checkpoints hold a list of every visible GPU's state: the first one is the state the training
    process (or rank 0) drew from, and so every rank's."""
    torch.set_rng_state(state["cpu"])
    saved = state.get(device.type)
    if saved is None:
        return
    if device.type == "cuda":
        torch.cuda.set_rng_state(saved[0] if isinstance(saved, (list, tuple)) else saved, device)
    elif device.type == "mps":
        torch.mps.set_rng_state(saved)


_malloc_tuned = None  # result of the first tune_cpu_malloc() call of this process
_libc = None
TRIM_HEADROOM = 4 << 30  # resident bytes above those after the last trim (or the first step) before the next trim
_trim_above = None


def tune_cpu_malloc():
    """Keep glibc from unmapping big activations after every step (they are page-faulted back on
    the next one; measured in results/README.md): big blocks come from the heap, and up to 1 GiB of
    freed memory stays with the process. Process-wide and done once: setup_process calls it, and
    fast.use_cpu_speedups' conv path at its first CPU forward. True when the settings took effect.
    trim_cpu_malloc bounds what the heap keeps."""
    global _malloc_tuned, _libc
    if _malloc_tuned is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
            m_trim_threshold, m_mmap_max = -1, -4
            _malloc_tuned = _libc.mallopt(m_mmap_max, 0) == 1 and _libc.mallopt(m_trim_threshold, 1 << 30) == 1
        except (OSError, AttributeError):
            _malloc_tuned = False
    return _malloc_tuned


def resident_bytes():
    """This process's resident memory (Linux: /proc/self/statm), or None where it cannot be read."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def trim_cpu_malloc():
    """After a training step, with the allocator tuned: once the process holds TRIM_HEADROOM more
    than after the last trim (the first call sets the mark), hand the heap's free pages back
    (malloc_trim). The tuned heap fragments for some shapes: CapsNet at 40x40 (4,608 children) grew
    by about 60 MiB a step until the kernel killed it (results/README.md). -> True when it trimmed."""
    global _trim_above
    resident = resident_bytes() if _malloc_tuned else None
    if resident is None:
        return False
    if _trim_above is None:
        _trim_above = resident + TRIM_HEADROOM
    if resident <= _trim_above:
        return False
    _libc.malloc_trim(0)
    _trim_above = (resident_bytes() or resident) + TRIM_HEADROOM
    return True


def setup_process(cfg, dist=None):
    """Device, seeded RNG and allocator settings shared by every mode -> (device, malloc tuned?).
    Under torchrun (`dist`) the device is this process's GPU (LOCAL_RANK)."""
    device = resolve_device(cfg["DEVICE"])
    if dist is not None:
        device = dist.device(device)
    seed_everything(cfg["SEED"])
    malloc_tuned = device.type == "cpu" and cfg["CPU_MALLOC_TUNING"] and tune_cpu_malloc()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        use_tf32()
    elif cfg["DEVICE"] == "auto" and device.type == "cpu" and (dist is None or dist.main):
        line = unusable_gpu_line()  # an NVIDIA GPU that this torch cannot use: said in one line
        if line:
            print(line, file=sys.stderr)
    return device, bool(malloc_tuned)


def use_tf32():
    """TF32 for the fp32 matrix products and convolutions on CUDA, through the API this torch has:
    fp32_precision = "tf32" where it exists (torch 2.9 on), else the older allow_tf32 flags (torch
    warns of the old ones where the new exist, and refuses to read one kind after the other was set)."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision") and hasattr(getattr(cudnn, "conv", None), "fp32_precision"):
        matmul.fp32_precision = "tf32"
        cudnn.conv.fp32_precision = "tf32"
    else:
        matmul.allow_tf32 = True
        cudnn.allow_tf32 = True


def device_name(device):
    """The GPU's name, or the CPU's model and its cores (recorded in metrics rows and benchmarks)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
            return f"{model} ({os.cpu_count()} cores)"
        except (OSError, StopIteration):
            return "cpu"
    return device.type


def wrap_ddp(model, device, dist):
    """Under torchrun: the DistributedDataParallel wrapper that averages the gradients over the
    processes (the model itself stays plain); else None. On CUDA its batch norms (Efficient-CapsNet's,
    DECODER_BN's) become SyncBatchNorm, in place, with the same parameters and buffers (the
    optimizer's, the checkpoint's): they normalise over the global batch, as one process does.
    torch synchronises batch norm on CUDA only: on the CPU each process normalises its share."""
    if not dist.enabled:
        return None
    if device.type == "cuda" and torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) is not model:
        raise ValueError("the model itself is a batch norm: nothing to train")  # convert_sync_batchnorm replaces children only
    # Conv1's weight (256, 1, 9, 9) gets its gradient with channels-last strides from the CPU path
    # (fast.CpuConvPath); with one input channel that is the same memory order, and DDP's warning
    # about it says nothing.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


class RunRecord:
    """What a run leaves in its directory, written by rank 0 alone: a metrics.jsonl row per epoch,
    best.pt and last.pt after each epoch, and last.pt with the position when a stop signal
    arrives inside an epoch. The row first: a run killed (kill -9) before its checkpoint resumes
    from the previous epoch and drops this row again (truncate_metrics), so metrics and
    checkpoints agree; best.pt before last.pt, so that last.pt never names a best epoch best.pt
    lacks. Stop signals wait (stop_signals) until the files are written."""

    def __init__(self, run_dir, dist, saved_epoch=0, best_accuracy=None):
        self.run_dir, self.dist = run_dir, dist
        self.saved_epoch, self.best_accuracy = saved_epoch, best_accuracy  # the epoch last.pt holds
        self.last = os.path.join(run_dir, "last.pt")

    def end_epoch(self, row, checkpoint):
        """The epoch's row and checkpoints (checkpoint(): the dict to save, made after best_accuracy
        is brought up to date) -> whether it is the best epoch so far."""
        is_best = self.best_accuracy is None or row["test_accuracy"] > self.best_accuracy
        if is_best:
            self.best_accuracy = row["test_accuracy"]
        ckpt = checkpoint()  # checked in every process (their weights are the same) before anything is written
        self.refuse_non_finite(ckpt, row["epoch"])
        self.saved_epoch = row["epoch"]
        if self.dist.main:
            with WRITING:  # under torchrun a process ended by another's fault waits for these files
                with open(os.path.join(self.run_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
                if is_best:
                    atomic_torch_save(ckpt, os.path.join(self.run_dir, "best.pt"))
                atomic_torch_save(ckpt, self.last)
        return is_best

    def save_position(self, ckpt, live, stats, plan, logit_changes, seconds):
        """last.pt with a mid-epoch position (Trainer.stop_here): the batches done (`live`, a
        LiveProgress), every process's pass sums so far (`stats`, a PassStats), the epoch's `plan`
        of the data, the routing changes recorded and the seconds trained; every process waits."""
        self.refuse_non_finite(ckpt, ckpt["epoch"] + 1)
        partial = {"batch": live.batch, "stats": self.dist.gather(stats.snapshot()), "last_totals": live.last_totals,
                   "plan": plan and {k: v.cpu() for k, v in plan.items()},
                   "logit_changes": [c.cpu() for c in logit_changes], "seconds": seconds}
        if self.dist.main:
            with WRITING:
                atomic_torch_save(dict(ckpt, partial=partial), self.last)
        self.dist.barrier()

    def restore_position(self, part, stats, live, device, rows):
        """A saved position back: `stats` restored (this process's share, or under a changed world
        every share on rank 0), `live` (LiveProgress) at its batch -> (the plan on `device`, the
        routing changes, the seconds trained). Its plan must cover the `rows` images of the training
        set (else one UsageError line)."""
        planned = len(part["plan"]["order"]) if part["plan"] else rows
        if planned != rows:
            raise UsageError(f"--resume {self.last}: the epoch it stopped in was ordered over {planned} training "
                             f"images, and the training set now has {rows}: resume with the data it was trained on")
        shares = part["stats"]
        stats.restore([shares[self.dist.rank]] if len(shares) == self.dist.world else shares if self.dist.main else [])
        live.start_pass(part["batch"], part["last_totals"])
        plan = part["plan"] and {k: v.to(device) for k, v in part["plan"].items()}
        return plan, [c.to(device) for c in part["logit_changes"]], part["seconds"]

    def preempted(self, caught, where):
        """The Preempted that ends a run stopped `where` by the signals `caught` (none: another process's)."""
        name = signal.Signals(caught[0]).name if caught else "a stop signal of another process"
        return Preempted(caught[0] if caught else signal.SIGTERM, f"stopped by {name} {where}: {self.last} holds the "
                         f"run up to there; continue with --resume {self.last}")

    def refuse_non_finite(self, ckpt, epoch):
        """Raise diverged() rather than write `ckpt`, a checkpoint of (a part of) `epoch`, if any of its
        weights or Adam's state is NaN or infinite: the last good checkpoint is never overwritten."""
        name = non_finite(ckpt)
        if name is not None:
            raise self.diverged(epoch, None, ckpt["optimizer"]["param_groups"][0]["lr"], f" ({name})")

    def diverged(self, epoch, batch, lr, which=""):
        """The error that ends a run whose loss at `batch` of `epoch` (or, batch None, whose weights:
        `which`) was not finite; last.pt and best.pt keep the last finite epoch."""
        what = f"training loss became NaN or infinite at epoch {epoch}, batch {batch}" if batch else \
            f"weights became NaN or infinite{which} in epoch {epoch}"
        kept = f"{self.last} keeps epoch {self.saved_epoch}" if self.saved_epoch else "no checkpoint was written"
        return NonFiniteLoss(f"the {what} (learning rate {lr:.3g}): the run diverged; {kept}; lower --lr, or resume "
                             f"an earlier checkpoint")


def step_schedule(optimizer, scheduler, lr_min):
    """The end of an epoch's schedule: the decay, no lower than lr_min (LR_MIN) -> the rate the epoch trained at."""
    lr = optimizer.param_groups[0]["lr"]
    scheduler.step()
    for group in optimizer.param_groups:
        group["lr"] = max(group["lr"], lr_min)
    return lr


def choose_run_dir(run_dir, ckpt, dist, fresh):
    """The run directory every process uses: RUN_DIR, or for a `fresh` run a new one beside it if
    it holds a run already (fresh_run_dir, decided by rank 0). The processes must have found the
    same checkpoint."""
    run_dir = dist.from_main(fresh_run_dir(run_dir) if fresh and dist.main else None if fresh else run_dir)
    if len(set(dist.gather(ckpt["epoch"] if ckpt else None))) > 1:
        raise UsageError("the processes found different checkpoints: RUN_DIR and --resume must be on a file "
                         "system that every machine sees")
    return run_dir


def prepare_run_dir(run_dir, ckpt, dist):
    """RUN_DIR made ready by rank 0: a resumed run's files brought in (resume_into), and temporary
    files of a process killed while it wrote a checkpoint removed."""
    if ckpt is not None and dist.main:
        resume_into(run_dir, ckpt["path"], ckpt["epoch"])
    os.makedirs(run_dir, exist_ok=True)
    if dist.main:
        for name in os.listdir(run_dir):
            if ".pt.tmp" in name:
                os.remove(os.path.join(run_dir, name))


POSITION_KEYS = ("DATASET", "TRAIN_SIZE", "BATCH_SIZE")  # what an epoch's order and batches are made from


def check_position(ckpt, cfg):
    """A checkpoint written inside an epoch (its `partial` position) goes on only with the settings
    that made that epoch's order and batches: else one UsageError line naming the setting (the
    training set's size is checked again when the position is restored: RunRecord.restore_position).
    --seed changes nothing on resume: the random state is the checkpoint's."""
    part = (ckpt or {}).get("partial")
    for key in POSITION_KEYS if part else ():
        if cfg[key] != ckpt["config"].get(key, cfg[key]):
            raise UsageError(f"--resume {ckpt['path']}: the run stopped inside epoch {ckpt['epoch'] + 1}, after batch "
                             f"{part['batch']}; --{key.lower().replace('_', '-')} {cfg[key]} (the checkpoint's "
                             f"{ckpt['config'][key]}) would change that epoch's order and batches: resume without "
                             f"it, and change it when resuming from the end of an epoch")


def training_checkpoint(epoch, cfg, model, optimizer, scheduler, device, best_accuracy, compile_state, scaler):
    """What last.pt and best.pt hold (resume_training reads it back): the weights, Adam, the schedule,
    the random state, the settings, the compile choice and fp16's GradScaler (else None)."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "epoch": epoch, "best_accuracy": best_accuracy, "config": cfg, "rng_state": rng_state(device),
            "compile_choice": compile_state, "scaler": scaler and scaler.state_dict()}


def resume_training(ckpt, cfg, model, optimizer, scheduler, device):
    """A training checkpoint's weights, Adam, schedule and RNG into a new run's objects, with the
    lines that say so -> (its epoch, its best test accuracy or None). A learning rate given now
    (--lr differs from the checkpoint's) restarts the schedule from it at the same epoch."""
    load_weights(model, ckpt["model"])
    if "optimizer" not in ckpt:
        raise UsageError("--resume needs a training checkpoint (last.pt or best.pt) to continue training")
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scheduler.gamma = cfg["LR_DECAY"]
    epoch, best = ckpt["epoch"], ckpt["best_accuracy"]
    set_rng_state(ckpt["rng_state"], device)
    part = ckpt.get("partial")
    inside = f", batch {part['batch']} of epoch {epoch + 1}" if part else ""
    so_far = "no epoch finished yet" if best is None else f"best test accuracy so far {best:.2f}%"
    print(f"resumed from epoch {epoch}{inside} ({so_far}) in {cfg['RUN_DIR']}")
    if cfg["LR"] != ckpt["config"]["LR"]:  # --lr given now: the schedule restarts from it
        rate = max(cfg["LR"] * cfg["LR_DECAY"] ** epoch, cfg["LR_MIN"])
        for group in optimizer.param_groups:
            group["lr"] = rate
        scheduler.base_lrs = [cfg["LR"]] * len(optimizer.param_groups)
        print(f"--lr {cfg['LR']:g} (the checkpoint's {ckpt['config']['LR']:g}): epoch {epoch + 1} trains at "
              f"{rate:.3g}, as if the run had started at {cfg['LR']:g}")
    return epoch, best


"""Speed benchmark of capsule_network.py: images/s of training and evaluation steps, against a
gram-ai-structured baseline, on synthetic data.

    python bench.py                     # the trainer's default mode, batch 100, with the baseline
    python bench.py --no-amp --json out.json
    python bench.py --compile-vs-eager  # the compiled and the eager capsule layer, side by side
    python bench.py --compile-vs-eager --compile step   # ... and the whole compiled step (always on CUDA)
    python bench.py --model efficient-capsnet --batch-size 16   # Efficient-CapsNet, its recipe's batch

It accepts every flag of capsule_network.py that shapes a training step (--device,
--batch-size, --no-amp, --compile ...) and times exactly what the trainer runs: its model,
loss, optimizer and BatchLoss, one training step being what torchnet's Engine does per batch.
Three programs take turns in rounds, so that a slow minute of a shared machine hits all alike:
  this project's default mode (of --model, the paper's CapsNet by default), in this process;
  the paper's CapsuleNet + CapsuleLoss + Adam called directly in fp32, in a fresh process ("direct");
  a CapsNet laid out like gram-ai/capsule-networks, in a fresh process ("baseline").
Measured results and the commands behind them are in README.md and results/README.md.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import capsule_network as cn
from capsnet import cli, data, fast, runtime  # noqa: E402

# ---- constants (each one is also a flag: FOO_BAR -> --foo-bar) ----
BENCHMARK_STEPS: int = 15  # timed steps per measurement (the median step is reported)
BENCHMARK_WARMUP: int = 3  # untimed warm-up steps of each program
BENCHMARK_ROUNDS: int = 3  # the programs take turns, each one's steps split into this many rounds
BENCHMARK_BASELINE: bool = True  # also time the gram-ai-structured baseline and direct fp32 use, each in its process
BENCHMARK_DIRECT: bool = True  # with the baseline, direct fp32 use too (off: less memory for large shapes)
# ---- end of constants ----


# ---- the baseline: a gram-ai-structured CapsNet ----
class GramStyleCapsNet(nn.Module):
    """A CapsNet laid out like gram-ai/capsule-networks, for the speed baseline only: eight separate
    primary-capsule convolutions, a (classes, B, children, 1, 16) routing tensor (u_hat, built in
    full) and a softmax over the lengths, all fp32. Same layer sizes as CapsuleNet, for any input
    shape and number of classes (MNIST: 1 x 28 x 28, 1,152 children, 10 classes); its semantic bugs
    are kept on purpose (this is the structure users run), and nothing trains with it."""

    def __init__(self, in_channels=1, image_size=28, classes=10, types=32):
        super().__init__()
        self.classes = classes
        grid = ((image_size - 8) - 9) // 2 + 1
        self.conv1 = nn.Conv2d(in_channels, 256, 9)
        self.primary = nn.ModuleList([nn.Conv2d(256, types, 9, stride=2) for _ in range(8)])
        self.route_weights = nn.Parameter(0.01 * torch.randn(classes, types * grid * grid, 8, 16))
        self.decoder = nn.Sequential(nn.Linear(16 * classes, 512), nn.ReLU(inplace=True), nn.Linear(512, 1024),
                                     nn.ReLU(inplace=True), nn.Linear(1024, in_channels * image_size ** 2),
                                     nn.Sigmoid())

    @staticmethod
    def squash(t, dim=-1):
        n2 = (t ** 2).sum(dim=dim, keepdim=True)
        return n2 / (1 + n2) * t / torch.sqrt(n2)

    def forward(self, x, y=None):
        x = F.relu(self.conv1(x), inplace=True)
        u = torch.cat([conv(x).reshape(x.size(0), -1, 1) for conv in self.primary], dim=-1)  # (B, children, 8)
        u = self.squash(u)
        priors = u[None, :, :, None, :] @ self.route_weights[:, None, :, :, :]  # (classes, B, children, 1, 16)
        logits = torch.zeros_like(priors)
        for i in range(3):
            probs = F.softmax(logits, dim=2)
            v = self.squash((probs * priors).sum(dim=2, keepdim=True))  # (10, B, 1, 1, 16)
            if i != 2:
                logits = logits + (priors * v).sum(dim=-1, keepdim=True)
        v = v.squeeze(2).squeeze(2).transpose(0, 1)  # (B, classes, 16)
        classes = F.softmax((v ** 2).sum(dim=-1) ** 0.5, dim=-1)
        if y is None:
            y = classes.argmax(dim=1)
        mask = torch.eye(self.classes, device=x.device).index_select(0, y)
        recon = self.decoder((v * mask[:, :, None]).reshape(x.size(0), -1))
        return classes, recon


def gram_style_loss(images, labels, classes, recon):
    onehot = F.one_hot(labels, classes.shape[1]).float()
    margin = onehot * F.relu(0.9 - classes) ** 2 + 0.5 * (1 - onehot) * F.relu(classes - 0.1) ** 2
    return (margin.sum() + 0.0005 * ((recon - images.flatten(1)) ** 2).sum()) / images.size(0)


# ---- the programs and their alternation ----
class StepTimer:
    """One program under test: warm-up once, then `segment(mode, n)` -> n step times (seconds)."""

    def __init__(self, model, train_step, eval_step, device, warmup):
        self.model, self.steps, self.device = model, {"train": train_step, "eval": eval_step}, device
        for mode in ("train", "eval"):
            self.model.train(mode == "train")
            for _ in range(warmup):
                self.steps[mode]()
        runtime.sync(device)

    def segment(self, mode, n):
        """One untimed step (the caches are the previous program's), then n timed steps."""
        self.model.train(mode == "train")
        self.steps[mode]()
        runtime.sync(self.device)
        times = []
        for _ in range(n):
            started = time.perf_counter()
            self.steps[mode]()
            runtime.sync(self.device)
            times.append(time.perf_counter() - started)
        return times


def synthetic_batch(batch_size, seed, device, dataset="mnist", channels=1, size=28, classes=10):
    """Random uint8 images and labels of the data set's kind and shape: (images, labels), or for
    multimnist (36x36 composites, pair labels, parts) made by multimnist_pairs from random digits."""
    g = torch.Generator().manual_seed(seed)
    if dataset == "multimnist":
        images = torch.randint(0, 256, (batch_size, 28, 28), dtype=torch.uint8, generator=g)
        composites, parts, pair_labels = cn.multimnist_pairs(images, torch.arange(batch_size) % 10, generator=g)
        return composites.to(device), pair_labels.to(device), parts.to(device)
    shape = (batch_size, size, size) if channels == 1 else (batch_size, channels, size, size)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    return images.to(device), torch.randint(0, classes, (batch_size,), generator=g).to(device)


def data_batch(cfg, batch_size, device):
    """synthetic_batch of cfg's data set, in the shape load_data would give it."""
    return synthetic_batch(batch_size, cfg["SEED"], device, cfg["DATASET"], cfg["IMAGE_CHANNELS"], cfg["IMAGE_SIZE"],
                           cfg["NUM_CLASSES"])


def limit_memory(device):
    """On the CPU, cap this process's address space at the memory the machine has free, so that a
    shape too large for it ends in a MemoryError of this worker (reported as a result) rather than
    in the kernel's out-of-memory killer picking a process. Not on a GPU: CUDA reserves far more
    address space than the machine has memory, and its own out-of-memory error is a result already."""
    if device.type != "cpu":
        return
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        resource.setrlimit(resource.RLIMIT_AS, (free, free))
    except (OSError, StopIteration, ValueError):
        pass


def peak_memory_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def benchmark_worker(cfg, kind):
    """Runs in its own process, with the default environment, fp32 and no trainer settings:
    kind 'baseline' is the gram-ai-structured model, kind 'direct' is CapsuleNet + CapsuleLoss +
    Adam called directly, as a user's own script would. After its warm-up it prints one JSON line,
    then answers each line "train N" / "eval N" on stdin with N step times, and "done" with its
    peak memory."""
    device = runtime.resolve_device(cfg["DEVICE"])  # no CUDA context yet: limit_memory comes first
    limit_memory(device)
    runtime.seed_everything(cfg["SEED"])
    shape = (cfg["IMAGE_CHANNELS"], data.input_size(cfg), cfg["NUM_CLASSES"], cfg["PRIMARY_CAPS"])
    if kind == "baseline":
        model, loss_fn = GramStyleCapsNet(*shape).to(device), gram_style_loss
    else:
        config = cn.CapsNetConfig(image_channels=shape[0], image_size=shape[1], num_classes=shape[2],
                                  primary_caps=shape[3])
        model = fast.use_cpu_speedups(cn.CapsuleNet(config))  # what a user's script would call on the CPU
        model, loss_fn = model.to(device), cn.CapsuleLoss()
    optimizer = torch.optim.Adam(model.parameters())
    images_u8, labels = data_batch(cfg, cfg["BATCH_SIZE"], device)
    images = data.to_float_images(images_u8, cfg["CROP_SIZE"])
    eval_images = data.to_float_images(data_batch(cfg, cfg["EVAL_BATCH_SIZE"], device)[0], cfg["CROP_SIZE"])

    def train_step():
        optimizer.zero_grad()
        classes, recon = model(images, labels)
        loss_fn(images, labels, classes, recon).backward()
        optimizer.step()

    def eval_step():
        with torch.no_grad():
            model(eval_images)

    timer = StepTimer(model, train_step, eval_step, device, cfg["BENCHMARK_WARMUP"])
    print(json.dumps({"ready": kind}), flush=True)
    for line in sys.stdin:
        mode, _, n = line.strip().partition(" ")
        if mode == "done":
            break
        print(json.dumps({"times": timer.segment(mode, int(n))}), flush=True)
    print(json.dumps({"peak_memory_mib": peak_memory_mib(device)}), flush=True)


class WorkerProgram:
    """A benchmark_worker in a fresh process with the default environment (nothing inherited from
    this process's settings; the direct CapsuleNet gets fast.use_cpu_speedups, allocator included,
    as a user's script would call it): same interface as StepTimer, and None-safe when it fails."""

    def __init__(self, cfg, kind):
        self.kind, self.error = kind, None
        args = [sys.executable, os.path.abspath(__file__), "--worker", kind,
                "--device", cfg["DEVICE"], "--batch-size", str(cfg["BATCH_SIZE"]),
                "--eval-batch-size", str(cfg["EVAL_BATCH_SIZE"]), "--seed", str(cfg["SEED"]),
                "--benchmark-warmup", str(cfg["BENCHMARK_WARMUP"]), "--dataset", cfg["DATASET"],
                "--image-size", str(cfg["IMAGE_SIZE"]), "--image-channels", str(cfg["IMAGE_CHANNELS"]),
                "--num-classes", str(cfg["NUM_CLASSES"]), "--crop-size", str(cfg["CROP_SIZE"]),
                "--primary-caps", str(cfg["PRIMARY_CAPS"])]
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True, bufsize=1)

    def request(self, line):
        """Send one command, return its JSON answer; None (with one warning) if the worker failed."""
        try:
            if line:
                self.proc.stdin.write(line + "\n")
                self.proc.stdin.flush()
            while True:  # skip anything else a library printed to stdout
                answer = self.proc.stdout.readline()
                if not answer:
                    raise EOFError(f"{self.kind} worker exited")
                if answer.startswith("{"):
                    return json.loads(answer)
        except (OSError, ValueError, EOFError):
            self.proc.kill()
            self.proc.wait()
            self.stderr.seek(0)
            self.error = (self.stderr.read().strip().splitlines() or ["no output"])[-1]
            print(f"warning: {self.kind} benchmark failed: {self.error}", file=sys.stderr)
            return None

    def segment(self, mode, n):
        answer = self.request(f"{mode} {n}")
        return answer and answer["times"]

    def finish(self):
        answer = self.request("done")
        self.proc.wait()
        self.stderr.close()
        return answer and answer["peak_memory_mib"]


def alternate_segments(programs, steps, rounds):
    """Time every program in turn, in `rounds` short segments per mode, the order rotating from
    round to round, so that a slow minute of a shared machine (or the page-freeing aftermath of the
    previous program) hits all of them alike -> {name: {mode: median step seconds}}. A program
    that fails is dropped."""
    sizes = [steps // rounds + (r < steps % rounds) for r in range(rounds)]
    times = {name: {"train": [], "eval": []} for name in programs}
    for mode in ("train", "eval"):
        for r, n in enumerate(k for k in sizes if k):
            names = list(programs)
            for name in names[r % len(names):] + names[:r % len(names)]:
                got = programs[name].segment(mode, n)
                if got is None:
                    del programs[name], times[name]
                else:
                    times[name][mode] += got
    return {name: {mode: sorted(t)[len(t) // 2] for mode, t in per.items()} for name, per in times.items()}


# ---- the report ----
def run_benchmark(cfg, json_path=None, compile_vs_eager=False):
    device, malloc_tuned = runtime.setup_process(cfg)
    workers = {}
    kinds = ["direct", "baseline"] if cfg["BENCHMARK_DIRECT"] else ["baseline"]
    kinds = kinds if cfg["BENCHMARK_BASELINE"] else []
    if kinds and cfg["DATASET"] == "multimnist":
        print(f"note: the baseline and direct programs take one digit per image; {cfg['DATASET']} is timed alone")
    elif kinds:  # they start (and warm up) while this process warms up
        workers = {kind: WorkerProgram(cfg, kind) for kind in kinds}
    started = dict(workers)
    model = cn.model_to_device(cn.build_model(cfg), cfg, device)
    optimizer = cn.build_optimizer(model, cfg)
    dtype = runtime.amp_dtype(device, cfg["AMP"])
    network = cn.BatchLoss.for_run(model, cfg, device)
    batch = data_batch(cfg, cfg["BATCH_SIZE"], device)
    eval_batch = data_batch(cfg, cfg["EVAL_BATCH_SIZE"], device)

    stepper = runtime.scaled_steps(optimizer, network.scaler)  # fp16 (GPUs below 8.0): with its gradient scaler

    def train_step():  # exactly what torchnet's Engine does per training batch
        def closure():
            loss, _ = network(batch)
            loss.backward()
            return loss

        stepper.zero_grad()
        stepper.step(closure)

    def eval_step():  # what the test pass does per batch
        with torch.no_grad():
            network(eval_batch)

    def with_layer(kind, step):  # the same model, with the compiled or the eager capsule layer, or the whole step
        def run():
            fast.use_compiled_routing(model, kind != "eager")
            network.use_whole_step(kind == "step")
            step()
        return run

    # the workers warm up while this process builds its model; the compile trial below times
    # steps, so it waits until they are ready and idle
    workers = {kind: w for kind, w in workers.items() if w.request(None) is not None}
    if compile_vs_eager:
        choice = None
        kinds = ("compiled", "eager") + ("step",) * (device.type == "cuda" or cfg["COMPILE"] == "step")
        programs = {kind: StepTimer(model, with_layer(kind, train_step), with_layer(kind, eval_step), device,
                                    cfg["BENCHMARK_WARMUP"]) for kind in kinds}
    else:
        choice = fast.CompileChoice(model, device, cfg["COMPILE"], network=network)
        model.train()
        while choice.choice is None:  # COMPILE = "auto": the trainer's trial, on the benchmark's batch
            choice.before_step()
            train_step()
            choice.after_step()
        programs = {"this": StepTimer(model, train_step, eval_step, device, cfg["BENCHMARK_WARMUP"])}
    programs.update(workers)
    medians = alternate_segments(programs, cfg["BENCHMARK_STEPS"], cfg["BENCHMARK_ROUNDS"])
    rates = {name: (cfg["BATCH_SIZE"] / m["train"], cfg["EVAL_BATCH_SIZE"] / m["eval"])
             for name, m in medians.items()}
    peaks = {kind: w.finish() for kind, w in workers.items() if kind in rates}
    errors = {f"{kind}_error": w.error for kind, w in started.items() if w.error}  # e.g. a MemoryError
    result = {
        "device": str(device), "device_name": runtime.device_name(device),
        "dtype": {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast, gradient scaler"}.get(dtype, "fp32"),
        "model": cfg["MODEL"], "preset": cfg["PRESET"],
        "decoder": cfg["DECODER"] if cfg["MODEL"] != "baseline-cnn" else None,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dataset": cfg["DATASET"], "input": f"{model.image_size}x{model.image_size}", "channels": model.in_channels,
        "classes": model.num_classes,
        "batch_size": cfg["BATCH_SIZE"], "eval_batch_size": cfg["EVAL_BATCH_SIZE"],
        "steps": cfg["BENCHMARK_STEPS"], "rounds": cfg["BENCHMARK_ROUNDS"], "warmup": cfg["BENCHMARK_WARMUP"],
        "statistic": "median step",
        "peak_memory_mib": round(peak_memory_mib(device), 1),
        "settings": {"amp": dtype is not None, "compile": "compiled vs eager" if compile_vs_eager else cfg["COMPILE"],
                     "capsule_layer": choice.choice if choice else "/".join(kinds),
                     "channels_last": cfg["CHANNELS_LAST"], "routing_bf16": cfg["ROUTING_BF16"],
                     "cpu_dft_conv": device.type == "cpu" and cfg["CPU_DFT_CONV"] and cfg["MODEL"] == "capsnet",
                     "cpu_malloc_tuning": bool(malloc_tuned), "threads": torch.get_num_threads(),
                     "cudnn_benchmark": device.type == "cuda", "tf32": device.type == "cuda"},
        "torch": torch.__version__,
        **errors,
    }
    preset = f", preset {cfg['PRESET']}" if cfg["PRESET"] else ""
    decoder = f"{cfg['DECODER']} decoder, " if cfg["MODEL"] != "baseline-cnn" else ""
    print(f"{cfg['MODEL']} ({decoder}{result['parameters']:,} parameters{preset}), device "
          f"{result['device_name']}, {result['dtype']}{', routing products in bf16' if cfg['ROUTING_BF16'] else ''}, "
          f"{cfg['DATASET']} {model.in_channels}x{result['input']} "
          f"({model.num_classes} classes), "
          f"batch {cfg['BATCH_SIZE']} (eval "
          f"{cfg['EVAL_BATCH_SIZE']}), median of {cfg['BENCHMARK_STEPS']} steps after {cfg['BENCHMARK_WARMUP']} "
          f"warm-up, programs alternating in {cfg['BENCHMARK_ROUNDS']} rounds, torch {torch.__version__}")
    print("settings: " + ", ".join(f"{k}={v}" for k, v in result["settings"].items()))
    report_rates(result, rates, workers, peaks, cfg["DATASET"], compile_vs_eager)
    if json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return result


def report_rates(result, rates, workers, peaks, dataset, compile_vs_eager):
    """Each program's images/s, this model's epoch time and the speed-ups, printed and added to
    `result` (rates: {program: (train, eval) images/s}; workers: the programs in processes of
    their own, with their peak memory in `peaks`)."""
    labels = {"this": ("this model", ""), "compiled": ("compiled", "this model, compiled capsule layer"),
              "eager": ("eager", "this model, eager capsule layer"),
              "step": ("whole step", "this model, the whole training step compiled"),
              "direct": ("direct fp32", "the paper's CapsuleNet + CapsuleLoss + Adam, own process"),
              "baseline": ("baseline", "gram-ai-structured, fp32, own process")}
    for kind in ("this", "compiled", "eager", "step", "direct", "baseline"):
        if kind not in rates:
            continue
        train_ips, eval_ips = rates[kind]
        prefix = "" if kind == "this" else f"{kind}_"
        result[f"{prefix}train_images_per_s"] = float(f"{train_ips:.4g}")
        result[f"{prefix}eval_images_per_s"] = float(f"{eval_ips:.4g}")
        line = f"{labels[kind][0] + ':':12s} train {train_ips:8.4g} images/s   eval {eval_ips:8.4g} images/s   "
        if kind in workers:
            result[f"{kind}_peak_memory_mib"] = peaks[kind] and round(peaks[kind], 1)
            print(line + f"({labels[kind][1]})")
        else:
            result[f"{prefix}seconds_per_mnist_epoch"] = round(60000 / train_ips + 10000 / eval_ips, 1)
            print(line + f"~{60000 / train_ips + 10000 / eval_ips:.1f} s per 60k training and 10k test "
                         f"{'pairs' if dataset == 'multimnist' else 'images'}"
                  + (f", peak memory {result['peak_memory_mib']:.0f} MiB" if kind == "this" else
                     f" ({labels[kind][1]})"))
    if compile_vs_eager:
        (ct, ce), (et, ee) = rates["compiled"], rates["eager"]
        result.update(compile_train_speedup=round(ct / et, 3), compile_eval_speedup=round(ce / ee, 3))
        print(f"compiled / eager: train {ct / et:.2f}x   eval {ce / ee:.2f}x")
        if "step" in rates:
            result.update(step_train_speedup=round(rates["step"][0] / et, 3))
            print(f"whole step / eager: train {rates['step'][0] / et:.2f}x")
    if "baseline" in rates:
        base_train, base_eval = rates["baseline"]
        for kind, note in (("this", ""), ("compiled", "compiled_"), ("eager", "eager_"), ("direct", "direct_")):
            if kind in rates:
                result.update({f"{note}train_speedup": round(rates[kind][0] / base_train, 2),
                               f"{note}eval_speedup": round(rates[kind][1] / base_eval, 2)})
                print(f"{'speed-up:' if kind in ('this', 'compiled') else '':12s} train "
                      f"{rates[kind][0] / base_train:.2f}x   eval {rates[kind][1] / base_eval:.2f}x   "
                      f"({labels[kind][0]} / baseline)")



# ---- main ----
def build_parser():
    parser = cli.OneLineParser(prog="bench.py", description=__doc__.split("\n\n")[0].replace("\n", " "))
    cli.add_constant_flags(parser, cn.__file__, vars(cn))
    cli.add_constant_flags(parser, __file__, globals())
    parser.add_argument("--json", "--benchmark-json", dest="json", metavar="PATH",
                        help="also write the results as JSON to PATH")
    parser.add_argument("--compile-vs-eager", action="store_true",
                        help="time this model with the compiled and with the eager capsule layer, side by side")
    parser.add_argument("--worker", choices=("baseline", "direct"), help=argparse.SUPPRESS)
    return parser


def make_config(args):
    """The trainer's configuration made as the trainer makes it (capsule_network.configure: its
    constants, the data set's settings, presets, the flags given), this file's constants and flags,
    and what the data would decide, from the data set's usual shape (data.nominal_data_settings)."""
    cfg = cn.configure(cn.flags_given(args))[0]
    for name, _, _ in cli.constants_table(__file__):
        cfg[name] = globals()[name] if getattr(args, name, None) is None else getattr(args, name)
    data.nominal_data_settings(cfg)
    for ok, message in ((cfg["BENCHMARK_STEPS"] >= 1, "--benchmark-steps must be >= 1"),
                        (cfg["BENCHMARK_WARMUP"] >= 0, "--benchmark-warmup must be >= 0"),
                        (cfg["BENCHMARK_ROUNDS"] >= 1, "--benchmark-rounds must be >= 1")):
        if not ok:
            raise runtime.UsageError(message)
    return cfg


def main(argv=None):
    args = build_parser().parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not args.worker:
        print("bench.py: error: the benchmark times one process; run it with python, not torchrun", file=sys.stderr)
        return 2
    cfg = {}
    try:
        cfg = make_config(args)
        if args.worker:
            benchmark_worker(cfg, args.worker)
        else:
            run_benchmark(cfg, args.json, args.compile_vs_eager)
    except runtime.UsageError as e:
        print(f"bench.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as e:  # this process's shape does not fit: one line, exit 3 (the trainer's code)
        if not runtime.is_out_of_memory(e):
            raise
        print(f"bench.py: error: out of memory ({type(e).__name__}) at --batch-size {cfg.get('BATCH_SIZE', '?')}, "
              f"--eval-batch-size {cfg.get('EVAL_BATCH_SIZE', '?')}: lower them", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())

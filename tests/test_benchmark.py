"""bench.py: it runs and reports its numbers (no timing thresholds), how it alternates programs,
its flags, and the hand-over from capsule_network.py --benchmark."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, SCRIPT, cn, describe, run_main
from capsnet import cli, runtime  # noqa: E402

BENCH = os.path.join(ROOT, "bench.py")
sys.path.insert(0, ROOT)
import bench  # noqa: E402

KEYS = ("device", "dtype", "batch_size", "train_images_per_s", "eval_images_per_s",
        "baseline_train_images_per_s", "baseline_eval_images_per_s", "train_speedup", "eval_speedup")
# one timed step, the eager capsule layer (compiling is what --compile-vs-eager and tests/test_compile.py test)
TINY = ["--benchmark-steps", 1, "--benchmark-warmup", 0, "--benchmark-rounds", 1, "--batch-size", 4,
        "--eval-batch-size", 4, "--no-visdom", "--device", "cpu", "--compile", "off"]


def run_bench(args, cwd):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, BENCH, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def bench_config(*argv):
    return bench.make_config(bench.build_parser().parse_args(list(argv)))


def check_report(done, path):
    assert done.returncode == 0, describe(done)
    assert "Traceback" not in done.stderr and "benchmark failed" not in done.stderr, describe(done)
    with open(path, encoding="utf-8") as f:
        result = json.load(f)
    for key in KEYS:
        assert key in result, key
    assert result["device"] == "cpu" and result["batch_size"] == 4 and result["steps"] == 1 and result["rounds"] == 1
    assert result["dtype"] in ("fp32", "bf16 autocast")
    for key in KEYS[3:]:
        assert isinstance(result[key], (int, float)) and result[key] > 0, key
    # the speed-ups and the epoch time are the measured rates' (4 significant digits each)
    for mode in ("train", "eval"):
        ratio = result[f"{mode}_images_per_s"] / result[f"baseline_{mode}_images_per_s"]
        assert result[f"{mode}_speedup"] == pytest.approx(ratio, rel=2e-3, abs=0.006), mode
        assert f"{mode} {result[f'{mode}_speedup']:.2f}x" in done.stdout
    epoch = 60000 / result["train_images_per_s"] + 10000 / result["eval_images_per_s"]
    assert result["seconds_per_mnist_epoch"] == pytest.approx(epoch, rel=2e-3, abs=0.06)
    assert result["settings"]["capsule_layer"] == "eager"
    assert "baseline:" in done.stdout and "speed-up:" in done.stdout and "this model:" in done.stdout
    return result


def test_bench_times_a_preset_and_a_data_sets_shape_through_the_trainers_configuration(tmp_path):
    """bench.py --preset authors --dataset cifar10 --benchmark-json PATH with one timed step: exit 0
    and a JSON file with device, dtype, batch size and images/s for this model, the direct program
    and the gram-ai-structured baseline, speed-ups from them; the model is the one the trainer builds
    for that preset and data set (its parameter count), and all three programs run at 3 x 24 x 24
    (the crop) with 64 primary capsule types: the baseline builds its u_hat for 1,024 children. No
    run dir, no data. The trainer itself has no --benchmark (bench.py is the one way in)."""
    out = tmp_path / "bench.json"
    result = check_report(run_bench([*TINY, "--preset", "authors", "--dataset", "cifar10", "--benchmark-json", out],
                                    tmp_path), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]
    assert (result["dataset"], result["input"], result["channels"], result["classes"]) == ("cifar10", "24x24", 3, 10)
    assert result["direct_train_images_per_s"] > 0 and result["direct_eval_images_per_s"] > 0
    cfg = bench_config("--preset", "authors", "--dataset", "cifar10")
    preset_model = cn.build_model(cfg)
    assert result["preset"] == "authors" and cfg["PRIMARY_CAPS"] == 64 and preset_model.digit_bias is not None
    assert result["parameters"] == sum(p.numel() for p in preset_model.parameters())
    assert result["device_name"] == runtime.device_name(torch.device("cpu"))
    model = bench.GramStyleCapsNet(3, 24, 10, 64)
    assert model.route_weights.shape == (10, 64 * 4 * 4, 8, 16)
    classes, recon = model(torch.rand(2, 3, 24, 24))
    assert classes.shape == (2, 10) and recon.shape == (2, 3 * 24 * 24)
    done = run_main(["--benchmark"])
    assert done.returncode == 2 and "unrecognized arguments: --benchmark" in done.stderr


def test_the_presets_model_is_the_trainers():
    """The authors preset's MNIST model, as bench.py builds it: the trainer's model with the authors'
    digit-capsule bias, 160 parameters more."""
    preset_model = cn.build_model(bench_config("--preset", "authors"))
    assert sum(p.numel() for p in preset_model.parameters()) == 8_215_728
    assert sum(p.numel() for p in cn.build_model(bench_config()).parameters()) == 8_215_568


def test_bench_times_multimnist_at_36x36(tmp_path):
    """bench.py --dataset multimnist: this model alone (the baseline is MNIST-shaped), at 36x36,
    with the data set's settings (no MNIST shift), on pairs made by multimnist_pairs."""
    out = tmp_path / "mm.json"
    done = run_bench(TINY + ["--dataset", "multimnist", "--json", out], tmp_path)
    assert done.returncode == 0, describe(done)
    with open(out, encoding="utf-8") as f:
        result = json.load(f)
    assert result["dataset"] == "multimnist" and result["input"] == "36x36"
    assert result["train_images_per_s"] > 0 and result["eval_images_per_s"] > 0
    assert "baseline_train_images_per_s" not in result and "timed alone" in done.stdout
    batch = bench.synthetic_batch(6, 0, torch.device("cpu"), "multimnist")
    assert [tuple(t.shape) for t in batch] == [(6, 36, 36), (6, 2), (6, 2, 36, 36)]


def test_a_baseline_out_of_memory_is_a_result_in_the_json(tmp_path):
    """A worker that cannot allocate its tensors (here the baseline at a batch of 200,000 images,
    far beyond its memory cap) does not end the benchmark: one warning, this model's numbers, the
    baseline's last error line as baseline_error in the JSON; --no-benchmark-direct leaves out
    the direct program."""
    out = tmp_path / "oom.json"
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); import bench\n"
            "class Huge(bench.WorkerProgram):\n"
            "    def __init__(self, cfg, kind):\n"
            "        super().__init__(dict(cfg, BATCH_SIZE=200000), kind)\n"
            "bench.WorkerProgram = Huge\n"
            "sys.exit(bench.main(sys.argv[1:]))\n")
    args = TINY + ["--no-benchmark-direct", "--compile", "off", "--json", out]
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, describe(done)
    with open(out, encoding="utf-8") as f:
        result = json.load(f)
    assert result["train_images_per_s"] > 0 and "baseline_train_images_per_s" not in result
    assert "direct_train_images_per_s" not in result and "direct_error" not in result
    assert "allocate" in result["baseline_error"].lower() or "memory" in result["baseline_error"].lower()
    warnings = [line for line in done.stderr.splitlines() if "benchmark failed" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: baseline benchmark failed:"), describe(done)


def test_compile_vs_eager_times_both_capsule_layers(tmp_path):
    """--compile-vs-eager: the same model with the compiled and with the eager capsule layer, side
    by side, and their ratio; the compiled one ran compiled (no fallback to eager)."""
    out = tmp_path / "c.json"
    done = run_bench(TINY + ["--no-benchmark-baseline", "--compile-vs-eager", "--json", out], tmp_path)
    assert done.returncode == 0 and "torch.compile failed" not in done.stderr, describe(done)
    with open(out, encoding="utf-8") as f:
        result = json.load(f)
    for kind in ("compiled", "eager"):
        assert result[f"{kind}_train_images_per_s"] > 0 and result[f"{kind}_eval_images_per_s"] > 0
    assert result["compile_train_speedup"] == pytest.approx(
        result["compiled_train_images_per_s"] / result["eager_train_images_per_s"], rel=0.01)
    assert "compiled / eager:" in done.stdout and "baseline" not in done.stdout


def test_bench_accepts_every_trainer_flag():
    """Every constant of capsule_network.py is a flag of bench.py too, and so are bench's own."""
    parser = bench.build_parser()
    flags = {flag for action in parser._actions for flag in action.option_strings}
    for name, _, _ in cli.constants_table(SCRIPT) + cli.constants_table(BENCH):
        assert "--" + name.lower().replace("_", "-") in flags, name
    assert {"--json", "--compile-vs-eager"} <= flags
    assert "--worker" not in parser.format_help()


@pytest.mark.parametrize("argv, fragment", [
    (["--benchmark-rounds", "0"], "--benchmark-rounds must be >= 1"),
    (["--benchmark-steps", "0"], "--benchmark-steps must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
])
def test_bench_usage_errors(argv, fragment, capsys):
    """A bad value: exit 2 and one line."""
    rc = bench.main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("bench.py: error:") and fragment in lines[0]


def test_the_trainer_holds_no_benchmark_code():
    """The baseline model, the workers and the report live in bench.py only."""
    for name in ("GramStyleCapsNet", "WorkerProgram", "alternate_segments", "run_benchmark", "StepTimer"):
        assert hasattr(bench, name) and not hasattr(cn, name), name


class FakeProgram:
    def __init__(self, name, log, seconds, fail_on_call=None):
        self.name, self.log, self.seconds, self.fail_on_call = name, log, seconds, fail_on_call
        self.calls = 0

    def segment(self, mode, n):
        self.calls += 1
        self.log.append((self.name, mode, n))
        if self.calls == self.fail_on_call:
            return None
        return [self.seconds[mode]] * n


def test_alternate_segments_interleaves_programs_and_drops_a_failed_one():
    """Each mode's steps are split into rounds, the programs take turns in every round and the
    order rotates; the medians come from all of a program's steps; a program whose worker fails
    is dropped."""
    log = []
    programs = {"this": FakeProgram("this", log, {"train": 0.5, "eval": 0.1}),
                "base": FakeProgram("base", log, {"train": 4.0, "eval": 1.0}),
                "flaky": FakeProgram("flaky", log, {"train": 1.0, "eval": 1.0}, fail_on_call=2)}
    medians = bench.alternate_segments(programs, steps=7, rounds=3)
    assert log == [("this", "train", 3), ("base", "train", 3), ("flaky", "train", 3),
                   ("base", "train", 2), ("flaky", "train", 2), ("this", "train", 2),
                   ("this", "train", 2), ("base", "train", 2),
                   ("this", "eval", 3), ("base", "eval", 3), ("base", "eval", 2), ("this", "eval", 2),
                   ("this", "eval", 2), ("base", "eval", 2)]
    assert medians == {"this": {"train": 0.5, "eval": 0.1}, "base": {"train": 4.0, "eval": 1.0}}


def test_workers_cap_their_address_space_on_the_cpu_only(monkeypatch):
    """On a GPU the worker's address space stays uncapped (CUDA reserves far more than the free
    memory); the report names the device and measures GPU memory with CUDA's own counter."""
    import resource

    before = resource.getrlimit(resource.RLIMIT_AS)
    bench.limit_memory(torch.device("cuda"))
    assert resource.getrlimit(resource.RLIMIT_AS) == before
    code = (f"import resource, sys, torch; sys.path.insert(0, {ROOT!r}); import bench\n"
            "bench.limit_memory(torch.device('cpu'))\n"
            "print(resource.getrlimit(resource.RLIMIT_AS)[0])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and 0 < int(done.stdout) < 2**62, describe(done)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**20)
    assert bench.peak_memory_mib(torch.device("cuda")) == 3.0


def test_out_of_memory_in_the_main_process_is_one_line_with_exit_3(monkeypatch, capsys):
    """A shape that does not fit this process (here an injected OutOfMemoryError): exit 3 and one
    line naming the batch sizes, as the trainer reports it."""
    def run_benchmark(*args):
        raise getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)("CUDA out of memory. Tried to allocate")

    monkeypatch.setattr(bench, "run_benchmark", run_benchmark)
    rc = bench.main(["--batch-size", "7", "--device", "cpu"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 3 and lines == ["bench.py: error: out of memory (OutOfMemoryError) at --batch-size 7, "
                                 "--eval-batch-size 100: lower them"]

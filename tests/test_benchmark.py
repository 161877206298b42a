"""--benchmark: it runs and reports its numbers (no timing thresholds), and how it alternates programs."""

import json

from conftest import describe, run_script

KEYS = ("device", "dtype", "batch_size", "train_images_per_s", "eval_images_per_s",
        "baseline_train_images_per_s", "baseline_eval_images_per_s")


def test_benchmark_writes_json(tmp_path):
    """--benchmark with one timed step: exit 0 and a JSON file with device, dtype, batch size and
    positive images/s for this model and the gram-ai-structured baseline."""
    out = tmp_path / "bench.json"
    done = run_script(["--benchmark", "--benchmark-steps", 1, "--benchmark-warmup", 0, "--batch-size", 4,
                       "--benchmark-json", out, "--no-visdom", "--device", "cpu"], cwd=tmp_path)
    assert done.returncode == 0, describe(done)
    assert "Traceback" not in done.stderr and "baseline benchmark failed" not in done.stderr, describe(done)
    with open(out, encoding="utf-8") as f:
        result = json.load(f)
    for key in KEYS:
        assert key in result, key
    assert result["device"] == "cpu" and result["batch_size"] == 4 and result["steps"] == 1 and result["rounds"] == 3
    assert result["dtype"] in ("fp32", "bf16 autocast")
    for key in KEYS[3:]:
        assert isinstance(result[key], (int, float)) and result[key] > 0, key
    assert "baseline:" in done.stdout and "speed-up:" in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]  # no run dir, no data needed


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
    from conftest import cn
    log = []
    programs = {"this": FakeProgram("this", log, {"train": 0.5, "eval": 0.1}),
                "base": FakeProgram("base", log, {"train": 4.0, "eval": 1.0}),
                "flaky": FakeProgram("flaky", log, {"train": 1.0, "eval": 1.0}, fail_on_call=2)}
    medians = cn.alternate_segments(programs, steps=7, rounds=3)
    assert log == [("this", "train", 3), ("base", "train", 3), ("flaky", "train", 3),
                   ("base", "train", 2), ("flaky", "train", 2), ("this", "train", 2),
                   ("this", "train", 2), ("base", "train", 2),
                   ("this", "eval", 3), ("base", "eval", 3), ("base", "eval", 2), ("this", "eval", 2),
                   ("this", "eval", 2), ("base", "eval", 2)]
    assert medians == {"this": {"train": 0.5, "eval": 0.1}, "base": {"train": 4.0, "eval": 1.0}}

"""--benchmark smoke test: it runs and reports its numbers (no timing thresholds)."""

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
    assert result["device"] == "cpu" and result["batch_size"] == 4 and result["steps"] == 1
    assert result["dtype"] in ("fp32", "bf16 autocast")
    for key in KEYS[3:]:
        assert isinstance(result[key], (int, float)) and result[key] > 0, key
    assert "baseline:" in done.stdout and "speed-up:" in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]  # no run dir, no data needed

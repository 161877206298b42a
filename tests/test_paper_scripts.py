"""The shell runners of the paper's comparisons (results/paper-comparisons/table1.sh and affnist.sh):
their order, stopping rule, resumption and summaries, with a stand-in PYTHON that records each
trainer call and writes the metrics rows a run would (the training itself is tested elsewhere)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "results", "paper-comparisons")

STAND_IN = f"""#!{sys.executable}
import json, os, sys
args = sys.argv[1:]
if not args or args[0] not in ("capsule_network.py", "results/paper-comparisons/affnist_figure.py"):
    os.execv({sys.executable!r}, [{sys.executable!r}] + args)  # the scripts' own snippets run for real
with open(os.environ["CALLS"], "a") as f:
    f.write(json.dumps(args) + "\\n")
if args[0] == "capsule_network.py" and "--eval-only" not in args:
    get = lambda flag: args[args.index(flag) + 1]
    run, epochs = get("--run-dir"), int(get("--epochs"))
    path = os.path.join(run, "metrics.jsonl")
    done = sum(1 for _ in open(path)) if os.path.exists(path) else 0
    accuracies = [float(a) for a in os.environ["ACCURACY_" + get("--model").replace("-", "_")].split()]
    os.makedirs(run, exist_ok=True)
    with open(path, "a") as f:
        for epoch in range(done + 1, epochs + 1):
            f.write(json.dumps({{"epoch": epoch, "test_accuracy": accuracies[epoch - 1]}}) + "\\n")
"""


def run_script(tmp_path, name, *args, **accuracies):
    stand_in = tmp_path / "python"
    stand_in.write_text(STAND_IN)
    stand_in.chmod(0o755)
    calls = tmp_path / "calls.jsonl"
    calls.write_text("")
    env = dict(os.environ, CALLS=str(calls), **{f"ACCURACY_{k}": v for k, v in accuracies.items()})
    done = subprocess.run(["bash", os.path.join(SCRIPTS, name), str(stand_in), "DATA", str(tmp_path / "out"), *args],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout, [json.loads(line) for line in calls.read_text().splitlines()]


def flag(call, name):
    return call[call.index(name) + 1]


def test_table1_trains_capsnet_then_the_baseline_alike_and_prints_each_final_epoch(tmp_path):
    out, calls = run_script(tmp_path, "table1.sh", "3", "0.5", capsnet="98.84 99.10 99.38",
                            baseline_cnn="98.30 98.91 99.24")
    assert [flag(c, "--model") for c in calls] == ["capsnet", "baseline-cnn"]
    for call in calls:
        assert (flag(call, "--epochs"), flag(call, "--lr-decay"), flag(call, "--seed")) == ("3", "0.5", "0")
        assert flag(call, "--resume") == "auto" and flag(call, "--data-dir") == "DATA"
    assert out.splitlines() == ["capsnet       epoch 3  test accuracy 99.38%  error 0.62%",
                                "baseline-cnn  epoch 3  test accuracy 99.24%  error 0.76%"]


def test_affnist_stops_each_model_at_the_target_or_the_budget_then_tests_it_on_affnist(tmp_path):
    out, calls = run_script(tmp_path, "affnist.sh", "4", "0.96", capsnet="98.90 99.10 99.23 99.40",
                            baseline_cnn="98.00 98.50 99.00 99.10")
    runs = {m: str(tmp_path / "out" / m) for m in ("capsnet", "baseline-cnn")}
    trained = [(flag(c, "--model"), flag(c, "--epochs")) for c in calls if "--epochs" in c]
    assert trained == [("capsnet", "1"), ("capsnet", "2"), ("capsnet", "3"),  # 99.23 >= 99.2: stopped
                       ("baseline-cnn", "1"), ("baseline-cnn", "2"), ("baseline-cnn", "3"), ("baseline-cnn", "4")]
    assert all(flag(c, "--dataset") == "expanded-mnist" and flag(c, "--lr-decay") == "0.96" for c in calls
               if "--epochs" in c)
    evaluations = [c for c in calls if "--eval-only" in c]
    assert [(flag(c, "--resume"), flag(c, "--dataset")) for c in evaluations] == [
        (os.path.join(runs["capsnet"], "last.pt"), "affnist"), (os.path.join(runs["baseline-cnn"], "last.pt"), "affnist")]
    assert calls[-1] == ["results/paper-comparisons/affnist_figure.py", "DATA", os.path.join(runs["capsnet"], "last.pt"),
                         os.path.join(runs["baseline-cnn"], "last.pt"), str(tmp_path / "out" / "affnist-digits.png")]
    assert "capsnet: stopped after epoch 3, expanded-MNIST test accuracy 99.23% (target 99.2%, at most 4 epochs)" in out
    assert "baseline-cnn: stopped after epoch 4, expanded-MNIST test accuracy 99.10%" in out

    _, again = run_script(tmp_path, "affnist.sh", "4", "0.96", capsnet="", baseline_cnn="")
    assert not [c for c in again if "--epochs" in c], "a finished comparison trains nothing when run again"
    assert len([c for c in again if "--eval-only" in c]) == 2

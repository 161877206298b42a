"""Curves of several runs in one picture, from their metrics.jsonl files:

    python results/compare-runs.py OUT.png "LABEL=RUN/metrics.jsonl" "LABEL=..." ...

Top: the test accuracy per epoch (the final epoch's value in the legend). Bottom: each run's
training and test loss, log scale; runs whose losses are different functions (the authors'
half-mean margin loss against eq. 4's sum) are drawn on their own scale, and the legend says so.
"""

import json
import sys

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def main(out, specs):
    fig = Figure(figsize=(9, 7), dpi=120, layout="constrained")
    accuracy, loss = fig.subplots(2, 1, sharex=True)
    for k, spec in enumerate(specs):
        label, _, path = spec.partition("=")
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        epochs = [r["epoch"] for r in rows]
        color = f"C{k}"
        accuracy.plot(epochs, [r["test_accuracy"] for r in rows], "o-", ms=3, color=color,
                      label=f"{label}: final epoch {rows[-1]['test_accuracy']:.2f}%")
        loss.plot(epochs, [r["test_loss"] for r in rows], "o-", ms=3, color=color,
                  label=f"{label}: test, final {rows[-1]['test_loss']:.4f}")
        loss.plot(epochs, [r["train_loss"] for r in rows], "--", color=color, alpha=0.6, label=f"{label}: train")
    accuracy.set_ylabel("test accuracy (%)")
    accuracy.set_ylim(bottom=max(accuracy.get_ylim()[0], 98.0))
    loss.set_yscale("log")
    loss.set_ylabel("loss (each run's own)")
    loss.set_xlabel("epoch")
    loss.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (accuracy, loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])

"""Curves of several runs in one picture, from their metrics.jsonl files:

    python results/compare-runs.py OUT.png "LABEL=RUN/metrics.jsonl" "LABEL=..." ...

Top: the test accuracy per epoch (each run's final epoch in the legend). Bottom: each run's
training and test loss, log scale, each in its own loss's units (the authors' half-mean margin
loss and eq. 4's sum are different functions; compare their shapes, not their heights).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project root
from capsnet.figures import plot_runs_png  # noqa: E402


def read_run(spec):
    label, _, path = spec.partition("=")
    with open(path, encoding="utf-8") as f:
        return label, [json.loads(line) for line in f if line.strip()]


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    plot_runs_png([read_run(spec) for spec in sys.argv[2:]], sys.argv[1])
    print(f"wrote {sys.argv[1]}")

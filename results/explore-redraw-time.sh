#!/usr/bin/env bash
# The redraw time of --explore (docs/explore.md): 24 changes sent to the explorer of the shipped
# CapsNet as the browser's controls send them (12 dimensions, 4 classes, 4 test images, reset, 3 x
# the next misclassified image); each line it prints says how long the redraw took, from the
# event's arrival to the Visdom server's answer to the last window sent (the browser's own
# drawing not counted); then the median and the longest.
#   results/explore-redraw-time.sh [PYTHON] [DATA_DIR]     (from anywhere; MNIST in DATA_DIR)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
DATA=${2:-data}
EXTRA=${EXTRA:-}
. results/explore-serve.sh  # the server and the explorer, serving
"$PY" -c "
import time
from capsnet.explore import send_as_browser
rows = [(2 + d, str(k)) for d, k in enumerate([11, 2, 0, 12, 8, 4, 10, 1, 9, 3, 12, 0])]  # 12 dimensions
rows += [(1, '4'), (1, '9'), (1, '1'), (1, '0')]  # 4 classes, then the predicted one again
rows += [(0, '1'), (0, '42'), (0, '1234'), (0, '9999')]  # 4 test images
rows += [(18, 'clicked')] + 3 * [(19, 'clicked')]  # reset, then 3 x the next misclassified image
for row, value in rows:
    send_as_browser('127.0.0.1', $port, 'capsnet_explore', row, value)
    time.sleep(0.4)
time.sleep(1)"
cat "$work/explore.out"
grep -o 'redrawn in [0-9]* ms' "$work/explore.out" | awk '{print $3}' | sort -n |
    awk '{a[NR] = $1} END {print NR " redraws: median " a[int((NR + 1) / 2)] " ms, longest " a[NR] " ms"}'
kill -INT $explore
wait $explore || true

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
work=$(mktemp -d)
port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$PY" -m visdom.server -port "$port" -bind_local -env_path "$work/env" >"$work/server.log" 2>&1 &
server=$!
explore=
trap 'kill $explore $server 2>/dev/null || true' EXIT
until "$PY" -c "import socket; socket.create_connection(('127.0.0.1', $port), 1)" 2>/dev/null; do sleep 0.5; done
set -m  # the explorer in a job of its own, so that Ctrl-C (SIGINT) reaches it
"$PY" capsule_network.py --explore --resume results/capsnet-mnist.pt --data-dir "$DATA" --device cpu \
    --visdom-server 127.0.0.1 --visdom-port "$port" >"$work/explore.out" 2>"$work/explore.err" &
explore=$!
set +m
until grep -q "Visdom: explore at" "$work/explore.out"; do
    kill -0 $explore 2>/dev/null || { cat "$work/explore.err" >&2; exit 1; }
    sleep 1
done
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

#!/usr/bin/env bash
# results/explore-visdom.png: --explore of the shipped CapsNet (results/capsnet-mnist.pt) in Visdom,
# with dimensions 4 and 7 of the first test image's capsule changed by +0.25 and -0.20 through the
# server as the browser's controls send them, seen by headless Chromium (apt-get install -y chromium).
#   results/explore-screenshot.sh [PYTHON] [DATA_DIR] [OUT_PNG]     (from anywhere; MNIST in DATA_DIR)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
DATA=${2:-data}
OUT=${3:-results/explore-visdom.png}
ENV=capsnet_explore
EXTRA=${EXTRA:-}  # more flags for the explorer, e.g. EXTRA="--test-size 1000"
EXTRA="--explore-index 0 $EXTRA"
. results/explore-serve.sh  # the server and the explorer, serving

# two dimensions changed as the page sends it: PropertyUpdate of the controls pane's row 2 + d, its
# value the position of the change among -0.30, -0.25, ..., +0.30 (11: +0.25, 2: -0.20)
"$PY" -c "
from capsnet.explore import send_as_browser
send_as_browser('127.0.0.1', $port, '$ENV', 2 + 4, '11')
send_as_browser('127.0.0.1', $port, '$ENV', 2 + 7, '2')"
until [ "$(grep -c 'redrawn in' "$work/explore.out")" -ge 2 ]; do sleep 0.2; done
cat "$work/explore.out"

chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --user-data-dir="$(mktemp -d)" --virtual-time-budget=5000 \
    --window-size=1400,1000 --screenshot="$OUT" "http://localhost:$port/env/$ENV" 2>/dev/null
kill -INT $explore
status=0
wait $explore || status=$?
echo "explore stopped by Ctrl-C (SIGINT): exit $status, its last line: $(tr '\r' '\n' <"$work/explore.err" | tail -n 1)"

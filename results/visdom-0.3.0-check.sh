#!/usr/bin/env bash
# Does visdom 0.3.0 work here on Python 3.12 / 3.13? Used for the lab notes (results/README.md).
#   bash results/visdom-0.3.0-check.sh PYTHON OUT.png [TORNADO_REQUIREMENT]
# With RUN_TESTS=1 it also runs the project's test suite in that venv.
# A fresh venv with the README's set-up command, but visdom==0.3.0 instead of 0.2.4 and tornado
# as TORNADO_REQUIREMENT (default: "tornado", whatever installs); then the
# files visdom 0.3.0's server would download from CDNs at its start (server/build.py), taken
# from npm packages of the same versions (this machine is offline); then a server on a free
# local port, one line plot sent through the client, and a headless Chromium screenshot.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$1 OUT=$2 TORNADO=${3:-tornado}
work=$(mktemp -d)
"$PY" -m venv "$work/venv"
"$work/venv/bin/pip" install -q "setuptools<81" wheel
grep -v -E '^(visdom|tornado)' requirements.txt > "$work/req.txt"
printf 'visdom==0.3.0\n%s\n' "$TORNADO" >> "$work/req.txt"
"$work/venv/bin/pip" install -q --no-build-isolation -r "$work/req.txt"
"$work/venv/bin/python" -c "import visdom, tornado, torch; print('visdom', visdom.__version__, 'tornado', tornado.version, 'torch', torch.__version__)"
static=$("$work/venv/bin/python" -c 'import visdom, os; print(os.path.join(os.path.dirname(visdom.__file__), "static"))')
mkdir -p "$static/js/mathjax/3.2.2/es5" "$static/css" "$static/fonts"
while read -r pkg file dest; do
  [ -n "$pkg" ] || continue
  dir=$work/npm/${pkg//[@\/]/_}
  if [ ! -d "$dir" ]; then
    mkdir -p "$dir" && (cd "$dir" && npm pack -q "$pkg" >/dev/null 2>&1 && tar xzf ./*.tgz)
  fi
  cp "$dir/package/$file" "$static/$dest"
done <<'LIST'
jquery@3.1.1 dist/jquery.min.js js/jquery.min.js
bootstrap@3.3.7 dist/js/bootstrap.min.js js/bootstrap.min.js
react@16.2.0 umd/react.production.min.js js/react-react.min.js
react-dom@16.2.0 umd/react-dom.production.min.js js/react-dom.min.js
react-modal@3.1.10 dist/react-modal.min.js js/react-modal.min.js
plotly.js-dist-min@2.11.1 plotly.min.js js/plotly-plotly.min.js
sjcl@1.0.7 sjcl.js js/sjcl.js
layout-bin-packer@1.4.0 dist/layout-bin-packer.js.map js/layout-bin-packer.js.map
layout-bin-packer@1.4.0 dist/layout-bin-packer.js js/layout_bin_packer.js
d3@3.5.17 d3.min.js js/d3.v3.min.js
d3-selection-multi@1.0.1 build/d3-selection-multi.js js/d3-selection-multi.v1.js
save-svg-as-png@1.4.17 lib/saveSvgAsPng.js js/saveSvgAsPng.js
react-resizable@3.1.3 css/styles.css css/react-resizable-styles.css
react-grid-layout@2.2.3 css/styles.css css/react-grid-layout-styles.css
bootstrap@3.3.7 dist/css/bootstrap.min.css css/bootstrap.min.css
classnames@2.2.5 index.js fonts/classnames
bootstrap@3.3.7 dist/fonts/glyphicons-halflings-regular.eot fonts/glyphicons-halflings-regular.eot
bootstrap@3.3.7 dist/fonts/glyphicons-halflings-regular.woff2 fonts/glyphicons-halflings-regular.woff2
bootstrap@3.3.7 dist/fonts/glyphicons-halflings-regular.woff fonts/glyphicons-halflings-regular.woff
bootstrap@3.3.7 dist/fonts/glyphicons-halflings-regular.ttf fonts/glyphicons-halflings-regular.ttf
bootstrap@3.3.7 dist/fonts/glyphicons-halflings-regular.svg fonts/glyphicons-halflings-regular.svg#glyphicons_halflingsregular
mathjax@3.2.2 es5/tex-mml-svg.js js/mathjax/3.2.2/es5/tex-mml-svg.js
LIST
echo -n 0.3.0 > "$static/version.built"
if [ "${RUN_TESTS:-0}" = 1 ]; then
  "$work/venv/bin/python" -m pytest -q tests 2>&1 | tail -n 4
fi
port=$("$work/venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$work/venv/bin/python" -m visdom.server -port "$port" -bind_local -env_path "$work/env" > "$work/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 120); do (echo > /dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.5; done
"$work/venv/bin/python" - "$port" <<'PYEOF'
import sys, numpy as np, visdom
viz = visdom.Visdom(server="http://127.0.0.1", port=int(sys.argv[1]), env="check", raise_exceptions=True)
x = np.arange(1, 11)
viz.line(X=x, Y=np.exp(-x / 4.0), win="check_line", opts=dict(title="visdom 0.3.0 line plot", xlabel="epoch"))
print("server answers:", viz.check_connection())
PYEOF
chromium --headless --no-sandbox --disable-gpu --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$(mktemp -d)" --window-size=1200,800 \
  --virtual-time-budget=5000 --screenshot="$OUT" "http://127.0.0.1:$port/env/check" 2>/dev/null
echo "screenshot: $OUT"; grep -i -E "error|exception" "$work/server.log" | head -5 || true

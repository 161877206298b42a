# Sourced by explore-screenshot.sh and explore-redraw-time.sh: a Visdom server on a free local port
# and `--explore` of the shipped CapsNet connected to it, serving. Reads PY, DATA and EXTRA (more
# explorer flags); sets work (a temporary folder: explore.out, explore.err, server.log), port,
# server and explore (the two processes, killed when the script exits).
work=$(mktemp -d)
port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$PY" -m visdom.server -port "$port" -bind_local -env_path "$work/env" >"$work/server.log" 2>&1 &
server=$!
explore=
trap 'kill $explore $server 2>/dev/null || true' EXIT
until "$PY" -c "import socket; socket.create_connection(('127.0.0.1', $port), 1)" 2>/dev/null; do sleep 0.5; done
set -m  # the explorer in a job of its own: a background command of a script would ignore Ctrl-C (SIGINT)
# shellcheck disable=SC2086
"$PY" capsule_network.py --explore --resume results/capsnet-mnist.pt --data-dir "$DATA" --device cpu \
    --visdom-server 127.0.0.1 --visdom-port "$port" $EXTRA >"$work/explore.out" 2>"$work/explore.err" &
explore=$!
set +m
until grep -q "Visdom: explore at" "$work/explore.out"; do
    kill -0 $explore 2>/dev/null || { cat "$work/explore.err" >&2; exit 1; }
    sleep 1
done

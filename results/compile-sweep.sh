#!/usr/bin/env bash
# Compiled vs eager capsule layer on each torch release: a fresh venv per release, torch from
# PyPI (this machine's pip cap lifted for the command), then
#   python bench.py --compile-vs-eager --no-benchmark-baseline
# whose JSON goes to results/compile/torch-VERSION.json. Usage (from the project root):
#   bash results/compile-sweep.sh 2.15.0 2.14.1 ...
# Runs one release at a time, so that nothing else shares the CPU while one is timed.
set -uo pipefail
cd "$(dirname "$0")/.."
empty=$(mktemp)
for version in "$@"; do
  venv=$(mktemp -d)/venv
  numpy=numpy
  case "$version" in 2.1.*|2.2.*) numpy="numpy<2" ;; esac
  echo "== torch $version =="
  if python3 -m venv "$venv" && PIP_CONSTRAINT=$empty "$venv/bin/pip" install -q --no-cache-dir "torch==$version" "$numpy"; then
    "$venv/bin/python" bench.py --compile-vs-eager --no-benchmark-baseline --benchmark-steps 8 --benchmark-rounds 2 \
      --json "results/compile/torch-$version.json" 2>&1 | grep -v "^ *$"
  else
    echo "torch $version: install failed"
  fi
  rm -rf "$(dirname "$venv")"
done
rm -f "$empty"

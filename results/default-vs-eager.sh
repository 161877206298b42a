#!/usr/bin/env bash
# The default mode (COMPILE = auto) against --no-compile, alternating runs of bench.py, for the
# torch of each given venv: bash results/default-vs-eager.sh VENV_PYTHON ...
cd "$(dirname "$0")/.."
for py in "$@"; do
  v=$("$py" -c 'import torch; print(torch.__version__.split("+")[0])')
  for pair in 1 2; do
    for mode in default no-compile; do
      flag=""; [ "$mode" = no-compile ] && flag="--no-compile"
      echo "== torch $v, pair $pair, $mode =="
      "$py" bench.py $flag --no-benchmark-baseline --benchmark-steps 10 --benchmark-rounds 2 \
        --json "results/default-vs-eager/torch-$v-$mode-$pair.json" 2>&1 | grep -E "^compile auto|^this model"
    done
  done
done

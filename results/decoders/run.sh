#!/usr/bin/env bash
# The four decoders side by side on real MNIST (issue: decoder batch norm; ethanleet/CapsNet's table
# of FC / FC+BN / DeConv / DeConv+BN after 25 epochs): the same seed, epochs and schedule for every
# arm, one arm after another, then each final epoch's test accuracy and summed squared
# reconstruction error (compare.py). Size EPOCHS so that the four arms fit the budget on the CPU at
# hand: time one epoch first (the start-up line and the first epoch's seconds).
#   bash results/decoders/run.sh PYTHON DATA_DIR OUT_DIR EPOCHS
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=$1 DATA=$2 OUT=$3 EPOCHS=$4
mkdir -p "$OUT"
for arm in "fc" "fc --decoder-bn" "deconv" "deconv --decoder-bn"; do
  name=$(echo "$arm" | tr -d '-' | tr ' ' '-')
  # shellcheck disable=SC2086
  "$PY" capsule_network.py --decoder $arm --epochs "$EPOCHS" --seed 0 --data-dir "$DATA" \
      --run-dir "$OUT/$name" --resume auto --no-visdom
done
"$PY" results/decoders/compare.py "$DATA" "$OUT"/fc "$OUT"/fc-decoderbn "$OUT"/deconv "$OUT"/deconv-decoderbn

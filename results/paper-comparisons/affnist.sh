#!/usr/bin/env bash
# Sec. 5.2 measured here: CapsNet and the authors' max-pooled CNN (--model baseline-cnn, conv-model
# at 40x40) trained on expanded MNIST (each digit at a random place on a 40x40 canvas), one epoch at
# a time, each stopped after the first epoch whose expanded-MNIST test accuracy reaches TARGET (the
# paper's early stopping: 99.23% for CapsNet, 99.22% for its CNN) or at MAX_EPOCHS, whichever comes
# first; then each stopped model is tested on affNIST (its official files in DATA_DIR/affNIST) or,
# without them, on the generated affNIST-like set: eval.json and the printed line say which.
# The schedule does not depend on where a run stops (LR x LR_DECAY per epoch), so each epoch's
# process continues the same run (--resume auto): run the same command again after any stop.
#   bash results/paper-comparisons/affnist.sh PYTHON DATA_DIR OUT_DIR MAX_EPOCHS LR_DECAY [TARGET]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=$1 DATA=$2 OUT=$3 MAX=$4 DECAY=$5 TARGET=${6:-99.2}
mkdir -p "$OUT"
last() {  # the last row's epoch and test accuracy, or "0 0" before the first epoch
  "$PY" -c 'import json, os, sys; p = sys.argv[1]
rows = [json.loads(l) for l in open(p)] if os.path.exists(p) else []
print(*(rows[-1]["epoch"], rows[-1]["test_accuracy"]) if rows else (0, 0))' "$1/metrics.jsonl"
}
for model in capsnet baseline-cnn; do
  run="$OUT/$model"
  while true; do
    read -r epoch accuracy < <(last "$run")
    if [ "$epoch" -ge "$MAX" ] || { [ "$epoch" -ge 1 ] &&
        "$PY" -c 'import sys; sys.exit(float(sys.argv[1]) < float(sys.argv[2]))' "$accuracy" "$TARGET"; }; then
      break
    fi
    "$PY" capsule_network.py --model "$model" --dataset expanded-mnist --epochs $((epoch + 1)) --lr-decay "$DECAY" \
        --seed 0 --data-dir "$DATA" --run-dir "$run" --resume auto --no-visdom
  done
  printf '%s: stopped after epoch %s, expanded-MNIST test accuracy %.2f%% (target %s%%, at most %s epochs)\n' \
      "$model" "$epoch" "$accuracy" "$TARGET" "$MAX"
  "$PY" capsule_network.py --eval-only --resume "$run/last.pt" --dataset affnist --data-dir "$DATA" --no-visdom
done
"$PY" results/paper-comparisons/affnist_figure.py "$DATA" "$OUT/capsnet/last.pt" "$OUT/baseline-cnn/last.pt" \
    "$OUT/affnist-digits.png"

#!/usr/bin/env bash
# Table 1 on MNIST, measured here: the paper's baseline CNN (sec. 5, --model baseline-cnn: 35.4M
# parameters) and CapsNet (3 routing iterations, the reconstruction loss) trained alike: the same
# data (60,000 images, 2-pixel shifts), seed, epochs, batch and learning-rate schedule, one arm
# after the other, each continued with --resume auto after any stop (run the same command again).
# Each arm's final epoch is its result (metrics.jsonl, last row).
#   bash results/paper-comparisons/table1.sh PYTHON DATA_DIR OUT_DIR EPOCHS LR_DECAY
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=$1 DATA=$2 OUT=$3 EPOCHS=$4 DECAY=$5
mkdir -p "$OUT"
for model in capsnet baseline-cnn; do
  "$PY" capsule_network.py --model "$model" --epochs "$EPOCHS" --lr-decay "$DECAY" --seed 0 --data-dir "$DATA" \
      --run-dir "$OUT/$model" --resume auto --no-visdom
done
for model in capsnet baseline-cnn; do
  "$PY" -c 'import json, sys; r = [json.loads(l) for l in open(sys.argv[1])][-1]; a = r["test_accuracy"]
print("%-13s epoch %d  test accuracy %.2f%%  error %.2f%%" % (sys.argv[2], r["epoch"], a, 100 - a))' \
      "$OUT/$model/metrics.jsonl" "$model"
done

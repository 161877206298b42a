#!/usr/bin/env bash
# The numbers of a fixed-seed tiny run, before and after a change to the code: the same command at
# commit BEFORE (a temporary git worktree) and in this working tree; every metric of every epoch
# but the timings and the device's name must be identical; keys the change added are listed.
#   bash results/house/same-numbers.sh BEFORE DATA_DIR [PYTHON]
set -euo pipefail
before=$1 data=$2 python=${3:-python}
case $python in /*) ;; */*) python=$PWD/$python ;; esac  # the runs start in other folders
root=$(cd "$(dirname "$0")/../.." && pwd)
tmp=$(mktemp -d)
trap 'git -C "$root" worktree remove --force "$tmp/before" >/dev/null 2>&1 || true; rm -rf "$tmp"' EXIT
git -C "$root" worktree add -q --detach "$tmp/before" "$before"
args=(--data-dir "$data" --train-size 300 --test-size 200 --epochs 2 --no-visdom --conv1-channels 16
      --primary-caps 4 --decoder-hidden1 32 --decoder-hidden2 64 --compile off --seed 3)
for preset in "" authors; do
  for tree in before after; do
    dir=$root; [ "$tree" = before ] && dir=$tmp/before
    (cd "$dir" && "$python" capsule_network.py "${args[@]}" ${preset:+--preset $preset} --run-dir "$tmp/$tree-$preset" \
       >/dev/null 2>&1)
  done
  "$python" - "$tmp/before-$preset/metrics.jsonl" "$tmp/after-$preset/metrics.jsonl" "${preset:-default}" <<'PY'
import json, sys
skip = {"train_seconds", "test_seconds", "train_images_per_s", "device_name"}
rows = [[{k: v for k, v in json.loads(line).items() if k not in skip} for line in open(path)] for path in sys.argv[1:3]]
before, after = rows  # keys the change added (e.g. test_set) are new columns, not changed numbers
shared = [{k: row[k] for k in old if k in row} for old, row in zip(before, after)]
assert len(before) == 2 and shared == before, f"{sys.argv[3]}: the numbers differ:\n{before}\n{after}"
added = sorted(set(after[0]) - set(before[0]))
print(f"{sys.argv[3]}: 2 epochs, {len(before[0])} metrics each, identical (test accuracy "
      f"{after[-1]['test_accuracy']:.2f}%, test loss {after[-1]['test_loss']:.6f})"
      + (f"; added: {', '.join(added)}" if added else ""))
PY
done

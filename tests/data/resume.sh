#!/usr/bin/env bash
# Exact resume across world sizes, as real jobs: 4 ranks run 7 steps and save the loader state;
# 2 ranks (twice the batch per rank, the same global batch) restore it and run 13 more. Together
# they must print exactly what one uninterrupted 4-rank run of 20 steps prints; the 100-sample
# set gives 12 steps per epoch, so the resumed part also crosses into the next epoch.
# Usage: resume.sh FIXTURES   (CTest sets MPIEXEC and BIN)
set -euo pipefail
fixtures=$1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
run() {
  local np=$1
  shift
  "$MPIEXEC" -np "$np" --oversubscribe --bind-to none "$BIN/data_probe" --source "$fixtures/ids.h5" --seed 7 "$@"
}
run 4 --batch 2 --steps 20 >"$work/full.txt"
run 4 --batch 2 --steps 7 --save "$work/state.json" >"$work/first.txt"
run 2 --batch 4 --steps 13 --restore "$work/state.json" >"$work/second.txt"
cat "$work/first.txt" "$work/second.txt" >"$work/resumed.txt"
echo "state after 7 steps: $(cat "$work/state.json")"
[ "$(wc -l <"$work/full.txt")" -eq 20 ] || { echo "FAIL: expected 20 steps"; cat "$work/full.txt"; exit 1; }
grep -q "^epoch 1 step 0:" "$work/full.txt" || { echo "FAIL: the run did not reach epoch 1"; exit 1; }
if ! diff "$work/full.txt" "$work/resumed.txt"; then
  echo "FAIL: the resumed run's batches differ from the uninterrupted run's"
  exit 1
fi
echo "PASS: 4 ranks x 7 steps, then 2 ranks x 13 steps restored == 4 ranks x 20 steps"

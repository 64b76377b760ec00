#!/usr/bin/env bash
# kill -9 during a checkpoint save, at each of the save's fault points (runtime/fault.h), on
# the rank that is doing the work there. Every time: the previous complete checkpoint is
# intact, --resume auto takes the newest complete one, and the resumed run ends with weights
# bit-identical to a run that was never killed.
#  files_written (rank 1)       the new checkpoint has no manifest      -> resume from step 10
#  manifest_written (rank 0)    complete but not yet renamed into place -> resume from step 10
#  renamed (rank 0)             in place, older ones not yet rotated    -> resume from step 20
#  and, for a step saved again by a resumed run (the old directory is exchanged, not deleted):
#  manifest_written / renamed   step 20 stays complete either way
# Environment (set by CTest): MPIEXEC, BIN.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../support/tiny_run.sh"

train 2 --set run.name=reference --set train.steps=20 > /dev/null
reference=$work/runs/reference/checkpoints/step-00000020/model.safetensors

# killed_save NAME POINT RANK STEPS: runs --resume auto to STEPS with the fault armed; the job
# must die (by the kill) during the save of step STEPS.
killed_save() {
  local name=$1 point=$2 rank=$3 steps=$4 rc=0
  MPITRAIN_FAULT_AT=$point MPITRAIN_FAULT_RANK=$rank \
    "$MPIEXEC" -np 2 --oversubscribe --bind-to none -x MPITRAIN_FAULT_AT -x MPITRAIN_FAULT_RANK \
    "$BIN/train" --config "$work/run.json" --set run.name="$name" --set train.steps="$steps" --resume auto \
    > "$work/$name-killed.log" 2>&1 || rc=$?
  [ "$rc" -ne 0 ] || { cat "$work/$name-killed.log"; fail "$point: the job survived the kill"; }
  if pgrep -f "$BIN/train --config $work/run.json --set run.name=$name " > /dev/null; then
    pkill -9 -f "$BIN/train --config $work/run.json --set run.name=$name " || true
    fail "$point: processes left behind"
  fi
}

# resumes_from NAME STEP: --resume auto to step 20 starts at STEP and ends at the reference weights.
resumes_from() {
  local name=$1 step=$2
  train 2 --set run.name="$name" --set train.steps=20 --resume auto > "$work/$name-resume.log" 2>&1 ||
    { cat "$work/$name-resume.log"; fail "$name: the resume failed"; }
  grep -q "resumed from .*step-$(printf %08d "$step") at step $step" "$work/$name-resume.log" ||
    { cat "$work/$name-resume.log"; fail "$name: did not resume from step $step"; }
  cmp "$reference" "$work/runs/$name/checkpoints/step-00000020/model.safetensors" ||
    fail "$name: final weights differ from the run that was never killed"
}

for case in "files_written 1 10" "manifest_written 0 10" "renamed 0 20"; do
  read -r point rank expect <<< "$case"
  name=kill-$point
  echo "--- kill -9 at checkpoint.$point on rank $rank"
  train 2 --set run.name="$name" --set train.steps=10 > /dev/null
  cp -r "$work/runs/$name/checkpoints/step-00000010" "$work/$name-before"
  killed_save "$name" "checkpoint.$point" "$rank" 20
  diff -r "$work/$name-before" "$work/runs/$name/checkpoints/step-00000010" ||
    fail "$point: the previous checkpoint changed"
  resumes_from "$name" "$expect"
  echo "ok: $point"
done

for point in manifest_written renamed; do
  name=again-$point
  echo "--- step 20 saved again, kill -9 at checkpoint.$point"
  train 2 --set run.name="$name" --set train.steps=20 > /dev/null
  killed_save "$name" "checkpoint.$point" 0 20
  ls -a "$work/runs/$name/checkpoints"
  resumes_from "$name" 20
  echo "ok: again $point"
done
leftovers=$(find "$work/runs" -name '.step-*' | wc -l)
[ "$leftovers" -eq 0 ] || { find "$work/runs" -name '.step-*'; fail "temporary folders left after the resumed saves"; }
echo "PASS"

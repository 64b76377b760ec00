#!/usr/bin/env bash
# Checkpoints under mpirun, with real processes and real signals:
#  1. exact resume: 40 steps in one go == 20 steps, then --resume auto to 40 (np 2, CPU, fp32):
#     identical metrics.jsonl losses and bit-identical final weights;
#  2. SIGTERM mid-run, and a second one during the save: exit code 99 and a complete
#     checkpoint; --resume auto finishes the run;
#  3. a corrupted newest checkpoint is skipped (with a warning) by --resume auto;
#  4. world size 4 -> 2 with the global batch kept: the data position carries over.
#  5. the weights load in Python (safetensors and torch 2.11) with the values mpitrain saved.
#  6. no memory to load a checkpoint into is not a bad checkpoint: exit 1 (not 2, bad input),
#     a message that says so, the checkpoint untouched, and a later resume with memory works.
# Environment (set by CTest): MPIEXEC, BIN.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../support/tiny_run.sh"

echo "--- 1. exact resume"
train 2 --set run.name=straight
train 2 --set run.name=resumed --set train.steps=20
train 2 --set run.name=resumed --resume auto
[ "$(losses "$work/runs/straight/metrics.jsonl")" = "$(losses "$work/runs/resumed/metrics.jsonl")" ] || {
  echo "FAIL: losses differ"; losses "$work/runs/straight/metrics.jsonl"; losses "$work/runs/resumed/metrics.jsonl"; exit 1; }
cmp "$work/runs/straight/checkpoints/step-00000040/model.safetensors" "$work/runs/resumed/checkpoints/step-00000040/model.safetensors"
ls "$work/runs/straight/checkpoints" | tr '\n' ' ' | grep -x "step-00000030 step-00000040 " > /dev/null || {
  echo "FAIL: keep_last 2 should leave steps 30 and 40"; ls "$work/runs/straight/checkpoints"; exit 1; }

echo "--- 2. SIGTERM"
train 2 --set run.name=stopped --set train.steps=100000 --set checkpoint.every_steps=0 > "$work/stop.log" 2>&1 &
job=$!
for _ in $(seq 100); do grep -q "step" "$work/runs/stopped/metrics.jsonl" 2>/dev/null && break; sleep 0.2; done
# The ranks, not mpirun: the signal a scheduler sends to the job's processes.
pkill -TERM -f "^$BIN/train --config $work/run.json --set run.name=stopped" || true
# A second signal while the checkpoint is being written must not spoil it.
sleep 0.1
pkill -TERM -f "^$BIN/train --config $work/run.json --set run.name=stopped" || true
set +e; wait "$job"; rc=$?; set -e
cat "$work/stop.log"
[ "$rc" -eq 99 ] || { echo "FAIL: exit code $rc after SIGTERM, want 99"; exit 1; }
stopped=$(ls "$work/runs/stopped/checkpoints")
echo "stopped at $stopped"
train 2 --set run.name=stopped --set train.steps=$((10#${stopped#step-} + 5)) --resume auto > "$work/resume.log" 2>&1
grep -q "resumed from" "$work/resume.log"

echo "--- 3. corrupted newest checkpoint"
newest=$work/runs/straight/checkpoints/step-00000040
printf 'garbage' | dd of="$newest/model.safetensors" bs=1 seek=100 conv=notrunc 2>/dev/null
train 2 --set run.name=straight --set train.steps=45 --resume auto > "$work/corrupt.log" 2>&1
grep -q "skipping checkpoint .*step-00000040: file model.safetensors fails its CRC-32 check" "$work/corrupt.log"
grep -q "resumed from .*step-00000030 at step 30" "$work/corrupt.log"

echo "--- 4. 4 ranks -> 2 ranks"
train 4 --set run.name=resize --set train.steps=20 --set batch.micro_batch=16
train 2 --set run.name=resize --set batch.micro_batch=32 --resume auto > "$work/resize.log" 2>&1
grep -q "resumed from .*step-00000020 at step 20" "$work/resize.log"

echo "--- 5. Python reads the weights"
"$PYTHON" - "$work/runs/resumed/checkpoints/step-00000040/model.safetensors" <<'PY'
import sys
import torch
from safetensors.torch import load_file
weights = load_file(sys.argv[1])
shapes = {k: tuple(v.shape) for k, v in weights.items()}
assert shapes == {"net.0.weight": (32, 784), "net.0.bias": (32,), "net.3.weight": (10, 32), "net.3.bias": (10,)}, shapes
for name, t in weights.items():
    assert t.dtype == torch.float32 and t.isfinite().all() and t.abs().sum() > 0, name
print("PASS: python read", {k: tuple(v.shape) for k, v in weights.items()})
PY

echo "--- 6. out of memory while loading a checkpoint"
# A wider model, whose saved state does not fit in what the CPU memory budget leaves after the
# model is built (the stand-in for a full GPU, runtime/memory_budget.h): 4-6 MB here fail at
# model.safetensors or optimizer.pt, 8 MB in the first step, 10 MB fit.
wide=(--set run.name=wide --set model.mlp.hidden=512)
train 2 "${wide[@]}" --set train.steps=10 > /dev/null
cp -r "$work/runs/wide/checkpoints/step-00000010" "$work/wide-before"
rc=0
MPITRAIN_CPU_MEMORY_BUDGET=5000000 "$MPIEXEC" -np 2 --oversubscribe --bind-to none -x MPITRAIN_CPU_MEMORY_BUDGET \
  "$BIN/train" --config "$work/run.json" "${wide[@]}" --set train.steps=20 --resume auto > "$work/oom.log" 2>&1 || rc=$?
[ "$rc" -eq 1 ] || { cat "$work/oom.log"; fail "exit code $rc when the checkpoint does not fit, want 1"; }
grep -q "out of memory on cpu loading .* of checkpoint .*step-00000010 (the checkpoint itself is fine)" "$work/oom.log" ||
  { cat "$work/oom.log"; fail "the error does not say the checkpoint is fine"; }
diff -r "$work/wide-before" "$work/runs/wide/checkpoints/step-00000010" || fail "the checkpoint changed"
train 2 "${wide[@]}" --set train.steps=20 --resume auto > "$work/wide-resume.log" 2>&1
grep -q "resumed from .*step-00000010 at step 10" "$work/wide-resume.log" || fail "the resume with memory failed"
echo "PASS"

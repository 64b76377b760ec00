#!/usr/bin/env bash
# ZeRO stage 1 (ddp.zero_stage 1) through the trainer, under mpirun:
#  1. stage 1 gives stage 0's weights after 20 AdamW steps with clipping, within 1e-6 relative
#     (per tensor, ||a - b|| / ||b||):
#     np 2 (accumulation 2), np 4 (accumulation 2), np 2 with bf16 autocast;
#  2. rank 0's optimizer state is 1/N of stage 0's (metrics.jsonl's optimizer_state_bytes, within
#     the padding of the buckets);
#  3. a resume on the same world size is exact: 10 steps, then 10 more, give the uninterrupted
#     run's weights and shard files bit for bit;
#  4. a resume on another world size re-shards: the np 2 checkpoint resumed and saved again on
#     4 ranks holds exactly the same optimizer state, cut in 4; training on to step 20 gives the
#     np 2 weights within 1e-5;
#  5. refusals (exit 2): a stage 1 checkpoint resumed at stage 0, zero_stage 2, ZeRO with top-k;
#  6. batch.micro_batch auto under a CPU memory budget counts the shard's optimizer state (a larger
#     micro-batch fits at stage 1), and its trial steps leave no gradient behind: the weights
#     equal those of a run given the chosen micro-batch by hand.
# Environment (set by CTest): MPIEXEC, BIN.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../support/tiny_run.sh"
common=(--set model.mlp.dropout=0 --set train.steps=20 --set checkpoint.every_steps=10 --set checkpoint.keep_last=5
        --set optimizer.grad_clip=0.5 --set log.every_steps=1)
zero=(--set ddp.zero_stage=1)

echo "--- 1. stage 1 = stage 0"
train 2 "${common[@]}" --set run.name=s0-np2
train 2 "${common[@]}" "${zero[@]}" --set run.name=s1-np2
same_weights s1-np2 s0-np2 1e-6
train 4 "${common[@]}" --set batch.micro_batch=8 --set run.name=s0-np4
train 4 "${common[@]}" "${zero[@]}" --set batch.micro_batch=8 --set run.name=s1-np4
same_weights s1-np4 s0-np4 1e-6
train 2 "${common[@]}" --set precision.mode=bf16 --set run.name=s0-bf16
train 2 "${common[@]}" "${zero[@]}" --set precision.mode=bf16 --set run.name=s1-bf16
same_weights s1-bf16 s0-bf16 1e-6

echo "--- 2. optimizer state per rank"
python3 - "$work/runs" <<'PY'
import json, sys
def last(run, field):
    return [json.loads(l) for l in open(f"{sys.argv[1]}/{run}/metrics.jsonl") if '"loss"' in l][-1][field]
for n in (2, 4):
    full, shard = last(f"s0-np{n}", "optimizer_state_bytes"), last(f"s1-np{n}", "optimizer_state_bytes")
    sent0, sent1 = last(f"s0-np{n}", "comm_bytes_per_step"), last(f"s1-np{n}", "comm_bytes_per_step")
    print(f"np {n}: rank 0's optimizer state {shard} bytes at stage 1, {full} at stage 0 ({shard / full:.4f}); "
          f"bytes sent per step {sent1:.0f} at stage 1, {sent0:.0f} at stage 0")
    # Padding: at most n - 1 elements per bucket, 2 moments of 4 bytes each.
    assert abs(shard * n - full) <= 8 * n * 8, f"np {n}: {shard} x {n} is not {full}"
PY

echo "--- 3. resume on the same world size"
train 2 "${common[@]}" "${zero[@]}" --set run.name=again --set train.steps=10
train 2 "${common[@]}" "${zero[@]}" --set run.name=again --resume auto > "$work/again.log" 2>&1
grep -q "resumed from .*step-00000010 at step 10" "$work/again.log" || { cat "$work/again.log"; fail "no resume"; }
for file in model.safetensors optimizer-rank-00000.safetensors optimizer-rank-00001.safetensors; do
  cmp "$work/runs/again/checkpoints/step-00000020/$file" "$work/runs/s1-np2/checkpoints/step-00000020/$file" ||
    fail "$file after a resume differs from the uninterrupted run's"
done
echo "PASS: weights and optimizer shards identical to the uninterrupted run"

echo "--- 4. resume on 4 ranks"
train 2 "${common[@]}" "${zero[@]}" --set run.name=two --set train.steps=10
cp -r "$work/runs/two" "$work/runs/four"
# micro-batch 8: the same 32 samples per micro-step as 2 ranks x 16, so the data order continues.
train 4 "${common[@]}" "${zero[@]}" --set batch.micro_batch=8 --set run.name=four --set train.steps=10 --resume auto > "$work/four.log" 2>&1 ||
  { cat "$work/four.log"; fail "the resume on 4 ranks failed"; }
grep -q "the optimizer state is re-sharded exactly" "$work/four.log" || { cat "$work/four.log"; fail "no re-shard notice"; }
"$PYTHON" - "$work/runs/two/checkpoints/step-00000010" "$work/runs/four/checkpoints/step-00000010" <<'PY'
import glob, json, re, sys
import numpy as np
from safetensors.numpy import load_file
def whole(directory):
    """parameter -> field -> the whole flat state, from every rank's shard file."""
    files = sorted(glob.glob(f"{directory}/optimizer-rank-*.safetensors"))
    pieces = {}
    for path in files:
        for name, value in load_file(path).items():
            parameter, begin, end, field = re.fullmatch(r"(.*)\[(\d+):(\d+)\]\.(\w+)", name).groups()
            pieces.setdefault((parameter, field), []).append((int(begin), int(end), value))
    state = {}
    for key, parts in pieces.items():
        parts.sort(key=lambda p: p[0])
        if key[1] == "step":
            assert len({int(p[2][0]) for p in parts}) == 1, key
            state[key] = parts[0][2]
        else:
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:])) and parts[0][0] == 0, f"{key}: gaps or overlaps"
            state[key] = np.concatenate([p[2] for p in parts])
    return len(files), state
n2, two = whole(sys.argv[1])
n4, four = whole(sys.argv[2])
assert (n2, n4) == (2, 4), (n2, n4)
assert json.load(open(f"{sys.argv[2]}/trainer.json"))["world_size"] == 4
assert two.keys() == four.keys() and len(two) > 0
for key in two:
    assert np.array_equal(two[key], four[key]), f"{key}: the state changed in re-sharding"
print(f"PASS: {len(two)} state tensors, cut in 2 and re-cut in 4, identical")
PY
train 4 "${common[@]}" "${zero[@]}" --set batch.micro_batch=8 --set run.name=four --resume auto > "$work/four.log" 2>&1 ||
  { cat "$work/four.log"; fail "training on 4 ranks after the re-shard failed"; }
same_weights four s1-np2 1e-5

echo "--- 5. refusals"
refused() {
  local message=$1; shift
  set +e
  train 2 "${common[@]}" "$@" > "$work/bad.log" 2>&1
  local rc=$?
  set -e
  [ "$rc" -eq 2 ] || { cat "$work/bad.log"; fail "exit $rc, want 2, for $*"; }
  grep -qF -- "$message" "$work/bad.log" || { cat "$work/bad.log"; fail "no message '$message' for $*"; }
}
before=$(find "$work/runs/two" -type f | sort | xargs md5sum)
refused "ddp.zero_stage" --set run.name=two --resume auto
refused "holds the optimizer state of ddp.zero_stage 1; this run has ddp.zero_stage 0" --set run.name=two --resume auto \
  --allow-config-change
[ "$before" = "$(find "$work/runs/two" -type f | sort | xargs md5sum)" ] || fail "a refused resume changed the checkpoint"
refused '"ddp.zero_stage" must be an integer in [0, 1]' --set run.name=bad --set ddp.zero_stage=2
refused "ddp.compression topk works with ddp.zero_stage 0 only" --set run.name=bad "${zero[@]}" --set ddp.compression=topk
echo "PASS"

echo "--- 6. batch.micro_batch auto"
wide=(--set model.mlp.hidden=256 --set batch.global=512 --set train.steps=3)
for stage in 0 1; do
  MPITRAIN_CPU_MEMORY_BUDGET=5100000 train 2 "${common[@]}" "${wide[@]}" --set batch.micro_batch=auto \
    --set ddp.zero_stage=$stage --set run.name=auto$stage > "$work/auto$stage.log" 2>&1 ||
    { cat "$work/auto$stage.log"; fail "batch.micro_batch auto at stage $stage failed"; }
done
micro=$(python3 - "$work/auto0.log" "$work/auto1.log" "$work/runs/auto1/config.json" <<'PY'
import json, re, sys
caps = [min(int(c) for c in re.search(r"fits per rank: ([\d, ]+);", open(path).read()).group(1).split(", "))
        for path in sys.argv[1:3]]
print(f"smallest cap per rank: {caps[0]} at stage 0, {caps[1]} at stage 1", file=sys.stderr)
assert caps[1] > caps[0], f"FAIL: ZeRO's smaller optimizer state did not make room: {caps}"
print(json.load(open(sys.argv[3]))["batch"]["micro_batch"])
PY
)
train 2 "${common[@]}" "${wide[@]}" "${zero[@]}" --set batch.micro_batch="$micro" --set run.name=manual > /dev/null 2>&1
cmp "$work/runs/auto1/checkpoints/step-00000003/model.safetensors" \
  "$work/runs/manual/checkpoints/step-00000003/model.safetensors" ||
  fail "the run after the micro-batch search differs from one given micro-batch $micro by hand"
echo "PASS: micro-batch $micro found at stage 1; the same weights as with it set by hand"

#!/usr/bin/env bash
# The fault matrix of docs/reliability.md, with real processes, real signals and real file
# systems (np 2, CPU). Each fault must end the job on every rank with a clear message, leave no
# process behind, and lose no complete checkpoint.
# Usage: faults.sh [REPEATS]  (REPEATS: kill -9 at random moments of checkpointing, default 3)
# Environment (set by CTest): MPIEXEC, BIN.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../support/tiny_run.sh"
repeats=${1:-3}
mounts=()
cleanup() {
  for m in "${mounts[@]}"; do umount "$m" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# start NAME [ARGS...]: a long run in the background; its job's pid in $job.
start() {
  local name=$1; shift
  train 2 --set run.name="$name" --set train.steps=100000 "$@" > "$work/$name.log" 2>&1 &
  job=$!
}
ranks_of() { pgrep -f "^$BIN/train --config $work/run.json --set run.name=$1 " || true; }
wait_for_step() {  # wait_for_step NAME: until metrics.jsonl has a line
  for _ in $(seq 300); do grep -q '"step"' "$work/runs/$1/metrics.jsonl" 2>/dev/null && return; sleep 0.1; done
  cat "$work/$1.log"; fail "$1: no training step within 30 s"
}
# ended NAME LIMIT MESSAGE: the job must end non-zero within LIMIT s with MESSAGE, no rank left.
ended() {
  local name=$1 limit=$2 message=$3 rc=0 start_s=$SECONDS
  while kill -0 "$job" 2>/dev/null && [ $((SECONDS - start_s)) -lt "$limit" ]; do sleep 0.2; done
  if kill -0 "$job" 2>/dev/null; then
    pkill -9 -f "^$BIN/train --config $work/run.json --set run.name=$name " || true
    cat "$work/$name.log"; fail "$name: the job did not end within $limit s"
  fi
  wait "$job" || rc=$?
  [ "$rc" -ne 0 ] || { cat "$work/$name.log"; fail "$name: exit 0"; }
  grep -q -- "$message" "$work/$name.log" || { cat "$work/$name.log"; fail "$name: no message '$message'"; }
  [ -z "$(ranks_of "$name")" ] || fail "$name: processes left behind"
  echo "ok: $name ended with exit $rc in $((SECONDS - start_s)) s: $(grep -m1 -o -- "$message.\{0,80\}" "$work/$name.log")"
}
# resumes NAME: --resume auto continues from a complete checkpoint and trains 2 more steps.
resumes() {
  local name=$1 newest
  newest=$(ls "$work/runs/$name/checkpoints" | grep '^step-' | tail -1)
  train 2 --set run.name="$name" --set train.steps=$((10#${newest#step-} + 2)) --resume auto > "$work/$name-resume.log" 2>&1 ||
    { cat "$work/$name-resume.log"; fail "$name: resume failed"; }
  grep -q "resumed from" "$work/$name-resume.log" || { cat "$work/$name-resume.log"; fail "$name: did not resume"; }
}

echo "--- kill -9 of one rank while training"
start killed --set ddp.comm_timeout_s=20
wait_for_step killed
kill -9 "$(ranks_of killed | tail -1)"
ended killed 60 "exited on signal 9"

echo "--- one rank stopped (SIGSTOP): the others' collective, or the save's heartbeat, times out"
start stalled --set ddp.comm_timeout_s=5
wait_for_step stalled
kill -STOP "$(ranks_of stalled | tail -1)"
ended stalled 60 "did not complete within 5000 ms\|has not answered the save's heartbeat for 5"

echo "--- out of memory on rank 1 (injected)"
# mpirun's ranks on this node inherit its environment.
MPITRAIN_FAULT_AT=train.out_of_memory MPITRAIN_FAULT_RANK=1 start oom
ended oom 60 "out of GPU memory at batch.micro_batch 16: lower batch.micro_batch"

echo "--- a GPU asked for where there is none"
start nogpu --set device.kind=cuda
ended nogpu 60 "no CUDA device is usable"

echo "--- ranks started with different configs"
"$MPIEXEC" --oversubscribe --bind-to none -np 1 "$BIN/train" --config "$work/run.json" --set run.name=mixed \
  --set optimizer.lr=0.1 : -np 1 "$BIN/train" --config "$work/run.json" --set run.name=mixed > "$work/mixed.log" 2>&1 &
job=$!
ended mixed 60 "the resolved config differs between rank"
[ ! -e "$work/runs/mixed/metrics.jsonl" ] || fail "mixed configs: a step was taken"

echo "--- NaN loss in fp32: skipped up to train.max_nonfinite_steps, then a checkpoint and a stop"
start diverged --set optimizer.name=sgd --set optimizer.lr=1e30 --set train.max_nonfinite_steps=2 --set log.every_steps=1
ended diverged 60 "were not finite in 3 steps in a row"
newest=$(ls "$work/runs/diverged/checkpoints" | grep '^step-' | tail -1)
python3 - "$work/runs/diverged/metrics.jsonl" "${newest#step-}" <<'PY'
import json, sys
records = [json.loads(l) for l in open(sys.argv[1])]
skipped = sum(r["skipped_steps"] for r in records)
assert skipped == 3, records
assert records[-1]["step"] == int(sys.argv[2]), (records[-1], sys.argv[2])
PY

echo "--- the run of non-finite steps carries over a resume"
# Steps 2 and 3 are skipped before the run's end at step 3 and its checkpoint; resumed, step 4
# is the third in a row, as in the run above that was never stopped (not the first of a new run).
diverging=(--set run.name=diverged-resumed --set optimizer.name=sgd --set optimizer.lr=1e30
  --set train.max_nonfinite_steps=2 --set log.every_steps=1)
train 2 "${diverging[@]}" --set train.steps=3 > "$work/diverged-3.log" 2>&1 ||
  { cat "$work/diverged-3.log"; fail "the run to step 3 failed"; }
train 2 "${diverging[@]}" --set train.steps=100 --resume auto > "$work/diverged-resumed.log" 2>&1 &&
  fail "the resumed run did not stop"
grep -q "resumed from .*step-00000003 at step 3" "$work/diverged-resumed.log" ||
  { cat "$work/diverged-resumed.log"; fail "did not resume from step 3"; }
grep -q "were not finite in 3 steps in a row (steps 2 to 4)" "$work/diverged-resumed.log" ||
  { cat "$work/diverged-resumed.log"; fail "the resumed run did not stop at step 4"; }
echo "ok: stopped at step 4 after the resume"

if mkdir -p "$work/full" && mount -t tmpfs -o size=600k tmpfs "$work/full" 2>/dev/null; then
  mounts+=("$work/full")
  echo "--- disk full during a checkpoint save"
  start full --set checkpoint.dir="$work/full" --set checkpoint.keep_last=3
  ended full 60 "saving the checkpoint of step 20 under $work/full failed: cannot write"
  cp -r "$work/full/step-00000010" "$work/saved-10"
  train 2 --set run.name=after-full --set train.steps=12 --resume "$work/saved-10" > "$work/after-full.log" 2>&1 ||
    { cat "$work/after-full.log"; fail "the checkpoint before the full disk does not resume"; }
  echo "ok: the checkpoint of step 10 was intact and resumed"

  mkdir -p "$work/readonly"
  mount -t tmpfs -o ro,size=1m tmpfs "$work/readonly"
  mounts+=("$work/readonly")
  echo "--- read-only checkpoint folder"
  start readonly --set checkpoint.dir="$work/readonly/checkpoints"
  ended readonly 60 "saving the checkpoint of step 10 under $work/readonly/checkpoints failed"
else
  echo "SKIP: disk full and read-only folders need tmpfs mounts (root), not available here"
fi

echo "--- kill -9 of a random rank at a random moment while checkpoints are written ($repeats times)"
for i in $(seq "$repeats"); do
  name=random-$i
  start "$name" --set checkpoint.every_steps=1 --set checkpoint.keep_last=2
  for _ in $(seq 300); do ls "$work/runs/$name/checkpoints" 2>/dev/null | grep '^step-' > /dev/null && break; sleep 0.1; done
  sleep "$(awk -v s="$RANDOM" 'BEGIN { srand(s); printf "%.2f", rand() * 2 }')"
  kill -9 "$(ranks_of "$name" | shuf -n 1)"
  ended "$name" 60 "exited on signal 9"
  resumes "$name"
  echo "ok: $name $(grep -o "resumed from [^ ]*" "$work/$name-resume.log")"
done
echo "PASS"

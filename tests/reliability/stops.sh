#!/usr/bin/env bash
# The fault matrix's stops and kills by phase (docs/reliability.md): one rank is stopped
# (SIGSTOP: alive but silent, every thread) or killed (SIGKILL) at a fault point during
# start-up, evaluation, a checkpoint save and a resume's restore (rank 0 picking the checkpoint,
# another rank reading it). Every time the job must end
# within ddp.comm_timeout_s + 10 s of the fault, leave no process behind, keep the previous
# checkpoint byte for byte, and resume from it. (The save's faults come before its first
# barrier: mpirun's teardown continues a stopped rank (SIGCONT), so rank 0 stopped where the
# others had already reached the commit barrier can still finish the new checkpoint, which is
# then complete and rightly the one resumed; docs/reliability.md.) A save slowed to outlast ddp.comm_timeout_s
# while it keeps writing must finish.
# Usage: stops.sh [NP [PHASES]]  (default 2 and "startup eval save restore slow")
# Environment (set by CTest): MPIEXEC, BIN.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../support/tiny_run.sh"
np=${1:-2}
phases=" ${2:-startup eval save restore slow} "
last=$((np - 1))
timeout_s=3
bound_s=$((timeout_s + 10))
common=(--set ddp.comm_timeout_s=$timeout_s --set data.eval.manifest="$work/data/train.json"
        --set eval.every_steps=5 --set eval.max_batches=2)
ranks_of() { pgrep -f "^$BIN/train --config $work/run.json --set run.name=$1 " || true; }
now() { date +%s.%N; }

train "$np" --set run.name=base --set train.steps=10 "${common[@]}" > "$work/base.log" 2>&1 ||
  { cat "$work/base.log"; fail "the first 10 steps failed"; }

# faulted NAME POINT RANK SIGNAL MESSAGE: from a copy of the base run, --resume auto to step 20
# with the fault armed; the job must end within bound_s of the fault with MESSAGE and nothing
# left; step 10 must be unchanged and must be what the next resume takes.
faulted() {
  local name=$1 point=$2 rank=$3 signal=$4 message=$5 job fired="" ended_at rc=0
  cp -r "$work/runs/base" "$work/runs/$name"
  MPITRAIN_FAULT_AT=$point MPITRAIN_FAULT_RANK=$rank MPITRAIN_FAULT_SIGNAL=$signal \
    "$MPIEXEC" -np "$np" --oversubscribe --bind-to none -x MPITRAIN_FAULT_AT -x MPITRAIN_FAULT_RANK \
    -x MPITRAIN_FAULT_SIGNAL "$BIN/train" --config "$work/run.json" --set run.name="$name" --set train.steps=20 \
    "${common[@]}" --resume auto > "$work/$name.log" 2>&1 &
  job=$!
  while kill -0 "$job" 2>/dev/null; do
    [ -z "$fired" ] && grep -qs "fault point $point" "$work/$name.log" && fired=$(now)
    if [ -n "$fired" ] && awk -v a="$fired" -v b="$(now)" 'BEGIN { exit !(b - a > '"$bound_s"') }'; then
      pkill -9 -f "^$BIN/train --config $work/run.json --set run.name=$name " || true
      cat "$work/$name.log"; fail "$name: the job did not end within $bound_s s of the fault"
    fi
    sleep 0.1
  done
  ended_at=$(now)
  wait "$job" || rc=$?
  [ -n "$fired" ] || { cat "$work/$name.log"; fail "$name: the fault point $point was never reached"; }
  [ "$rc" -ne 0 ] || { cat "$work/$name.log"; fail "$name: exit 0"; }
  grep -q -- "$message" "$work/$name.log" || { cat "$work/$name.log"; fail "$name: no message '$message'"; }
  sleep 0.5
  [ -z "$(ranks_of "$name")" ] || { ps -o pid,stat,args -p "$(ranks_of "$name" | paste -sd,)"; fail "$name: processes left behind"; }
  diff -r "$work/runs/base/checkpoints/step-00000010" "$work/runs/$name/checkpoints/step-00000010" ||
    fail "$name: the checkpoint of step 10 changed"
  train "$np" --set run.name="$name" --set train.steps=12 "${common[@]}" --resume auto > "$work/$name-resume.log" 2>&1 ||
    { cat "$work/$name-resume.log"; fail "$name: the resume failed"; }
  grep -q "resumed from .*step-00000010 at step 10" "$work/$name-resume.log" ||
    { cat "$work/$name-resume.log"; fail "$name: did not resume from step 10"; }
  printf 'ok: %-26s %s on rank %s at %-28s ended %4.1f s after the fault (exit %s): %s\n' "$name" "$signal" "$rank" \
    "$point" "$(awk -v a="$fired" -v b="$ended_at" 'BEGIN { print b - a }')" "$rc" \
    "$(grep -m1 -o -- "$message.\{0,60\}" "$work/$name.log")"
}

stopped="within ${timeout_s}000 ms\|has not answered the save's heartbeat for"
killed="exited on signal 9"
for signal in STOP KILL; do
  if [ "$signal" = STOP ]; then message=$stopped; else message=$killed; fi
  s=$(echo "$signal" | tr A-Z a-z)
  if [[ $phases == *" startup "* ]]; then faulted "startup-$s" comm.starting "$last" "$signal" "$message"; fi
  if [[ $phases == *" eval "* ]]; then faulted "eval-$s" train.evaluate "$last" "$signal" "$message"; fi
  if [[ $phases == *" save "* ]]; then
    faulted "save-leaf-$s" checkpoint.started "$last" "$signal" "$message"
    faulted "save-root-$s" checkpoint.started 0 "$signal" "$message"
  fi
  if [[ $phases == *" restore "* ]]; then
    faulted "restore-root-$s" checkpoint.verify 0 "$signal" "$message"
    faulted "restore-leaf-$s" checkpoint.verify "$last" "$signal" "$message"
  fi
done
[[ $phases == *" slow "* ]] || { echo "PASS"; exit 0; }

echo "--- a slow save that keeps writing outlasts ddp.comm_timeout_s and completes"
MPITRAIN_FAULT_AT=checkpoint.slow_writes MPITRAIN_FAULT_RANK=0 \
  "$MPIEXEC" -np "$np" --oversubscribe --bind-to none -x MPITRAIN_FAULT_AT -x MPITRAIN_FAULT_RANK \
  "$BIN/train" --config "$work/run.json" --set run.name=slow --set train.steps=10 \
  "${common[@]}" > "$work/slow.log" 2>&1 || { cat "$work/slow.log"; fail "the slow save did not complete"; }
seconds=$(grep -o "step-00000010 saved in [0-9.]*" "$work/slow.log" | awk '{ print $NF }')
[ -n "$seconds" ] || { cat "$work/slow.log"; fail "no save was logged"; }
awk -v s="$seconds" -v t="$timeout_s" 'BEGIN { exit !(s > t) }' ||
  fail "the slowed save took $seconds s, not more than ddp.comm_timeout_s ($timeout_s s): the test shows nothing"
[ -f "$work/runs/slow/checkpoints/step-00000010/manifest.json" ] || fail "the slowed save left no complete checkpoint"
echo "ok: the slowed save took $seconds s with ddp.comm_timeout_s $timeout_s and completed"
echo "PASS"

#!/usr/bin/env bash
# launch/mpirun.sh with real processes, real signals and real failures (2 CPU ranks):
#  1. a rank killed with SIGKILL mid-run: attempt 2 starts with --resume auto, resumes from the
#     newest checkpoint and finishes the run;
#  2. bad input (exit 2) is not retried;
#  3. SIGTERM to the wrapper: the ranks save a checkpoint and exit 99, which the wrapper returns
#     without a restart;
#  4. --max-restarts 1 with a rank killed in every attempt: two attempts, then the wrapper gives
#     up and returns the failure (137);
#  5. SIGTERM during the back-off before a restart: no restart, exit 99.
# Environment (set by CTest): MPIEXEC, BIN.
# shellcheck source=tests/launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
make_tiny_run
wrapper=$root/launch/mpirun.sh

# start NAME ARGS...: the wrapper on 2 ranks in the background, its log in $work/NAME.log.
start() {
  local name=$1
  shift
  log=$work/$name.log
  "$wrapper" -n 2 "$@" --config "$work/run.json" --set run.name="$name" >"$log" 2>&1 &
  job=$!
  started+=("$job")
}
# finish NAME: waits for the wrapper started last; rc is its exit code; prints its log.
finish() {
  rc=0
  wait "$job" || rc=$?
  grep -v '^checkpoint ' "$work/$1.log" || true
  log=""  # printed already
}
# kill_a_rank WRAPPER: SIGKILL to one of its ranks, as the OOM killer or a crash would.
kill_a_rank() {
  local ranks
  ranks=$(ranks_of "$1")
  [ -n "$ranks" ] || fail "no rank of wrapper $1 found"
  echo "killing rank pid $(echo "$ranks" | tail -1) of [${ranks//$'\n'/ }]"
  kill -KILL "$(echo "$ranks" | tail -1)"
}
# attempts_training LOG N: the N-th attempt logged that it trains.
attempts_training() { [ "$(grep -c '^training mlp' "$1" || true)" -ge "$2" ]; }

echo "--- 1. a rank killed mid-run: restarted with --resume auto, finishes"
start killed
has_checkpoint() { [ "$(newest_checkpoint "$work/runs/$1")" -gt 0 ]; }
wait_for 90 "the first checkpoint" has_checkpoint killed
kill_a_rank "$job"
finish killed
[ "$rc" -eq 0 ] || fail "wrapper exit code $rc, want 0 after one restart"
grep -q "attempt 1 exited with code 137" "$work/killed.log" || fail "attempt 1 should end with the killed rank's 137"
grep -q "attempt 2 of 4: .* --resume auto" "$work/killed.log" || fail "no attempt 2 with --resume auto"
grep -q "^resumed from .*step-" "$work/killed.log" || fail "attempt 2 did not resume from a checkpoint"
[ "$(last_step "$work/runs/killed/metrics.jsonl")" -eq 1000 ] || fail "metrics end at step $(last_step "$work/runs/killed/metrics.jsonl"), want 1000"
test -d "$work/runs/killed/checkpoints/step-00001000" || fail "no final checkpoint step-00001000"

echo "--- 2. bad input: not retried"
start badinput --set optimizer.lr=-1
finish badinput
[ "$rc" -eq 2 ] || fail "wrapper exit code $rc for a bad config, want 2"
grep -q "not restarting: a restart would read the same" "$work/badinput.log" || fail "no 'not restarting' line"
! grep -q "attempt 2" "$work/badinput.log" || fail "bad input was retried"

echo "--- 3. SIGTERM to the wrapper: checkpoint and exit 99"
start stopped --set train.steps=100000
wait_for 90 "the first metrics" test -s "$work/runs/stopped/metrics.jsonl"
kill -TERM "$job"
finish stopped
[ "$rc" -eq 99 ] || fail "wrapper exit code $rc after SIGTERM, want 99"
grep -q "received SIGTERM: asking the ranks to checkpoint" "$work/stopped.log" || fail "SIGTERM not forwarded"
stopped_at=$(grep -o 'stopped by a signal after step [0-9]*' "$work/stopped.log" | grep -o '[0-9]*$')
[ "$(newest_checkpoint "$work/runs/stopped")" -eq "$stopped_at" ] ||
  fail "newest checkpoint is step $(newest_checkpoint "$work/runs/stopped"), want the stop's step $stopped_at"
! grep -q "attempt 2" "$work/stopped.log" || fail "a stopped job was restarted"

echo "--- 4. --max-restarts 1: a rank killed in each attempt, two attempts, then the failure"
start bounded --max-restarts 1 --set train.steps=100000
for attempt in 1 2; do
  wait_for 90 "attempt $attempt to train" attempts_training "$work/bounded.log" "$attempt"
  kill_a_rank "$job"
done
finish bounded
[ "$rc" -eq 137 ] || fail "wrapper exit code $rc, want the last attempt's 137"
grep -q "attempt 2 of 2" "$work/bounded.log" || fail "no attempt 2 of 2"
grep -q "giving up after 2 attempt(s)" "$work/bounded.log" || fail "no 'giving up' line"
! grep -q "attempt 3" "$work/bounded.log" || fail "more attempts than --max-restarts 1 allows"

echo "--- 5. SIGTERM during the back-off: exit 99, no restart"
MPITRAIN_RESTART_DELAY_S=60 start backoff --set train.steps=100000
wait_for 90 "attempt 1 to train" attempts_training "$work/backoff.log" 1
kill_a_rank "$job"
wait_for 30 "the back-off" grep -q "restarting with --resume auto in 60 s" "$work/backoff.log"
kill -TERM "$job"
finish backoff
[ "$rc" -eq 99 ] || fail "wrapper exit code $rc after SIGTERM in the back-off, want 99"
! grep -q "attempt 2" "$work/backoff.log" || fail "restarted after SIGTERM"

for pid in "${started[@]}"; do ! kill -0 "$pid" 2>/dev/null || fail "wrapper $pid still runs"; done
leftover=$(pgrep -f "$work/run.json" || true)
[ -z "$leftover" ] || fail "processes left behind: ${leftover//$'\n'/ }"
echo "PASS"

#!/usr/bin/env bash
# Runs PROGRAM ARGS... under mpirun with NP ranks and checks that the job ends by itself:
# non-zero exit, the expected message, no rank saying it went on ("should have"), no process
# left behind, within LIMIT_S seconds.
# Usage: expect_job_failure.sh NP LIMIT_S MESSAGE PROGRAM [ARGS...]
# Environment (set by CTest): MPIEXEC, BIN (PROGRAM is looked up in BIN).
set -uo pipefail
np=$1 limit=$2 message=$3 program=$4
shift 4
out=$(mktemp)
trap 'rm -f "$out"' EXIT
start=$(date +%s)
timeout -s KILL "$limit" "$MPIEXEC" -np "$np" --oversubscribe --bind-to none "$BIN/$program" "$@" >"$out" 2>&1
rc=$?
elapsed=$(( $(date +%s) - start ))
cat "$out"
echo "exit code $rc after ${elapsed}s (limit ${limit}s)"
[ "$rc" -ne 0 ] || { echo "FAIL: the job exited 0"; exit 1; }
[ "$rc" -ne 137 ] || { echo "FAIL: the job hung and was killed"; exit 1; }
grep -q -- "$message" "$out" || { echo "FAIL: no message '$message'"; exit 1; }
grep -q "should have" "$out" && { echo "FAIL: a rank went on"; exit 1; }
if pgrep -f "$BIN/$program $*" >/dev/null; then
  echo "FAIL: $program processes left behind"; pkill -9 -f "$BIN/$program $*"; exit 1
fi
echo "PASS: $program $* on $np ranks ended the job with exit $rc in ${elapsed}s"

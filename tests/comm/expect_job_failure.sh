#!/usr/bin/env bash
# Runs comm_probe SCENARIO under mpirun with NP ranks and a collective timeout of TIMEOUT_S and
# checks that the job ends by itself: non-zero exit, the expected message, no rank left
# running, within the timeout plus a margin.
# Usage: expect_job_failure.sh NP SCENARIO TIMEOUT_S MESSAGE [DEVICE]
set -uo pipefail
np=$1 scenario=$2 timeout_s=$3 message=$4 device=${5:-cpu}
limit=$((timeout_s + 30))
out=$(mktemp)
trap 'rm -f "$out"' EXIT
start=$(date +%s)
timeout -s KILL "$limit" "$MPIEXEC" -np "$np" --oversubscribe "$BIN/comm_probe" "$scenario" "$timeout_s" "$device" >"$out" 2>&1
rc=$?
elapsed=$(( $(date +%s) - start ))
cat "$out"
echo "exit code $rc after ${elapsed}s (limit ${limit}s)"
[ "$rc" -ne 0 ] || { echo "FAIL: the job exited 0"; exit 1; }
[ "$rc" -ne 137 ] || { echo "FAIL: the job hung and was killed"; exit 1; }
grep -q -- "$message" "$out" || { echo "FAIL: no message '$message'"; exit 1; }
grep -q "should have" "$out" && { echo "FAIL: a rank went on"; exit 1; }
if pgrep -f "$BIN/comm_probe $scenario" >/dev/null; then
  echo "FAIL: comm_probe processes left behind"; pkill -9 -f "$BIN/comm_probe $scenario"; exit 1
fi
echo "PASS: $scenario on $np ranks ended the job with exit $rc in ${elapsed}s"

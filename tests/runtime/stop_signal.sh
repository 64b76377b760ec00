#!/usr/bin/env bash
# Starts NP ranks, sends SIGTERM to the last rank's process from outside, and checks that every
# rank stops at the same step and the job exits 0.
set -euo pipefail
np=$1
out=$(mktemp)
trap 'rm -f "$out"' EXIT
"$MPIEXEC" -np "$np" --oversubscribe "$BIN/runtime_probe" >"$out" 2>&1 &
job=$!
for _ in $(seq 100); do
  [ "$(grep -c ' pid ' "$out")" -eq "$np" ] && break
  sleep 0.1
done
victim=$(awk -v r=$((np - 1)) '$1 == "rank" && $2 == r && $3 == "pid" {print $4}' "$out")
[ -n "$victim" ] || { echo "no pid for rank $((np - 1))"; cat "$out"; exit 1; }
sleep 0.3
kill -TERM "$victim"
rc=0
wait "$job" || rc=$?
cat "$out"
[ "$rc" -eq 0 ] || { echo "FAIL: job exited $rc"; exit 1; }
stopped=$(grep -c 'stopped at step' "$out")
[ "$stopped" -eq "$np" ] || { echo "FAIL: $stopped of $np ranks stopped"; exit 1; }
steps=$(grep -o 'stopped at step [0-9]*' "$out" | sort -u | wc -l)
[ "$steps" -eq 1 ] || { echo "FAIL: ranks stopped at different steps"; exit 1; }
grep -q "rank $((np - 1)) stopped at step [0-9]* (signal 15 here)" "$out" || { echo "FAIL: the victim did not record SIGTERM"; exit 1; }
echo "PASS: $np ranks stopped together"

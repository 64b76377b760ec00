#!/usr/bin/env bash
# A withheld NCCL collective (tests/gpu/nccl_probe.cpp) ends the job by itself: non-zero exit,
# the timeout message naming the operation, within TIMEOUT + 5 s of the launch, no process left.
# Exit 77 (skipped) without a usable CUDA device. Environment (set by CTest): MPIEXEC, BIN.
set -uo pipefail
"$BIN/gpu_probe" || exit $?
timeout_ms=3000
limit=$(( timeout_ms / 1000 + 5 ))
out=$(mktemp)
trap 'rm -f "$out"' EXIT
timeout -s KILL 120 "$MPIEXEC" -np 1 --oversubscribe --bind-to none "$BIN/nccl_probe" withheld "$timeout_ms" >"$out" 2>&1
rc=$?
ended=$(date +%s.%N)
cat "$out"
fail() { echo "FAIL: $*"; exit 1; }
[ "$rc" -ne 0 ] || fail "the job exited 0"
[ "$rc" -ne 137 ] || fail "the job hung and was killed after 120 s"
launched=$(sed -n 's/^withheld: launching at \([0-9.]*\)$/\1/p' "$out")
[ -n "$launched" ] || fail "the probe never launched the withheld collective (exit $rc)"
grep -Eq "NCCL all_reduce\(sum\) of 1048576 .* did not (complete|finish) within $timeout_ms ms" "$out" ||
  fail "no timeout message naming the all_reduce"
grep -q "should have ended" "$out" && fail "the probe went on past the timeout"
elapsed=$(awk -v a="$launched" -v b="$ended" 'BEGIN { printf "%.1f", b - a }')
awk -v e="$elapsed" -v l="$limit" 'BEGIN { exit !(e <= l) }' ||
  fail "the job ended ${elapsed} s after the launch; the limit is ${limit} s (timeout + 5 s)"
if pgrep -f "$BIN/nccl_probe withheld" >/dev/null; then
  pkill -9 -f "$BIN/nccl_probe withheld"
  fail "nccl_probe processes left behind"
fi
echo "PASS: the withheld all_reduce ended the job with exit $rc ${elapsed} s after its launch (timeout ${timeout_ms} ms)"

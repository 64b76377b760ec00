#!/usr/bin/env bash
# Each file of a checkpoint is written by one rank: with ZeRO stage 0 the optimizer state once
# (rank 0: every replica holds the same), each rank's loader and shard files by that rank. Two
# ranks writing one file truncate each other, and on GPUs their bytes differ (each archive
# names its own device). Watched with strace: every file a rank creates under the run folder.
# Environment (set by CTest): MPIEXEC, BIN.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../support/tiny_run.sh"
command -v strace > /dev/null || fail "strace is missing (scripts/setup installs it)"

for zero in 0 1; do
  name=zero$zero
  # One save, at step 10; rank r's system calls go to trace.r.
  "$MPIEXEC" -np 2 --oversubscribe --bind-to none bash -c \
    'exec strace -f -qq -e trace=openat -o "$0.$OMPI_COMM_WORLD_RANK" "$@"' "$work/$name.trace" \
    "$BIN/train" --config "$work/run.json" --set run.name=$name --set train.steps=10 \
    --set ddp.zero_stage=$zero > /dev/null
  python3 - "$work/$name.trace" "$work/runs/$name/checkpoints" "$zero" <<'PY'
import collections, os, re, sys
trace, checkpoints, zero = sys.argv[1], sys.argv[2], sys.argv[3]
writers = collections.defaultdict(set)
for rank in (0, 1):
    for line in open(f"{trace}.{rank}"):
        m = re.search(r'openat\(AT_FDCWD, "([^"]+)", ([A-Z_|]+)', line)
        if m and m.group(1).startswith(checkpoints) and "O_CREAT" in m.group(2) and "= -1" not in line:
            writers[os.path.basename(m.group(1))].add(rank)
print(f"zero {zero}:", {f: sorted(r) for f, r in sorted(writers.items())})
shared = {f: sorted(r) for f, r in writers.items() if len(r) > 1}
assert not shared, f"files written by more than one rank: {shared}"
for f, ranks in writers.items():
    m = re.search(r"rank-(\d{5})", f)
    assert ranks == ({int(m.group(1))} if m else {0}), f"{f} written by rank(s) {sorted(ranks)}"
# ZeRO stage 0: the optimizer once; stage 1: each rank's shard of it.
expected = {"optimizer.pt"} if zero == "0" else {"optimizer-rank-00000.safetensors", "optimizer-rank-00001.safetensors"}
assert {f for f in writers if f.startswith("optimizer")} == expected, sorted(writers)
PY
done
echo "PASS: every checkpoint file has one writer"

# shellcheck shell=bash
# Sourced by tests/launch/*.sh: a tiny Fashion-MNIST run, waiting helpers, and the clean-up
# of every process a test starts (by pid, with its descendants).
# Environment (set by CTest): BIN (the build's bin/), MPIEXEC.
set -euo pipefail
launch_tests=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$launch_tests/../.." && pwd)
# shellcheck source=scripts/env.sh
source "$root/scripts/env.sh"
: "${BIN:?BIN is not set: run this test through ctest (ctest -L launch)}"
export MPITRAIN_PROGRAM=$BIN/train
export MPITRAIN_MPIRUN=${MPIEXEC:-mpirun}
export MPITRAIN_RESTART_DELAY_S=1
work=$(mktemp -d)
started=()  # pids this test started; they and their descendants are ended at exit

# A test sets `log` to the file of the step it checks; a failure shows it.
log=""
fail() {
  if [ -n "$log" ] && [ -f "$log" ]; then echo "--- $log"; grep -v '^checkpoint ' "$log" || true; fi
  echo "FAIL: $*"
  exit 1
}

# Every descendant of pid $1, deepest first, so parents do not restart what we end.
descendants() {
  local child
  for child in $(pgrep -P "$1" 2>/dev/null || true); do
    descendants "$child"
    echo "$child"
  done
}

# Ends pid $1 and its descendants: SIGTERM, then SIGKILL for what is left after 5 s.
end_tree() {
  local pids
  pids="$(descendants "$1") $1"
  # shellcheck disable=SC2086
  kill -TERM $pids 2>/dev/null || true
  for _ in $(seq 50); do
    # shellcheck disable=SC2086
    kill -0 $pids 2>/dev/null || return 0
    sleep 0.1
  done
  # shellcheck disable=SC2086
  kill -KILL $pids 2>/dev/null || true
}

# Registered with `trap cleanup EXIT` by each test; tests may add steps in extra_cleanup.
extra_cleanup() { :; }
cleanup() {
  local pid
  for pid in "${started[@]}"; do end_tree "$pid"; done
  extra_cleanup
  if [ -n "${KEEP_WORK:-}" ]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

# Shards of the Fashion-MNIST test set and $work/run.json: an MLP of 25 k parameters on CPU,
# fp32, 32 samples a step on 2 ranks. A checkpoint every 10 steps keeps each step cheap but
# the run slow enough (about 100 steps/s here) to be signalled mid-run.
make_tiny_run() {
  local images=/usr/share/datasets/fashion-mnist
  "$BIN/h5shard" idx --images "$images/t10k-images-idx3-ubyte.gz" --labels "$images/t10k-labels-idx1-ubyte.gz" \
    --out "$work/data" --name train --shards 2 >/dev/null
  cat >"$work/run.json" <<JSON
{
  "run": {"dir": "$work/runs", "seed": 3},
  "model": {"name": "mlp", "mlp": {"input_dim": 784, "hidden": 32, "layers": 1, "num_classes": 10}},
  "data": {"train": {"manifest": "$work/data/train.json"}},
  "batch": {"micro_batch": 16, "global": 32},
  "optimizer": {"name": "adamw", "lr": 0.003},
  "precision": {"mode": "fp32"},
  "device": {"kind": "cpu"},
  "train": {"steps": 1000},
  "checkpoint": {"every_steps": 10, "keep_last": 2},
  "log": {"every_steps": 10, "console": false}
}
JSON
}

# wait_for LIMIT_S DESCRIPTION COMMAND...: polls COMMAND until it succeeds, or fails the test.
wait_for() {
  local limit=$1 what=$2
  shift 2
  local deadline=$((SECONDS + limit))
  until "$@"; do
    [ "$SECONDS" -lt "$deadline" ] || fail "waited ${limit}s for $what"
    sleep 0.2
  done
}

# The last step in a metrics.jsonl (0 when there is none).
last_step() {
  python3 -c 'import json, sys
steps = [json.loads(l)["step"] for l in open(sys.argv[1]) if l.strip()]
print(steps[-1] if steps else 0)' "$1" 2>/dev/null || echo 0
}

# The newest checkpoint's step in a run directory (0 when there is none).
newest_checkpoint() {
  local newest=0 dir
  for dir in "$1"/checkpoints/step-*; do
    [ -d "$dir" ] && newest=$((10#${dir##*/step-}))  # the glob sorts them
  done
  echo "$newest"
}

# The ranks of a launch/mpirun.sh (pid $1): the children of its mpirun.
ranks_of() {
  local mpirun
  mpirun=$(pgrep -P "$1" -x "$(basename "$MPITRAIN_MPIRUN")" || true)
  if [ -n "$mpirun" ]; then pgrep -P "$mpirun" || true; fi
}

#!/usr/bin/env bash
# h5shard on the machine's real data sets (Fashion-MNIST, fortunes), checked value by value
# with numpy/h5py; h5shard on bad input (exit 2, one line naming the file and the problem,
# nothing written); and a job reading bad data through the Loader (non-zero exit, no hang).
# Usage: tools.sh FIXTURES EXPECT_JOB_FAILURE   (CTest sets MPIEXEC and BIN)
set -uo pipefail
fixtures=$1 expect_job_failure=$2
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/env.sh
source "$here/../../scripts/env.sh"
python=$MPITRAIN_VENV/bin/python
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*"; exit 1; }

# --- Real data -------------------------------------------------------------------------------
fm=/usr/share/datasets/fashion-mnist
[ -f "$fm/t10k-images-idx3-ubyte.gz" ] || fail "Fashion-MNIST is missing: run scripts/setup (dataset-fashion-mnist)"
"$BIN/h5shard" idx --images "$fm/t10k-images-idx3-ubyte.gz" --labels "$fm/t10k-labels-idx1-ubyte.gz" \
  --out "$work/fm" --shards 2 || fail "h5shard idx"
"$BIN/h5shard" verify "$work/fm/train.json" | tee "$work/verify.txt" || fail "verify"
grep -q "2 file(s), 10000 rows" "$work/verify.txt" || fail "verify counts"
"$BIN/h5shard" inspect "$work/fm/train.json" | tee "$work/inspect.txt" || fail "inspect"
grep -q "inputs     uint8 \[5000,28,28\]" "$work/inspect.txt" || fail "inspect shape"
grep -q "gzip(4)" "$work/inspect.txt" || fail "inspect filters"
# plan: 10000 samples in 8 blocks; 2 ranks over 16 partitions take 8 whole partitions each.
"$BIN/h5shard" plan "$work/fm/train.json" --ranks 2 --batch 64 | tee "$work/plan.txt" || fail "plan"
grep -q "10000 samples in 8 blocks" "$work/plan.txt" || fail "plan: dataset"
grep -q "global batch 64 = 16 partitions x 4 samples; 156 steps per epoch (16 samples unused, drop)" "$work/plan.txt" ||
  fail "plan: partitions"
grep -qE "^  0 +0-7 +32 " "$work/plan.txt" && grep -qE "^  1 +8-15 +32 " "$work/plan.txt" || fail "plan: ranks"
# With 2 pipeline stages the same 2 replicas read the same samples: stage 0 the images
# (784 B each), stage 1 the labels (1 B each).
"$BIN/h5shard" plan "$work/fm/train.json" --ranks 4 --stages 2 --batch 64 | tee "$work/plan-stages.txt" ||
  fail "plan --stages"
grep -q "4 rank(s) as 2 pipeline stages x 2 replicas" "$work/plan-stages.txt" || fail "plan --stages: layout"
grep -qE "^  0 +0 +0-7 +32 .* 3.7 MiB " "$work/plan-stages.txt" && grep -qE "^  3 +1 +8-15 +32 .* 9.8 KiB " \
  "$work/plan-stages.txt" || fail "plan --stages: what each stage reads"
"$python" - "$fm" "$work/fm" <<'PY' || fail "Fashion-MNIST values differ"
import gzip, sys, h5py, numpy as np
src, out = sys.argv[1:]
images = np.frombuffer(gzip.open(f"{src}/t10k-images-idx3-ubyte.gz").read()[16:], np.uint8).reshape(-1, 28, 28)
labels = np.frombuffer(gzip.open(f"{src}/t10k-labels-idx1-ubyte.gz").read()[8:], np.uint8)
shards = [h5py.File(f"{out}/train-0000{i}-of-00002.h5", "r") for i in range(2)]
assert (np.concatenate([s["inputs"][:] for s in shards]) == images).all()
assert (np.concatenate([s["targets"][:] for s in shards]) == labels).all()
print("Fashion-MNIST t10k: 10000 images and labels equal")
PY
"$BIN/h5shard" idx --images "$fm/t10k-images-idx3-ubyte.gz" --labels "$fm/t10k-labels-idx1-ubyte.gz" \
  --out "$work/fm" --name split --val 0.1 --seed 1 || fail "h5shard idx --val"
"$BIN/h5shard" verify "$work/fm/split.json" | grep "9000 rows" > /dev/null || fail "train split"
"$BIN/h5shard" verify "$work/fm/val.json" | grep "1000 rows" > /dev/null || fail "validation split"

fortunes=/usr/share/games/fortunes/fortunes
[ -f "$fortunes" ] || fail "fortunes are missing: run scripts/setup (fortunes)"
"$BIN/h5shard" text "$fortunes" --separator % --level char --out "$work/text" --gzip 1 || fail "h5shard text"
"$python" - "$fortunes" "$work/text" <<'PY' || fail "fortunes tokens differ"
import json, sys, h5py
src, out = sys.argv[1:]
text = "".join(line for line in open(src, encoding="utf-8").read().splitlines(keepends=True) if line != "%\n")
manifest = json.load(open(f"{out}/train.json"))
vocab = manifest["metadata"]["vocab"]
tokens = h5py.File(f"{out}/train-00000-of-00001.h5", "r")["tokens"][:]
assert "".join(vocab[t] for t in tokens) == text, "decoded text differs"
print(f"fortunes: {len(tokens)} character tokens decode to the source ({len(vocab)} symbols)")
PY

# --- Bad input to h5shard: exit 2, one line, nothing written ---------------------------------
out="$work/never"
check_error() {  # check_error MESSAGE COMMAND...
  local message=$1
  shift
  local err rc
  err=$("$@" 2>&1 >/dev/null)
  rc=$?
  [ "$rc" -eq 2 ] || fail "exit $rc, expected 2: $*: $err"
  grep -qF -- "$message" <<<"$err" || fail "no '$message' in: $err"
  [ "$(wc -l <<<"$err")" -eq 1 ] || fail "more than one line: $err"
  [ ! -e "$out" ] || fail "output written: $(ls -A "$out")"
  echo "ok (exit 2): $err"
}
labels="$fixtures/labels-idx1-ubyte.gz"
check_error "does-not-exist.gz" "$BIN/h5shard" idx --images "$fixtures/does-not-exist.gz" --labels "$labels" --out "$out"
check_error "not an IDX file" "$BIN/h5shard" idx --images "$fixtures/table.csv" --labels "$labels" --out "$out"
check_error "is truncated" "$BIN/h5shard" idx --images "$fixtures/images-truncated.gz" --labels "$labels" --out "$out"
check_error "first dimensions must agree" "$BIN/h5shard" idx --images "$fixtures/images-idx3-ubyte.gz" \
  --labels "$fixtures/labels-short-idx1-ubyte.gz" --out "$out"
check_error "has a header but no rows" "$BIN/h5shard" csv "$fixtures/empty.csv" --out "$out"
: >"$work/empty.txt"
check_error "no text" "$BIN/h5shard" text "$work/empty.txt" --out "$out"
check_error "not an HDF5 file" "$BIN/h5shard" verify "$fixtures/not_hdf5.h5"
check_error "truncated file" "$BIN/h5shard" verify "$fixtures/truncated.h5"
check_error "filter 'lzf'" "$BIN/h5shard" verify "$fixtures/lzf.h5"
check_error "unsupported dtype string" "$BIN/h5shard" verify "$fixtures/string_dtype.h5"
check_error "first dimensions must agree" "$BIN/h5shard" verify "$fixtures/rows_disagree.h5"
check_error "no file matches" "$BIN/h5shard" inspect "$fixtures/none-*.h5"
check_error "choose a divisor of it" "$BIN/h5shard" plan "$work/fm/train.json" --ranks 3 --batch 64
check_error "3 pipeline stages do not divide 4 ranks" "$BIN/h5shard" plan "$work/fm/train.json" --ranks 4 --stages 3 \
  --batch 64

# A failure after some shards are written (the second one cannot be moved into place) removes
# everything it wrote.
mkdir -p "$work/partial/train-00001-of-00002.h5/blocker"
err=$("$BIN/h5shard" csv "$fixtures/table.csv" --out "$work/partial" --shards 2 2>&1 >/dev/null)
rc=$?
[ "$rc" -ne 0 ] || fail "h5shard succeeded over a blocked output"
left=$(ls -A "$work/partial")
[ "$left" = "train-00001-of-00002.h5" ] || fail "left behind after a failed write: $left"
echo "ok (exit $rc): $err; nothing left behind"

# --- Bad data through the Loader in a job: non-zero exit on every rank, no hang ----------------
bash "$expect_job_failure" 2 60 "not an HDF5 file" data_probe --source "$fixtures/not_hdf5.h5" || fail "job on bad data"
bash "$expect_job_failure" 2 60 "fewer than one global batch" data_probe --source "$fixtures/ids.h5" --batch 60 ||
  fail "job with too big a batch"
echo "PASS: h5shard on real data and bad input; jobs on bad data"

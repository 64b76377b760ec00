#!/usr/bin/env bash
# h5shard tokens: llm.c shards, nanoGPT .bin files and numpy .npy arrays that the test writes
# become one token stream whose shards hold exactly the files' tokens, in order; bad files (bad
# magic, version or count, truncated, odd size, wrong dtype or shape, an id outside the
# vocabulary) are refused with exit 2 and a message naming the file and the problem, and
# nothing is written. Environment (set by CTest): BIN.
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/env.sh
source "$here/../../scripts/env.sh"
python=$MPITRAIN_VENV/bin/python
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*"; exit 1; }

"$python" - "$work" <<'PY' || fail "writing the token files"
import sys
import numpy as np
work = sys.argv[1]
rng = np.random.default_rng(3)
def llmc(path, tokens, magic=20240520, version=1, count=None):
    header = np.zeros(256, np.int32)
    header[:3] = [magic, version, len(tokens) if count is None else count]
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, np.uint16).tobytes())
a = rng.integers(0, 50257, 3000).astype(np.uint16)
b = rng.integers(0, 50257, 1234).astype(np.uint16)
c = rng.integers(0, 50257, 777).astype(np.int32)
d = rng.integers(0, 50257, 500).astype(np.uint16)
llmc(f"{work}/shard_000000.bin", a)
b.tofile(f"{work}/train.bin")  # nanoGPT's prepare.py: np.memmap of uint16, no header
np.save(f"{work}/tokens.npy", c)
np.save(f"{work}/tokens_u2.npy", d)
np.concatenate([a, b, c, d]).astype(np.int64).tofile(f"{work}/expected.i64")
# Bad files.
llmc(f"{work}/bad_magic.bin", a[:10], magic=20240521)
llmc(f"{work}/bad_version.bin", a[:10], version=7)
llmc(f"{work}/truncated.bin", a[:10], count=11)
a[:11].tofile(f"{work}/odd.bin")
with open(f"{work}/odd.bin", "ab") as f: f.write(b"\0")
np.save(f"{work}/float.npy", np.zeros(10, np.float32))
np.save(f"{work}/matrix.npy", np.zeros((2, 5), np.int32))
llmc(f"{work}/big_id.bin", [1, 2, 60000, 3])
np.save(f"{work}/negative.npy", np.array([1, -4, 2], np.int32))
PY

"$BIN/h5shard" tokens "$work/shard_000000.bin" "$work/train.bin" "$work/tokens.npy" "$work/tokens_u2.npy" \
  --vocab-size 50257 --tokenizer gpt2 --out "$work/out" --shards 2 > "$work/ok.log" 2>&1 || { cat "$work/ok.log"; fail "h5shard tokens"; }
cat "$work/ok.log"
grep -q "2 shard(s), 5511 rows" "$work/ok.log" || fail "row count"
"$python" - "$work" <<'PY' || fail "the shards do not hold the files' tokens"
import json, sys, h5py, numpy as np
work = sys.argv[1]
manifest = json.load(open(f"{work}/out/train.json"))
tokens = np.concatenate([h5py.File(f"{work}/out/{f['path']}")["tokens"][:] for f in manifest["files"]])
expected = np.fromfile(f"{work}/expected.i64", np.int64)
assert tokens.dtype == np.uint16, tokens.dtype
assert np.array_equal(tokens.astype(np.int64), expected), "tokens differ"
meta = manifest["metadata"]
assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257, meta
assert [f["format"] for f in meta["files"]] == ["llmc", "nanogpt", "npy", "npy"], meta["files"]
print("ok: 5511 tokens from 4 files, in order")
PY

# Each bad file: exit 2, the file and the problem named, no output folder.
check_bad() {
  local file=$1 message=$2 rc=0
  shift 2
  "$BIN/h5shard" tokens "$work/$file" --vocab-size 50257 --out "$work/bad-$file" "$@" > "$work/bad.log" 2>&1 || rc=$?
  [ "$rc" -eq 2 ] || { cat "$work/bad.log"; fail "$file: exit $rc, want 2"; }
  grep -qF "token file '$work/$file': $message" "$work/bad.log" || { cat "$work/bad.log"; fail "$file: no '$message'"; }
  [ ! -e "$work/bad-$file" ] || [ -z "$(ls -A "$work/bad-$file")" ] || fail "$file: something was written"
  echo "ok: $file refused: $(cat "$work/bad.log")"
}
check_bad bad_magic.bin "header magic is 20240521, not llm.c's 20240520" --format llmc
check_bad bad_version.bin "header version is 7; version 1 (uint16 tokens) is the one known"
check_bad truncated.bin "header says 11 tokens, but the file holds 20 bytes (10 uint16 tokens) after it"
check_bad odd.bin "has an odd size (23 bytes)"
check_bad float.npy "holds dtype f4; token ids must be integers"
check_bad matrix.npy "is an array of shape (2, 5); save the tokens as one 1-D array"
check_bad big_id.bin "token 2 is 60000, outside the vocabulary [0, 50257) (--vocab-size)"
check_bad negative.npy "token 1 is -4, a negative id"
check_bad missing.bin "cannot be opened"
echo PASS

#!/usr/bin/env bash
# Writes the data tests' files into OUT: h5py-written files and inputs for h5shard (through
# make_fixtures.py, with the project's Python environment), then shard sets made by h5shard
# from those inputs, for the round-trip tests.
# Usage: make_fixtures.sh OUT H5SHARD
set -euo pipefail
out=$1 h5shard=$2
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/env.sh
source "$here/../../scripts/env.sh"
rm -rf "$out"
mkdir -p "$out"
"$MPITRAIN_VENV/bin/python" "$here/make_fixtures.py" "$out"
# Small chunks (3 image rows) and 3 shards, so reads cross chunks and shards.
"$h5shard" idx --images "$out/images-idx3-ubyte.gz" --labels "$out/labels-idx1-ubyte.gz" \
  --out "$out/tool/idx" --shards 3 --chunk-size 36 --gzip 1
"$h5shard" csv "$out/table.csv" --label animal --out "$out/tool/csv" --shards 2
"$h5shard" text "$out/a.txt" "$out/b.txt" --level char --out "$out/tool/text" --chunk-size 64
echo "fixtures written to $out"

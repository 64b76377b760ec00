#!/usr/bin/env bash
# The one schema of benchmark results (bench/result_schema.py): every committed result fits it,
# and results that lack a field or have a null baseline without a reason are refused with a
# line naming what is wrong. Usage: bench_schema.sh SOURCE_DIR
set -euo pipefail
source=$1
cd "$source"
python3 bench/result_schema.py bench/results/*.json

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 - "$work" <<'PY'
import json, os, sys
work = sys.argv[1]
good = json.load(open("bench/results/loader.json"))
no_ratio = {k: v for k, v in good.items() if k != "ratio"}
json.dump({**no_ratio, "name": "no_ratio"}, open(os.path.join(work, "no_ratio.json"), "w"))
json.dump({**good, "name": "null_baseline", "baseline": None, "ratio": None},
          open(os.path.join(work, "null_baseline.json"), "w"))
PY
expect_refused() {
  local file=$1 message=$2 out
  if out=$(python3 bench/result_schema.py "$work/$file"); then
    echo "FAIL: $file was accepted"; exit 1
  fi
  grep -qF "$message" <<< "$out" || { echo "$out"; echo "FAIL: $file: no line saying '$message'"; exit 1; }
  echo "refused as expected: $file: $message"
}
expect_refused no_ratio.json "no field 'ratio'"
expect_refused null_baseline.json "baseline is null without a reason in no_baseline"
echo PASS

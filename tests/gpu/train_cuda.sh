#!/usr/bin/env bash
# `train` on one GPU, with real processes:
#  1. exact resume on CUDA: 40 steps in one go == 20 steps, then --resume auto to 40 (an MLP with
#     dropout, fp32, fused AdamW): the same logged losses and bit-identical final weights, so the
#     weights, the optimizer state, the CUDA random state and the data position all came back;
#  2. the metrics of a GPU run: gpu_mem_allocated_bytes, gpu_utilization_percent and
#     gpu_temperature_c, with values a GPU can have;
#  3. a byte-level GPT in bf16 on the project's own docs: the loss falls, and mfu and
#     tokens_per_s are logged (or the log says why mfu is not).
# Exit 77 (skipped) without a usable CUDA device. Environment (set by CTest): MPIEXEC, BIN.
set -euo pipefail
probe=0
"$BIN/gpu_probe" || probe=$?
[ "$probe" -eq 0 ] || exit "$probe"
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*"; exit 1; }
# cuBLAS picks reductions per workspace; a fixed configuration keeps them the same run to run.
export CUBLAS_WORKSPACE_CONFIG=:4096:8

# A learnable table without a data set on disk: 16 features from a Park-Miller generator (exact
# in awk's doubles), the label says which of the first four is largest.
awk 'BEGIN {
  s = 12345; printf "f0"; for (j = 1; j < 16; j++) printf ",f%d", j; print ",label"
  for (i = 0; i < 4096; i++) {
    best = 0
    for (j = 0; j < 16; j++) {
      s = (s * 16807) % 2147483647; v[j] = s / 2147483647 - 0.5
      printf "%s%.6f", (j ? "," : ""), v[j]
      if (j < 4 && v[j] > v[best]) best = j
    }
    print "," best
  }
}' > "$work/table.csv"
"$BIN/h5shard" csv "$work/table.csv" --out "$work/table" --shards 2 >/dev/null
cat > "$work/mlp.json" <<JSON
{
  "run": {"dir": "$work/runs", "seed": 5},
  "model": {"name": "mlp", "mlp": {"input_dim": 16, "hidden": 64, "layers": 2, "num_classes": 4, "dropout": 0.1}},
  "data": {"train": {"manifest": "$work/table/train.json"}},
  "batch": {"micro_batch": 32, "global": 64},
  "optimizer": {"name": "adamw", "lr": 0.003},
  "schedule": {"name": "constant", "warmup_steps": 5},
  "device": {"kind": "cuda"},
  "precision": {"mode": "fp32"},
  "train": {"steps": 40},
  "checkpoint": {"every_steps": 20, "keep_last": 2},
  "log": {"every_steps": 5, "console": false}
}
JSON
# train CONFIG LOG [ARGS...]: one rank; its output goes to LOG, and is shown when it fails.
train() {
  local config=$1 log=$2
  shift 2
  "$MPIEXEC" -np 1 --oversubscribe --bind-to none "$BIN/train" --config "$config" "$@" >"$log" 2>&1 ||
    { local rc=$?; cat "$log"; fail "train $* exited $rc"; }
}
losses() { grep -o '"loss":[^,}]*' "$1" | tr '\n' ' '; }
# field FILE KEY: KEY's value in the last record of FILE that has it.
field() { sed -n "s/.*\"$2\":\([-0-9.e+]*\).*/\1/p" "$1" | tail -1; }

echo "--- 1. exact resume on CUDA"
train "$work/mlp.json" "$work/straight.log" --set run.name=straight
train "$work/mlp.json" "$work/first-half.log" --set run.name=resumed --set train.steps=20
train "$work/mlp.json" "$work/resume.log" --set run.name=resumed --resume auto
cat "$work/resume.log"
grep -q "resumed from .*step-00000020 at step 20" "$work/resume.log" || fail "no resume from step 20"
straight=$(losses "$work/runs/straight/metrics.jsonl")
resumed=$(losses "$work/runs/resumed/metrics.jsonl")
[ -n "$straight" ] && [ "$straight" = "$resumed" ] || fail "losses differ: straight $straight; resumed $resumed"
cmp "$work/runs/straight/checkpoints/step-00000040/model.safetensors" \
  "$work/runs/resumed/checkpoints/step-00000040/model.safetensors" || fail "the final weights differ"
echo "ok: identical losses ($straight) and bit-identical weights at step 40"

echo "--- 2. GPU metrics"
metrics=$work/runs/straight/metrics.jsonl
tail -1 "$metrics"
allocated=$(field "$metrics" gpu_mem_allocated_bytes)
utilization=$(field "$metrics" gpu_utilization_percent)
temperature=$(field "$metrics" gpu_temperature_c)
[ -n "$allocated" ] && [ "$allocated" -gt 0 ] || fail "gpu_mem_allocated_bytes is '$allocated'"
[ -n "$utilization" ] && [ "$utilization" -le 100 ] || fail "gpu_utilization_percent is '$utilization'"
[ -n "$temperature" ] && [ "$temperature" -gt 0 ] && [ "$temperature" -lt 120 ] || fail "gpu_temperature_c is '$temperature'"
echo "ok: ${allocated} bytes allocated, ${utilization} % utilisation, ${temperature} C"

echo "--- 3. GPT in bf16"
"$BIN/h5shard" text "$here"/../../docs/*.md "$here"/../../README.md --level byte --out "$work/text" >/dev/null
cat > "$work/gpt.json" <<JSON
{
  "run": {"dir": "$work/runs", "name": "gpt", "seed": 1},
  "model": {"name": "gpt", "gpt": {"vocab_size": 256, "seq_len": 128, "n_layer": 2, "n_head": 4, "n_embd": 128}},
  "data": {"train": {"manifest": "$work/text/train.json"}},
  "batch": {"micro_batch": 16, "global": 16},
  "optimizer": {"name": "adamw", "lr": 0.003, "betas": [0.9, 0.95], "weight_decay": 0.1, "grad_clip": 1.0},
  "schedule": {"name": "constant", "warmup_steps": 10},
  "device": {"kind": "cuda"},
  "precision": {"mode": "bf16"},
  "train": {"steps": 100},
  "checkpoint": {"every_steps": 0},
  "log": {"every_steps": 20, "console": false}
}
JSON
train "$work/gpt.json" "$work/gpt.log"
cat "$work/gpt.log"
metrics=$work/runs/gpt/metrics.jsonl
first=$(grep -m1 -o '"loss":[^,}]*' "$metrics" | cut -d: -f2)
last=$(grep -o '"loss":[^,}]*' "$metrics" | tail -1 | cut -d: -f2)
awk -v a="$first" -v b="$last" 'BEGIN { exit !(b < a - 0.5) }' || fail "the loss did not fall: $first -> $last"
tokens=$(field "$metrics" tokens_per_s)
[ -n "$tokens" ] || fail "no tokens_per_s"
mfu=$(field "$metrics" mfu)
if [ -z "$mfu" ]; then
  grep -q "no mfu in the metrics: no bf16 peak is known for" "$work/gpt.log" || fail "no mfu and no line saying why"
  echo "note: $(grep -o 'no mfu in the metrics.*' "$work/gpt.log")"
else
  awk -v m="$mfu" 'BEGIN { exit !(m > 0 && m < 1) }' || fail "mfu is $mfu"
fi
echo "ok: loss $first -> $last, ${tokens} tokens/s, mfu ${mfu:-not known}"
echo "PASS"

#!/usr/bin/env bash
# End to end under mpirun -np 2: shards made by h5shard from Fashion-MNIST's test set, an MLP
# trained for 40 steps. Checks: --dry-run writes nothing; config errors exit 2 with their
# message and write nothing; the real run's loss falls and metrics.jsonl has every documented
# field; the resolved config is saved in the run directory; a small GPT logs tokens/s, model
# FLOPs per rank and MFU by the documented formula.
# Environment (set by CTest): MPIEXEC, BIN.
set -euo pipefail
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
images=/usr/share/datasets/fashion-mnist
"$BIN/h5shard" idx --images "$images/t10k-images-idx3-ubyte.gz" --labels "$images/t10k-labels-idx1-ubyte.gz" \
  --out "$work/data" --name train --val 0.2 --shards 2 >/dev/null
cat > "$work/run.json" <<JSON
{
  "run": {"name": "e2e", "dir": "$work/runs", "seed": 3},
  "model": {"name": "mlp", "mlp": {"input_dim": 784, "hidden": 64, "layers": 1, "num_classes": 10}},
  "data": {"train": {"manifest": "$work/data/train.json"}, "eval": {"manifest": "$work/data/val.json"}},
  "batch": {"micro_batch": 16, "global": 64},
  "optimizer": {"name": "adamw", "lr": 0.003, "grad_clip": 1.0},
  "schedule": {"name": "cosine", "warmup_steps": 5},
  "train": {"steps": 40},
  "log": {"every_steps": 10},
  "eval": {"every_steps": 20, "max_batches": 10}
}
JSON
train() { "$MPIEXEC" -np 2 --oversubscribe --bind-to none "$BIN/train" --config "$work/run.json" "$@"; }

echo "--- dry run"
train --dry-run > "$work/dry.txt"
grep -q "model mlp has 50890 parameters; 40 optimizer steps of 64 samples on 2 rank(s)" "$work/dry.txt"
[ ! -e "$work/runs" ] || { echo "FAIL: --dry-run wrote $work/runs"; exit 1; }

echo "--- config errors"
expect_bad_input() {
  local message=$1; shift
  set +e
  train "$@" > "$work/out.txt" 2>&1
  local rc=$?
  set -e
  cat "$work/out.txt"
  [ "$rc" -eq 2 ] || { echo "FAIL: exit $rc, want 2 (bad input)"; exit 1; }
  grep -q -- "$message" "$work/out.txt" || { echo "FAIL: no message '$message'"; exit 1; }
  [ ! -e "$work/runs" ] || { echo "FAIL: a failed start wrote $work/runs"; exit 1; }
}
expect_bad_input 'did you mean "optimizer.lr"' --set optimizer.lrr=0.1
expect_bad_input "batch.micro_batch" --set batch.micro_batch=zero
expect_bad_input "optimizer.lr" --set optimizer.lr=-1

echo "--- training"
train
run=$work/runs/e2e
[ -f "$run/config.json" ]
python3 - "$run/metrics.jsonl" <<'PY'
import json, sys
records = [json.loads(line) for line in open(sys.argv[1])]
train = [r for r in records if "loss" in r]
evals = [r for r in records if "eval_loss" in r]
fields = {"step", "epoch", "loss", "lr", "grad_norm", "loss_scale", "skipped_steps", "samples_per_s",
          "step_time_s", "time_data_s", "time_compute_s", "time_comm_s", "time_optimizer_s",
          "time_data_starved_s", "optimizer_state_bytes", "comm_bytes_per_step"}
for r in train:
    missing = fields - r.keys()
    assert not missing, f"step {r.get('step')}: missing {sorted(missing)}"
    # The loader's starved time is part of the data wait.
    assert 0 <= r["time_data_starved_s"] <= r["time_data_s"], r
assert [r["step"] for r in train] == [10, 20, 30, 40], [r["step"] for r in train]
assert [r["step"] for r in evals] == [20, 40], [r["step"] for r in evals]
for r in evals:
    assert {"eval_loss", "eval_accuracy", "eval_samples"} <= r.keys(), r
assert train[-1]["loss"] < 0.7 * train[0]["loss"], f"loss did not fall: {train[0]['loss']} -> {train[-1]['loss']}"
assert evals[-1]["eval_accuracy"] > 0.5, evals[-1]
print(f"PASS: loss {train[0]['loss']:.3f} -> {train[-1]['loss']:.3f}, eval accuracy {evals[-1]['eval_accuracy']:.3f}")
PY

echo "--- evaluation reads the same samples every time"
# A learning rate too small to move an fp32 weight: every pass must give the same figures, which
# it does only if each starts at the same eval batch (10 of the 25 batches of the eval set).
train --set run.name=frozen --set optimizer.lr=1e-30 --set train.steps=30 --set eval.every_steps=10 \
  --set log.console=false
python3 - "$work/runs/frozen/metrics.jsonl" <<'PY'
import json, sys
evals = [json.loads(line) for line in open(sys.argv[1]) if '"eval_loss"' in line]
assert [r["step"] for r in evals] == [10, 20, 30], evals
assert 0 < evals[0]["eval_samples"] < 2000, evals[0]
for r in evals[1:]:
    assert (r["eval_loss"], r["eval_accuracy"], r["eval_samples"]) == \
        (evals[0]["eval_loss"], evals[0]["eval_accuracy"], evals[0]["eval_samples"]), evals
print(f"PASS: 3 evaluations of {evals[0]['eval_samples']} samples, loss {evals[0]['eval_loss']:.6f} each")
PY

echo "--- language model: tokens/s, model FLOPs per rank and MFU"
F=/usr/share/games/fortunes
"$BIN/h5shard" text "$F/computers" --level char --separator % --out "$work/text" --name train > /dev/null
cat > "$work/gpt.json" <<JSON
{
  "run": {"name": "gpt", "dir": "$work/runs", "seed": 3},
  "model": {"name": "gpt", "gpt": {"vocab_size": 128, "seq_len": 32, "n_layer": 2, "n_head": 2, "n_embd": 32}},
  "data": {"train": {"manifest": "$work/text/train.json"}},
  "batch": {"micro_batch": 4, "global": 8},
  "train": {"steps": 4},
  "device": {"peak_tflops": 0.5},
  "log": {"every_steps": 2, "console": false}
}
JSON
"$MPIEXEC" -np 2 --oversubscribe --bind-to none "$BIN/train" --config "$work/gpt.json"
python3 - "$work/runs/gpt/metrics.jsonl" <<'PY'
import json, math, sys
records = [json.loads(line) for line in open(sys.argv[1]) if '"loss"' in line]
assert [r["step"] for r in records] == [2, 4], records
# 30592 parameters, 1024 of them the position embedding: 6 * 29568 + 12 * 2 layers * 32 * 32 tokens.
flops_per_token = 6 * 29568 + 12 * 2 * 32 * 32
for r in records:
    assert math.isclose(r["tokens_per_s"], r["samples_per_s"] * 32, rel_tol=1e-9), r
    assert math.isclose(r["model_tflops_per_rank"], flops_per_token * r["tokens_per_s"] / 2 / 1e12, rel_tol=1e-9), r
    assert math.isclose(r["mfu"], r["model_tflops_per_rank"] / 0.5, rel_tol=1e-9), r
print(f"PASS: {records[-1]['tokens_per_s']:.0f} tokens/s, {records[-1]['model_tflops_per_rank'] * 1e3:.3f} GFLOP/s per rank")
PY

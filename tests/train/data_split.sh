#!/usr/bin/env bash
# The samples of an optimizer step depend only on the data, the seed, data.partitions and
# batch.global, never on the world size or the micro-batch x accumulation split (docs/data.md):
#  1. 20 AdamW steps at batch.global 32 give the same weights (fp32, 1e-5 relative per tensor) on
#     4 ranks x micro-batch 8, 2 ranks x 8 x accumulation 2, 1 rank x 32 and 1 rank x 8 x 4;
#     and 3 reader threads per rank (data.workers) give exactly the weights of one;
#  2. a run of 2 ranks x micro-batch 32 resumed at step 10 as 1 rank x 32 x accumulation 2
#     continues exactly: its step-20 weights equal the uninterrupted 2-rank run's (1e-5) and its
#     logged losses of steps 11-20 too;
#  3. resuming with another batch.global or data.partitions is refused (exit 2), naming the key.
# Environment (set by CTest): MPIEXEC, BIN.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../support/tiny_run.sh"
common=(--set model.mlp.dropout=0 --set train.steps=20 --set checkpoint.every_steps=10 --set checkpoint.keep_last=5
        --set log.every_steps=1)

echo "--- 1. one global batch, four splits"
train 4 "${common[@]}" --set batch.global=32 --set batch.micro_batch=8 --set run.name=np4-m8
train 2 "${common[@]}" --set batch.global=32 --set batch.micro_batch=8 --set run.name=np2-m8-a2
train 1 "${common[@]}" --set batch.global=32 --set batch.micro_batch=32 --set run.name=np1-m32
train 1 "${common[@]}" --set batch.global=32 --set batch.micro_batch=8 --set run.name=np1-m8-a4
for run in np2-m8-a2 np1-m32 np1-m8-a4; do same_weights "$run" np4-m8 1e-5; done
# Reader threads change nothing: three per rank give the very same batches, hence weights.
train 2 "${common[@]}" --set batch.global=32 --set batch.micro_batch=8 --set data.workers=3 --set run.name=np2-m8-a2-w3
same_weights np2-m8-a2-w3 np2-m8-a2 0
# The split really was the one asked for.
python3 -c "import json,sys; b=json.load(open(sys.argv[1]))['config']['batch']; assert b['accumulation']==2, b" \
  "$work/runs/np2-m8-a2/checkpoints/step-00000020/trainer.json"

echo "--- 2. 2 ranks x 32 resumed as 1 rank x 32 x accumulation 2"
train 2 "${common[@]}" --set batch.global=64 --set batch.micro_batch=32 --set run.name=whole
train 2 "${common[@]}" --set batch.global=64 --set batch.micro_batch=32 --set train.steps=10 --set run.name=split
train 1 "${common[@]}" --set batch.global=64 --set batch.micro_batch=32 --set run.name=split --resume auto
same_weights split whole 1e-5
python3 - "$work/runs/whole/metrics.jsonl" "$work/runs/split/metrics.jsonl" <<'PY'
import json, sys
def losses(path):
    return {r["step"]: r["loss"] for r in map(json.loads, open(path)) if "loss" in r}
whole, split = losses(sys.argv[1]), losses(sys.argv[2])
for step in range(11, 21):
    assert abs(whole[step] - split[step]) <= 1e-5 * abs(whole[step]), (step, whole[step], split[step])
print("losses of steps 11-20 agree:", [round(split[s], 6) for s in range(11, 21)])
PY

echo "--- 3. refusals"
out=$work/refused.txt
for change in batch.global=32 data.partitions=8; do
  set +e
  train 1 "${common[@]}" --set batch.global=64 --set batch.micro_batch=32 --set train.steps=30 --set run.name=split \
    --resume auto --set "$change" >"$out" 2>&1
  code=$?
  set -e
  [ "$code" -eq 2 ] || { cat "$out"; fail "resume with $change exited $code, expected 2"; }
  grep -q "${change%%=*}" "$out" || { cat "$out"; fail "the refusal of $change does not name the key"; }
done
echo "PASS"

#!/usr/bin/env bash
# Top-k gradient compression with error feedback (ddp.compression topk) through the trainer:
#  1. the Fashion-MNIST example (examples/configs/fashion_mnist_cnn.json: the CNN, 2 epochs of the
#     60000 training images, evaluated on the 10000 test images) on 2 ranks reaches an accuracy
#     within 1 point of the uncompressed run, sending at most 25 % of its bytes per step
#     (ddp.topk_ratio 0.1, and an index travels with each value);
#  2. the error-feedback residuals are checkpointed: 10 steps, then 10 more after a resume, give
#     the uninterrupted run's weights bit for bit;
#  3. top-k with ZeRO or a bf16 wire is refused (exit 2).
# Environment (set by CTest): MPIEXEC, BIN.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../support/tiny_run.sh"
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

echo "--- 1. the Fashion-MNIST example, uncompressed and top-k"
"$BIN/h5shard" idx --images "$images/train-images-idx3-ubyte.gz" --labels "$images/train-labels-idx1-ubyte.gz" \
  --out "$work/fashion" --name train --shards 4 >/dev/null
"$BIN/h5shard" idx --images "$images/t10k-images-idx3-ubyte.gz" --labels "$images/t10k-labels-idx1-ubyte.gz" \
  --out "$work/fashion" --name test >/dev/null
example=(--config "$root/examples/configs/fashion_mnist_cnn.json" --set run.dir="$work/runs"
         --set data.train.manifest="$work/fashion/train.json" --set data.eval.manifest="$work/fashion/test.json"
         --set log.console=false --set checkpoint.every_steps=0)
for compression in none topk; do
  "$MPIEXEC" -np 2 --oversubscribe --bind-to none -x OMP_NUM_THREADS=1 "$BIN/train" "${example[@]}" \
    --set run.name="$compression" --set ddp.compression=$compression > "$work/$compression.log" 2>&1 ||
    { cat "$work/$compression.log"; fail "the $compression run failed"; }
done
python3 - "$work/runs" <<'PY'
import json, sys
def run(name):
    records = [json.loads(line) for line in open(f"{sys.argv[1]}/{name}/metrics.jsonl")]
    accuracy = [r for r in records if "eval_accuracy" in r][-1]["eval_accuracy"]
    sent = [r["comm_bytes_per_step"] for r in records if "comm_bytes_per_step" in r]
    return accuracy, sum(sent) / len(sent)
(plain, plain_bytes), (topk, topk_bytes) = run("none"), run("topk")
print(f"test accuracy {plain:.4f} uncompressed, {topk:.4f} with top-k; bytes sent per step {plain_bytes:.0f} and "
      f"{topk_bytes:.0f} ({topk_bytes / plain_bytes:.1%})")
assert plain > 0.8, f"the uncompressed run did not learn: {plain}"
assert topk >= plain - 0.01, f"FAIL: top-k accuracy {topk:.4f} is more than 1 point below {plain:.4f}"
assert topk_bytes <= 0.25 * plain_bytes, f"FAIL: top-k sent {topk_bytes} bytes per step of {plain_bytes}"
PY

echo "--- 2. resume with the residuals"
topk=(--set ddp.compression=topk --set model.mlp.dropout=0 --set train.steps=20 --set checkpoint.every_steps=10)
train 2 "${topk[@]}" --set run.name=straight > /dev/null 2>&1
train 2 "${topk[@]}" --set run.name=resumed --set train.steps=10 > /dev/null 2>&1
[ -f "$work/runs/resumed/checkpoints/step-00000010/ddp-rank-00001.safetensors" ] || fail "no residuals in the checkpoint"
train 2 "${topk[@]}" --set run.name=resumed --resume auto > "$work/resumed.log" 2>&1
grep -q "resumed from .*step-00000010 at step 10" "$work/resumed.log" || { cat "$work/resumed.log"; fail "no resume"; }
cmp "$work/runs/resumed/checkpoints/step-00000020/model.safetensors" \
  "$work/runs/straight/checkpoints/step-00000020/model.safetensors" || fail "the resumed weights differ"
echo "PASS: resumed weights identical to the uninterrupted run's"

echo "--- 3. refusals"
for setting in ddp.zero_stage=1 ddp.wire_dtype=bf16; do
  set +e
  train 2 --set run.name=bad --set ddp.compression=topk --set "$setting" > "$work/bad.log" 2>&1
  rc=$?
  set -e
  [ "$rc" -eq 2 ] && grep -q "ddp.compression topk" "$work/bad.log" || { cat "$work/bad.log"; fail "topk with $setting: exit $rc"; }
done
echo "PASS"

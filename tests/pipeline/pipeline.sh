#!/usr/bin/env bash
# Pipeline parallelism (parallel.pipeline_stages) through the trainer, under mpirun with NP ranks:
#  1. exact: P stages x D replicas train the weights of one process on the same global batch
#     (fp32, 1e-5 relative per tensor after 10 AdamW steps with clipping) for the MLP, the CNN and
#     the GPT (tied embedding and head on the first and last stage), with 1f1b and gpipe;
#     NP 2: (P, D) = (2, 1); NP 4: (2, 2) and (4, 1); also bf16 and fp16 autocast, ZeRO-1 and
#     data.rank_weights; evaluation through the stages gives one process's loss and accuracy;
#  2. checkpoints: model.safetensors holds the whole model under its ordinary names; a resume at
#     the same layout continues bit for bit (NP 2), another D resumes exactly (NP 4: (2, 2) -> (2, 1),
#     also with ZeRO-1's optimizer shards re-cut);
#     another P is refused with what to do;
#  3. the metrics report per-stage compute, receive waits, the bubble against (P - 1) / (m + P - 1)
#     and the peak activation memory, which 1f1b keeps below gpipe's; each stage reads only the
#     data it uses (the first the inputs, the last the targets, the stages between nothing);
#  4. bad input exits 2 before step 1 on every rank: P not dividing the world, more stages than
#     pieces, ZeRO-1 with tied weights across stages, batch.micro_batch auto.
# Usage: pipeline.sh NP. Environment (set by CTest): MPIEXEC, BIN.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../support/tiny_run.sh"
np=$1
"$PYTHON" -c "import numpy as np; np.save('$work/tokens.npy', np.random.default_rng(1).integers(0, 97, 20000).astype(np.uint16))"
"$BIN/h5shard" tokens "$work/tokens.npy" --vocab-size 97 --out "$work/tokens" > /dev/null || fail "h5shard tokens"

common=(--set train.steps=10 --set checkpoint.every_steps=5 --set checkpoint.keep_last=0 --set log.every_steps=5
        --set optimizer.grad_clip=0.5 --set batch.micro_batch=4 --set batch.global=32)
declare -A model_args
model_args[mlp]="--set model.mlp.dropout=0 --set model.mlp.layers=3"
model_args[cnn]="--set model.name=cnn --set model.cnn.in_channels=1 --set model.cnn.image_size=28 --set model.cnn.channels=4,8,8,8"
# The GPT with SGD: its tied wte's gradient is summed in another order across stages (rounding,
# 6e-9 after one step), and the key part of attention's c_attn bias has a gradient that is zero
# but for rounding (softmax ignores a shift shared by all keys), which AdamW would scale up to
# full-size steps; with SGD the rounding stays rounding (4e-7 after 10 steps).
model_args[gpt]="--set model.name=gpt --set model.gpt.vocab_size=97 --set model.gpt.seq_len=16 --set model.gpt.n_layer=4
 --set model.gpt.n_head=2 --set model.gpt.n_embd=16 --set data.train.manifest=$work/tokens/train.json
 --set optimizer.name=sgd --set optimizer.lr=0.1 --set optimizer.momentum=0.9"
# run NP NAME MODEL [ARGS...]: a run of MODEL; its output in $work/NAME.log.
run() {
  local n=$1 name=$2 model=$3
  shift 3
  # shellcheck disable=SC2086
  train "$n" "${common[@]}" ${model_args[$model]} --set run.name="$name" "$@" > "$work/$name.log" 2>&1 ||
    { cat "$work/$name.log"; fail "$name: the run failed"; }
}
# refused NP MESSAGE ARGS...: the run must exit 2 with MESSAGE, before step 1.
refused() {
  local n=$1 message=$2 status=0
  shift 2
  train "$n" "${common[@]}" "$@" > "$work/refused.log" 2>&1 || status=$?
  [ "$status" = 2 ] || { cat "$work/refused.log"; fail "exit $status, not 2, for $*"; }
  grep -F -- "$message" "$work/refused.log" > /dev/null || { cat "$work/refused.log"; fail "no message '$message' for $*"; }
  ! grep '"step"' "$work/runs/refused/metrics.jsonl" > /dev/null 2>&1 || fail "a refused run trained: $*"
}

echo "--- 1. P x D = one process"
for model in mlp cnn gpt; do
  run 1 "$model-ref" "$model"
  layouts=(2)
  [ "$np" = 4 ] && layouts=(2 4)
  for stages in "${layouts[@]}"; do
    for schedule in 1f1b gpipe; do
      name=$model-p$stages-d$((np / stages))-$schedule
      run "$np" "$name" "$model" --set parallel.pipeline_stages="$stages" --set parallel.schedule="$schedule"
      same_weights "$name" "$model-ref" 1e-5 10
    done
  done
done
grep "pipeline stage" "$work/gpt-p2-d$((np / 2))-1f1b.log"
# Autocast and fp16's loss scaler (its found-inf flag agreed by every stage) change nothing.
for precision in bf16 fp16; do
  run 1 "mlp-$precision-ref" mlp --set precision.mode=$precision
  run "$np" "mlp-$precision" mlp --set precision.mode=$precision --set parallel.pipeline_stages=2
  same_weights "mlp-$precision" "mlp-$precision-ref" 1e-5 10
done
# Evaluation runs forward through the stages (the first reads the inputs, the last the targets):
# the same loss and accuracy as one process.
evaluated=(--set data.eval.manifest="$work/data/train.json" --set eval.every_steps=5 --set eval.max_batches=16)
run 1 mlp-eval-ref mlp "${evaluated[@]}"
run "$np" mlp-eval mlp "${evaluated[@]}" --set parallel.pipeline_stages="$np"
"$PYTHON" - "$work/runs" <<'PY'
import json, sys
def evals(run):
    return [(r["step"], r["eval_loss"], r["eval_accuracy"], r["eval_samples"])
            for r in map(json.loads, open(f"{sys.argv[1]}/{run}/metrics.jsonl")) if "eval_loss" in r]
one, staged = evals("mlp-eval-ref"), evals("mlp-eval")
assert [e[0] for e in one] == [e[0] for e in staged] == [5, 10], (one, staged)
for a, b in zip(one, staged):
    assert a[2:] == b[2:] and abs(a[1] - b[1]) <= 1e-6 * abs(a[1]), (a, b)
print(f"PASS: evaluation through the stages equals one process's: {staged}")
PY
if [ "$np" = 4 ]; then
  run 4 mlp-zero mlp --set parallel.pipeline_stages=2 --set ddp.zero_stage=1
  same_weights mlp-zero mlp-ref 1e-5 10
  run 4 mlp-weighted mlp --set parallel.pipeline_stages=2 --set data.rank_weights=1,3
  same_weights mlp-weighted mlp-ref 1e-5 10
fi

echo "--- 2. checkpoints"
"$PYTHON" - "$work/runs/gpt-ref/checkpoints/step-00000010/model.safetensors" \
  "$work/runs/gpt-p2-d$((np / 2))-1f1b/checkpoints/step-00000010/model.safetensors" <<'PY'
import sys
from safetensors.numpy import load_file
one, staged = load_file(sys.argv[1]), load_file(sys.argv[2])
assert sorted(one) == sorted(staged), (sorted(one), sorted(staged))
assert {v.shape for v in one.values()} == {v.shape for v in staged.values()}
print(f"PASS: the pipeline's model.safetensors holds the whole model: {len(staged)} tensors, the same names")
PY
if [ "$np" = 2 ]; then
  run 2 half gpt --set parallel.pipeline_stages=2 --set train.steps=5
  run 2 half gpt --set parallel.pipeline_stages=2 --resume auto
  grep "resumed from .*step-00000005" "$work/half.log" > /dev/null || { cat "$work/half.log"; fail "no resume"; }
  cmp "$work/runs/half/checkpoints/step-00000010/model.safetensors" \
    "$work/runs/gpt-p2-d1-1f1b/checkpoints/step-00000010/model.safetensors" ||
    fail "the weights after a resume differ from the uninterrupted run's"
  [ "$(losses "$work/runs/half/metrics.jsonl" | tr -d '[]' | tr ',' '\n' | tail -1)" = \
    "$(losses "$work/runs/gpt-p2-d1-1f1b/metrics.jsonl" | tr -d '[]' | tr ',' '\n' | tail -1)" ] ||
    fail "the loss of step 10 after a resume differs from the uninterrupted run's"
  echo "PASS: a resume at the same layout gives the uninterrupted run's weights bit for bit"
  status=0
  train 2 "${common[@]}" ${model_args[gpt]} --set run.name=half --resume "$work/runs/half/checkpoints/step-00000005" \
    > "$work/other-p.log" 2>&1 || status=$?
  [ "$status" = 2 ] && grep -F "pipeline stage(s)" "$work/other-p.log" > /dev/null &&
    grep -F "model.init_from=" "$work/other-p.log" > /dev/null || { cat "$work/other-p.log"; fail "another P was not refused"; }
  echo "PASS: another P is refused, naming model.init_from"
else
  run 4 wide gpt --set parallel.pipeline_stages=2 --set train.steps=5
  run 2 wide gpt --set parallel.pipeline_stages=2 --resume auto
  same_weights wide gpt-ref 1e-5 10
  # ZeRO-1: each stage's optimizer shards, re-cut from 2 replicas to 1.
  run 4 wide-zero mlp --set parallel.pipeline_stages=2 --set ddp.zero_stage=1 --set train.steps=5
  run 2 wide-zero mlp --set parallel.pipeline_stages=2 --set ddp.zero_stage=1 --resume auto
  same_weights wide-zero mlp-ref 1e-5 10
  echo "PASS: (2, 2) resumed as (2, 1) trains on to the one-process weights, ZeRO-1's shards re-cut"
fi

echo "--- 3. figures"
"$PYTHON" - "$work/runs" "$np" <<'PY'
import json, sys
runs, np_ = sys.argv[1], int(sys.argv[2])
def last(run):
    return [json.loads(l) for l in open(f"{runs}/{run}/metrics.jsonl") if '"loss"' in l][-1]
for stages in ((2,) if np_ == 2 else (2, 4)):
    one_f, gpipe = last(f"mlp-p{stages}-d{np_ // stages}-1f1b"), last(f"mlp-p{stages}-d{np_ // stages}-gpipe")
    for record in (one_f, gpipe):
        assert len(record["pipeline_bubble"]) == stages and len(record["pipeline_compute_s"]) == stages
        assert all(0 <= b < 1 for b in record["pipeline_bubble"]), record["pipeline_bubble"]
        m = 32 // 4 // (np_ // stages)
        assert abs(record["pipeline_bubble_theory"] - (stages - 1) / (m + stages - 1)) < 1e-12
    print(f"P {stages}: bubble 1f1b {one_f['pipeline_bubble']}, gpipe {gpipe['pipeline_bubble']}, theory "
          f"{one_f['pipeline_bubble_theory']:.3f}; peak activation bytes 1f1b {one_f['pipeline_peak_activation_bytes']}, "
          f"gpipe {gpipe['pipeline_peak_activation_bytes']}")
    # Each stage reads only what it uses (rank = stage x D + replica): the first stage the
    # inputs, the last the targets, the stages between nothing. At D = 1 the two reads together
    # are exactly the one-process run's, which read the same samples.
    replicas = np_ // stages
    for model in ("mlp", "gpt"):
        read = last(f"{model}-p{stages}-d{replicas}-1f1b")["data_bytes_read"]
        first, between, final = read[:replicas], read[replicas:-replicas], read[-replicas:]
        assert all(b > 0 for b in first + final) and all(b == 0 for b in between), (model, read)
        if replicas == 1:
            whole = last(f"{model}-ref")["data_bytes_read"][0]
            if model == "mlp":
                assert first[0] + final[0] == whole, (read, whole)
            else:  # inputs and targets are two windows of one token stream: both stages read it
                assert first[0] == final[0] == whole, (read, whole)
        print(f"P {stages}: {model} bytes read per rank {read}")
PY
# The step trace shows each rank's schedule: stage 0 of 2 warms up with one forward more.
run "$np" traced mlp --set parallel.pipeline_stages=2 --set train.steps=3 --set log.trace_steps=1 \
  --set log.trace_start_step=2
"$PYTHON" - "$work/runs/traced/trace.json" "$np" <<'PY'
import json, sys
events = json.load(open(sys.argv[1]))["traceEvents"]
replicas = int(sys.argv[2]) // 2
m = 32 // 4 // replicas
def order(rank):
    return " ".join(("F" if e["name"] == "forward" else "B") + str(e["args"]["micro_step"]) for e in events
                    if e.get("pid") == rank and e["name"] in ("forward", "backward") and e["args"]["step"] == 2)
def one_f_one_b(warm_up):
    names = [f"F{i}" for i in range(warm_up)]
    for i in range(warm_up, m):
        names += [f"F{i}", f"B{i - warm_up}"]
    return " ".join(names + [f"B{i}" for i in range(m - warm_up, m)])
assert order(0) == one_f_one_b(1), order(0)
assert order(replicas) == one_f_one_b(0), order(replicas)
assert any(e["name"] == "recv wait" and e.get("pid") == replicas for e in events), "no receive waits traced"
# Each stage's replicas reduce its gradients on their own communicator: traced on every rank.
if replicas > 1:
    reduced = sorted({e.get("pid") for e in events if e["name"].startswith("all-reduce bucket")})
    assert reduced == list(range(2 * replicas)), f"bucket all-reduces traced on ranks {reduced}"
print(f"PASS: the trace shows 1f1b on both stages: {order(0)}")
PY
# Activation memory, counted under a CPU memory budget: 1f1b holds at most P micro-batches per
# stage, gpipe all m = 8.
for schedule in 1f1b gpipe; do
  MPITRAIN_CPU_MEMORY_BUDGET=4000000000 run "$np" "memory-$schedule" mlp --set parallel.pipeline_stages=2 \
    --set parallel.schedule=$schedule --set model.mlp.hidden=512 --set batch.global=$((64 * np / 2)) --set train.steps=2 \
    --set log.every_steps=1
done
"$PYTHON" - "$work/runs" <<'PY'
import json, sys
def peak(run):
    return [json.loads(l) for l in open(f"{sys.argv[1]}/{run}/metrics.jsonl") if '"loss"' in l][-1]["pipeline_peak_activation_bytes"]
one_f, gpipe = peak("memory-1f1b"), peak("memory-gpipe")
print(f"peak activation bytes per stage: 1f1b {one_f}, gpipe {gpipe}")
assert one_f[0] < gpipe[0], "stage 0 should hold fewer activations with 1f1b"
PY

echo "--- 4. refusals"
refused "$np" "must divide the number of ranks" --set run.name=refused --set parallel.pipeline_stages=3
refused "$np" "more stages than the model has pieces" --set run.name=refused --set parallel.pipeline_stages=2 \
  --set model.mlp.layers=0
refused "$np" "whose summed gradient ZeRO's shards cannot hold" --set run.name=refused ${model_args[gpt]} \
  --set parallel.pipeline_stages=2 --set ddp.zero_stage=1
refused "$np" "batch.micro_batch auto" --set run.name=refused --set parallel.pipeline_stages=2 --set batch.micro_batch=auto
refused "$np" "parallel.stage_pieces adds up to 3 pieces" --set run.name=refused --set parallel.pipeline_stages=2 \
  --set model.mlp.layers=3 --set parallel.stage_pieces=1,2
echo "PASS"

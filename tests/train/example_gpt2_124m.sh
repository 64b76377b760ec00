#!/usr/bin/env bash
# examples/gpt2_124m: the CPU-sized recipe trains on 2 ranks from llm.c-format shards that the
# test writes (converted by h5shard tokens), and keeps llm.c's hyper-parameters: cpu.json
# differs from config.json only in sizes, data, precision and cadences. The loss starts at
# ln(vocab) (an untrained model's uniform guess) and falls on a learnable token stream.
# Environment (set by CTest): MPIEXEC, BIN.
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
example=$here/../../examples/gpt2_124m
# shellcheck source=scripts/env.sh
source "$here/../../scripts/env.sh"
python=$MPITRAIN_VENV/bin/python
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*"; exit 1; }

"$python" - "$example" <<'PY' || fail "cpu.json no longer follows config.json's recipe"
import json, sys
full, cpu = (json.load(open(f"{sys.argv[1]}/{n}")) for n in ("config.json", "cpu.json"))
assert full["optimizer"] == cpu["optimizer"], (full["optimizer"], cpu["optimizer"])
for key in ("vocab_size", "activation", "bias", "dropout"):
    assert full["model"]["gpt"][key] == cpu["model"]["gpt"][key], key
assert full["schedule"]["name"] == cpu["schedule"]["name"] and full["schedule"]["min_lr_ratio"] == cpu["schedule"]["min_lr_ratio"]
assert full["ddp"] == cpu["ddp"]
print("ok: cpu.json keeps config.json's optimizer, schedule, model kind and ZeRO stage")
PY

# llm.c shards (256 x int32 header, uint16 tokens) of a repeating GPT-2-id pattern a model can learn.
mkdir -p "$work/dev" "$work/data"
"$python" - "$work/dev" <<'PY' || fail "writing llm.c shards"
import sys
import numpy as np
rng = np.random.default_rng(0)
pattern = rng.integers(0, 50257, 50)
for name, n in (("fineweb_train_000001", 20000), ("fineweb_train_000002", 20000), ("fineweb_val_000000", 4000)):
    tokens = np.resize(pattern, n).astype(np.uint16)
    header = np.zeros(256, np.int32)
    header[:3] = [20240520, 1, n]
    with open(f"{sys.argv[1]}/{name}.bin", "wb") as f:
        f.write(header.tobytes() + tokens.tobytes())
PY
for f in "$work"/dev/*.bin; do
  name=$(basename "$f" .bin)
  "$BIN/h5shard" tokens "$f" --vocab-size 50257 --tokenizer gpt2 --out "$work/data/tiny" --name "${name#fineweb_}" > /dev/null ||
    fail "h5shard tokens $f"
done

cd "$work" || fail "cd $work"
"$MPIEXEC" -np 2 --oversubscribe --bind-to none "$BIN/train" --config "$example/cpu.json" --set log.console=false \
  > train.log 2>&1 || { cat train.log; fail "training cpu.json on 2 ranks"; }
"$python" - "$work/runs/gpt2_124m_cpu/metrics.jsonl" <<'PY' || { cat train.log; fail "losses"; }
import json, math, sys
losses = [json.loads(l)["loss"] for l in open(sys.argv[1]) if '"loss"' in l]
print("losses:", [round(x, 3) for x in losses])
assert len(losses) == 6, losses
assert abs(losses[0] - math.log(50304)) < 0.3, f"first loss {losses[0]}, an untrained model gives ln(50304) = {math.log(50304):.3f}"
assert losses[-1] < losses[0] - 0.3, "the loss did not fall"  # measured: 10.83 -> 10.31
PY
[ -f runs/gpt2_124m_cpu/checkpoints/step-00000006/model.safetensors ] || fail "no final checkpoint"
"$BIN/generate" runs/gpt2_124m_cpu/checkpoints/step-00000006 --prompt-ids 1,2 --tokens 5 --seed 1 > sample.txt ||
  fail "generate from the checkpoint"
[ "$(wc -w < sample.txt)" -eq 7 ] || fail "generate printed $(cat sample.txt), want 7 token ids"
echo PASS

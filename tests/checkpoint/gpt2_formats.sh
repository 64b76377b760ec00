#!/usr/bin/env bash
# GPT-2 weights in and out, against the real transformers library (float32, CPU):
#  1. A GPT2LMHeadModel with random weights, saved by save_pretrained, loaded by mpitrain
#     (generate's reader): its logits equal transformers' within 1e-5; mpitrain's greedy
#     generation equals transformers' model.generate, with and without the KV cache.
#  2. Training starts from it (model.init_from = its model.safetensors); the checkpoint, exported
#     by convert_weights --to huggingface and loaded by from_pretrained, gives mpitrain's logits.
#  3. nanoGPT: an exact-GELU model exported to a nanoGPT ckpt.pt holds nanoGPT's names and
#     model_args and, mapped into GPT2LMHeadModel as nanoGPT's from_pretrained maps, gives the
#     same logits; mpitrain reads the ckpt.pt back to the same logits. A gelu_tanh model is refused.
#  4. A model whose sizes do not fit is refused before training with the sizes that differ.
# Usage: gpt2_formats.sh GPT2_PROBE   (CTest sets MPIEXEC and BIN)
set -uo pipefail
probe=$1
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/env.sh
source "$here/../../scripts/env.sh"
python=$MPITRAIN_VENV/bin/python
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*"; exit 1; }

# compare A B LIMIT WHAT: the "logits" of two safetensors files agree within LIMIT.
compare() {
  "$python" - "$@" <<'PY'
import sys
from safetensors.torch import load_file
a, b, limit, what = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
x, y = load_file(a)["logits"], load_file(b)["logits"]
assert x.shape == y.shape, (x.shape, y.shape)
diff = (x - y).abs().max().item()
print(f"{what}: max |logit difference| {diff:.3g} (limit {limit:g})")
assert diff <= limit, f"{what}: {diff} > {limit}"
PY
}

# --- 1. Hugging Face in ------------------------------------------------------------------------
"$python" - "$work" <<'PY' || fail "making the Hugging Face models"
import sys, torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel
work = sys.argv[1]
torch.manual_seed(0)
tokens = torch.randint(0, 97, (2, 32))
save_file({"tokens": tokens}, f"{work}/tokens.safetensors")
for name, activation in (("hf", "gelu_new"), ("hf_exact", "gelu")):
    config = GPT2Config(vocab_size=97, n_positions=32, n_embd=48, n_layer=3, n_head=4,
                        activation_function=activation, bos_token_id=None, eos_token_id=None)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # every tensor random, so that a wrong mapping cannot hide
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(f"{work}/{name}")
    with torch.no_grad():
        save_file({"logits": model(tokens).logits.contiguous()}, f"{work}/{name}.logits")
        if name == "hf":
            out = model.generate(tokens[:1, :4], max_new_tokens=20, do_sample=False,
                                 pad_token_id=0, attention_mask=torch.ones(1, 4, dtype=torch.long))
            open(f"{work}/hf.greedy", "w").write(" ".join(map(str, out[0].tolist())))
PY
"$probe" "$work/hf" "$work/tokens.safetensors" "$work/mp_hf.logits" || fail "mpitrain reads the Hugging Face model"
compare "$work/hf.logits" "$work/mp_hf.logits" 1e-5 "Hugging Face model read by mpitrain" || fail "logits differ"

prompt=$("$python" -c "import sys; print(','.join(open(sys.argv[1]).read().split()[:4]))" "$work/hf.greedy")
for cache in "" --no-cache; do
  "$BIN/generate" "$work/hf" --prompt-ids "$prompt" --tokens 20 --temperature 0 $cache > "$work/greedy$cache.txt" ||
    fail "generate $cache"
  cmp -s <(tr -d '\n' < "$work/greedy$cache.txt") "$work/hf.greedy" ||
    fail "greedy generation ${cache:-with KV cache}: $(cat "$work/greedy$cache.txt") != transformers' $(cat "$work/hf.greedy")"
  echo "ok: greedy generation ${cache:-with KV cache} equals transformers' generate"
done

# --- 2. Training from it, and the checkpoint out to transformers ----------------------------------
"$python" -c "import numpy as np; np.save('$work/tokens.npy', np.random.default_rng(1).integers(0, 97, 4000).astype(np.uint16))"
"$BIN/h5shard" tokens "$work/tokens.npy" --vocab-size 97 --out "$work/data" > /dev/null || fail "h5shard tokens"
cat > "$work/run.json" <<JSON
{
  "run": {"dir": "$work/runs", "name": "from_hf", "seed": 2},
  "model": {"name": "gpt", "init_from": "$work/hf/model.safetensors",
            "gpt": {"vocab_size": 97, "seq_len": 32, "n_layer": 3, "n_head": 4, "n_embd": 48, "activation": "gelu_tanh"}},
  "data": {"train": {"manifest": "$work/data/train.json"}},
  "batch": {"micro_batch": 4, "global": 4},
  "optimizer": {"name": "adamw", "lr": 0.001},
  "precision": {"mode": "fp32"},
  "train": {"steps": 3},
  "log": {"every_steps": 1, "console": false}
}
JSON
train() { "$MPIEXEC" -np 1 --oversubscribe --bind-to none "$BIN/train" --config "$work/run.json" "$@"; }
train > "$work/train.log" 2>&1 || { cat "$work/train.log"; fail "training from the Hugging Face weights"; }
step=$work/runs/from_hf/checkpoints/step-00000003
"$probe" "$step" "$work/tokens.safetensors" "$work/mp_trained.logits" || fail "probe of the checkpoint"
"$BIN/convert_weights" "$step" --to huggingface --out "$work/exported" || fail "convert_weights --to huggingface"
"$python" - "$work" <<'PY' || fail "transformers reading the export"
import sys, torch
from safetensors.torch import load_file, save_file
from transformers import GPT2LMHeadModel
work = sys.argv[1]
model = GPT2LMHeadModel.from_pretrained(f"{work}/exported").eval()
# Training moved the weights: the export is not the file training started from.
start = load_file(f"{work}/hf/model.safetensors")["transformer.wte.weight"]
assert not torch.equal(model.transformer.wte.weight, start), "the checkpoint holds the starting weights"
with torch.no_grad():
    logits = model(load_file(f"{work}/tokens.safetensors")["tokens"]).logits
save_file({"logits": logits.contiguous()}, f"{work}/hf_exported.logits")
PY
compare "$work/mp_trained.logits" "$work/hf_exported.logits" 1e-5 "mpitrain checkpoint read by transformers" ||
  fail "logits differ"

# --- 3. nanoGPT out and in -------------------------------------------------------------------------
rc=0
"$BIN/convert_weights" "$step" --to nanogpt --out "$work/tanh.pt" > "$work/tanh.log" 2>&1 || rc=$?
[ "$rc" -eq 2 ] && grep -q "nanoGPT's GPT computes exact GELU" "$work/tanh.log" ||
  { cat "$work/tanh.log"; fail "a gelu_tanh model exported to nanoGPT: exit $rc"; }
"$BIN/convert_weights" "$work/hf_exact" --to nanogpt --out "$work/ckpt.pt" || fail "convert_weights --to nanogpt"
"$python" - "$work" <<'PY' || fail "the nanoGPT checkpoint"
import sys, torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel
work = sys.argv[1]
ckpt = torch.load(f"{work}/ckpt.pt", weights_only=True)
args = ckpt["model_args"]
assert args == {"n_layer": 3, "n_head": 4, "n_embd": 48, "block_size": 32, "bias": True, "vocab_size": 97,
                "dropout": 0.1}, args
state = ckpt["model"]
# nanoGPT's GPT: transformer.{wte,wpe,h.N.{ln_1,attn.c_attn,attn.c_proj,ln_2,mlp.c_fc,mlp.c_proj},ln_f} + lm_head.
names = {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias",
         "lm_head.weight"}
for i in range(3):
    for m in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
        names |= {f"transformer.h.{i}.{m}.weight", f"transformer.h.{i}.{m}.bias"}
assert set(state) == names, set(state) ^ names
assert state["transformer.h.0.attn.c_attn.weight"].shape == (144, 48)  # nn.Linear: [out, in]
# nanoGPT's from_pretrained: the Conv1D weights are the transposes of its Linear weights.
model = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=32, n_embd=48, n_layer=3, n_head=4,
                                   activation_function="gelu")).eval()
conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
model.load_state_dict({k: v.t() if k.endswith(conv1d) else v for k, v in state.items()})
with torch.no_grad():
    logits = model(load_file(f"{work}/tokens.safetensors")["tokens"]).logits
save_file({"logits": logits.contiguous()}, f"{work}/nanogpt.logits")
PY
compare "$work/hf_exact.logits" "$work/nanogpt.logits" 1e-5 "nanoGPT export in GPT2LMHeadModel" || fail "logits differ"
"$probe" "$work/ckpt.pt" "$work/tokens.safetensors" "$work/mp_nanogpt.logits" || fail "mpitrain reads the nanoGPT ckpt.pt"
compare "$work/hf_exact.logits" "$work/mp_nanogpt.logits" 1e-5 "nanoGPT ckpt.pt read by mpitrain" || fail "logits differ"
# The same ckpt.pt as nanoGPT saves it on a GPU: each tensor's saved location is cuda:0. This
# host has none; the tensors must come back on the CPU all the same.
"$python" - "$work" <<'PY' || fail "re-saving the ckpt.pt as from a GPU"
import sys, zipfile, torch, torch.serialization as serialization
work = sys.argv[1]
ckpt = torch.load(f"{work}/ckpt.pt", weights_only=True)
serialization.location_tag = lambda storage: "cuda:0"
torch.save(ckpt, f"{work}/ckpt_gpu.pt")
archive = zipfile.ZipFile(f"{work}/ckpt_gpu.pt")
assert b"cuda:0" in archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
PY
"$probe" "$work/ckpt_gpu.pt" "$work/tokens.safetensors" "$work/mp_nanogpt_gpu.logits" ||
  fail "mpitrain reads a nanoGPT ckpt.pt saved on a GPU"
compare "$work/hf_exact.logits" "$work/mp_nanogpt_gpu.logits" 1e-5 "GPU-saved ckpt.pt read by mpitrain" ||
  fail "logits differ"

# --- 4. Sizes that do not fit ----------------------------------------------------------------------
rc=0
train --set run.name=misfit --set model.gpt.n_layer=2 --set model.gpt.n_embd=64 > "$work/misfit.log" 2>&1 || rc=$?
cat "$work/misfit.log"
[ "$rc" -eq 2 ] || fail "a Hugging Face model that does not fit: exit $rc, want 2"
for line in "n_embd: 48 in the file, 64 in the model (model.gpt.n_embd)" \
            "n_layer: 3 in the file, 2 in the model (model.gpt.n_layer)" "unexpected: h.2.attn.c_attn.weight"; do
  grep -qF "$line" "$work/misfit.log" || fail "no '$line' in the message"
done
[ ! -e "$work/runs/misfit/checkpoints" ] || fail "a refused run wrote checkpoints"
echo PASS

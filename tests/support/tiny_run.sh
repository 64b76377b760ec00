# Sourced by the checkpoint and reliability tests: a work folder, Fashion-MNIST shards, a tiny MLP config and
# helpers to run it. Environment (set by CTest): MPIEXEC, BIN.
# shellcheck source=scripts/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/../../scripts/env.sh"
PYTHON=$MPITRAIN_VENV/bin/python
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
images=/usr/share/datasets/fashion-mnist
"$BIN/h5shard" idx --images "$images/t10k-images-idx3-ubyte.gz" --labels "$images/t10k-labels-idx1-ubyte.gz" \
  --out "$work/data" --name train --shards 2 >/dev/null
cat > "$work/run.json" <<JSON
{
  "run": {"dir": "$work/runs", "seed": 5},
  "model": {"name": "mlp", "mlp": {"input_dim": 784, "hidden": 32, "layers": 1, "num_classes": 10, "dropout": 0.1}},
  "data": {"train": {"manifest": "$work/data/train.json"}},
  "batch": {"micro_batch": 16, "global": 64},
  "optimizer": {"name": "adamw", "lr": 0.003},
  "schedule": {"name": "constant", "warmup_steps": 5},
  "precision": {"mode": "fp32"},
  "train": {"steps": 40},
  "checkpoint": {"every_steps": 10, "keep_last": 2},
  "log": {"every_steps": 5, "console": false}
}
JSON
# train NP [ARGS...]: the tiny run on NP ranks.
train() { local np=$1; shift; "$MPIEXEC" -np "$np" --oversubscribe --bind-to none "$BIN/train" --config "$work/run.json" "$@"; }
# losses FILE: the logged losses of a metrics.jsonl.
losses() { python3 -c "import json,sys; print([json.loads(l)['loss'] for l in open(sys.argv[1]) if 'loss' in l])" "$1"; }
fail() { echo "FAIL: $*"; exit 1; }
# same_weights RUN REFERENCE TOLERANCE [STEP]: the checkpointed weights of two runs at STEP (default
# 20) agree: ||a - b|| / ||b|| per tensor. (The largest single element's difference over the
# tensor's largest is printed too: at np 4 it reaches about 1e-6 in the first layer, where the
# input's always-black border pixels give gradients of rounding noise that AdamW normalises.)
same_weights() {
  local step
  step=$(printf "%08d" "${4:-20}")
  "$PYTHON" - "$work/runs/$1/checkpoints/step-$step/model.safetensors" \
    "$work/runs/$2/checkpoints/step-$step/model.safetensors" "$1" "$2" "$3" <<'PY'
import sys
import numpy as np
from safetensors.numpy import load_file
a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
assert a.keys() == b.keys()
norm = max(float(np.linalg.norm((a[k] - b[k]).astype(np.float64)) / np.linalg.norm(b[k].astype(np.float64))) for k in a)
element = max(float(abs(a[k] - b[k]).max() / abs(b[k]).max()) for k in a)
print(f"{sys.argv[3]} vs {sys.argv[4]}: relative difference {norm:.2e} (largest element {element:.2e})")
assert norm <= float(sys.argv[5]), "FAIL: the weights differ"
PY
}

#!/usr/bin/env bash
# model.init_from: training starts from weights Python wrote, in each format users have:
#  1. torch.save(state_dict) (.pt), 2. torch.save({"model": state_dict, ...}) as training
#  scripts save, 3. safetensors. With a learning rate too small to move a float32 weight, the
#  weights after one step are exactly the file's. 4. A file that does not fit the model is
#  refused before training with every missing, unexpected and mis-shaped tensor named, and the
#  run directory gets no checkpoint.
# Environment (set by CTest): MPIEXEC, BIN.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../support/tiny_run.sh"

# Names and shapes as mpitrain's mlp has them, from one step of a real run.
train 2 --set run.name=shapes --set train.steps=1 > /dev/null
"$PYTHON" - "$work/runs/shapes/checkpoints/step-00000001/model.safetensors" "$work" <<'PY'
import sys
import torch
from safetensors.torch import load_file, save_file
shapes = {k: v.shape for k, v in load_file(sys.argv[1]).items()}
work = sys.argv[2]
g = torch.Generator().manual_seed(11)
state = {k: torch.randn(s, generator=g) for k, s in sorted(shapes.items())}
torch.save(state, f"{work}/plain.pt")
torch.save({"model": state, "step": 7}, f"{work}/nested.pt")
save_file(state, f"{work}/weights.safetensors")
bad = dict(state)
del bad["net.0.bias"]
bad["net.3.weight"] = torch.zeros(10, 31)
bad["head.weight"] = torch.zeros(3)
torch.save(bad, f"{work}/bad.pt")
PY

for file in plain.pt nested.pt weights.safetensors; do
  name=init-${file%%.*}
  train 2 --set run.name="$name" --set train.steps=1 --set optimizer.lr=1e-30 --set schedule.warmup_steps=0 \
    --set model.init_from="$work/$file" > "$work/$name.log" 2>&1 ||
    { cat "$work/$name.log"; fail "init_from $file"; }
  "$PYTHON" - "$work/weights.safetensors" "$work/runs/$name/checkpoints/step-00000001/model.safetensors" <<'PY'
import sys
from safetensors.torch import load_file
want, got = load_file(sys.argv[1]), load_file(sys.argv[2])
assert want.keys() == got.keys(), (want.keys(), got.keys())
for k in want:
    assert (want[k] == got[k]).all(), f"{k} differs from the file"
PY
  echo "ok: init_from $file"
done

rc=0
train 2 --set run.name=init-bad --set model.init_from="$work/bad.pt" > "$work/bad.log" 2>&1 || rc=$?
cat "$work/bad.log"
[ "$rc" -eq 2 ] || fail "a weights file that does not fit: exit $rc, want 2"
for line in "missing: net.0.bias \[32\]" "mis-shaped: net.3.weight is \[10, 31\] in the file, \[10, 32\] in the model" \
            "unexpected: head.weight \[3\]"; do
  grep -q "$line" "$work/bad.log" || fail "no '$line' in the message"
done
[ ! -e "$work/runs/init-bad/checkpoints" ] || fail "a refused run wrote checkpoints"

rc=0
train 1 --set run.name=init-missing --set model.init_from="$work/nothing.pt" > "$work/missing.log" 2>&1 || rc=$?
grep -q "weights file '$work/nothing.pt': cannot be opened" "$work/missing.log" && [ "$rc" -eq 2 ] ||
  { cat "$work/missing.log"; fail "a missing weights file: exit $rc"; }
echo "PASS"

#!/usr/bin/env bash
# The installable package, end to end (docs/building.md, "Using mpitrain from another CMake
# project"):
#  1. cmake --install the build into a fresh prefix;
#  2. configure examples/custom_model, a project of its own, with only that prefix and torch's
#     in CMAKE_PREFIX_PATH (find_package(mpitrain) must find every dependency), and build it;
#  3. make Fashion-MNIST shards with the installed h5shard;
#  4. train the example's own registered model (resmlp) with mpitrain's Trainer under
#     mpirun -np 2: exit 0, the expected parameter count, and a falling loss.
# The work folder is stable (not mktemp) so that ccache recognises the example's compilations.
# Usage: install.sh CMAKE SOURCE_DIR BUILD_DIR WORK_DIR. Environment (set by CTest): MPIEXEC.
set -euo pipefail
cmake=$1 source=$2 build=$3 work=$4
# shellcheck source=scripts/env.sh
source "$source/scripts/env.sh"
torch_prefix=$("$MPITRAIN_VENV/bin/python" -c 'import torch; print(torch.utils.cmake_prefix_path)')
# The compiler cache of scripts/build.
export CCACHE_DIR=${CCACHE_DIR:-$MPITRAIN_CACHE/ccache}
export CCACHE_SLOPPINESS=${CCACHE_SLOPPINESS:-pch_defines,time_macros,include_file_mtime,include_file_ctime}
rm -rf "$work"
mkdir -p "$work"
prefix=$work/prefix

SECONDS=0
echo "--- 1. install"
"$cmake" --install "$build" --prefix "$prefix" > "$work/install.log"
for f in lib/libmpitrain.a lib/cmake/mpitrain/mpitrainConfig.cmake lib/cmake/mpitrain/mpitrainConfigVersion.cmake \
         lib/cmake/mpitrain/mpitrainTargets.cmake include/mpitrain/train/trainer.h include/mpitrain/apps/cli.h \
         bin/train bin/h5shard; do
  [ -e "$prefix/$f" ] || { echo "FAIL: the install lacks $f"; cat "$work/install.log"; exit 1; }
done

echo "[${SECONDS} s] --- 2. configure and build examples/custom_model against $prefix"
launcher=()
if command -v ccache > /dev/null; then
  launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_C_COMPILER_LAUNCHER=ccache)
fi
"$cmake" -S "$source/examples/custom_model" -B "$work/build" -G Ninja \
  -DCMAKE_PREFIX_PATH="$prefix;$torch_prefix" "${launcher[@]}" > "$work/configure.log" 2>&1 || {
  cat "$work/configure.log"; echo "FAIL: configuring the example against the install"; exit 1; }
grep -q "mpitrain_DIR:PATH=$prefix/lib/cmake/mpitrain" "$work/build/CMakeCache.txt" || {
  grep mpitrain_DIR "$work/build/CMakeCache.txt"; echo "FAIL: the example did not find the installed package"; exit 1; }
"$cmake" --build "$work/build" > "$work/build.log" 2>&1 || {
  cat "$work/build.log"; echo "FAIL: building the example"; exit 1; }
# The example compiles against the installed headers, never the source tree's.
if grep -q -- "-I$source/include" "$work/build/build.ninja"; then
  echo "FAIL: the example's build uses $source/include"; exit 1
fi

echo "[${SECONDS} s] --- 3. shards with the installed h5shard"
images=/usr/share/datasets/fashion-mnist
"$prefix/bin/h5shard" idx --images "$images/t10k-images-idx3-ubyte.gz" --labels "$images/t10k-labels-idx1-ubyte.gz" \
  --out "$work/data" --name train --val 0.1 --seed 1 --shards 2 > /dev/null

echo "[${SECONDS} s] --- 4. mpirun -np 2 custom_model"
cd "$work"
set +e
"$MPIEXEC" -np 2 --oversubscribe --bind-to none -x OMP_NUM_THREADS=1 \
  "$work/build/custom_model" --config "$source/examples/custom_model/config.json" \
  --set run.dir="$work/runs" --set data.train.manifest="$work/data/train.json" \
  --set data.eval.manifest="$work/data/val.json" --set train.steps=60 --set log.console=false \
  > "$work/train.log" 2>&1
rc=$?
set -e
cat "$work/train.log"
[ "$rc" -eq 0 ] || { echo "FAIL: custom_model exited with $rc"; exit 1; }
# resmlp 784 -> 64, 2 blocks, 10 classes: stem 50240 + 2 x (LayerNorm 128 + Linear 4160) + 128 + 650.
grep -q "custom_model: training resmlp (59594 parameters) for 60 steps on 2 rank(s)" "$work/train.log" || {
  echo "FAIL: the registered model was not trained as configured"; exit 1; }
grep -q "custom_model: done, 60 steps" "$work/train.log" || { echo "FAIL: no 'done' line"; exit 1; }
[ -f "$work/runs/resmlp/checkpoints/step-00000060/manifest.json" ] || {
  echo "FAIL: no final checkpoint"; ls -R "$work/runs"; exit 1; }
python3 - "$work/runs/resmlp/metrics.jsonl" <<'PY'
import json, sys
records = [json.loads(line) for line in open(sys.argv[1])]
losses = [r["loss"] for r in records if "loss" in r]
evals = [r for r in records if "eval_accuracy" in r]
print("losses", [round(l, 3) for l in losses], "eval", evals[-1] if evals else None)
assert len(losses) == 6, f"want 6 logged losses (60 steps, every 10), got {len(losses)}"
assert losses[-1] < 0.6 * losses[0], f"the loss did not fall: {losses[0]} -> {losses[-1]}"
assert evals and evals[-1]["eval_accuracy"] > 0.6, f"eval accuracy too low: {evals}"
PY

echo "[${SECONDS} s] --- 5. the user model's pieces as 2 pipeline stages"
"$MPIEXEC" -np 2 --oversubscribe --bind-to none -x OMP_NUM_THREADS=1 \
  "$work/build/custom_model" --config "$source/examples/custom_model/config.json" \
  --set run.dir="$work/runs" --set run.name=staged --set data.train.manifest="$work/data/train.json" \
  --set data.eval.manifest="$work/data/val.json" --set train.steps=20 --set log.console=false --set parallel.pipeline_stages=2 > "$work/staged.log" 2>&1 ||
  { cat "$work/staged.log"; echo "FAIL: custom_model with 2 pipeline stages"; exit 1; }
grep "pipeline stage" "$work/staged.log"
grep "pipeline stage 1 of 2 (1f1b, ranks 1..1): block 1: 1 piece(s)" "$work/staged.log" > /dev/null ||
  { echo "FAIL: the second stage should run block 1"; exit 1; }
grep "custom_model: done, 20 steps" "$work/staged.log" > /dev/null || { echo "FAIL: no 'done' line"; exit 1; }
echo "PASS in ${SECONDS} s"

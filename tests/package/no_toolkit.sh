#!/usr/bin/env bash
# A machine without a CUDA toolkit (docs/building.md, "Without a CUDA toolkit"): in a private
# mount namespace the system's toolkit folders are hidden under empty tmpfs mounts and every
# nvcc on PATH under an empty non-executable file. There, with the default options:
#  1. configure succeeds and says it builds CPU-only because no toolkit was found;
#  2. one small program linking LibTorch as mpitrain's programs do (package_torch_probe) builds
#     and computes the exact expected matrix product;
#  3. its run path names the torch wheel's library folders, and every library it needs
#     (libtorch_cuda's CUDA run time included) resolves from the wheel, none from a toolkit;
#  4. the main build's train, when it is a CUDA build (linked to libcudart itself), resolves
#     every library, libcudart from the wheel, and starts: a GPU node needs no toolkit.
# Needs root (or CAP_SYS_ADMIN) for unshare -m; without it the test is skipped (exit 77).
# Usage: no_toolkit.sh CMAKE SOURCE_DIR WORK_DIR
set -euo pipefail
cmake=$1 source=$2 work=$3

if [ "${MPITRAIN_IN_NAMESPACE:-}" != 1 ]; then
  if ! unshare -m true 2> /dev/null; then
    echo "SKIP: unshare -m is not permitted here (needs root or CAP_SYS_ADMIN)"
    exit 77
  fi
  exec env MPITRAIN_IN_NAMESPACE=1 unshare -m --propagation private bash "$0" "$@"
fi

# shellcheck source=scripts/env.sh
source "$source/scripts/env.sh"
export CCACHE_DIR=${CCACHE_DIR:-$MPITRAIN_CACHE/ccache}
export CCACHE_SLOPPINESS=${CCACHE_SLOPPINESS:-pch_defines,time_macros,include_file_mtime,include_file_ctime}
export CCACHE_BASEDIR=$source
torch_prefix=$("$MPITRAIN_VENV/bin/python" -c 'import torch; print(torch.utils.cmake_prefix_path)')
# torch's CMake prefix is <site-packages>/torch/share/cmake.
site=$(cd "$torch_prefix/../../.." && pwd)
[ -d "$site/torch/lib" ] || { echo "FAIL: no torch/lib under $site"; exit 1; }

SECONDS=0
echo "--- 0. hide the CUDA toolkit"
hidden=()
for d in /usr/local/cuda /usr/local/cuda-* /opt/cuda /opt/nvidia; do
  [ -d "$d" ] || continue
  real=$(readlink -f "$d")
  case " ${hidden[*]} " in *" $real "*) continue ;; esac
  mount -t tmpfs -o size=1m tmpfs "$real"
  hidden+=("$real")
done
empty=$(mktemp)
IFS=: read -ra path_dirs <<< "$PATH"
for d in "${path_dirs[@]}"; do
  if [ -x "$d/nvcc" ]; then
    mount --bind "$empty" "$d/nvcc"
    hidden+=("$d/nvcc")
  fi
done
hash -r
echo "hidden: ${hidden[*]:-(nothing: this machine has no toolkit)}"
# No other copy of the toolkit may be reachable: no nvcc in the usual prefixes or the torch
# environment, and no libcudart outside the torch wheel in the loader's cache.
for d in "${path_dirs[@]}"; do
  [ ! -x "$d/nvcc" ] || { echo "FAIL: an executable nvcc is still on PATH: $d/nvcc"; exit 1; }
done
copies=$(find /usr/local /opt /usr/bin "$MPITRAIN_VENV" -name nvcc -type f -perm -u+x 2> /dev/null || true)
[ -z "$copies" ] || { echo "FAIL: a CUDA compiler is still reachable: $copies"; exit 1; }
for lib in $(ldconfig -p | awk '/libcudart\.so/ {print $NF}'); do
  [ ! -e "$lib" ] || { echo "FAIL: the loader still finds $lib"; exit 1; }
done

echo "[${SECONDS} s] --- 1. configure with the default options"
rm -rf "$work"
mkdir -p "$work"
launcher=()
if command -v ccache > /dev/null; then
  launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_C_COMPILER_LAUNCHER=ccache)
fi
"$cmake" -S "$source" -B "$work/build" -G Ninja -DCMAKE_PREFIX_PATH="$torch_prefix" \
  -DMPITRAIN_BUILD_BENCH=OFF "${launcher[@]}" > "$work/configure.log" 2>&1 || {
  cat "$work/configure.log"; echo "FAIL: configure without a CUDA toolkit"; exit 1; }
grep -E '^  (CUDA|NCCL|build):' "$work/configure.log"
grep -q "CUDA: NOT FOUND (CPU-only build: no CUDA toolkit" "$work/configure.log" || {
  cat "$work/configure.log"; echo "FAIL: configure does not say why the build is CPU-only"; exit 1; }

echo "[${SECONDS} s] --- 2. build and run package_torch_probe"
"$cmake" --build "$work/build" --target package_torch_probe > "$work/build.log" 2>&1 || {
  tail -50 "$work/build.log"; echo "FAIL: building package_torch_probe without a CUDA toolkit"; exit 1; }
probe=$work/build/bin/package_torch_probe
"$probe" || { echo "FAIL: package_torch_probe did not compute the expected product"; exit 1; }

echo "[${SECONDS} s] --- 3. run path and resolved libraries"
runpath=$(readelf -d "$probe" | sed -n 's/.*R\(UN\)\{0,1\}PATH.*\[\(.*\)\]/\2/p')
echo "run path: $runpath"
for want in "$site/torch/lib" "$site/nvidia/cu13/lib" "$site/nvidia/nccl/lib"; do
  [ -d "$want" ] || continue
  case ":$runpath:" in
    *":$want:"*) ;;
    *) echo "FAIL: the run path lacks $want"; exit 1 ;;
  esac
done
ldd "$probe" > "$work/ldd.log"
if grep -q "not found" "$work/ldd.log"; then
  cat "$work/ldd.log"; echo "FAIL: unresolved libraries"; exit 1
fi
cudart=$(readlink -f "$(awk '/libcudart\.so/ {print $3; exit}' "$work/ldd.log")")
case "$cudart" in
  "$site"/nvidia/*) echo "libcudart: $cudart" ;;
  *) cat "$work/ldd.log"; echo "FAIL: libcudart comes from '$cudart', not the torch wheel"; exit 1 ;;
esac

echo "[${SECONDS} s] --- 4. the main build's train, where it is a CUDA build, starts without the toolkit"
train=${BIN:?BIN is set by CTest}/train
[ -x "$train" ] || { echo "FAIL: $train is not built"; exit 1; }
if readelf -d "$train" | grep 'NEEDED.*libcudart' > /dev/null; then
  ldd "$train" > "$work/ldd-train.log"
  if grep -q "not found" "$work/ldd-train.log"; then
    cat "$work/ldd-train.log"; echo "FAIL: train (CUDA build) has unresolved libraries without the toolkit"; exit 1
  fi
  cudart=$(readlink -f "$(awk '/libcudart\.so/ {print $3; exit}' "$work/ldd-train.log")")
  case "$cudart" in
    "$site"/nvidia/*) echo "train's libcudart: $cudart" ;;
    *) echo "FAIL: train's libcudart comes from '$cudart', not the torch wheel"; exit 1 ;;
  esac
  "$train" --help > /dev/null || { echo "FAIL: train --help without the toolkit"; exit 1; }
else
  echo "train is a CPU-only build: its libcudart comes through LibTorch, as step 3 showed"
fi
echo "PASS in ${SECONDS} s"

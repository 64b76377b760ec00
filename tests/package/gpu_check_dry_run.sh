#!/usr/bin/env bash
# scripts/gpu-check --dry-run on this machine (no GPU needed): the bundle for a bare GPU machine
# is complete (its own check: no missing library, its mpirun runs an MPI program with this
# machine's Open MPI hidden), mpitrain configures against the bundle alone, and every library
# the built programs need resolves from the bundle, torch or the C/C++ run times. The bundle is
# made in the build folder (reused while it passes its check), never in the checkout.
# Usage: gpu_check_dry_run.sh SOURCE_DIR BUILD_DIR
set -euo pipefail
source=$1 build=$2
export GPU_BUNDLE_DIR=$build/gpu-bundle GPU_CHECK_BUILD_DIR=$build/gpu-check-build MPITRAIN_BUILD_DIR=$build
if ! "$source/scripts/gpu-bundle" --check > /dev/null 2>&1; then
  "$source/scripts/gpu-bundle"
fi
"$source/scripts/gpu-check" --dry-run

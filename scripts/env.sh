# Sourced by the project's scripts: where the cached environment lives, and how to reach it.
# MPITRAIN_CACHE overrides the cache folder; nothing here writes anything.
MPITRAIN_CACHE=${MPITRAIN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mpitrain}
MPITRAIN_VENV=${MPITRAIN_VENV:-$MPITRAIN_CACHE/venv-torch-2.11.0}
export MPITRAIN_CACHE MPITRAIN_VENV
# Open MPI refuses root without these; CI and the development machines run as root.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

#!/usr/bin/env bash
# Starts mpitrain's trainer under mpirun, one rank per GPU, on this node or on the nodes of a
# host file, and restarts it with --resume auto when it fails (like torchrun --max-restarts).
#
#   launch/mpirun.sh [OPTIONS] [--] TRAIN_ARGS...
#   launch/mpirun.sh --config run.json --set optimizer.lr=3e-4       # every GPU of this node
#   launch/mpirun.sh --hostfile hosts --max-restarts 5 -- --config run.json
#   launch/mpirun.sh -n 2 --config run.json                          # 2 CPU ranks (no GPU)
#   MPITRAIN_RESUME= launch/mpirun.sh --program build/bin/bench_allreduce -- --backend nccl
#                                            # another program: here the network check
#
# Options (each also an environment variable; the option wins):
#   -n, --np N          ranks (MPITRAIN_NP; default: the GPUs of this node, or one per GPU of
#                       every node of the host file; required on CPU)
#   --hostfile FILE     Open MPI host file, one line per node: "node07 slots=8" (MPITRAIN_HOSTFILE)
#   --max-restarts N    restarts after a failure (MPITRAIN_MAX_RESTARTS, default 3)
#   --program PATH      program to start (MPITRAIN_PROGRAM, default <checkout>/build/bin/train)
#   --print-command     print the mpirun command line and exit, starting nothing
#   -h, --help          this text
# The first argument that is not an option above (or everything after --) goes to the program.
#
# Environment (all optional; launch/common.sh has the defaults, docs/launching.md the details):
#   MPITRAIN_RESTART_DELAY_S, MPITRAIN_RESTART_DELAY_MAX_S   back-off before restarts (10, 300 s)
#   MPITRAIN_RESUME        --resume value added to every start (auto; empty = none)
#   MPITRAIN_GPUS_PER_NODE GPUs per node (detected: CUDA_VISIBLE_DEVICES, else nvidia-smi -L)
#   MPITRAIN_CORES_PER_RANK, OMP_NUM_THREADS   cores and threads per rank (cores / ranks per node)
#   MPITRAIN_MPIRUN        the mpirun (mpirun)
#   MPITRAIN_MAP_BY, MPITRAIN_BIND_TO   --map-by / --bind-to (GPU: ppr:<gpus>:node:PE=<cores
#                          per rank> and core; CPU: slot:PE=<cores per rank> and core, or slot
#                          and none when ranks outnumber cores)
#   MPITRAIN_MPIRUN_ARGS   more mpirun arguments, e.g. "--report-bindings --mca btl_tcp_if_include eth0"
#   MPITRAIN_EXPORT        more variable names passed to every rank with -x; passed already:
#                          NCCL_* MPITRAIN_* OMPI_MCA_* UCX_* OMP_* CUDA_* TORCH_* PYTORCH_* HDF5_*
#                          PATH LD_LIBRARY_PATH
#
# Exit code: the trainer's. 0 finished; 99 stopped by a signal after saving a checkpoint (a
# scheduler should requeue; restarting starts with --resume auto); 2 bad input, never retried;
# 1, 3 or a killed rank: retried up to --max-restarts times, then returned.
# Signals: SIGTERM, SIGUSR1, SIGHUP or SIGINT to this script make the ranks save a checkpoint and
# exit 99 (they get SIGUSR1 through mpirun); a second SIGINT ends them at once. After a stop
# signal the script returns 99 unless the job finished (0) or had bad input (2).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=launch/common.sh
source "$root/launch/common.sh"

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

np=${MPITRAIN_NP:-}
hostfile=${MPITRAIN_HOSTFILE:-}
program=${MPITRAIN_PROGRAM:-$root/build/bin/train}
print_only=0
# An option's value, or a clear error when it is missing.
value() { { [ $# -ge 2 ] && [ -n "$2" ]; } || mpitrain_die "option $1 needs a value (launch/mpirun.sh --help)"; echo "$2"; }
while [ $# -gt 0 ]; do
  case $1 in
    -n | --np) np=$(value "$@"); shift 2 ;;
    --np=*) np=${1#*=}; shift ;;
    --hostfile) hostfile=$(value "$@"); shift 2 ;;
    --hostfile=*) hostfile=${1#*=}; shift ;;
    --max-restarts) MPITRAIN_MAX_RESTARTS=$(value "$@"); shift 2 ;;
    --max-restarts=*) MPITRAIN_MAX_RESTARTS=${1#*=}; shift ;;
    --program) program=$(value "$@"); shift 2 ;;
    --program=*) program=${1#*=}; shift ;;
    --print-command) print_only=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
[ $# -gt 0 ] || mpitrain_die "no arguments for the program: give at least --config FILE (launch/mpirun.sh --help)"
[ -x "$program" ] || mpitrain_die "program '$program' is not an executable file: build it (scripts/build) or give --program PATH"
# Ranks on other nodes start the same path, so make it absolute.
program=$(cd "$(dirname "$program")" && pwd)/$(basename "$program")

mpitrain_mpirun_command "$program" "$np" "$hostfile"
if [ "$print_only" -eq 1 ]; then
  _mpitrain_attempt_args 1 "$@"
  printf '%q ' "${MPITRAIN_LAUNCHER[@]}" "${_mpitrain_args[@]}"
  echo
  exit 0
fi
rc=0
mpitrain_supervise "$@" || rc=$?
exit "$rc"

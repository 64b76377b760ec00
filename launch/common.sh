# shellcheck shell=bash
# Sourced by launch/mpirun.sh and launch/slurm/*.sbatch: what every way of starting mpitrain
# shares, written once.
#
#   mpitrain_gpus_on_node        GPUs this node gives the job (0 = train on CPU)
#   mpitrain_mpirun_command      fills MPITRAIN_LAUNCHER with an mpirun line, one rank per GPU
#   mpitrain_supervise ARGS...   runs "${MPITRAIN_LAUNCHER[@]}" ARGS... with restarts on failure,
#                                forwarding stop signals to the ranks; returns the job's code
#
# Settings (environment; docs/launching.md lists them all with examples):
#   MPITRAIN_MAX_RESTARTS        restarts after a failure (default 3; 0 = none)
#   MPITRAIN_RESTART_DELAY_S     back-off before the first restart, doubled each time (default 10)
#   MPITRAIN_RESTART_DELAY_MAX_S longest back-off (default 300)
#   MPITRAIN_RESUME              value of the --resume added to every start (default auto;
#                                empty = add none, for programs that have no --resume)
#   MPITRAIN_GPUS_PER_NODE       GPUs per node (default: detected, see mpitrain_gpus_on_node)
#   MPITRAIN_CORES_PER_RANK      cores per rank (default: the node's cores / ranks on the node)
#   OMP_NUM_THREADS              threads per rank (default: MPITRAIN_CORES_PER_RANK's value)
#   MPITRAIN_MPIRUN              mpirun to use (default: mpirun)
#   MPITRAIN_MAP_BY, MPITRAIN_BIND_TO   mpirun --map-by / --bind-to (defaults below)
#   MPITRAIN_MPIRUN_ARGS         more mpirun arguments, split on spaces
#   MPITRAIN_EXPORT              more variable names for mpirun -x, split on spaces
#
# Exit codes of the trainer (include/mpitrain/runtime/exit_code.h) decide what happens:
#   0 finished, 99 stopped by a signal after a checkpoint: returned as they are, never restarted;
#   2 bad input: returned at once (a restart would read the same input);
#   1, 3 and anything else (a rank killed, a node lost): restarted with --resume auto.
# A stop signal (TERM, USR1, INT, HUP) to the calling shell is passed to the ranks as SIGUSR1:
# mpirun forwards USR1 to every rank but answers TERM by killing the ranks within a second,
# before they could save. A second INT (Ctrl-C twice) sends TERM: the job ends at once.
# Once a stop was asked for, the result is 99 whatever the ranks did (unless 0 or 2): the job
# is to be requeued and resume from its newest checkpoint, even if a rank died before saving.

MPITRAIN_MAX_RESTARTS=${MPITRAIN_MAX_RESTARTS:-3}
MPITRAIN_RESTART_DELAY_S=${MPITRAIN_RESTART_DELAY_S:-10}
MPITRAIN_RESTART_DELAY_MAX_S=${MPITRAIN_RESTART_DELAY_MAX_S:-300}
MPITRAIN_RESUME=${MPITRAIN_RESUME-auto}
MPITRAIN_MPIRUN=${MPITRAIN_MPIRUN:-mpirun}

# Prefixes of the variables every rank gets through mpirun -x: remote ranks do not inherit the
# launching shell's environment, and these are the ones that change what a rank does.
MPITRAIN_EXPORT_PREFIXES=(NCCL_ MPITRAIN_ OMPI_MCA_ UCX_ OMP_ CUDA_ TORCH_ PYTORCH_ HDF5_)

mpitrain_log() { printf 'mpitrain-launch [%s %s]: %s\n' "$(hostname -s)" "$(date +%H:%M:%S)" "$*" >&2; }
mpitrain_die() { mpitrain_log "error: $*"; exit 2; }

_mpitrain_is_count() { [[ $1 =~ ^[0-9]+$ ]]; }

# GPUs this node gives the job. Slurm: SLURM_GPUS_ON_NODE (unset = none allocated); otherwise
# CUDA_VISIBLE_DEVICES when set, else the GPUs nvidia-smi lists, else 0.
mpitrain_gpus_on_node() {
  if [ -n "${MPITRAIN_GPUS_PER_NODE:-}" ]; then
    _mpitrain_is_count "$MPITRAIN_GPUS_PER_NODE" ||
      mpitrain_die "MPITRAIN_GPUS_PER_NODE='$MPITRAIN_GPUS_PER_NODE' is not a count: set a number, or unset it to detect GPUs"
    echo "$MPITRAIN_GPUS_PER_NODE"
  elif [ -n "${SLURM_JOB_ID:-}" ]; then
    echo "${SLURM_GPUS_ON_NODE:-0}"
  elif [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
    case $CUDA_VISIBLE_DEVICES in
      "" | -1 | NoDevFiles) echo 0 ;;
      *) local -a ids; IFS=, read -ra ids <<<"$CUDA_VISIBLE_DEVICES"; echo "${#ids[@]}" ;;
    esac
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    nvidia-smi -L | grep -c '^GPU' || true
  else
    echo 0
  fi
}

# Cores this node gives the job: Slurm's count, else the ones this process may run on (nproc
# would answer OMP_NUM_THREADS when that is set).
_mpitrain_cores_on_node() { echo "${SLURM_CPUS_ON_NODE:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}"; }

# The variables passed with mpirun -x: every exported one with a prefix above, PATH and
# LD_LIBRARY_PATH (remote nodes must find the same libraries), and MPITRAIN_EXPORT's names.
_mpitrain_export_names() {
  local name prefix
  while read -r name; do
    for prefix in "${MPITRAIN_EXPORT_PREFIXES[@]}"; do
      [[ $name == "$prefix"* ]] && { echo "$name"; break; }
    done
  done < <(compgen -e)
  for name in PATH LD_LIBRARY_PATH ${MPITRAIN_EXPORT:-}; do
    [ -n "${!name+set}" ] && echo "$name"
  done
  return 0
}

# mpitrain_mpirun_command PROGRAM NP HOSTFILE: sets MPITRAIN_LAUNCHER to the mpirun line that
# starts PROGRAM on NP ranks (empty: one per GPU on each node of HOSTFILE, or on this node).
# With GPUs: exactly one rank per GPU on each node (ppr), each bound to its share of the cores.
# On CPU (no GPU found): NP is required; ranks are bound to cores while they fit, otherwise
# they share the cores unbound (--oversubscribe), which is how the CPU tests run.
mpitrain_mpirun_command() {
  local program=$1 np=$2 hostfile=$3
  local gpus cores nodes=${SLURM_NNODES:-1} per_node cores_per_rank map_by bind_to oversubscribe=0
  gpus=$(mpitrain_gpus_on_node)
  cores=$(_mpitrain_cores_on_node)
  if [ -n "$hostfile" ]; then
    [ -r "$hostfile" ] || mpitrain_die "host file '$hostfile' cannot be read: give an existing Open MPI host file (lines 'HOST slots=N')"
    # Open MPI merges lines naming the same host, so count distinct hosts.
    nodes=$(awk '!/^[[:space:]]*(#|$)/ {print $1}' "$hostfile" | sort -u | wc -l)
    [ "$nodes" -gt 0 ] || mpitrain_die "host file '$hostfile' names no host"
  fi
  [ -z "$np" ] || { _mpitrain_is_count "$np" && [ "$np" -gt 0 ]; } ||
    mpitrain_die "number of ranks '$np' is not a positive count"
  if [ "$gpus" -gt 0 ]; then
    per_node=$gpus
    [ -n "$np" ] || [ -n "$hostfile" ] || np=$gpus
  else
    [ -n "$np" ] || mpitrain_die "no GPU found on $(hostname -s) (nvidia-smi, CUDA_VISIBLE_DEVICES): give the number of CPU ranks with -n N (MPITRAIN_NP), or MPITRAIN_GPUS_PER_NODE if the GPUs are there"
    per_node=$(((np + nodes - 1) / nodes))
  fi
  cores_per_rank=${MPITRAIN_CORES_PER_RANK:-$((cores / per_node))}
  _mpitrain_is_count "$cores_per_rank" || mpitrain_die "MPITRAIN_CORES_PER_RANK='$cores_per_rank' is not a count"
  if [ "$cores_per_rank" -lt 1 ]; then
    # More ranks than cores (CPU tests on a small machine): the ranks share the cores, unbound.
    cores_per_rank=1
    oversubscribe=1
  fi
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$cores_per_rank}
  # GPUs: exactly <gpus> ranks on each node (ppr), whatever slots the host file gives; CPU:
  # fill the slots in order. Each rank bound to its own <cores per rank> consecutive cores,
  # so its threads stay on one socket, near the GPU of the same local rank on common boards.
  if [ "$gpus" -gt 0 ]; then map_by=ppr:$gpus:node; else map_by=slot; fi
  if [ "$oversubscribe" -eq 1 ]; then
    map_by=${MPITRAIN_MAP_BY:-$map_by}
    bind_to=${MPITRAIN_BIND_TO:-none}
  else
    map_by=${MPITRAIN_MAP_BY:-$map_by:PE=$cores_per_rank}
    bind_to=${MPITRAIN_BIND_TO:-core}
  fi

  MPITRAIN_LAUNCHER=("$MPITRAIN_MPIRUN")
  [ -z "$np" ] || MPITRAIN_LAUNCHER+=(-np "$np")
  [ -z "$hostfile" ] || MPITRAIN_LAUNCHER+=(--hostfile "$hostfile")
  MPITRAIN_LAUNCHER+=(--map-by "$map_by" --bind-to "$bind_to")
  [ "$oversubscribe" -eq 0 ] || MPITRAIN_LAUNCHER+=(--oversubscribe)
  local name
  while read -r name; do MPITRAIN_LAUNCHER+=(-x "$name"); done < <(_mpitrain_export_names)
  # shellcheck disable=SC2206  # word splitting is the documented contract of MPITRAIN_MPIRUN_ARGS
  MPITRAIN_LAUNCHER+=(${MPITRAIN_MPIRUN_ARGS:-} "$program")
  if [ "$gpus" -gt 0 ]; then
    mpitrain_log "$gpus GPU(s) per node: one rank per GPU, $cores_per_rank core(s) and OMP_NUM_THREADS=$OMP_NUM_THREADS per rank"
  else
    local shared=""
    [ "$oversubscribe" -eq 0 ] || shared=" (more ranks than cores: unbound, oversubscribed)"
    mpitrain_log "no GPU: $np CPU rank(s) on $nodes node(s), $cores_per_rank core(s) and OMP_NUM_THREADS=$OMP_NUM_THREADS per rank$shared"
  fi
}

# What an exit code means, for the log.
_mpitrain_meaning() {
  case $1 in
    0) echo "finished" ;;
    1) echo "failure" ;;
    2) echo "bad input" ;;
    3) echo "a collective timed out" ;;
    99) echo "stopped by a signal after saving a checkpoint" ;;
    *) if [ "$1" -gt 128 ]; then echo "a process was killed by signal $(($1 - 128)) ($(kill -l $(($1 - 128)) 2>/dev/null || echo '?'))"; else echo "failure"; fi ;;
  esac
}

# Arguments of one start: the user's, with --resume replaced by --resume $MPITRAIN_RESUME on
# restarts (and added to the first start when the user gave none).
_mpitrain_attempt_args() {
  local attempt=$1
  shift
  _mpitrain_args=()
  if [ -z "$MPITRAIN_RESUME" ]; then
    _mpitrain_args=("$@")
    return
  fi
  local has_resume=0 skip=0 arg
  for arg in "$@"; do
    if [ "$skip" -eq 1 ]; then skip=0; continue; fi
    case $arg in
      --resume) has_resume=1; [ "$attempt" -gt 1 ] && { skip=1; continue; } ;;
      --resume=*) has_resume=1; [ "$attempt" -gt 1 ] && continue ;;
    esac
    _mpitrain_args+=("$arg")
  done
  if [ "$attempt" -gt 1 ] || [ "$has_resume" -eq 0 ]; then _mpitrain_args+=(--resume "$MPITRAIN_RESUME"); fi
}

_mpitrain_child=""
_mpitrain_sleeper=""    # the back-off's sleep
_mpitrain_stop=""       # the first stop signal received, if any
_mpitrain_forwarded=0   # the stop was passed to the running attempt
_mpitrain_interrupts=0  # SIGINTs received
_mpitrain_woken=0       # a trapped signal interrupted `wait`

_mpitrain_on_signal() {
  local sig=$1
  _mpitrain_woken=1
  [ -n "$_mpitrain_stop" ] || _mpitrain_stop=$sig
  [ "$sig" != INT ] || _mpitrain_interrupts=$((_mpitrain_interrupts + 1))
  if [ -z "$_mpitrain_child" ]; then
    mpitrain_log "received SIG$sig between attempts: not starting another"
    [ -z "$_mpitrain_sleeper" ] || kill "$_mpitrain_sleeper" 2>/dev/null || true
  elif [ "$_mpitrain_interrupts" -ge 2 ]; then
    mpitrain_log "received SIGINT again: sending SIGTERM to the launcher (pid $_mpitrain_child), which ends the ranks now"
    kill -TERM "$_mpitrain_child" 2>/dev/null || true
  else
    _mpitrain_forward "SIG$sig"
  fi
}

_mpitrain_forward() {
  mpitrain_log "received $1: asking the ranks to checkpoint and stop (SIGUSR1 to the launcher, pid $_mpitrain_child)"
  _mpitrain_forwarded=1
  kill -USR1 "$_mpitrain_child" 2>/dev/null || true
}

_mpitrain_on_exit() {
  if [ -n "$_mpitrain_child" ] && kill -0 "$_mpitrain_child" 2>/dev/null; then
    mpitrain_log "exiting while the launcher (pid $_mpitrain_child) runs: sending it SIGTERM"
    kill -TERM "$_mpitrain_child" 2>/dev/null || true
  fi
}

# Waits for pid $1 and sets _mpitrain_rc to its exit code. A trapped signal makes `wait` return
# early (128 + signal) while the process still runs: wait again. Bash keeps the code of an
# ended background process, so waiting again is also right when the process ended just as the
# signal came.
_mpitrain_wait() {
  while :; do
    _mpitrain_woken=0
    _mpitrain_rc=0
    wait "$1" || _mpitrain_rc=$?
    [ "$_mpitrain_woken" -eq 1 ] && [ "$_mpitrain_rc" -gt 128 ] || return 0
  done
}

# mpitrain_supervise ARGS...: runs "${MPITRAIN_LAUNCHER[@]}" ARGS..., restarting it after a
# failure (see the top of this file) and returns the job's exit code.
mpitrain_supervise() {
  _mpitrain_is_count "$MPITRAIN_MAX_RESTARTS" ||
    mpitrain_die "MPITRAIN_MAX_RESTARTS='$MPITRAIN_MAX_RESTARTS' is not a count (0 = no restarts)"
  { _mpitrain_is_count "$MPITRAIN_RESTART_DELAY_S" && _mpitrain_is_count "$MPITRAIN_RESTART_DELAY_MAX_S"; } ||
    mpitrain_die "MPITRAIN_RESTART_DELAY_S='$MPITRAIN_RESTART_DELAY_S' and MPITRAIN_RESTART_DELAY_MAX_S='$MPITRAIN_RESTART_DELAY_MAX_S' must be whole seconds"
  local attempts=$((MPITRAIN_MAX_RESTARTS + 1)) attempt=1 delay=$MPITRAIN_RESTART_DELAY_S rc
  trap '_mpitrain_on_signal TERM' TERM
  trap '_mpitrain_on_signal USR1' USR1
  trap '_mpitrain_on_signal INT' INT
  trap '_mpitrain_on_signal HUP' HUP
  trap '_mpitrain_on_exit' EXIT
  while :; do
    [ -z "$_mpitrain_stop" ] || return 99
    _mpitrain_attempt_args "$attempt" "$@"
    mpitrain_log "attempt $attempt of $attempts: ${MPITRAIN_LAUNCHER[*]} ${_mpitrain_args[*]}"
    # Its own session: a Ctrl-C at the terminal reaches only this shell, which turns it into
    # the SIGUSR1 the ranks save on (mpirun would kill them). No stdin: ranks never read it.
    _mpitrain_forwarded=0
    setsid "${MPITRAIN_LAUNCHER[@]}" "${_mpitrain_args[@]}" </dev/null &
    _mpitrain_child=$!
    # A signal that came between the start and the line above found no launcher to pass it to.
    if [ -n "$_mpitrain_stop" ] && [ "$_mpitrain_forwarded" -eq 0 ]; then _mpitrain_forward "SIG$_mpitrain_stop"; fi
    _mpitrain_wait "$_mpitrain_child"
    _mpitrain_child=""
    rc=$_mpitrain_rc
    mpitrain_log "attempt $attempt exited with code $rc: $(_mpitrain_meaning "$rc")"
    case $rc in
      0) return 0 ;;
      2) mpitrain_log "not restarting: a restart would read the same config, data and flags; fix them and start again"
         return 2 ;;
    esac
    if [ -n "$_mpitrain_stop" ]; then
      [ "$rc" -eq 99 ] || mpitrain_log "SIG$_mpitrain_stop asked the job to stop, and it ended with $rc before a clean stop: exit 99 all the same, so that it is requeued and resumes from its newest checkpoint"
      return 99
    fi
    # 99 without a signal here: the ranks were signalled directly (by a scheduler).
    [ "$rc" -ne 99 ] || return 99
    if [ "$attempt" -ge "$attempts" ]; then
      mpitrain_log "giving up after $attempts attempt(s) (MPITRAIN_MAX_RESTARTS=$MPITRAIN_MAX_RESTARTS); the newest checkpoint is kept: start again with --resume auto after reading the log"
      return "$rc"
    fi
    mpitrain_log "restarting with --resume ${MPITRAIN_RESUME:-(none)} in ${delay} s ($((attempts - attempt)) restart(s) left)"
    sleep "$delay" &
    _mpitrain_sleeper=$!
    _mpitrain_wait "$_mpitrain_sleeper"
    _mpitrain_sleeper=""
    if [ -n "$_mpitrain_stop" ]; then
      # The job is not running: 99 lets a scheduler requeue it, and --resume auto then takes
      # the newest checkpoint, as this restart would have.
      mpitrain_log "stopping during the back-off (SIG$_mpitrain_stop): exit 99 so that the job is requeued and resumes"
      return 99
    fi
    delay=$((delay * 2 > MPITRAIN_RESTART_DELAY_MAX_S ? MPITRAIN_RESTART_DELAY_MAX_S : delay * 2))
    attempt=$((attempt + 1))
  done
}

# shellcheck shell=bash
# Sourced by launch/slurm/*.sbatch: the body of an mpitrain Slurm job, shared by the
# single-node and multi-node scripts, which differ only in their #SBATCH lines.
#
#   mpitrain_slurm_job TRAIN_ARGS...
#
# 1. starts one rank per task, with `srun --mpi=pmix` (or mpirun inside the allocation);
# 2. restarts it after a failure, with --resume auto, up to MPITRAIN_MAX_RESTARTS times
#    (launch/common.sh: exit 2 is never retried, 0 and 99 end the job);
# 3. passes the USR1 that `#SBATCH --signal=B:USR1@<seconds>` sends to this shell before the
#    time limit (or `scancel --batch --signal=USR1`) on to the ranks, which save a checkpoint
#    and exit 99;
# 4. on exit code 99, `scontrol requeue`s the job, which then starts again with --resume auto.
#
# Environment (sbatch passes the submitting shell's environment to the job):
#   MPITRAIN_HOME           the mpitrain checkout (default: the directory sbatch ran in)
#   MPITRAIN_PROGRAM        program to start (default: $MPITRAIN_HOME/build/bin/train)
#   MPITRAIN_SLURM_LAUNCHER srun (default) or mpirun
#   MPITRAIN_SRUN_ARGS      more srun arguments, split on spaces (e.g. "--cpu-bind=cores")
#   MPITRAIN_REQUEUE        1 (default): requeue on exit 99; 0: end the job with 99
#   OMP_NUM_THREADS         threads per rank (default: --cpus-per-task, else 1)
#   and launch/common.sh's: MPITRAIN_MAX_RESTARTS, MPITRAIN_RESTART_DELAY_S,
#   MPITRAIN_RESTART_DELAY_MAX_S, MPITRAIN_RESUME, and for mpirun its MPITRAIN_MPIRUN* settings.

# shellcheck source=launch/common.sh
source "$MPITRAIN_HOME/launch/common.sh"

mpitrain_slurm_job() {
  [ -n "${SLURM_JOB_ID:-}" ] ||
    mpitrain_die "not inside a Slurm job: submit this script with sbatch (see its header), or use launch/mpirun.sh"
  [ $# -gt 0 ] || mpitrain_die "no arguments for the trainer: sbatch launch/slurm/single-node.sbatch --config run.json [--set key=value ...]"
  local program=${MPITRAIN_PROGRAM:-$MPITRAIN_HOME/build/bin/train}
  [ -x "$program" ] ||
    mpitrain_die "program '$program' is not an executable file on $(hostname -s): build mpitrain (scripts/build) on a file system every node sees, or set MPITRAIN_PROGRAM"
  local gpus
  gpus=$(mpitrain_gpus_on_node)
  mpitrain_log "job $SLURM_JOB_ID (started $((${SLURM_RESTART_COUNT:-0} + 1)) time(s)): ${SLURM_NTASKS:-?} task(s) on ${SLURM_NNODES:-1} node(s) [${SLURM_JOB_NODELIST:-?}], $gpus GPU(s) per node"
  if [ "$gpus" -eq 0 ]; then
    mpitrain_log "no GPU allocated: the ranks train on CPU (ask for GPUs with --gpus-per-node)"
  elif [ -n "${SLURM_NTASKS_PER_NODE:-}" ] && [ "${SLURM_NTASKS_PER_NODE%%(*}" != "$gpus" ]; then
    mpitrain_log "warning: --ntasks-per-node=$SLURM_NTASKS_PER_NODE but $gpus GPU(s) per node: mpitrain runs one rank per GPU and refuses more ranks than GPUs"
  fi

  case ${MPITRAIN_SLURM_LAUNCHER:-srun} in
    srun)
      export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
      # --wait=60: once one rank has ended, the others get 60 s, then the step is ended, so a
      # crashed rank does not leave its peers waiting ddp.comm_timeout_s in a collective.
      # Not --kill-on-bad-exit: after a stop, the rank that exits 99 first would have the
      # others killed in MPI_Finalize, and srun would return 143 instead of 99.
      # Every rank sees all GPUs of its node and takes cuda:<local rank> (no per-task GPU
      # binding: see docs/launching.md).
      MPITRAIN_LAUNCHER=(srun --mpi=pmix --kill-on-bad-exit=0 --wait=60)
      # Slurm 22.05's srun does not inherit --cpus-per-task from sbatch.
      [ -z "${SLURM_CPUS_PER_TASK:-}" ] || MPITRAIN_LAUNCHER+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
      # shellcheck disable=SC2206  # word splitting is the documented contract of MPITRAIN_SRUN_ARGS
      MPITRAIN_LAUNCHER+=(${MPITRAIN_SRUN_ARGS:-} "$program")
      mpitrain_log "OMP_NUM_THREADS=$OMP_NUM_THREADS per rank"
      ;;
    mpirun)
      # Open MPI reads the allocation from Slurm; the ranks per node follow the tasks per node.
      MPITRAIN_CORES_PER_RANK=${MPITRAIN_CORES_PER_RANK:-${SLURM_CPUS_PER_TASK:-}}
      mpitrain_mpirun_command "$program" "${SLURM_NTASKS:?SLURM_NTASKS is not set: give sbatch --ntasks or --ntasks-per-node}" ""
      ;;
    *) mpitrain_die "MPITRAIN_SLURM_LAUNCHER='$MPITRAIN_SLURM_LAUNCHER': expected srun or mpirun" ;;
  esac

  local rc=0
  mpitrain_supervise "$@" || rc=$?
  if [ "$rc" -eq 99 ] && [ "${MPITRAIN_REQUEUE:-1}" = 1 ]; then
    # The requeue ends this script (Slurm signals it), so it is the last thing it does.
    trap - TERM USR1 INT HUP EXIT
    mpitrain_log "requeueing job $SLURM_JOB_ID: it starts again with --resume auto when it is scheduled"
    scontrol requeue "$SLURM_JOB_ID" ||
      mpitrain_log "error: scontrol requeue $SLURM_JOB_ID failed (is the job requeueable? sbatch --requeue, JobRequeue): submit the script again; --resume auto continues from the checkpoint"
  fi
  return "$rc"
}

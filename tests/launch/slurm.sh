#!/usr/bin/env bash
# launch/slurm/single-node.sbatch on a real Slurm (slurmctld + slurmd of Debian's slurm-wlm),
# started in a fresh temporary directory: auth/none, free ports, this host as the one node
# (docs: /work/shared/SLURM-NOTES.md; nothing outside the directory is touched).
#  1. MPITRAIN_SLURM_LAUNCHER=mpirun: a short run on 2 CPU tasks finishes (exit 0);
#  2. srun --mpi=pmix on 2 CPU tasks (no GPU: the script falls back to CPU); USR1 to the batch
#     shell, as `#SBATCH --signal=B:USR1@...` sends before the time limit: the trainer saves a
#     checkpoint and exits 99, the script requeues the job, and the requeued job resumes from
#     that checkpoint (`resumed from`) and finishes: final checkpoint and metrics at the last step.
# The daemons run in the foreground (-D) as children of this script, so a test runner that ends
# the script's process tree ends them too; at the end they are stopped through their pid
# files, with SIGKILL if they linger.
# Environment (set by CTest): MPIEXEC, BIN.
# shellcheck source=tests/launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
for tool in slurmctld slurmd sbatch scontrol squeue sinfo scancel; do
  command -v "$tool" >/dev/null ||
    fail "$tool not found: scripts/setup installs Slurm (slurmctld slurmd slurm-client); run it, or exclude this test with ctest -LE slurm"
done
make_tiny_run

slurm=$work/slurm
mkdir -p "$slurm/state" "$slurm/spool"
export SLURM_CONF=$slurm/slurm.conf
# Two ports nothing listens on (the kernel hands out a free one for port 0).
read -r ctld_port slurmd_port < <(python3 -c '
import socket
s = [socket.socket() for _ in range(2)]
for x in s: x.bind(("127.0.0.1", 0))
print(*[x.getsockname()[1] for x in s])')
node=$(hostname -s)
cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
memory_mb=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2))
# cred_expire=5 and sched_interval=1: a requeued job may start again after 6 s instead of
# the default 121 s, and the scheduler looks every second (defaults suit real clusters).
cat >"$SLURM_CONF" <<EOF
ClusterName=mpitraintest
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=5
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$slurm/state
SlurmdSpoolDir=$slurm/spool
SlurmctldPidFile=$slurm/slurmctld.pid
SlurmdPidFile=$slurm/slurmd.pid
SlurmctldLogFile=$slurm/slurmctld.log
SlurmdLogFile=$slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
ReturnToService=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
KillWait=5
MinJobAge=600
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
PartitionName=test Nodes=$node Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
echo "slurm.conf: ports $ctld_port (slurmctld) and $slurmd_port (slurmd), node $node with $cpus CPUs"

# At exit: cancel our jobs and let their step daemons finish, stop the daemons by their pid
# files, then end whatever still carries our SLURM_CONF in its environment (only processes this
# test started can: job steps, ranks).
# A daemon that exited stays a zombie until its parent (init) reaps it: that counts as ended.
alive() { [ -r "/proc/$1/status" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null; }
# stop_daemon PID_FILE PID: the pid file's process (PID if the daemon wrote none).
stop_daemon() {
  local file=$1 pid=$2
  [ -f "$file" ] && pid=$(cat "$file")
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 50); do alive "$pid" || return 0; sleep 0.2; done
  echo "$(basename "$file" .pid) (pid $pid) ignored SIGTERM: SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
}
# Live processes other than this shell whose environment holds our SLURM_CONF; with an
# argument, only those of that name (e.g. slurmstepd).
ours() {
  local dir pid
  for dir in /proc/[0-9]*; do
    pid=${dir#/proc/}
    if [ "$pid" = $$ ] || [ "$pid" = "$BASHPID" ]; then continue; fi
    [ -z "${1:-}" ] || [ "$(cat "$dir/comm" 2>/dev/null)" = "$1" ] || continue
    tr '\0' '\n' 2>/dev/null <"$dir/environ" | grep -qxF "SLURM_CONF=$SLURM_CONF" && alive "$pid" && echo "$pid"
  done
  return 0
}
no_steps_left() { [ -z "$(squeue -h 2>/dev/null)" ] && [ -z "$(ours slurmstepd)" ]; }
extra_cleanup() {
  if [ -n "$ctld_pid" ]; then
    scancel --user="$(id -un)" 2>/dev/null || true
    for _ in $(seq 100); do no_steps_left && break; sleep 0.2; done
  fi
  stop_daemon "$slurm/slurmd.pid" "$slurmd_pid"
  stop_daemon "$slurm/slurmctld.pid" "$ctld_pid"
  wait 2>/dev/null || true  # reap them
  local pids
  pids=$(ours)
  # shellcheck disable=SC2086
  [ -z "$pids" ] || { echo "ending leftover processes: ${pids//$'\n'/ }"; kill -KILL $pids 2>/dev/null || true; }
  if [ "${failed:-1}" -eq 1 ]; then
    for log in slurmctld slurmd; do echo "--- last lines of $log.log"; tail -15 "$slurm/$log.log" 2>/dev/null || true; done
  fi
}

ctld_pid="" slurmd_pid=""
slurmctld -D -c >"$slurm/slurmctld.out" 2>&1 &
ctld_pid=$!
slurmd -D >"$slurm/slurmd.out" 2>&1 &
slurmd_pid=$!
node_idle() { [ "$(sinfo -h -n "$node" -o %T 2>/dev/null)" = idle ]; }
wait_for 60 "node $node to be idle (sinfo: $(sinfo -h 2>&1 | tr '\n' ' '))" node_idle
sinfo

job_state() { scontrol show job "$1" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | cut -d= -f2; }
# Job $1 has ended (completed, failed or cancelled) and is not about to run again.
job_ended() { case $(job_state "$1") in COMPLETED | FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY) return 0 ;; *) return 1 ;; esac; }
# sbatch from the checkout, as a user would; no GPU asked for (the node has none).
submit() {
  (cd "$root" && sbatch --parsable --gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=1 --time=10 "$@")
}

echo "--- 1. mpirun inside the allocation: a short run finishes"
job=$(MPITRAIN_SLURM_LAUNCHER=mpirun submit --output="$work/mpirun.out" launch/slurm/single-node.sbatch \
  --config "$work/run.json" --set run.name=viampirun --set train.steps=40)
wait_for 120 "job $job to end" job_ended "$job"
grep -v '^checkpoint ' "$work/mpirun.out"
[ "$(job_state "$job")" = COMPLETED ] || fail "job $job ended $(job_state "$job"), want COMPLETED"
grep -q "attempt 1 of 4: [^ ]*/$(basename "$MPITRAIN_MPIRUN") -np 2 " "$work/mpirun.out" || fail "the job did not start $MPITRAIN_MPIRUN -np 2"
[ "$(last_step "$work/runs/viampirun/metrics.jsonl")" -eq 40 ] || fail "metrics end before step 40"

echo "--- 2. srun: USR1 to the batch shell -> checkpoint, exit 99, requeue, resume, finish"
job=$(submit --output="$work/srun.out" launch/slurm/single-node.sbatch --config "$work/run.json" --set run.name=preempted)
wait_for 120 "job $job to train" test -s "$work/runs/preempted/metrics.jsonl"
scancel --batch --signal=USR1 "$job"
wait_for 60 "the trainer to stop" grep -q "attempt 1 exited with code" "$work/srun.out"
wait_for 180 "job $job to end after its requeue" job_ended "$job"
grep -v '^checkpoint ' "$work/srun.out"
grep -q "received SIGUSR1: asking the ranks to checkpoint" "$work/srun.out" || fail "USR1 was not forwarded"
grep -q "attempt 1 exited with code 99" "$work/srun.out" || fail "the trainer did not exit 99 after USR1"
stopped_at=$(grep -o 'stopped by a signal after step [0-9]*' "$work/srun.out" | grep -o '[0-9]*$')
[ -n "$stopped_at" ] || fail "no 'stopped by a signal after step' line"
grep -q "requeueing job $job" "$work/srun.out" || fail "the job was not requeued"
grep -q "job $job (started 2 time(s))" "$work/srun.out" || fail "the requeued job did not start again"
grep -q "^resumed from .*step-$(printf %08d "$stopped_at") at step $stopped_at" "$work/srun.out" ||
  fail "the requeued job did not resume from the stop's checkpoint (step $stopped_at)"
[ "$(job_state "$job")" = COMPLETED ] || fail "job $job ended $(job_state "$job"), want COMPLETED"
test -d "$work/runs/preempted/checkpoints/step-00001000" || fail "no final checkpoint step-00001000"
[ "$(last_step "$work/runs/preempted/metrics.jsonl")" -eq 1000 ] ||
  fail "metrics end at step $(last_step "$work/runs/preempted/metrics.jsonl"), want 1000"
failed=0
echo "PASS"

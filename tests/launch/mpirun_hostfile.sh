#!/usr/bin/env bash
# launch/mpirun.sh across "nodes" as far as one machine allows: a host file naming localhost
# twice, 2 ranks, trained to the end. Open MPI counts each line as one slot of the same node
# (it refuses "localhost slots=1" twice: two slot counts for one node), so this checks the
# host-file path of the wrapper (options, mapping, exported variables), not a second machine;
# docs/launching.md lists what stays untested.
# Environment (set by CTest): MPIEXEC, BIN.
# shellcheck source=tests/launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
make_tiny_run
printf 'localhost\nlocalhost\n' >"$work/hosts"
wrapper=$root/launch/mpirun.sh

command=$("$wrapper" --hostfile "$work/hosts" -n 2 --print-command -- --config "$work/run.json")
echo "command: $command"
for part in "--hostfile $work/hosts" "-np 2" "--map-by slot:PE=1 --bind-to core" "-x OMP_NUM_THREADS" \
  "-x PATH" "--config $work/run.json --resume auto"; do
  [[ $command == *"$part"* ]] || fail "the mpirun command lacks '$part'"
done

# A variable set for the job is passed to every rank with -x (remote ranks would not inherit it).
NCCL_DEBUG=WARN "$wrapper" --hostfile "$work/hosts" -n 2 -- --config "$work/run.json" --set train.steps=40 \
  >"$work/hosts.log" 2>&1 &
started+=($!)
rc=0
wait "${started[-1]}" || rc=$?
grep -v '^checkpoint ' "$work/hosts.log"
[ "$rc" -eq 0 ] || fail "wrapper exit code $rc, want 0"
grep -q -- "-x NCCL_DEBUG" "$work/hosts.log" || fail "NCCL_DEBUG not passed with -x"
grep -q "for 40 steps on 2 rank(s)" "$work/hosts.log" || fail "the run did not train on 2 ranks"
[ "$(last_step "$work/runs/run/metrics.jsonl")" -eq 40 ] || fail "metrics end at step $(last_step "$work/runs/run/metrics.jsonl"), want 40"
test -d "$work/runs/run/checkpoints/step-00000040" || fail "no final checkpoint step-00000040"
echo "PASS"

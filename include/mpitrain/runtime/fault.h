#pragma once
// Named fault points, so tests can kill a process at an exact moment of a protocol (for
// example between writing a checkpoint's files and its manifest) instead of hoping a timed
// signal lands there.
//
// Contract: fault_armed(name, rank) is true when the environment variable MPITRAIN_FAULT_AT
// equals name and MPITRAIN_FAULT_RANK names this rank (any rank when unset); the caller then
// fails the way the real fault would (an out-of-memory error, say). fault_point(name, rank)
// does nothing unless armed; then the process raises SIGKILL on itself, as `kill -9` would, or
// SIGSTOP when MPITRAIN_FAULT_SIGNAL is STOP (every thread stops, as under `kill -STOP`). The
// overloads without a rank use the rank World recorded (runtime::own_rank), for layers that are
// handed none. The variables are read once. The points are listed in docs/reliability.md.

namespace mpitrain::runtime {

bool fault_armed(const char* name, int rank);
void fault_point(const char* name, int rank);
bool fault_armed(const char* name);
void fault_point(const char* name);

}  // namespace mpitrain::runtime

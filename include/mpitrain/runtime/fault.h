#pragma once
// Named fault points, so tests can kill a process at an exact moment of a protocol (for
// example between writing a checkpoint's files and its manifest) instead of hoping a timed
// signal lands there.
//
// Contract: fault_point(name) does nothing unless the environment variable MPITRAIN_FAULT_AT
// equals name, and on the rank MPITRAIN_FAULT_RANK names (any rank when unset); then the process
// raises SIGKILL on itself, as `kill -9` would. The variables are read once. The
// checkpoint points are listed in docs/checkpoints.md.

namespace mpitrain::runtime {

void fault_point(const char* name, int rank);

}  // namespace mpitrain::runtime

#pragma once
// The crash path: how a rank that cannot go on ends the whole job instead of leaving its peers
// waiting in a collective.
//
// Contract:
// - fatal() prints one message prefixed with this rank and host, runs every registered abort
//   action (communicators tear themselves down, e.g. ncclCommAbort), then calls
//   MPI_Abort(MPI_COMM_WORLD), which makes the launcher end every rank. It never returns and
//   may be called from any thread, including communicator progress and watchdog threads.
// - The rank/host identity and the abort actions are process-wide by necessity: the crash path
//   must work from a hook or a thread that was handed no context. World sets the identity;
//   everything else is passed explicitly.

#include <functional>
#include <string>

#include "mpitrain/runtime/exit_code.h"

namespace mpitrain::runtime {

/// "rank 3 (node01)" once World exists, "rank ? (host)" before.
std::string where();

/// Records who this process is, for where(); called by World.
void set_identity(int rank, const std::string& host);

/// Registers an action that fatal() runs before MPI_Abort. Returns a handle for removal.
/// Actions must be quick and must not throw.
int add_abort_action(std::function<void()> action);
void remove_abort_action(int handle);

[[noreturn]] void fatal(const std::string& what, ExitCode code = ExitCode::failure);

}  // namespace mpitrain::runtime

#pragma once
// The crash path: how a rank that cannot go on ends the whole job instead of leaving its peers
// waiting in a collective.
//
// Contract:
// - fatal() prints one message prefixed with this rank and host, runs every registered abort
//   action (communicators tear themselves down, e.g. ncclCommAbort), then calls
//   MPI_Abort(MPI_COMM_WORLD), which makes the launcher end every rank. It never returns and
//   may be called from any thread, including communicator progress and watchdog threads.
// - It is bounded: the actions run on their own thread and get 2 s, then MPI_Abort runs
//   without them; and the process ends itself (_Exit) 4 s after fatal() began, whatever blocks,
//   so a teardown stuck behind a hung kernel cannot keep the job alive.
// - The rank/host identity and the abort actions are process-wide by necessity: the crash path
//   must work from a hook or a thread that was handed no context. World sets the identity;
//   everything else is passed explicitly.

#include <functional>
#include <string>

#include "mpitrain/runtime/exit_code.h"

namespace mpitrain::runtime {

/// "rank 3 (node01)" once World exists, "rank ? (host)" before.
std::string where();

/// This process's rank as World recorded it; -1 before.
int own_rank();

/// Records who this process is, for where(); called by World.
void set_identity(int rank, const std::string& host);

/// Registers an action that fatal() runs before MPI_Abort. Returns a handle for removal.
/// Actions must be quick and must not throw.
int add_abort_action(std::function<void()> action);
void remove_abort_action(int handle);

[[noreturn]] void fatal(const std::string& what, ExitCode code = ExitCode::failure);

}  // namespace mpitrain::runtime

#pragma once
// Process exit codes. mpirun returns the code of the first rank that failed (or the code passed
// to MPI_Abort), so a job script can tell these apart. Defined once, documented in
// docs/architecture.md.

namespace mpitrain::runtime {

enum class ExitCode : int {
  ok = 0,
  failure = 1,         // an error inside the job (bad state, library failure, peer abort)
  bad_input = 2,       // bad command line, config, data or checkpoint: fix the input and rerun
  comm_timeout = 3,    // a collective did not complete within its timeout
  stopped = 99,        // a stop signal (SIGTERM, SIGUSR1, SIGINT) ended the run early: requeue it
};

constexpr int to_int(ExitCode code) { return static_cast<int>(code); }

}  // namespace mpitrain::runtime

#pragma once
// Stop requests: SIGTERM (scheduler preemption, scancel), SIGUSR1 (Slurm --signal) and SIGINT
// (Ctrl-C) do not kill the process; they set a flag that the training loop reads at a step
// boundary. A second SIGINT falls back to the default action, so Ctrl-C twice always stops.
//
// Contract: construct one StopSignals per process (it installs the handlers and restores the
// previous ones when destroyed, unless a stop was requested: then they stay until the process
// exits, so that a repeated SIGTERM cannot turn the stop exit code into a death by signal). agree() is a collective: every rank calls it at the same step
// boundary and every rank gets the same answer, so all ranks stop at the same step.

#include <chrono>
#include <csignal>

namespace mpitrain::runtime {

class World;

class StopSignals {
 public:
  StopSignals();
  ~StopSignals();
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;

  /// True once this process received one of the signals.
  bool requested() const;
  /// The signal received first, 0 if none.
  int signal() const;
  /// Collective (all-reduce MAX over the world): true on every rank if any rank received a
  /// stop signal. A rank still waiting after `timeout` (a peer stalled or dead) ends the job
  /// with ExitCode::comm_timeout.
  bool agree(const World& world, std::chrono::milliseconds timeout = std::chrono::minutes(10)) const;

 private:
  struct sigaction previous_[3];
};

}  // namespace mpitrain::runtime

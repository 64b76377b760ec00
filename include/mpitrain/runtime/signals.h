#pragma once
// Stop requests: SIGTERM (scheduler preemption, scancel), SIGUSR1 (Slurm --signal) and SIGINT
// (Ctrl-C) do not kill the process; they set a flag that the training loop reads at a step
// boundary. A second SIGINT falls back to the default action, so Ctrl-C twice always stops.
//
// Contract: construct one StopSignals per process (it installs the handlers and restores the
// previous ones when destroyed, unless a stop was requested: then they stay until the process
// exits, so that a repeated SIGTERM cannot turn the stop exit code into a death by signal).
//
// StopAgreement makes the ranks agree, without waiting at every step: poll() is a collective
// that every rank calls at every step boundary, in the same order. It starts a non-blocking
// all-reduce (MAX) of this rank's flag on its own duplicate of the world communicator and
// returns the answer of the one the previous poll() started (false at the first), which has
// had a whole step to complete. Every rank therefore gets the same answer at the same step,
// one step after the first rank saw the signal. A rank whose previous answer has not arrived
// within `timeout` (a peer stalled or dead) ends the job with ExitCode::comm_timeout.

#include <chrono>
#include <csignal>
#include <memory>

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
 private:
  struct sigaction previous_[3];
};

class StopAgreement {
 public:
  /// Collective (duplicates the world communicator).
  StopAgreement(const World& world, const StopSignals& signals, std::chrono::milliseconds timeout);
  /// Collects the last check's answer (collective), unless an exception is unwinding: the job
  /// is ending then, and a peer may never answer.
  ~StopAgreement();
  StopAgreement(const StopAgreement&) = delete;
  StopAgreement& operator=(const StopAgreement&) = delete;

  /// Collective: true on every rank at the same call once any rank saw a stop signal.
  bool poll();

 private:
  struct State;  // keeps MPI out of this header
  std::unique_ptr<State> state_;
};

}  // namespace mpitrain::runtime

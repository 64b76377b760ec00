#pragma once
// Errors that carry their exit code. Code that finds bad input (config, data, checkpoint,
// flags) throws Error with ExitCode::bad_input and a message that says what, where and what to
// do; run_guarded() turns it into one clear line and a job-wide exit, so no peer hangs.

#include <functional>
#include <stdexcept>
#include <string>

#include "mpitrain/runtime/exit_code.h"

namespace mpitrain::runtime {

class World;

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what, ExitCode code = ExitCode::failure)
      : std::runtime_error(what), code_(code) {}
  ExitCode code() const { return code_; }

 private:
  ExitCode code_;
};

/// Runs body; returns its exit code. An exception is printed by the rank that raised it
/// (prefixed with rank and host) and, in a world of more than one rank, ends the whole job
/// through fatal() so that peers blocked in a collective do not hang.
int run_guarded(const World& world, const std::function<int()>& body);

}  // namespace mpitrain::runtime

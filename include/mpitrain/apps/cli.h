#pragma once
// The shared tail of mpitrain's programs (train, the tools, the benchmarks): parse the command
// line with CLI11 on every rank — rank 0 alone prints help and errors, and a bad command line
// exits with ExitCode::bad_input everywhere — then run the body under runtime::run_guarded.
// Header-only, so the library itself does not depend on CLI11.

#include <CLI/CLI.hpp>

#include <functional>

#include "mpitrain/runtime/error.h"
#include "mpitrain/runtime/exit_code.h"
#include "mpitrain/runtime/world.h"

namespace mpitrain::apps {

inline int parse_and_run(const runtime::World& world, CLI::App& app, int argc, char** argv,
                         const std::function<int()>& body) {
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = world.is_root() ? app.exit(e) : e.get_exit_code();
    return rc == 0 ? 0 : runtime::to_int(runtime::ExitCode::bad_input);
  }
  return runtime::run_guarded(world, body);
}

}  // namespace mpitrain::apps

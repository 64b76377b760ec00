#pragma once
// The shared tail of mpitrain's programs (train, the tools, the benchmarks): parse the command
// line with CLI11 on every rank — rank 0 alone prints help and errors, and a bad command line
// exits with ExitCode::bad_input everywhere — then run the body under runtime::run_guarded.
// Single-process tools (h5shard, generate, convert_weights) use run_tool(): the same parse,
// then an error from the body is one line "<name>: error: ..." and its exit code
// (runtime::Error's own, 1 for anything else). Header-only, so the library itself does not
// depend on CLI11.

#include <CLI/CLI.hpp>

#include <c10/util/Exception.h>

#include <exception>
#include <functional>
#include <iostream>

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

inline int run_tool(const char* name, CLI::App& app, int argc, char** argv, const std::function<int()>& body) {
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : runtime::to_int(runtime::ExitCode::bad_input);
  }
  try {
    return body();
  } catch (const runtime::Error& e) {
    std::cerr << name << ": error: " << e.what() << '\n';
    return runtime::to_int(e.code());
  } catch (const c10::Error& e) {
    std::cerr << name << ": error: " << e.what_without_backtrace() << '\n';
  } catch (const std::exception& e) {
    std::cerr << name << ": error: " << e.what() << '\n';
  }
  return runtime::to_int(runtime::ExitCode::failure);
}

}  // namespace mpitrain::apps

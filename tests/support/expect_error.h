#pragma once
// The message of the runtime::Error(bad_input) that f throws; a test failure when f throws
// nothing or another code.

#include <catch2/catch.hpp>

#include <functional>
#include <string>

#include "mpitrain/runtime/error.h"

namespace mpitrain::testing {

inline std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const runtime::Error& e) {
    CHECK(e.code() == runtime::ExitCode::bad_input);
    return e.what();
  }
  FAIL("no runtime::Error was thrown");
  return "";
}

}  // namespace mpitrain::testing

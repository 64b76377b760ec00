#pragma once
// The World that the test runner's main() created, for tests that need MPI.

#include "mpitrain/runtime/world.h"

namespace mpitrain::testing {

const runtime::World& world();

}  // namespace mpitrain::testing

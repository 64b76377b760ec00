// Catch2 runner for tests that run under mpirun: one World per process, the same test cases on
// every rank (so their collectives match), and a job-wide verdict: the binary fails on every
// rank if any rank failed.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include "test_world.h"

namespace {
const mpitrain::runtime::World* g_world = nullptr;
}

const mpitrain::runtime::World& mpitrain::testing::world() { return *g_world; }

int main(int argc, char** argv) {
  mpitrain::runtime::World world(&argc, &argv);
  g_world = &world;
  const int failed = Catch::Session().run(argc, argv) != 0 ? 1 : 0;
  int any_failed = 0;
  MPI_Allreduce(&failed, &any_failed, 1, MPI_INT, MPI_MAX, world.comm());
  if (any_failed && !failed && world.is_root())
    std::fprintf(stderr, "another rank failed; see its output above\n");
  return any_failed;
}

// Catch2 runner for the CUDA tests: like support/mpi_main.cpp, and without a usable CUDA
// device it runs nothing (it still lists the tests when asked), says why, and exits kSkipped.
// The NCCL communicator the tests share is torn down before MPI is finalized.
#include "gpu_support.h"
// After ATen (through gpu_support.h): c10 defines a CHECK macro of its own that Catch must override.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cstdio>
#include <memory>

#include "cuda_probe.h"
#include "mpitrain/runtime/device.h"

namespace {
const mpitrain::runtime::World* g_world = nullptr;
std::unique_ptr<mpitrain::comm::Communicator> g_nccl;
}  // namespace

const mpitrain::runtime::World& mpitrain::testing::world() { return *g_world; }

c10::Device mpitrain::testing::gpu() {
  static const c10::Device device = runtime::choose_device(world(), {runtime::DeviceKind::cuda, false});
  return device;
}

mpitrain::comm::Communicator& mpitrain::testing::nccl() {
  if (!g_nccl) {
    comm::CommOptions options;
    options.timeout = std::chrono::seconds(60);
    options.verify_collectives = true;  // a protocol slip fails loudly
    g_nccl = comm::make_communicator(world(), gpu(), options, comm::Backend::nccl);
  }
  return *g_nccl;
}

int main(int argc, char** argv) {
  mpitrain::runtime::World world(&argc, &argv);
  g_world = &world;
  Catch::Session session;
  if (const int rc = session.applyCommandLine(argc, argv); rc != 0) return rc;
  const Catch::ConfigData& asked = session.configData();
  const bool listing = asked.listTests || asked.listTestNamesOnly || asked.listTags || asked.listReporters || asked.showHelp;
  std::string why = mpitrain::testing::cuda_unusable();
  if (why.empty() && mpitrain::runtime::cuda_device_count() == 0)
    why = "no GPU: the CUDA runtime sees a device but LibTorch does not (a CPU-only LibTorch?)";
  if (!why.empty() && !listing) {
    if (world.is_root()) std::printf("SKIPPED: %s\n", why.c_str());
    return mpitrain::testing::kSkipped;
  }
  const int failed = session.run() != 0 ? 1 : 0;
  g_nccl.reset();
  int any_failed = 0;
  MPI_Allreduce(&failed, &any_failed, 1, MPI_INT, MPI_MAX, world.comm());
  if (any_failed && !failed && world.is_root()) std::fprintf(stderr, "another rank failed; see its output above\n");
  return any_failed;
}

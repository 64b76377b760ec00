#include <c10/util/Exception.h>
// After c10: it defines a CHECK macro of its own that Catch must override.
#include <catch2/catch.hpp>

#include <csignal>
#include <cstdlib>
#include <stdexcept>

#include "mpitrain/runtime/device.h"
#include "mpitrain/runtime/error.h"
#include "mpitrain/runtime/gpu_info.h"
#include "mpitrain/runtime/memory_budget.h"
#include "mpitrain/runtime/signals.h"
#include "test_world.h"

using namespace mpitrain::runtime;
using mpitrain::testing::world;

namespace {
int env_int(const char* name) {
  const char* value = std::getenv(name);
  return value ? std::atoi(value) : -1;
}
}  // namespace

TEST_CASE("world matches MPI_COMM_WORLD and the launcher", "[runtime]") {
  int rank = -1, size = -1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  CHECK(world().rank() == rank);
  CHECK(world().size() == size);
  CHECK_FALSE(world().host().empty());
  CHECK(world().is_root() == (rank == 0));

  int result = MPI_UNEQUAL;
  MPI_Comm_compare(world().comm(), MPI_COMM_WORLD, &result);
  CHECK(result == MPI_CONGRUENT);  // same group, a different communicator: traffic never mixes

  // One machine: every rank is on this node, local rank = world rank.
  CHECK(world().local_size() == size);
  CHECK(world().local_rank() == rank);
  if (env_int("OMPI_COMM_WORLD_LOCAL_RANK") >= 0) {
    CHECK(launcher_local_rank() == env_int("OMPI_COMM_WORLD_LOCAL_RANK"));
    CHECK(world().local_rank() == env_int("OMPI_COMM_WORLD_LOCAL_RANK"));
    CHECK(world().local_size() == env_int("OMPI_COMM_WORLD_LOCAL_SIZE"));
  }
}

TEST_CASE("stop flag is agreed across ranks one step boundary after it was raised", "[runtime]") {
  StopSignals signals;
  StopAgreement agreement(world(), signals, std::chrono::seconds(30));
  CHECK_FALSE(signals.requested());
  CHECK_FALSE(agreement.poll());  // nothing in flight yet
  CHECK_FALSE(agreement.poll());  // the first check: no signal anywhere

  // Only the last rank receives the signal; every rank must see the stop, at the same poll.
  if (world().rank() == world().size() - 1) std::raise(SIGUSR1);
  CHECK(signals.requested() == (world().rank() == world().size() - 1));
  CHECK(signals.signal() == (signals.requested() ? SIGUSR1 : 0));
  CHECK_FALSE(agreement.poll());  // answers the check started before the signal
  CHECK(agreement.poll());
}

TEST_CASE("SIGTERM and SIGINT are stop requests, not deaths", "[runtime]") {
  for (int signo : {SIGTERM, SIGINT}) {
    StopSignals signals;
    std::raise(signo);
    CHECK(signals.requested());
    CHECK(signals.signal() == signo);
  }
}

TEST_CASE("handlers are restored when StopSignals ends, unless a stop was requested", "[runtime]") {
  std::signal(SIGTERM, SIG_DFL);  // an earlier stop in this process may have left ours
  struct sigaction before;
  sigaction(SIGTERM, nullptr, &before);
  { StopSignals signals; }
  struct sigaction after;
  sigaction(SIGTERM, nullptr, &after);
  CHECK(after.sa_handler == before.sa_handler);

  struct sigaction installed;
  {
    StopSignals signals;
    sigaction(SIGTERM, nullptr, &installed);
    std::raise(SIGUSR1);
  }
  // The process is stopping: a later SIGTERM still only sets the flag (and this test lives on).
  sigaction(SIGTERM, nullptr, &after);
  CHECK(after.sa_handler == installed.sa_handler);
  CHECK(after.sa_handler != before.sa_handler);
  std::raise(SIGTERM);
}

TEST_CASE("device choice", "[runtime]") {
  CHECK(choose_device(world(), {DeviceKind::cpu, false}).is_cpu());
  if (cuda_device_count() == 0) {
    CHECK(choose_device(world(), {DeviceKind::automatic, false}).is_cpu());
    CHECK_THROWS_WITH(choose_device(world(), {DeviceKind::cuda, false}),
                      Catch::Contains("no CUDA device is usable"));
  } else {
    const c10::Device device = choose_device(world(), {DeviceKind::automatic, true});
    CHECK(device.is_cuda());
    CHECK(device.index() == world().local_rank() % cuda_device_count());
  }
  CHECK(parse_device_kind("cuda") == DeviceKind::cuda);
  CHECK_THROWS_WITH(parse_device_kind("gpu"), Catch::Contains("expected auto, cpu or cuda"));
}

TEST_CASE("GPU binding: distinct GPUs pass; two ranks on one GPU are refused unless allowed", "[runtime]") {
  // Per-task binding: every rank sees one GPU as cuda:0, but they are different GPUs.
  const std::vector<GpuBinding> distinct = {{4, "0000:18:00.0"}, {5, "0000:3B:00.0"}, {6, "0000:86:00.0"}};
  CHECK_NOTHROW(check_gpu_binding(distinct, false, "node07"));
  // Ranks without a GPU share nothing.
  CHECK_NOTHROW(check_gpu_binding({{0, ""}, {1, ""}}, false, "node07"));
  const std::vector<GpuBinding> shared = {
      {4, "0000:18:00.0"}, {5, "0000:3B:00.0"}, {6, "0000:18:00.0"}, {7, "0000:18:00.0"}};
  try {
    check_gpu_binding(shared, false, "node07");
    FAIL("two ranks on one GPU were not refused");
  } catch (const Error& e) {
    CHECK(e.code() == ExitCode::bad_input);
    CHECK_THAT(e.what(), Catch::StartsWith("ranks 4, 6 and 7 on node07 would share the GPU at PCI bus id 0000:18:00.0"));
    CHECK_THAT(e.what(), Catch::Contains("device.allow_shared_gpu"));
  }
  const std::vector<GpuBinding> pair = {{0, "0000:18:00.0"}, {1, "0000:18:00.0"}};
  CHECK_THROWS_WITH(check_gpu_binding(pair, false, "node07"),
                    Catch::StartsWith("ranks 0 and 1 on node07 would share the GPU at PCI bus id 0000:18:00.0"));
  CHECK_NOTHROW(check_gpu_binding(shared, true, "node07"));
}

TEST_CASE("errors carry their exit code", "[runtime]") {
  const Error error("bad key", ExitCode::bad_input);
  CHECK(error.code() == ExitCode::bad_input);
  CHECK(std::string(error.what()) == "bad key");
  if (world().size() == 1) {
    // In a world of one, run_guarded reports and returns the code instead of aborting.
    CHECK(run_guarded(world(), [] () -> int { throw Error("x", ExitCode::bad_input); }) == 2);
    CHECK(run_guarded(world(), [] { return 0; }) == 0);
  }
}

TEST_CASE("out of memory: the allocator's error, or a library's own allocation failing", "[runtime]") {
  const auto thrown = [](auto&& raise) -> bool {
    try {
      raise();
    } catch (const std::exception& e) {
      return out_of_memory(e);
    }
    FAIL("nothing was thrown");
    return false;
  };
  CHECK(thrown([] { TORCH_CHECK_WITH(OutOfMemoryError, false, "CUDA out of memory. Tried to allocate 2.00 GiB"); }));
  // The messages LibTorch raises as plain c10::Error when cuDNN, cuBLAS or CUDA run short.
  CHECK(thrown([] { TORCH_CHECK(false, "GET was unable to find an engine to execute this computation"); }));
  CHECK(thrown([] { TORCH_CHECK(false, "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"); }));
  CHECK(thrown([] { TORCH_CHECK(false, "cuDNN error: CUDNN_STATUS_ALLOC_FAILED"); }));
  CHECK(thrown([] { TORCH_CHECK(false, "CUDA error: out of memory"); }));
  // Anything else is not, however it mentions memory.
  CHECK_FALSE(thrown([] { TORCH_CHECK(false, "mat1 and mat2 shapes cannot be multiplied (8x12 and 16x3)"); }));
  CHECK_FALSE(thrown([] { TORCH_CHECK(false, "CUDA error: an illegal memory access was encountered"); }));
  CHECK_FALSE(thrown([] { throw std::runtime_error("out of range"); }));
}

TEST_CASE("GPU facts for the metrics: datasheet peaks by name; nothing on the CPU", "[runtime]") {
  // The names CUDA reports for them (cudaDeviceProp::name).
  CHECK(datasheet_peak_tflops_16bit("NVIDIA H100 80GB HBM3") == 989.4);
  CHECK(datasheet_peak_tflops_16bit("NVIDIA H100 NVL") == 835.5);
  CHECK(datasheet_peak_tflops_16bit("NVIDIA H100 PCIe") == 756.5);
  CHECK(datasheet_peak_tflops_16bit("NVIDIA H200") == 989.4);
  CHECK(datasheet_peak_tflops_16bit("NVIDIA H200 NVL") == 835.5);
  CHECK(datasheet_peak_tflops_16bit("NVIDIA GH200 480GB") == 989.4);
  CHECK(datasheet_peak_tflops_16bit("NVIDIA A100-SXM4-80GB") == 312.0);
  CHECK(datasheet_peak_tflops_16bit("NVIDIA A100 80GB PCIe") == 312.0);
  CHECK(datasheet_peak_tflops_16bit("NVIDIA A10") == 125.0);
  CHECK(datasheet_peak_tflops_16bit("NVIDIA L40S") == 362.05);
  CHECK(datasheet_peak_tflops_16bit("NVIDIA L40") == 181.05);
  CHECK(datasheet_peak_tflops_16bit("NVIDIA L4") == 121.0);
  CHECK(datasheet_peak_tflops_16bit("Tesla V100-SXM2-16GB") == 125.0);
  CHECK(datasheet_peak_tflops_16bit("Tesla V100-PCIE-32GB") == 112.0);
  // Near relatives are not matches: an unknown name has no peak.
  CHECK(datasheet_peak_tflops_16bit("NVIDIA A10G") == 0.0);
  CHECK(datasheet_peak_tflops_16bit("NVIDIA H100 80GB HBM3 MIG 1g.10gb") == 0.0);
  CHECK(datasheet_peak_tflops_16bit("NVIDIA L40G") == 0.0);
  CHECK(datasheet_peak_tflops_16bit("NVIDIA GeForce GTX 1080") == 0.0);
  const GpuInfo cpu(c10::kCPU);
  CHECK(cpu.name() == "cpu");
  CHECK(cpu.peak_tflops_16bit() == 0.0);
  CHECK_FALSE(cpu.read().has_value());
}

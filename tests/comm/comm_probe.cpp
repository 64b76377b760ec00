// Failure scenarios as real jobs, checked from outside by expect_job_failure.sh:
//   withhold: the last rank never joins an all-reduce; the others must time out and the whole
//             job must end non-zero (no hang) with a message naming the operation.
//   mismatch: the last rank all-reduces a different size; with verify_collectives every rank
//             must report the disagreement and the job must end non-zero.
// Usage: comm_probe withhold|mismatch TIMEOUT_S [cpu|cuda]
#include <ATen/ATen.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <thread>

#ifdef MPITRAIN_HAVE_NCCL
#include <ATen/cuda/Sleep.h>
#endif

#include "mpitrain/comm/communicator.h"
#include "mpitrain/runtime/device.h"
#include "mpitrain/runtime/error.h"
#include "mpitrain/runtime/world.h"

using namespace mpitrain;

int main(int argc, char** argv) {
  runtime::World world(&argc, &argv);
  if (argc < 3) {
    std::fprintf(stderr, "usage: comm_probe withhold|mismatch TIMEOUT_S [cpu|cuda]\n");
    return 2;
  }
  const std::string scenario = argv[1];
  comm::CommOptions options;
  options.timeout = std::chrono::seconds(std::stoi(argv[2]));
  options.verify_collectives = scenario == "mismatch";
  const auto kind = runtime::parse_device_kind(argc > 3 ? argv[3] : "cpu");
  const c10::Device device = runtime::choose_device(world, {kind, false});

  return runtime::run_guarded(world, [&] {
    auto comm = comm::make_communicator(world, device, options);
    const bool odd_one = world.rank() == world.size() - 1;
    auto tensor = at::ones({1000}, at::TensorOptions().device(device));
    if (scenario == "withhold") {
      if (world.size() == 1 && device.is_cuda()) {
#ifdef MPITRAIN_HAVE_NCCL
        // A world of one cannot withhold: hold the caller's stream busy instead, so the
        // collective (ordered after it) cannot complete in time.
        at::cuda::sleep(int64_t{1} << 40);
#endif
      } else if (odd_one) {
        std::this_thread::sleep_for(options.timeout * 4);
        std::printf("rank %d: still alive after withholding; the job should have ended\n",
                    world.rank());
        return 0;
      }
      comm->all_reduce(tensor);
      comm->barrier();
      std::printf("rank %d: the collective completed; it should have timed out\n", world.rank());
      return 0;
    }
    if (scenario == "mismatch") {
      auto other = at::ones({odd_one ? 1001 : 1000}, at::TensorOptions().device(device));
      comm->all_reduce(other);
      std::printf("rank %d: mismatched collective went through\n", world.rank());
      return 0;
    }
    throw runtime::Error("unknown scenario " + scenario, runtime::ExitCode::bad_input);
  });
}

// nccl_probe withheld TIMEOUT_MS: an NCCL all-reduce that can never start must end the job.
// At world size 1 no peer can be withheld, so the caller's stream is: a host function holds it
// for far longer than the timeout, and the collective, ordered after it, cannot begin. Prints
// "withheld: launching at <epoch seconds>" just before the launch; the job must end
// (comm_timeout) within TIMEOUT_MS plus a few seconds of that (tests/gpu/withheld.sh).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <thread>

#include "cuda_probe.h"
#include "mpitrain/comm/communicator.h"
#include "mpitrain/runtime/cuda_check.h"
#include "mpitrain/runtime/device.h"
#include "mpitrain/runtime/world.h"

using namespace mpitrain;

namespace {

void CUDART_CB hold(void* milliseconds) {
  std::this_thread::sleep_for(std::chrono::milliseconds(*static_cast<const long*>(milliseconds)));
}

}  // namespace

int main(int argc, char** argv) {
  runtime::World world(&argc, &argv);
  if (argc != 3 || std::string(argv[1]) != "withheld") {
    std::fprintf(stderr, "usage: nccl_probe withheld TIMEOUT_MS\n");
    return 2;
  }
  if (const std::string why = testing::cuda_unusable(); !why.empty()) {
    std::printf("SKIPPED: %s\n", why.c_str());
    return testing::kSkipped;
  }
  const long timeout_ms = std::stol(argv[2]);
  const c10::Device device = runtime::choose_device(world, {runtime::DeviceKind::cuda, false});
  at::cuda::set_device(device.index());
  comm::CommOptions options;
  options.timeout = std::chrono::milliseconds(timeout_ms);
  auto comm = comm::make_communicator(world, device, options, comm::Backend::nccl);

  at::Tensor tensor = at::ones({1 << 20}, at::TensorOptions().device(device));
  comm->all_reduce(tensor);  // the communicator works: this one completes
  at::cuda::getCurrentCUDAStream(device.index()).synchronize();
  std::printf("a first all_reduce completed: %s\n", tensor[0].item<float>() == comm->size() ? "ok" : "WRONG VALUE");

  static const long held_ms = 20 * timeout_ms;  // read by the host function: lives as long as the process
  MPITRAIN_CHECK_CUDA(cudaLaunchHostFunc(at::cuda::getCurrentCUDAStream(device.index()).stream(), hold,
                                         const_cast<long*>(&held_ms)));
  const double now = std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  std::printf("withheld: launching at %.3f\n", now);
  std::fflush(stdout);
  auto work = comm->all_reduce_async(tensor, comm::ReduceOp::sum);
  work->wait();  // orders the stream; returns on the host
  std::this_thread::sleep_for(std::chrono::milliseconds(10 * timeout_ms));
  std::printf("the job should have ended %ld ms after the launch, it is still running\n", timeout_ms);
  return 0;
}

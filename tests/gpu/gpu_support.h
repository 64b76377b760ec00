#pragma once
// What the CUDA tests share: this rank's GPU, its NCCL communicator (world size 1 on a one-GPU
// machine), and a gate that holds a CUDA stream so that work queued behind it cannot start.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <thread>

#include "mpitrain/comm/communicator.h"
#include "mpitrain/runtime/cuda_check.h"
#include "test_world.h"

namespace mpitrain::testing {

/// runtime::choose_device(kind cuda) of this rank.
c10::Device gpu();
/// The NCCL communicator over the test world on gpu(), created on first use.
comm::Communicator& nccl();

/// Holds `stream` from construction until release() or the end of the scope: a host function on
/// the stream waits for the gate to open, so everything queued on the stream afterwards waits too.
class StreamGate {
 public:
  explicit StreamGate(c10::cuda::CUDAStream stream) : stream_(stream) {
    MPITRAIN_CHECK_CUDA(cudaLaunchHostFunc(stream_.stream(), &StreamGate::hold, open_.get()));
  }
  ~StreamGate() {
    release();
    stream_.synchronize();  // the host function has returned before its flag goes away
  }
  StreamGate(const StreamGate&) = delete;
  StreamGate& operator=(const StreamGate&) = delete;

  void release() { open_->store(true); }

 private:
  static void CUDART_CB hold(void* flag) {
    while (!static_cast<std::atomic<bool>*>(flag)->load()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }

  c10::cuda::CUDAStream stream_;
  std::unique_ptr<std::atomic<bool>> open_ = std::make_unique<std::atomic<bool>>(false);
};

}  // namespace mpitrain::testing

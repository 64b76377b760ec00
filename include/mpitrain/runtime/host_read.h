#pragma once
// Device-to-host reads of the training step's values (loss, gradient norm, non-finite flags,
// loss scale). On a GPU each one stalls the host until the device has caught up, so a
// steady-state step makes none: they happen at log, evaluation and checkpoint time only.
//
// Contract:
// - read_scalar<T>() and read_tensor() are the one way the train, ddp and amp layers read a
//   tensor's value on the host. Each call counts once in host_reads() (process-wide, from any
//   thread), whatever the device, so a test on the CPU proves the same steps make no read that
//   would stall a GPU.
// - Start-up checks (model fingerprints, sizes agreed across ranks) are not step values and
//   need not go through here.

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace mpitrain::runtime {

/// How many reads read_scalar() and read_tensor() have made in this process.
std::int64_t host_reads();

namespace detail {
void count_host_read();
}

/// The value of a one-element tensor, on the host.
template <typename T>
T read_scalar(const at::Tensor& tensor) {
  detail::count_host_read();
  return tensor.item<T>();
}

/// A host copy of `tensor` (itself when it is on the CPU already).
at::Tensor read_tensor(const at::Tensor& tensor);

}  // namespace mpitrain::runtime

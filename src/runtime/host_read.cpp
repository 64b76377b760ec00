#include "mpitrain/runtime/host_read.h"

#include <ATen/ATen.h>

#include <atomic>

namespace mpitrain::runtime {
namespace {
std::atomic<std::int64_t> g_reads{0};
}

std::int64_t host_reads() { return g_reads.load(std::memory_order_relaxed); }

void detail::count_host_read() { g_reads.fetch_add(1, std::memory_order_relaxed); }

at::Tensor read_tensor(const at::Tensor& tensor) {
  detail::count_host_read();
  return tensor.cpu();
}

}  // namespace mpitrain::runtime

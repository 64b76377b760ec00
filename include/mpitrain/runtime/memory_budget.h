#pragma once
// An allocation budget for CPU tensors, so that what mpitrain does on running out of GPU memory
// (batch.micro_batch auto's search, the out-of-memory message) runs and is tested on machines
// without a GPU.
//
// Contract:
// - install_cpu_memory_budget(bytes) wraps LibTorch's CPU allocator: an allocation that would
//   take the bytes it has handed out and not yet had back beyond `bytes` raises
//   c10::OutOfMemoryError, as the CUDA caching allocator does when the GPU is full. Only
//   allocations made after the call count. Call it once, before the model is built; a second
//   call changes the budget. bytes <= 0 does nothing.
// - cpu_memory_budget_from_environment() reads MPITRAIN_CPU_MEMORY_BUDGET (bytes; unset or empty:
//   0); anything but a positive integer is runtime::Error(bad_input) naming the variable.
// - cpu_memory_in_use() is the bytes counted now (0 without a budget).
// - While an UncountedScope lives on a thread, that thread's allocations are not counted (nor
//   their frees, wherever they happen): host-side staging such as the data loader's read-ahead
//   buffers, which on a GPU machine live outside the GPU's memory.
// - out_of_memory(e) says whether an error means the device had no room: c10::OutOfMemoryError
//   (the caching allocator, this budget), or a library that failed to get memory of its own
//   and says so in its message (cuBLAS and cuDNN allocation failures, a cuDNN that found no
//   engine whose workspace fits, a CUDA call that returned out of memory).

#include <cstdint>
#include <exception>

namespace mpitrain::runtime {

void install_cpu_memory_budget(std::int64_t bytes);
std::int64_t cpu_memory_budget_from_environment();
std::int64_t cpu_memory_in_use();
bool out_of_memory(const std::exception& e);

class UncountedScope {
 public:
  UncountedScope();
  ~UncountedScope();
  UncountedScope(const UncountedScope&) = delete;
  UncountedScope& operator=(const UncountedScope&) = delete;

 private:
  bool previous_;
};

}  // namespace mpitrain::runtime

#include "mpitrain/runtime/memory_budget.h"

#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <string>
#include <unordered_map>

#include "mpitrain/runtime/error.h"

namespace mpitrain::runtime {
namespace {

thread_local bool uncounted = false;

// The context of each allocation is its data pointer (a "simple" DataPtr): some kernels use
// Allocator::raw_allocate, which requires that. What the wrapped allocator returned is kept in a
// map until the memory is freed.
class BudgetAllocator final : public c10::Allocator {
 public:
  explicit BudgetAllocator(c10::Allocator* inner) : inner_(inner) {}

  void set_budget(std::int64_t bytes) { budget_ = bytes; }
  std::int64_t in_use() const { return in_use_; }

  c10::DataPtr allocate(std::size_t n) override {
    if (n == 0) return inner_->allocate(0);
    const auto bytes = uncounted ? 0 : static_cast<std::int64_t>(n);
    const std::int64_t after = in_use_.fetch_add(bytes) + bytes;
    if (after > budget_) {
      in_use_ -= bytes;
      TORCH_CHECK_WITH(OutOfMemoryError, false, "CPU memory budget exceeded: ", bytes, " bytes asked for, ",
                       after - bytes, " of ", budget_.load(), " in use (MPITRAIN_CPU_MEMORY_BUDGET)");
    }
    c10::DataPtr inner = inner_->allocate(n);
    void* data = inner.get();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      held_.emplace(data, Held{std::move(inner), bytes});
    }
    return {data, data, &release, c10::Device(c10::kCPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  struct Held {
    c10::DataPtr inner;
    std::int64_t bytes;
  };

  static void release(void* data);

  c10::Allocator* inner_;
  std::atomic<std::int64_t> budget_{0};
  std::atomic<std::int64_t> in_use_{0};
  std::mutex mutex_;
  std::unordered_map<void*, Held> held_;
};

// Never destroyed: tensors may outlive every other static.
BudgetAllocator* installed = nullptr;

void BudgetAllocator::release(void* data) {
  if (data == nullptr) return;  // a zero-byte allocation's raw pointer
  Held held;
  {
    std::lock_guard<std::mutex> lock(installed->mutex_);
    auto it = installed->held_.find(data);
    TORCH_INTERNAL_ASSERT(it != installed->held_.end(), "CPU memory budget: freeing memory it did not hand out");
    held = std::move(it->second);
    installed->held_.erase(it);
  }
  installed->in_use_ -= held.bytes;
  // held.inner frees the memory through the wrapped allocator's deleter as it goes.
}

}  // namespace

void install_cpu_memory_budget(std::int64_t bytes) {
  if (bytes <= 0) return;
  if (installed) {
    installed->set_budget(bytes);
    return;
  }
  installed = new BudgetAllocator(c10::GetCPUAllocator());
  installed->set_budget(bytes);
  c10::SetCPUAllocator(installed, /*priority=*/std::numeric_limits<std::uint8_t>::max());
}

std::int64_t cpu_memory_budget_from_environment() {
  const char* text = std::getenv("MPITRAIN_CPU_MEMORY_BUDGET");
  if (!text || !*text) return 0;
  errno = 0;
  char* end = nullptr;
  const long long bytes = std::strtoll(text, &end, 10);
  if (errno != 0 || *end != '\0' || bytes <= 0)
    throw Error(std::string("MPITRAIN_CPU_MEMORY_BUDGET is '") + text +
                    "': give a number of bytes > 0, or unset it",
                ExitCode::bad_input);
  return bytes;
}

std::int64_t cpu_memory_in_use() { return installed ? installed->in_use() : 0; }

UncountedScope::UncountedScope() : previous_(uncounted) { uncounted = true; }
UncountedScope::~UncountedScope() { uncounted = previous_; }

bool out_of_memory(const std::exception& e) {
  if (dynamic_cast<const c10::OutOfMemoryError*>(&e) != nullptr) return true;
  // What cuBLAS, cuDNN and the CUDA runtime say when they cannot get memory themselves; the
  // error is then a plain c10::Error, but a smaller batch is still the cure.
  for (const char* sign : {"CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED",
                           "unable to find an engine to execute this computation", "CUDA error: out of memory"})
    if (std::strstr(e.what(), sign) != nullptr) return true;
  return false;
}

}  // namespace mpitrain::runtime

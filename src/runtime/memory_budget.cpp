#include "mpitrain/runtime/memory_budget.h"

#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <limits>
#include <string>

#include "mpitrain/runtime/error.h"

namespace mpitrain::runtime {
namespace {

thread_local bool uncounted = false;

class BudgetAllocator final : public c10::Allocator {
 public:
  explicit BudgetAllocator(c10::Allocator* inner) : inner_(inner) {}

  void set_budget(std::int64_t bytes) { budget_ = bytes; }
  std::int64_t in_use() const { return in_use_; }

  c10::DataPtr allocate(std::size_t n) override {
    const auto bytes = uncounted ? 0 : static_cast<std::int64_t>(n);
    const std::int64_t after = in_use_.fetch_add(bytes) + bytes;
    if (after > budget_) {
      in_use_ -= bytes;
      TORCH_CHECK_WITH(OutOfMemoryError, false, "CPU memory budget exceeded: ", bytes, " bytes asked for, ",
                       after - bytes, " of ", budget_.load(), " in use (MPITRAIN_CPU_MEMORY_BUDGET)");
    }
    c10::DataPtr inner = inner_->allocate(n);
    void* data = inner.get();
    auto* held = new Held{std::move(inner), bytes, this};
    return {data, held, &release, c10::Device(c10::kCPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  struct Held {
    c10::DataPtr inner;
    std::int64_t bytes;
    BudgetAllocator* owner;
  };

  static void release(void* context) {
    auto* held = static_cast<Held*>(context);
    held->owner->in_use_ -= held->bytes;
    delete held;  // frees the memory through the wrapped allocator's deleter
  }

  c10::Allocator* inner_;
  std::atomic<std::int64_t> budget_{0};
  std::atomic<std::int64_t> in_use_{0};
};

// Never destroyed: tensors may outlive every other static.
BudgetAllocator* installed = nullptr;

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

}  // namespace mpitrain::runtime

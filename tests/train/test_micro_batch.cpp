// batch.micro_batch auto's pieces with exact expected values: the search for the largest
// micro-batch that fits (against a known limit), the micro-batch that keeps batch.global within
// every rank's cap, and the CPU allocation budget that stands in for GPU memory in tests.
#include <ATen/ATen.h>
// After ATen: c10 defines a CHECK macro of its own that Catch must override.
#include <catch2/catch.hpp>

#include <c10/util/Exception.h>

#include <thread>
#include <vector>

#include "mpitrain/runtime/error.h"
#include "mpitrain/runtime/memory_budget.h"
#include "train/micro_batch.h"

using namespace mpitrain;
using Catch::Contains;

TEST_CASE("largest_fitting: doubling, then bisection, less the margin", "[hetero]") {
  std::vector<std::int64_t> tried;
  const auto below = [&](std::int64_t limit) {
    return [&tried, limit](std::int64_t m) {
      tried.push_back(m);
      return m <= limit;
    };
  };
  // Fits up to 37: 1 2 4 8 16 32 64(no), then 48 40 36 38 37 -> 37 less 10 % = 33.
  CHECK(train::largest_fitting(below(37), 1000, 0.1) == 33);
  CHECK(tried == std::vector<std::int64_t>{1, 2, 4, 8, 16, 32, 64, 48, 40, 36, 38, 37});
  tried.clear();
  // The upper bound fits: memory is not the limit, so no margin.
  CHECK(train::largest_fitting(below(37), 20, 0.1) == 20);
  CHECK(tried == std::vector<std::int64_t>{1, 2, 4, 8, 16, 20});
  tried.clear();
  CHECK(train::largest_fitting(below(1), 20, 0.1) == 1);  // never below 1
  CHECK_THROWS_WITH(train::largest_fitting(below(0), 20, 0.1), Contains("not even a micro-batch of 1 fits"));
}

TEST_CASE("micro_batch_for: the largest mean micro-batch within every cap that divides batch.global", "[hetero]") {
  CHECK(train::micro_batch_for({100, 100}, {}, 512) == 64);   // 128 x 2 > caps; 64 x 2 x 4 = 512
  CHECK(train::micro_batch_for({100, 30}, {}, 512) == 16);    // equal shares: the smaller cap rules
  CHECK(train::micro_batch_for({300, 300}, {}, 512) == 256);  // no accumulation needed
  CHECK(train::micro_batch_for({100, 30}, {3, 1}, 512) == 32);  // shares 48 and 16 of 64
  CHECK(train::micro_batch_for({7, 7, 7}, {}, 48) == 4);       // 4 x 3 x 4 = 48
  CHECK_THROWS_WITH(train::micro_batch_for({8, 8}, {}, 15), Contains("make batch.global a multiple of the number of ranks"));
  // Unequal weights may give one rank more than batch.global / ranks.
  CHECK(train::micro_batch_for({10, 1000}, {10, 1000}, 1024) == 256);  // shares 5 and 507 of 512
  // No search through every integer when memory is no limit.
  CHECK(train::micro_batch_for({std::int64_t{1} << 61, std::int64_t{1} << 61}, {}, std::int64_t{1} << 62) ==
        std::int64_t{1} << 61);
  CHECK_THROWS_WITH(train::micro_batch_for({1000, 1000}, {}, (std::int64_t{1} << 62) + 1),
                    Contains("make batch.global a multiple of the number of ranks"));
}

TEST_CASE("the CPU memory budget raises LibTorch's out-of-memory error and gives freed bytes back", "[hetero]") {
  runtime::install_cpu_memory_budget(1 << 20);
  const std::int64_t before = runtime::cpu_memory_in_use();
  {
    const at::Tensor a = at::empty({128 * 1024}, at::kFloat);  // 512 KiB
    CHECK(runtime::cpu_memory_in_use() == before + 512 * 1024);
    CHECK_THROWS_AS(at::empty({256 * 1024}, at::kFloat), c10::OutOfMemoryError);  // 1 MiB more
    CHECK(runtime::cpu_memory_in_use() == before + 512 * 1024);
  }
  CHECK(runtime::cpu_memory_in_use() == before);
  const at::Tensor b = at::ones({200 * 1024}, at::kFloat);  // 800 KiB fits again
  CHECK(b.sum().item<float>() == 200 * 1024);
  // Another thread's staging memory inside an UncountedScope does not count, nor its release here.
  at::Tensor staged;
  std::thread([&] {
    const runtime::UncountedScope host_memory;
    staged = at::empty({512 * 1024}, at::kFloat);  // 2 MiB, beyond the budget
  }).join();
  CHECK(runtime::cpu_memory_in_use() == before + 800 * 1024);
  staged = at::Tensor();
  CHECK(runtime::cpu_memory_in_use() == before + 800 * 1024);
  setenv("MPITRAIN_CPU_MEMORY_BUDGET", "12x", 1);
  CHECK_THROWS_WITH(runtime::cpu_memory_budget_from_environment(), Contains("MPITRAIN_CPU_MEMORY_BUDGET is '12x'"));
  setenv("MPITRAIN_CPU_MEMORY_BUDGET", "4096", 1);
  CHECK(runtime::cpu_memory_budget_from_environment() == 4096);
  unsetenv("MPITRAIN_CPU_MEMORY_BUDGET");
  CHECK(runtime::cpu_memory_budget_from_environment() == 0);
}

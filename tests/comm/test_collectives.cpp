// Every collective x every dtype x sizes 0, 1, odd and >= 64 MiB, with exact expected values:
// inputs depend on the rank so that the right answer is known in closed form. The device comes
// from MPITRAIN_TEST_DEVICE (cpu by default; cuda runs the same cases through NCCL).
#include <ATen/ATen.h>
// After ATen: c10 defines a CHECK macro of its own that Catch must override.
#include <catch2/catch.hpp>

#include <chrono>
#include <cstdlib>
#include <memory>
#include <thread>
#include <vector>

#include "mpitrain/comm/communicator.h"
#include "mpitrain/runtime/device.h"
#include "mpitrain/runtime/error.h"
#include "test_world.h"

using namespace mpitrain;
using mpitrain::testing::world;

namespace {

c10::Device test_device() {
  const char* kind = std::getenv("MPITRAIN_TEST_DEVICE");
  return runtime::choose_device(world(), {runtime::parse_device_kind(kind ? kind : "cpu"), false});
}

comm::Communicator& communicator() {
  static std::unique_ptr<comm::Communicator> comm = [] {
    comm::CommOptions options;
    options.timeout = std::chrono::seconds(120);
    options.verify_collectives = true;  // a test that desynchronises fails loudly, not by hanging
    return comm::make_communicator(world(), test_device(), options);
  }();
  return *comm;
}

const std::vector<c10::ScalarType> kTypes = {c10::kFloat, c10::kDouble, c10::kBFloat16, c10::kHalf,
                                             c10::kInt,   c10::kLong,   c10::kByte};

// Index pattern i % m on the CPU in the given dtype: small integers, exact in every dtype, and
// all arithmetic the tests do on them (small integer sums and products, halves) stays exact.
// Built by repeating one period, so a 64 MiB pattern costs a copy, not 64 Mi divisions.
at::Tensor pattern(std::int64_t n, std::int64_t m, c10::ScalarType type) {
  const at::Tensor period = at::arange(m, at::TensorOptions().dtype(type));
  return period.repeat({(n + m - 1) / m}).narrow(0, 0, n).contiguous();
}

at::Tensor on_device(const at::Tensor& t, c10::ScalarType type) {
  return t.to(communicator().device(), type).contiguous();
}

void require_equal(const at::Tensor& actual, const at::Tensor& expected_any) {
  const at::Tensor expected = expected_any.to(actual.scalar_type());
  const at::Tensor got = actual.cpu();
  INFO("dtype " << c10::toString(actual.scalar_type()) << ", " << actual.numel() << " elements");
  REQUIRE(got.sizes() == expected.sizes());
  REQUIRE(at::equal(got, expected));
}

std::vector<std::int64_t> sizes_for(c10::ScalarType type) {
  // >= 64 MiB for every dtype: 64 MiB / element size elements.
  const std::int64_t large = (std::int64_t{64} << 20) / c10::elementSize(type);
  return {0, 1, 17, 1001, large};
}

}  // namespace

TEST_CASE("all_reduce sum/avg/max/min: exact values", "[comm]") {
  const int n = communicator().size();
  const int r = communicator().rank();
  const std::int64_t rank_sum = n * (n + 1) / 2;
  for (c10::ScalarType type : kTypes) {
    for (std::int64_t numel : sizes_for(type)) {
      const at::Tensor p7 = pattern(numel, 7, type), p5 = pattern(numel, 5, type), p3 = pattern(numel, 3, type);
      at::Tensor x = on_device(p7 + (r + 1), type);
      communicator().all_reduce(x, comm::ReduceOp::sum);
      require_equal(x, p7 * n + rank_sum);

      if (at::isFloatingType(type)) {
        // (n * p7 + rank_sum) / n is exact in every float type for n in {1, 2, 4}.
        x = on_device(p7 + (r + 1), type);
        communicator().all_reduce(x, comm::ReduceOp::avg);
        require_equal(x, (p7 * n + rank_sum) / n);
      }

      x = on_device(p5 * r + p3, type);
      communicator().all_reduce(x, comm::ReduceOp::max);
      require_equal(x, p5 * (n - 1) + p3);

      x = on_device(p5 * r + p3, type);
      communicator().all_reduce(x, comm::ReduceOp::min);
      require_equal(x, p3);
    }
  }
}

TEST_CASE("broadcast from every root", "[comm]") {
  const int n = communicator().size();
  for (c10::ScalarType type : kTypes) {
    for (std::int64_t numel : {std::int64_t{0}, std::int64_t{1}, std::int64_t{17},
                               (std::int64_t{64} << 20) / static_cast<std::int64_t>(c10::elementSize(type))}) {
      for (int root = 0; root < n; ++root) {
        const at::Tensor want = pattern(numel, 11, type) + root;
        at::Tensor x = communicator().rank() == root ? on_device(want, type)
                                                      : on_device(pattern(numel, 3, type) + 50, type);
        communicator().broadcast(x, root);
        require_equal(x, want);
      }
    }
  }
}

TEST_CASE("all_gather puts rank r's input in slice r", "[comm]") {
  const int n = communicator().size();
  const int r = communicator().rank();
  for (c10::ScalarType type : kTypes) {
    for (std::int64_t numel : sizes_for(type)) {
      if (numel * n * static_cast<std::int64_t>(c10::elementSize(type)) > (std::int64_t{256} << 20))
        numel /= n;  // keep the gathered tensor at <= 256 MiB; still >= 64 MiB in all
      at::Tensor input = on_device(pattern(numel, 13, type) + 3 * r, type);
      at::Tensor output = on_device(at::zeros({numel * n}, type), type);
      communicator().all_gather(output, input);
      std::vector<at::Tensor> slices;
      for (int q = 0; q < n; ++q) slices.push_back(pattern(numel, 13, type) + 3 * q);
      require_equal(output, at::cat(slices));
    }
  }
}

TEST_CASE("reduce_scatter gives rank r the reduced slice r", "[comm]") {
  const int n = communicator().size();
  const int r = communicator().rank();
  const std::int64_t rank_sum = n * (n + 1) / 2;
  for (c10::ScalarType type : kTypes) {
    for (std::int64_t numel : sizes_for(type)) {
      const std::int64_t per_rank = numel / n + (numel == 0 ? 0 : 1);
      const at::Tensor full = pattern(per_rank * n, 7, type);
      const at::Tensor mine = full.slice(0, r * per_rank, (r + 1) * per_rank);
      at::Tensor input = on_device(full + (r + 1), type);
      at::Tensor output = on_device(at::zeros({per_rank}, type), type);
      communicator().reduce_scatter(output, input, comm::ReduceOp::sum);
      require_equal(output, mine * n + rank_sum);

      input = on_device(full * r, type);
      communicator().reduce_scatter(output, input, comm::ReduceOp::max);
      require_equal(output, mine * (n - 1));

      if (at::isFloatingType(type)) {
        input = on_device(full + (r + 1), type);
        communicator().reduce_scatter(output, input, comm::ReduceOp::avg);
        require_equal(output, (mine * n + rank_sum) / n);
      }
    }
  }
}

TEST_CASE("16-bit reductions agree with the float32 result", "[comm]") {
  // Random values: bf16/fp16 sums round each partial sum, so compare within their precision.
  const int r = communicator().rank();
  at::Tensor reference = at::randn({4099}, at::TensorOptions().dtype(at::kFloat)).mul_(r + 1);
  at::Tensor exact = reference.to(communicator().device(), /*non_blocking=*/false, /*copy=*/true);
  communicator().all_reduce(exact, comm::ReduceOp::sum);
  for (c10::ScalarType type : {c10::kBFloat16, c10::kHalf}) {
    at::Tensor low = reference.to(communicator().device(), type, false, /*copy=*/true);
    communicator().all_reduce(low, comm::ReduceOp::sum);
    const double eps = type == c10::kBFloat16 ? 1.0 / 128 : 1.0 / 1024;
    const double tolerance = eps * communicator().size() * 8;  // each hop rounds once
    const at::Tensor error = (low.to(at::kFloat) - exact).abs().cpu();
    const at::Tensor scale = exact.abs().cpu() + 1.0;
    const double worst = (error / scale).max().item<double>();
    INFO(c10::toString(type) << ": worst relative error " << worst);
    CHECK(worst < tolerance);
  }
}

TEST_CASE("several async operations in flight complete in order", "[comm]") {
  const int n = communicator().size();
  const int r = communicator().rank();
  std::vector<at::Tensor> tensors;
  std::vector<comm::WorkPtr> works;
  for (int k = 0; k < 8; ++k) {
    // Big and small mixed, so a later small one could overtake an earlier big one.
    const std::int64_t numel = k % 2 == 0 ? (1 << 20) : 3;
    tensors.push_back(on_device(pattern(numel, 7, c10::kFloat) + (r + 1) * (k + 1), c10::kFloat));
    works.push_back(communicator().all_reduce_async(tensors.back(), comm::ReduceOp::sum));
  }
  works.back()->wait();
  if (communicator().device().is_cpu()) {
    // Completion is in order: once the last is done, every earlier one is too.
    for (auto& work : works) CHECK(work->is_completed());
  }
  for (int k = 0; k < 8; ++k) {
    works[k]->wait();
    require_equal(tensors[k], pattern(tensors[k].numel(), 7, c10::kFloat) * n + (k + 1) * n * (n + 1) / 2.0);
  }
  communicator().barrier();
}

TEST_CASE("with timing on, completed work reports when it ran; with timing off, nothing", "[comm]") {
  using Clock = std::chrono::steady_clock;
  auto& comm = communicator();
  // On CUDA wait() only orders the caller's stream; poll for completion instead.
  const auto finish = [](comm::Work& work) {
    work.wait();
    while (!work.is_completed()) std::this_thread::yield();
  };
  at::Tensor t = on_device(pattern(1 << 16, 5, c10::kFloat), c10::kFloat);

  comm.set_timing(true);
  const auto before = Clock::now();
  const comm::WorkPtr timed = comm.all_reduce_async(t, comm::ReduceOp::sum);
  comm.set_timing(false);  // applies to later launches only
  finish(*timed);
  const auto after = Clock::now();
  const auto timing = timed->timing();
  REQUIRE(timing.has_value());
  CHECK(before <= timing->started);
  CHECK(timing->started <= timing->completed);
  CHECK(timing->completed <= after);

  const comm::WorkPtr untimed = comm.all_reduce_async(t, comm::ReduceOp::sum);
  finish(*untimed);
  CHECK_FALSE(untimed->timing().has_value());
  comm.barrier();
}

TEST_CASE("send and recv around a ring: exact values, in order, overlapping both ways", "[comm][p2p]") {
  auto& comm = communicator();
  const int n = comm.size(), r = comm.rank();
  if (n == 1) return;
  const int next = (r + 1) % n, previous = (r + n - 1) % n;
  for (const auto type : kTypes) {
    for (const std::int64_t numel : {std::int64_t{0}, std::int64_t{1}, std::int64_t{1000003}}) {
      // Two messages each way: the second must not overtake the first.
      const at::Tensor first = on_device(pattern(numel, 11, type) + r, type);
      const at::Tensor second = on_device(pattern(numel, 11, type) + 2 * r + 1, type);
      at::Tensor got_first = at::empty_like(first), got_second = at::empty_like(second);
      // Receives posted before the sends: p2p work completes on its own, not behind later work.
      auto recv_first = comm.recv_async(got_first, previous);
      auto recv_second = comm.recv_async(got_second, previous);
      auto send_first = comm.send_async(first, next);
      auto send_second = comm.send_async(second, next);
      recv_first->wait();
      recv_second->wait();
      send_first->wait();
      send_second->wait();
      require_equal(got_first, pattern(numel, 11, type) + previous);
      require_equal(got_second, pattern(numel, 11, type) + 2 * previous + 1);
    }
  }
  comm.barrier();
}

TEST_CASE("a split world gives each group its own communicator", "[comm][p2p]") {
  // Two groups by parity (a pipeline's stage groups): sums stay inside each group.
  const int r = world().rank();
  auto group = world().split(r % 2, r);
  REQUIRE(group->size() == (world().size() + 1 - r % 2) / 2);
  REQUIRE(group->rank() == r / 2);
  comm::CommOptions options;
  options.timeout = std::chrono::seconds(120);
  auto sub = comm::make_communicator(*group, communicator().device(), options);
  at::Tensor x = on_device(at::full({5}, r + 1, at::kDouble), c10::kDouble);
  sub->all_reduce(x);
  double expected = 0;
  for (int k = r % 2; k < world().size(); k += 2) expected += k + 1;
  require_equal(x, at::full({5}, expected, at::kDouble));
  CHECK_THROWS_WITH(sub->send_async(x, group->rank()), Catch::Contains("is not another rank"));
  CHECK_THROWS_WITH(sub->recv_async(x, group->size()), Catch::Contains("is not another rank"));
}

TEST_CASE("bad arguments are clear errors, never a silent wrong answer", "[comm]") {
  auto& comm = communicator();
  const auto options = at::TensorOptions().device(comm.device());
  at::Tensor strided = at::ones({4, 4}, options).t();
  CHECK_THROWS_WITH(comm.all_reduce(strided), Catch::Contains("not contiguous"));

  at::Tensor bools = at::ones({4}, options.dtype(at::kBool));
  CHECK_THROWS_WITH(comm.all_reduce(bools), Catch::Contains("is not supported"));

  at::Tensor ints = at::ones({4}, options.dtype(at::kInt));
  CHECK_THROWS_WITH(comm.all_reduce(ints, comm::ReduceOp::avg),
                    Catch::Contains("floating-point tensors only"));

  at::Tensor input = at::ones({4}, options);
  at::Tensor wrong = at::ones({4 * comm.size() + 1}, options);
  CHECK_THROWS_WITH(comm.all_gather(wrong, input), Catch::Contains("world size"));
  CHECK_THROWS_WITH(comm.reduce_scatter(input, wrong), Catch::Contains("world size"));
  at::Tensor doubles = at::ones({4 * comm.size()}, options.dtype(at::kDouble));
  CHECK_THROWS_WITH(comm.all_gather(doubles, input), Catch::Contains("dtype"));

  CHECK_THROWS_WITH(comm.broadcast(input, comm.size()), Catch::Contains("is not a rank"));

  if (comm.device().is_cpu()) {
    // A CUDA tensor cannot reach the MPI backend; neither can a meta tensor.
    at::Tensor meta = at::ones({4}, at::TensorOptions().device(c10::kMeta));
    CHECK_THROWS_WITH(comm.all_reduce(meta), Catch::Contains("move it first"));
  } else {
    at::Tensor host = at::ones({4});
    CHECK_THROWS_WITH(comm.all_reduce(host), Catch::Contains("move it first"));
  }
  // Nothing was sent by any of the above: the next collective still matches on every rank.
  at::Tensor x = at::ones({3}, options);
  comm.all_reduce(x);
  require_equal(x, at::full({3}, comm.size(), at::kDouble));
}

TEST_CASE("backend choice", "[comm]") {
  CHECK(comm::parse_backend("mpi") == comm::Backend::mpi);
  CHECK_THROWS_WITH(comm::parse_backend("gloo"), Catch::Contains("expected auto, mpi or nccl"));
  CHECK_THROWS_WITH(comm::make_communicator(world(), c10::Device(c10::kCUDA, 0), {}, comm::Backend::mpi),
                    Catch::Contains("device.backend \"mpi\" works on CPU tensors"));
  CHECK(comm::format_bytes(16 << 10) == "16.0 KiB");
  CHECK(comm::format_bytes(3) == "3 B");
}

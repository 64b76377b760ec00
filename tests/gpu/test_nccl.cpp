// The NCCL communicator on a real GPU, at world size 1 (one GPU is enough; NCCL allows one
// rank per GPU): every collective in every supported dtype with exact values, stream ordering
// for the caller, in-order completion of asynchronous operations, and the refusals of the
// Communicator contract.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
// After ATen: c10 defines a CHECK macro of its own that Catch must override.
#include <catch2/catch.hpp>

#include <algorithm>
#include <chrono>
#include <vector>

#include "gpu_support.h"
#include "mpitrain/runtime/error.h"

using namespace mpitrain;
using namespace mpitrain::testing;

namespace {

const std::vector<c10::ScalarType> kDtypes = {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf,
                                              at::kInt,   at::kLong,   at::kByte};

// n values that only this dtype holds exactly and that differ from element to element: quarter
// steps for the floating types (exact even in bf16), values beyond 2^53 for int64 (no detour
// through a double), the whole range for uint8. n is odd so no size is a multiple of a vector width.
at::Tensor distinct_values(c10::ScalarType dtype, std::int64_t n = 1001) {
  const at::Tensor i = at::arange(n, at::kLong);
  switch (dtype) {
    case at::kInt: return (i * 7919 - 3000000).to(at::kInt);
    case at::kLong: return i * 3 + (std::int64_t{1} << 60);
    case at::kByte: return (i % 256).to(at::kByte);
    default: return ((i % 97) - 48).to(at::kDouble).mul(0.25).to(dtype);
  }
}

// Something the result must overwrite.
at::Tensor poisoned(const at::Tensor& like) { return at::full_like(like, 99); }

bool floating(c10::ScalarType dtype) { return at::isFloatingType(dtype); }

}  // namespace

TEST_CASE("NCCL: all_reduce sum/avg/max/min in every dtype gives the exact values", "[nccl]") {
  auto& comm = nccl();
  REQUIRE(comm.size() == 1);  // one GPU: the result of every reduction is the input itself
  REQUIRE(comm.backend() == comm::Backend::nccl);
  REQUIRE(comm.device() == gpu());
  for (const c10::ScalarType dtype : kDtypes) {
    const at::Tensor expected = distinct_values(dtype);
    for (const comm::ReduceOp op : {comm::ReduceOp::sum, comm::ReduceOp::avg, comm::ReduceOp::max, comm::ReduceOp::min}) {
      INFO(c10::toString(dtype) << " all_reduce(" << comm::to_string(op) << ")");
      at::Tensor tensor = expected.to(gpu());
      if (op == comm::ReduceOp::avg && !floating(dtype)) {
        CHECK_THROWS_WITH(comm.all_reduce(tensor, op), Catch::Contains("avg is defined for floating-point"));
        continue;
      }
      comm.all_reduce(tensor, op);
      CHECK(tensor.device() == gpu());
      CHECK(at::equal(tensor.cpu(), expected));
    }
  }
}

TEST_CASE("NCCL: broadcast, all_gather and reduce_scatter in every dtype give the exact values", "[nccl]") {
  auto& comm = nccl();
  REQUIRE(comm.size() == 1);
  for (const c10::ScalarType dtype : kDtypes) {
    INFO(c10::toString(dtype));
    const at::Tensor expected = distinct_values(dtype);
    at::Tensor tensor = expected.to(gpu());
    comm.broadcast(tensor, 0);
    CHECK(at::equal(tensor.cpu(), expected));

    at::Tensor gathered = poisoned(tensor);
    comm.all_gather(gathered, tensor);
    CHECK(at::equal(gathered.cpu(), expected));

    for (const comm::ReduceOp op : {comm::ReduceOp::sum, comm::ReduceOp::avg, comm::ReduceOp::max, comm::ReduceOp::min}) {
      INFO("reduce_scatter(" << comm::to_string(op) << ")");
      at::Tensor out = poisoned(tensor);
      if (op == comm::ReduceOp::avg && !floating(dtype)) {
        CHECK_THROWS_WITH(comm.reduce_scatter(out, tensor, op), Catch::Contains("avg is defined for floating-point"));
        continue;
      }
      comm.reduce_scatter(out, tensor, op);
      CHECK(at::equal(out.cpu(), expected));
    }
  }
  // Empty tensors are legal and leave nothing behind.
  at::Tensor empty = at::empty({0}, at::TensorOptions().device(gpu()));
  comm.all_reduce(empty);
  CHECK(empty.numel() == 0);
}

TEST_CASE("NCCL: barrier returns on the host; wrong tensors are refused before anything is sent", "[nccl]") {
  auto& comm = nccl();
  const auto work = comm.barrier_async();
  work->wait();
  CHECK(work->is_completed());  // barrier's wait() blocks the host until it is done

  at::Tensor on_cpu = at::ones({4});
  CHECK_THROWS_AS(comm.all_reduce(on_cpu), runtime::Error);
  at::Tensor strided = at::ones({4, 4}, at::TensorOptions().device(gpu())).t();
  CHECK_THROWS_AS(comm.all_reduce(strided), runtime::Error);
  at::Tensor unsupported = at::ones({4}, at::TensorOptions().device(gpu()).dtype(at::kShort));
  CHECK_THROWS_AS(comm.all_reduce(unsupported), runtime::Error);
  at::Tensor wrong_size = at::ones({3}, at::TensorOptions().device(gpu()));
  CHECK_THROWS_AS(comm.all_gather(wrong_size, at::ones({4}, at::TensorOptions().device(gpu()))), runtime::Error);
}

TEST_CASE("NCCL: wait() orders the caller's stream after the result", "[nccl]") {
  auto& comm = nccl();
  // A side stream as the current one, as a user's own stream would be.
  const c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, gpu().index());
  const c10::cuda::CUDAStreamGuard on_side(side);
  const at::Tensor expected = distinct_values(at::kFloat, (1 << 22) + 1);
  for (int round = 0; round < 5; ++round) {
    // Written on the side stream right before the collective, and read there right after.
    at::Tensor input = expected.to(gpu()).add_(round);
    at::Tensor output = poisoned(input);
    comm.all_gather_async(output, input)->wait();
    const at::Tensor copy = output.clone();  // queued on the side stream after wait()
    CHECK(at::equal(copy.cpu(), expected + round));
  }
}

TEST_CASE("NCCL: asynchronous operations complete in the order they were launched", "[nccl]") {
  auto& comm = nccl();
  const auto cuda = at::TensorOptions().device(gpu());
  const c10::cuda::CUDAStream stream = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, gpu().index());
  const c10::cuda::CUDAStreamGuard on_stream(stream);
  constexpr int kOps = 8;
  std::vector<at::Tensor> inputs, outputs;
  std::vector<comm::WorkPtr> works;
  {
    StreamGate gate(stream);  // nothing launched below can start before the gate opens
    comm.set_timing(true);
    for (int i = 0; i < kOps; ++i) {
      inputs.push_back(at::full({(1 << 20) * (i % 3 + 1)}, static_cast<float>(i), cuda));
      outputs.push_back(poisoned(inputs.back()));
      // Mixed operations and sizes, so that a later one could finish sooner if order were not kept.
      if (i % 2 == 0) works.push_back(comm.all_gather_async(outputs.back(), inputs.back()));
      else works.push_back(comm.reduce_scatter_async(outputs.back(), inputs.back(), comm::ReduceOp::max));
    }
    comm.set_timing(false);
    for (const auto& work : works) CHECK_FALSE(work->is_completed());
    gate.release();

    // Whenever an operation is complete, every earlier one is.
    int out_of_order = 0;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    for (bool all = false; !all && std::chrono::steady_clock::now() < deadline;) {
      std::vector<bool> done;
      for (const auto& work : works) done.push_back(work->is_completed());
      for (int i = 1; i < kOps; ++i) out_of_order += done[i] && !done[i - 1] ? 1 : 0;
      all = std::all_of(done.begin(), done.end(), [](bool d) { return d; });
    }
    CHECK(out_of_order == 0);
  }
  for (int i = 0; i < kOps; ++i) {
    INFO("operation " << i);
    REQUIRE(works[i]->is_completed());
    works[i]->wait();
    CHECK(at::equal(outputs[i], inputs[i]));
    const auto timing = works[i]->timing();
    REQUIRE(timing.has_value());
    CHECK(timing->started <= timing->completed);
    if (i > 0) CHECK(works[i - 1]->timing()->completed <= timing->started);
  }
}

// The pipeline layer's parts with exact expected values: schedules, the split, the built-in
// models' pieces, tied gradients, channels and the grid (at 2 and 4 ranks).
#include <ATen/ATen.h>
// After ATen: c10 defines a CHECK macro of its own that Catch must override.
#include <catch2/catch.hpp>

#include <torch/nn/modules/linear.h>

#include "mpitrain/comm/communicator.h"
#include "mpitrain/models/registry.h"
#include "mpitrain/pipeline/channel.h"
#include "mpitrain/pipeline/grid.h"
#include "mpitrain/pipeline/schedule.h"
#include "mpitrain/pipeline/stage.h"
#include "mpitrain/runtime/error.h"
#include "test_world.h"

using namespace mpitrain;
using mpitrain::testing::world;
using pipeline::Action;
using Schedule = config::PipelineSchedule;

namespace {

std::string text(const std::vector<Action>& actions) {
  std::string s;
  for (const Action& a : actions) s += (s.empty() ? "" : " ") + std::string(a.kind == Action::forward ? "F" : "B") + std::to_string(a.micro);
  return s;
}

// A piece that owns one Linear layer (in * out + out parameters) and applies it.
models::Piece linear_piece(std::int64_t in, std::int64_t out) {
  torch::nn::Linear layer(in, out);
  models::Piece piece;
  piece.name = "linear " + std::to_string(in) + "x" + std::to_string(out);
  piece.owns.push_back(layer.ptr());
  piece.forward = [layer](const at::Tensor& x) mutable { return layer->forward(x); };
  return piece;
}

int error_code(const std::function<void()>& body) {
  try {
    body();
  } catch (const runtime::Error& e) {
    return static_cast<int>(e.code());
  }
  return 0;
}

}  // namespace

TEST_CASE("1f1b: warm-up forwards, then one forward and one backward, then the rest", "[pipeline]") {
  CHECK(text(pipeline::actions(Schedule::one_f_one_b, 4, 0, 6)) == "F0 F1 F2 F3 B0 F4 B1 F5 B2 B3 B4 B5");
  CHECK(text(pipeline::actions(Schedule::one_f_one_b, 4, 2, 6)) == "F0 F1 B0 F2 B1 F3 B2 F4 B3 F5 B4 B5");
  CHECK(text(pipeline::actions(Schedule::one_f_one_b, 4, 3, 6)) == "F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5");
  // Fewer micro-batches than stages: the warm-up is all of them.
  CHECK(text(pipeline::actions(Schedule::one_f_one_b, 4, 0, 2)) == "F0 F1 B0 B1");
  for (int stage = 0; stage < 4; ++stage) {
    CHECK(pipeline::max_in_flight(pipeline::actions(Schedule::one_f_one_b, 4, stage, 6)) == 4 - stage);
    CHECK(pipeline::max_in_flight(pipeline::actions(Schedule::gpipe, 4, stage, 6)) == 6);
  }
}

TEST_CASE("gpipe: all forwards, then all backwards in micro-batch order", "[pipeline]") {
  CHECK(text(pipeline::actions(Schedule::gpipe, 2, 0, 3)) == "F0 F1 F2 B0 B1 B2");
  CHECK(text(pipeline::actions(Schedule::gpipe, 2, 1, 3)) == "F0 F1 F2 B0 B1 B2");
  CHECK(pipeline::bubble_fraction(4, 12) == Approx(3.0 / 15.0).epsilon(1e-15));
  CHECK(pipeline::bubble_fraction(1, 8) == 0.0);
}

TEST_CASE("split: the contiguous cut with the smallest largest stage, or the counts given", "[pipeline]") {
  // Parameters 100, 10, 10, 100: [100, 10 | 10, 100] has the smallest largest stage (110).
  const std::vector<models::Piece> pieces = {linear_piece(9, 10), linear_piece(1, 5), linear_piece(1, 5), linear_piece(9, 10)};
  CHECK(pipeline::split(pieces, 2, {}) == std::vector<std::int64_t>{0, 2, 4});
  CHECK(pipeline::split(pieces, 4, {}) == std::vector<std::int64_t>{0, 1, 2, 3, 4});
  CHECK(pipeline::split(pieces, 3, {}) == std::vector<std::int64_t>{0, 1, 3, 4});
  CHECK(pipeline::split(pieces, 2, {1, 3}) == std::vector<std::int64_t>{0, 1, 4});
  CHECK(pipeline::split(pieces, 1, {}) == std::vector<std::int64_t>{0, 4});
  const int bad_input = static_cast<int>(runtime::ExitCode::bad_input);
  CHECK(error_code([&] { pipeline::split(pieces, 5, {}); }) == bad_input);
  CHECK(error_code([&] { pipeline::split(pieces, 2, {1, 2}); }) == bad_input);
  CHECK(error_code([&] { pipeline::split({}, 2, {}); }) == bad_input);
  CHECK_THROWS_WITH(pipeline::split(pieces, 5, {}), Catch::Contains("more stages than the model has pieces (4"));
  CHECK_THROWS_WITH(pipeline::split({}, 2, {}), Catch::Contains("cannot be cut into stages"));
}

TEST_CASE("the built-in models' pieces compose to forward(), each parameter owned once", "[pipeline]") {
  at::manual_seed(3);
  struct Case {
    const char* name;
    nlohmann::json options;
    at::Tensor inputs;
    std::size_t pieces;
  };
  const std::vector<Case> cases = {
      {"mlp", {{"input_dim", 6}, {"hidden", 5}, {"layers", 2}, {"num_classes", 3}}, at::randn({4, 6}), 3},
      {"cnn", {{"in_channels", 1}, {"image_size", 8}, {"channels", {2, 3}}, {"num_classes", 3}}, at::randn({4, 64}), 2},
      {"gpt", {{"vocab_size", 11}, {"seq_len", 6}, {"n_layer", 3}, {"n_head", 2}, {"n_embd", 8}},
       at::randint(0, 11, {2, 6}, at::kLong), 3},
  };
  for (const Case& c : cases) {
    INFO(c.name);
    auto model = models::create(c.name, c.options);
    const auto pieces = model->pieces();
    REQUIRE(pieces.size() == c.pieces);
    at::Tensor x = c.inputs;
    for (const auto& piece : pieces) x = piece.forward(x);
    CHECK(at::equal(x, model->forward(c.inputs)));
    // Owned modules cover every parameter exactly once.
    std::int64_t owned = 0;
    for (const auto& piece : pieces)
      for (const auto& module : piece.owns)
        for (const auto& p : module->parameters()) owned += p.numel();
    CHECK(owned == models::count_parameters(*model));
    // Two stages over the pieces hold the whole model between them, the GPT's wte on both.
    const auto bounds = pipeline::split(pieces, 2, {});
    pipeline::Stage first(pieces, bounds[0], bounds[1]), last(pieces, bounds[1], bounds[2]);
    const pipeline::Ties ties(pieces, bounds, 1);
    std::int64_t in_stages = 0;
    for (const auto* stage : {&first, &last})
      for (const auto& p : stage->parameters()) in_stages += p.numel();
    const std::int64_t tied = std::string(c.name) == "gpt" ? 11 * 8 : 0;
    CHECK(in_stages == models::count_parameters(*model) + tied);
    CHECK(ties.any() == (tied > 0));
    CHECK(at::equal(last.forward(first.forward(c.inputs)), model->forward(c.inputs)));
  }
}

TEST_CASE("tied gradients are summed across the stages that hold them", "[pipeline][mpi]") {
  if (world().size() < 2) return;
  // Piece 0 owns a layer that piece 1 borrows; ranks 0 and 1 are the two stages.
  torch::nn::Linear shared(2, 2);
  models::Piece owner = linear_piece(1, 1), borrower = linear_piece(1, 1);
  owner.owns = {shared.ptr()};
  borrower.borrows = {shared.ptr()};
  const std::vector<models::Piece> pieces = {owner, borrower};
  const int stage = world().rank() < 2 ? world().rank() : 0;
  const pipeline::Ties ties(pieces, {0, 1, 2}, stage);
  REQUIRE(ties.any());
  CHECK(ties.stages() == std::vector<int>{0, 1});
  CHECK(ties.counted_elsewhere().size() == (stage == 1 ? 2u : 0u));
  auto pair = world().split(world().rank() < 2 ? 0 : 1, world().rank());
  if (world().rank() >= 2) return;
  auto comm = comm::make_communicator(*pair, c10::Device(c10::kCPU));
  shared->weight.mutable_grad() = at::full({2, 2}, 1.0 + stage);
  shared->bias.mutable_grad() = at::full({2}, 10.0 * (1 + stage));
  ties.sum_gradients(*comm);
  CHECK(at::equal(shared->weight.grad(), at::full({2, 2}, 3.0)));
  CHECK(at::equal(shared->bias.grad(), at::full({2}, 30.0)));
}

TEST_CASE("a channel carries any shape and dtype, in order", "[pipeline][mpi]") {
  if (world().size() < 2) return;
  auto pair = world().split(world().rank() < 2 ? 0 : 1, world().rank());
  if (world().rank() >= 2) return;
  auto comm = comm::make_communicator(*pair, c10::Device(c10::kCPU));
  const std::vector<at::Tensor> sent = {at::arange(12, at::kFloat).reshape({3, 4}), at::arange(5, at::kDouble),
                                        at::full({}, 7.5, at::kBFloat16), at::arange(24, at::kFloat).reshape({2, 3, 4}).transpose(0, 2)};
  if (world().rank() == 0) {
    pipeline::Channel channel(*comm, 1);
    for (const auto& t : sent) channel.send(t);
    channel.flush();
  } else {
    pipeline::Channel channel(*comm, 0);
    for (const auto& t : sent) {
      const at::Tensor got = channel.recv();
      CHECK(got.scalar_type() == t.scalar_type());
      CHECK(got.sizes() == t.sizes());
      CHECK(at::equal(got, t));
    }
  }
}

TEST_CASE("a channel's headers can travel on a communicator of their own", "[pipeline][mpi]") {
  // As on a GPU, where the data goes over NCCL and the headers over MPI on the host.
  if (world().size() < 2) return;
  auto pair = world().split(world().rank() < 2 ? 0 : 1, world().rank());
  if (world().rank() >= 2) return;
  auto data = comm::make_communicator(*pair, c10::Device(c10::kCPU));
  auto headers = comm::make_communicator(*pair, c10::Device(c10::kCPU));
  const at::Tensor first = at::arange(6, at::kFloat).reshape({2, 3});
  const at::Tensor second = at::arange(60, at::kDouble).reshape({3, 4, 5});
  if (world().rank() == 0) {
    pipeline::Channel channel(*data, *headers, 1);
    channel.send(first);
    channel.send(second);
    channel.flush();
    return;
  }
  // The first message by hand: its header on `headers`, its data on `data`.
  at::Tensor head = at::empty({pipeline::Channel::kMaxDims + 2}, at::kLong);
  headers->recv_async(head, 0)->wait();
  std::vector<std::int64_t> expected(pipeline::Channel::kMaxDims + 2, 0);
  expected[0] = static_cast<std::int64_t>(at::kFloat);
  expected[1] = 2;
  expected[2] = 2;
  expected[3] = 3;
  CHECK(at::equal(head, at::tensor(expected, at::kLong)));
  at::Tensor got = at::empty({2, 3}, at::kFloat);
  data->recv_async(got, 0)->wait();
  CHECK(at::equal(got, first));
  // The second through a channel built the same way.
  pipeline::Channel channel(*data, *headers, 0);
  got = channel.recv();
  CHECK(got.scalar_type() == at::kDouble);
  CHECK(at::equal(got, second));
}

TEST_CASE("the grid: a stage's replicas are consecutive ranks", "[pipeline][mpi]") {
  const int n = world().size();
  if (n % 2 != 0) return;
  const pipeline::Grid grid(world(), 2);
  CHECK(grid.replicas() == n / 2);
  CHECK(grid.stage() == world().rank() / (n / 2));
  CHECK(grid.replica() == world().rank() % (n / 2));
  CHECK(grid.world_rank(grid.stage(), grid.replica()) == world().rank());
  CHECK(grid.stage_group().size() == n / 2);
  CHECK(grid.stage_group().rank() == grid.replica());
  CHECK(grid.pipeline_group().size() == 2);
  CHECK(grid.pipeline_group().rank() == grid.stage());
  CHECK(error_code([&] { pipeline::Grid(world(), n + 1); }) == static_cast<int>(runtime::ExitCode::bad_input));
}

// ZeRO stage 1 and top-k compression, the DDP engine's two alternatives to a plain all-reduce.
// Stage 1 must give stage 0's weights (AdamW and SGD, gradient accumulation, a bf16 wire,
// clipping by the global norm) while each rank's optimizer sees only its shard; the shards cover
// every parameter element exactly once, about 1/N each; with a bf16 wire, the shard gradients are
// stage 0's within bf16 rounding. PowerSGD must pass a rank-1 gradient exactly, average vectors
// whole, keep exactly what it did not send, and warm up with plain all-reduces. Top-k must send each rank's k largest of
// gradient plus residual, keep the rest as the residual, and equal the all-reduce at ratio 1.
#include <torch/torch.h>
// After torch: c10 defines a CHECK macro of its own that Catch must override.
#include <catch2/catch.hpp>

#include <limits>
#include <memory>
#include <optional>
#include <string>

#include "ddp_support.h"
#include "mpitrain/ddp/ddp.h"
#include "mpitrain/runtime/error.h"
#include "tiny_models.h"

using namespace mpitrain;
using namespace mpitrain::testing;

namespace {

ddp::Options small_buckets() {
  ddp::Options options;
  options.first_bucket_bytes = 256;  // several buckets even for tiny models
  options.bucket_bytes = 2048;
  return options;
}

void copy_weights(torch::nn::Module& from, torch::nn::Module& to) {
  torch::NoGradGuard no_grad;
  const auto source = from.parameters(), target = to.parameters();
  for (size_t i = 0; i < source.size(); ++i) target[i].copy_(source[i]);
}

std::vector<torch::Tensor> values_of(const std::vector<ddp::ShardSlice>& shard) {
  std::vector<torch::Tensor> values;
  for (const auto& slice : shard) values.push_back(slice.value);
  return values;
}

std::unique_ptr<torch::optim::Optimizer> optimizer(bool adamw, const std::vector<torch::Tensor>& params) {
  if (adamw) return std::make_unique<torch::optim::AdamW>(params, torch::optim::AdamWOptions(1e-2).weight_decay(0.01));
  return std::make_unique<torch::optim::SGD>(params, torch::optim::SGDOptions(0.05).momentum(0.9));
}

struct ZeroRun {
  bool adamw = true;
  int accumulation = 1;
  std::optional<c10::ScalarType> wire;
  double clip = 0;
  int steps = 20;
};

// Trains the same replica at stage 0 and at stage 1 side by side on this rank's data; returns
// the worst relative weight difference (and checks the clipping norms agree).
template <typename Model>
double stage1_against_stage0(const ZeroRun& run) {
  auto& comm = communicator();
  torch::manual_seed(comm.rank() == 0 ? 11 : 2000 + comm.rank());
  auto replicated = std::make_shared<Model>();
  auto sharded = std::make_shared<Model>();
  ddp::Options options = small_buckets();
  options.wire_dtype = run.wire;
  ddp::DistributedDataParallel stage0(replicated, comm, options);
  copy_weights(*replicated, *sharded);
  options.zero_stage = 1;
  ddp::DistributedDataParallel stage1(sharded, comm, options);
  auto opt0 = optimizer(run.adamw, replicated->parameters());
  auto opt1 = optimizer(run.adamw, values_of(stage1.shard()));

  at::Generator data = at::make_generator<at::CPUGeneratorImpl>(300 + comm.rank());
  for (int step = 0; step < run.steps; ++step) {
    for (int micro = 0; micro < run.accumulation; ++micro) {
      const auto [x, y] = replicated->batch(4, data);
      const bool last = micro + 1 == run.accumulation;
      for (auto [model, engine] : {std::pair<Model*, ddp::DistributedDataParallel*>{replicated.get(), &stage0},
                                   {sharded.get(), &stage1}}) {
        if (!last) {
          auto guard = engine->no_sync();
          (model->loss(model->forward(x), y) / run.accumulation).backward();
        } else {
          engine->before_forward();
          (model->loss(model->forward(x), y) / run.accumulation).backward();
          engine->finish_backward();
        }
      }
    }
    if (run.clip > 0) {
      const double norm0 = stage0.clip_grad_norm(run.clip).item<double>(),
                   norm1 = stage1.clip_grad_norm(run.clip).item<double>();
      INFO("step " << step << ": global norm " << norm0 << " at stage 0, " << norm1 << " at stage 1");
      CHECK(std::abs(norm1 - norm0) <= 1e-6 * norm0);
    }
    opt0->step();
    opt1->step();
    stage1.finish_step();
    replicated->zero_grad(/*set_to_none=*/false);
    sharded->zero_grad(/*set_to_none=*/false);
  }
  return worst_relative_difference(sharded->parameters(), replicated->parameters());
}

// One synchronised backward of each model, through its engine, on the same batch.
void backward_each(const std::vector<std::pair<TinyMlp*, ddp::DistributedDataParallel*>>& runs, const torch::Tensor& x,
                   const torch::Tensor& y) {
  for (const auto& [model, engine] : runs) {
    engine->before_forward();
    model->loss(model->forward(x), y).backward();
    engine->finish_backward();
  }
}

// One parameter of 10 elements whose gradient on rank r is a known vector.
struct Vector : torch::nn::Module {
  Vector() { w = register_parameter("w", torch::zeros({10})); }
  torch::Tensor w;
};

// Rank r's gradient: distinct magnitudes in a rank-dependent order, alternating signs.
torch::Tensor known_gradient(int rank) {
  torch::Tensor g = torch::empty({10});
  for (int i = 0; i < 10; ++i) g[i] = (1.0 + 0.37 * ((i + 3 * rank) % 10)) * (i % 2 ? -1.0 : 1.0);
  return g;
}

// A matrix and a vector parameter whose gradients on this rank are what the test says.
struct MatrixAndVector : torch::nn::Module {
  MatrixAndVector() {
    w = register_parameter("w", torch::zeros({8, 6}));
    b = register_parameter("b", torch::zeros({6}));
  }
  void backward(const torch::Tensor& gw, const torch::Tensor& gb) { ((w * gw).sum() + (b * gb).sum()).backward(); }
  torch::Tensor w, b;
};

ddp::Options powersgd(int64_t rank, int64_t warmup) {
  ddp::Options options;
  options.compression = ddp::Options::Compression::powersgd;
  options.powersgd_rank = rank;
  options.powersgd_warmup_steps = warmup;
  return options;
}

}  // namespace

TEST_CASE("ZeRO stage 1 gives stage 0's weights after 20 steps", "[zero]") {
  for (bool adamw : {true, false}) {
    for (int accumulation : {1, 3}) {
      ZeroRun run;
      run.adamw = adamw;
      run.accumulation = accumulation;
      run.clip = 0.5;
      const double mlp = stage1_against_stage0<TinyMlp>(run);
      const double gpt = stage1_against_stage0<TinyGpt>(run);
      INFO((adamw ? "AdamW" : "SGD") << ", accumulation " << accumulation << ": mlp " << mlp << ", gpt " << gpt);
      CHECK(mlp <= 1e-6);
      CHECK(gpt <= 1e-6);
    }
  }
}

TEST_CASE("ZeRO stage 1 with a bf16 wire: each shard's gradient is stage 0's within bf16 rounding", "[zero]") {
  // Above 2 ranks the reduce-scatter and the all-reduce may add the ranks' bf16 values in a
  // different order, each sum rounded to bf16: the same bound as the bf16 wire against fp32.
  auto& comm = communicator();
  torch::manual_seed(comm.rank() == 0 ? 11 : 2000 + comm.rank());
  auto replicated = std::make_shared<TinyMlp>(64), sharded = std::make_shared<TinyMlp>(64);
  ddp::Options options = small_buckets();
  options.wire_dtype = at::kBFloat16;
  ddp::DistributedDataParallel stage0(replicated, comm, options);
  copy_weights(*replicated, *sharded);
  options.zero_stage = 1;
  ddp::DistributedDataParallel stage1(sharded, comm, options);
  at::Generator data = at::make_generator<at::CPUGeneratorImpl>(300 + comm.rank());
  const auto [x, y] = replicated->batch(16, data);
  backward_each({{replicated.get(), &stage0}, {sharded.get(), &stage1}}, x, y);
  const auto parameters = replicated->named_parameters();
  for (const auto& slice : stage1.shard()) {
    const torch::Tensor want = parameters[slice.name].grad().flatten().narrow(0, slice.begin, slice.value.numel());
    const double difference = worst_relative_difference({slice.grad}, {want});
    INFO(slice.name << " from " << slice.begin << ": " << difference);
    if (comm.size() <= 2) CHECK(difference == 0);
    CHECK(difference <= (1.0 / 256) * (comm.size() + 1) * 2);
  }
}

TEST_CASE("ZeRO stage 1: the ranks' slices cover every parameter element once, about 1/N each", "[zero]") {
  auto& comm = communicator();
  const int n = comm.size();
  auto model = std::make_shared<TinyGpt>();
  ddp::Options options = small_buckets();
  options.zero_stage = 1;
  ddp::DistributedDataParallel engine(model, comm, options);

  std::map<std::string, torch::Tensor> counts;
  int64_t total = 0;
  for (const auto& item : model->named_parameters()) {
    counts[item.key()] = torch::zeros({item.value().numel()}, torch::kDouble);
    total += item.value().numel();
  }
  int64_t mine = 0;
  for (const auto& slice : engine.shard()) {
    const auto numel = slice.value.numel();
    mine += numel;
    counts.at(slice.name).narrow(0, slice.begin, numel) += 1;
    // The slice is the parameter's own storage, and its grad is what the optimizer will see.
    CHECK(static_cast<const char*>(slice.value.data_ptr()) ==
          static_cast<const char*>(slice.parameter.data_ptr()) + slice.begin * slice.parameter.element_size());
    CHECK(slice.value.grad().is_same(slice.grad));
  }
  for (auto& [name, count] : counts) {
    comm.all_reduce(count);
    INFO(name);
    CHECK(count.eq(1).all().item<bool>());
  }
  // Padding to a multiple of N costs at most N - 1 elements per bucket, shared among the ranks.
  const auto buckets = static_cast<int64_t>(engine.bucket_layout().size());
  INFO("rank " << comm.rank() << " holds " << mine << " of " << total << " elements, " << buckets << " buckets");
  CHECK(std::abs(mine * n - total) <= buckets * n);

  // An AdamW over the shard keeps two moments per element of it, no more.
  auto opt = optimizer(true, values_of(engine.shard()));
  at::Generator data = at::make_generator<at::CPUGeneratorImpl>(5);
  const auto [x, y] = model->batch(4, data);
  engine.before_forward();
  model->loss(model->forward(x), y).backward();
  engine.finish_backward();
  opt->step();
  engine.finish_step();
  int64_t state = 0;
  for (const auto& [key, entry] : opt->state()) {
    const auto& adam = static_cast<const torch::optim::AdamWParamState&>(*entry);
    state += adam.exp_avg().numel() + adam.exp_avg_sq().numel();
  }
  CHECK(state == 2 * mine);
}

TEST_CASE("top-k sends each rank's k largest of gradient plus residual and keeps the rest", "[compression]") {
  auto& comm = communicator();
  const int n = comm.size();
  auto model = std::make_shared<Vector>();
  ddp::Options options;
  options.compression = ddp::Options::Compression::topk;
  options.topk_ratio = 0.2;  // 2 of 10
  ddp::DistributedDataParallel engine(model, comm, options);

  // Every rank simulates every rank's residual.
  std::vector<torch::Tensor> residuals(static_cast<size_t>(n), torch::zeros({10}));
  for (int step = 0; step < 4; ++step) {
    torch::Tensor expected = torch::zeros({10});
    for (int q = 0; q < n; ++q) {
      torch::Tensor owed = residuals[static_cast<size_t>(q)] + known_gradient(q);
      const torch::Tensor chosen = std::get<1>(owed.abs().topk(2));
      expected.index_add_(0, chosen, owed.index_select(0, chosen));
      residuals[static_cast<size_t>(q)] = owed.index_fill(0, chosen, 0);
    }
    expected /= n;

    engine.before_forward();
    (model->w * known_gradient(comm.rank())).sum().backward();
    engine.finish_backward();
    INFO("step " << step << ": got " << model->w.grad() << ", want " << expected);
    CHECK(torch::allclose(model->w.grad(), expected, 1e-6, 1e-6));
    CHECK(torch::equal(engine.state().at("topk_residual.0"), residuals[static_cast<size_t>(comm.rank())]));
    model->zero_grad(/*set_to_none=*/false);
  }
  // 4 steps of k = 2 (an int32 index and a float32 value each); a ring all-gather sends the
  // other ranks' parts on as well.
  CHECK(engine.stats().bytes_reduced == 4 * 2 * (4 + 4));
  CHECK(engine.stats().bytes_sent == 4 * 2 * (4 + 4) * (n - 1));

  // The residuals are state: what state() gave loads back; anything else is refused.
  const auto saved = engine.state();
  engine.load_state(saved);
  CHECK(torch::equal(engine.state().at("topk_residual.0"), saved.at("topk_residual.0")));
  CHECK_THROWS_AS(engine.load_state({{"bogus", torch::zeros({10})}}), runtime::Error);
  CHECK_THROWS_AS(engine.load_state({{"topk_residual.0", torch::zeros({3})}}), runtime::Error);
}

TEST_CASE("top-k at ratio 1 sends everything: the all-reduce's result", "[compression]") {
  auto& comm = communicator();
  torch::manual_seed(3);
  auto plain = std::make_shared<TinyMlp>(), compressed = std::make_shared<TinyMlp>();
  plain->to(torch::kDouble);
  compressed->to(torch::kDouble);
  ddp::Options options = small_buckets();
  ddp::DistributedDataParallel reference(plain, comm, options);
  copy_weights(*plain, *compressed);
  options.compression = ddp::Options::Compression::topk;
  options.topk_ratio = 1.0;
  ddp::DistributedDataParallel engine(compressed, comm, options);
  at::Generator data = at::make_generator<at::CPUGeneratorImpl>(40 + comm.rank());
  const auto [x, y] = plain->batch(4, data);
  backward_each({{plain.get(), &reference}, {compressed.get(), &engine}}, x.to(torch::kDouble), y);
  std::vector<torch::Tensor> a, b;
  for (const auto& p : compressed->parameters()) a.push_back(p.grad());
  for (const auto& p : plain->parameters()) b.push_back(p.grad());
  CHECK(worst_relative_difference(a, b) <= 1e-12);
  for (const auto& [name, residual] : engine.state()) CHECK(residual.abs().max().item<double>() == 0);
}

TEST_CASE("PowerSGD: a rank-1 gradient comes through exactly, vectors are averaged whole", "[compression]") {
  auto& comm = communicator();
  const int n = comm.size(), r = comm.rank();
  auto model = std::make_shared<MatrixAndVector>();
  ddp::DistributedDataParallel engine(model, comm, powersgd(/*rank=*/1, /*warmup=*/0));
  const torch::Tensor u = torch::arange(1, 9, torch::kFloat), v = torch::arange(-3, 3, torch::kFloat) + 0.5;
  // Rank r's matrix gradient is (1 + r) u v^T, its vector gradient r + (0..5).
  engine.before_forward();
  model->backward((1.0 + r) * torch::outer(u, v), torch::arange(6, torch::kFloat) + r);
  engine.finish_backward();
  const double mean = 1.0 + (n - 1) / 2.0;
  INFO("got " << model->w.grad());
  CHECK(torch::allclose(model->w.grad(), mean * torch::outer(u, v), 1e-5, 1e-5));
  CHECK(torch::allclose(model->b.grad(), torch::arange(6, torch::kFloat) + (n - 1) / 2.0, 1e-6, 1e-6));
  // Each rank keeps its own gradient's distance from the average, and these add up to nothing.
  torch::Tensor residuals = engine.state().at("powersgd_residual.0").clone();
  comm.all_reduce(residuals);
  CHECK(residuals.abs().max().item<double>() <= 1e-4);
  // A rank-1 factor pair of the 8 x 6 matrix: (8 + 6) floats in each of two all-reduces, the
  // vector's 6 in the first.
  CHECK(engine.stats().bytes_reduced == (8 + 6 + 6) * 4);
}

TEST_CASE("PowerSGD keeps what it did not send: residual + result = gradient + previous residual", "[compression]") {
  auto& comm = communicator();
  auto model = std::make_shared<MatrixAndVector>();
  ddp::DistributedDataParallel engine(model, comm, powersgd(/*rank=*/2, /*warmup=*/2));
  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(77 + comm.rank());
  for (int step = 0; step < 5; ++step) {
    const torch::Tensor gw = torch::randn({8, 6}, g), gb = torch::randn({6}, g);
    const torch::Tensor before = engine.state().at("powersgd_residual.0").clone();
    engine.before_forward();
    model->backward(gw, gb);
    engine.finish_backward();
    // The bucket holds b's 6 elements, then w's 48 (reverse registration order).
    const torch::Tensor residual = engine.state().at("powersgd_residual.0");
    const torch::Tensor result = torch::cat({model->b.grad().flatten(), model->w.grad().flatten()});
    const torch::Tensor local = torch::cat({gb, gw.flatten()});
    if (step < 2) {
      // Warm-up: the plain average, nothing kept.
      torch::Tensor average = local.clone();
      comm.all_reduce(average);
      CHECK(torch::allclose(result, average / comm.size(), 1e-6, 1e-6));
      CHECK(residual.abs().max().item<double>() == 0);
    } else {
      INFO("step " << step);
      CHECK(torch::allclose(residual.narrow(0, 6, 48) + result.narrow(0, 6, 48),
                            local.narrow(0, 6, 48) + before.narrow(0, 6, 48), 1e-5, 1e-5));
      CHECK(residual.narrow(0, 0, 6).abs().max().item<double>() == 0);  // the vector is sent whole
      // Rank 2 at most: the result is a low-rank matrix.
      CHECK(torch::linalg_matrix_rank(model->w.grad()).item<int64_t>() <= 2);
    }
    model->zero_grad(/*set_to_none=*/false);
  }
  CHECK(engine.state().at("powersgd_steps").item<int64_t>() == 5);
  const auto saved = engine.state();
  engine.load_state(saved);
  CHECK(torch::equal(engine.state().at("powersgd_q.0"), saved.at("powersgd_q.0")));
  CHECK_THROWS_AS(engine.load_state({{"powersgd_steps", torch::zeros({1}, torch::kLong)}}), runtime::Error);
}

TEST_CASE("settings that do not go together are refused before anything is sent", "[zero][compression]") {
  auto model = std::make_shared<TinyMlp>();
  ddp::Options options;
  options.zero_stage = 2;
  CHECK_THROWS_AS(ddp::DistributedDataParallel(model, communicator(), options), runtime::Error);
  options.zero_stage = 1;
  options.compression = ddp::Options::Compression::topk;
  CHECK_THROWS_AS(ddp::DistributedDataParallel(model, communicator(), options), runtime::Error);
  options.zero_stage = 0;
  options.topk_ratio = 0;
  CHECK_THROWS_AS(ddp::DistributedDataParallel(model, communicator(), options), runtime::Error);
  // The rules are the ddp.* settings' (config::settings()), named by their keys.
  CHECK_THROWS_WITH(ddp::validate(options), Catch::Contains("\"ddp.topk_ratio\" must be a number in (0, 1], got 0.0"));
  options.topk_ratio = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_AS(ddp::validate(options), runtime::Error);
  options.topk_ratio = 0.5;
  options.zero_stage = 1;
  CHECK_THROWS_WITH(ddp::validate(options), Catch::Contains("ddp.compression topk works with ddp.zero_stage 0 only"));
  options.zero_stage = 0;
  CHECK_THROWS_AS(ddp::DistributedDataParallel(model, communicator(), powersgd(0, 0)), runtime::Error);
  ddp::Options narrow = powersgd(1, 0);
  narrow.wire_dtype = at::kBFloat16;
  CHECK_THROWS_AS(ddp::DistributedDataParallel(model, communicator(), narrow), runtime::Error);
}

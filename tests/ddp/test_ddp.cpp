// The DDP engine's central promise and its protocol: N ranks x batch B (x k micro-steps) give the
// same weights as one process with batch N*B (*k); buckets launch during backward, in the same
// order on every rank; no_sync sends nothing; unused parameters and wire formats behave as
// documented; last_bucket_timings says when each bucket's all-reduce ran. Every rank also
// computes the single-process reference itself.
#include <torch/torch.h>
// After torch: c10 defines a CHECK macro of its own that Catch must override.
#include <catch2/catch.hpp>

#include <chrono>
#include <memory>
#include <numeric>
#include <string>

#include "mpitrain/comm/communicator.h"
#include "mpitrain/ddp/ddp.h"
#include "mpitrain/runtime/error.h"
#include "ddp_support.h"
#include "recording_communicator.h"
#include "tiny_models.h"

using namespace mpitrain;
using namespace mpitrain::testing;

namespace {

enum class Opt { sgd, adamw };

std::unique_ptr<torch::optim::Optimizer> make_optimizer(Opt kind, const std::vector<torch::Tensor>& params) {
  if (kind == Opt::sgd)
    return std::make_unique<torch::optim::SGD>(params, torch::optim::SGDOptions(0.05).momentum(0.9));
  return std::make_unique<torch::optim::AdamW>(params, torch::optim::AdamWOptions(1e-2).weight_decay(0.01));
}

torch::Tensor as(const torch::Tensor& x, c10::ScalarType dtype) {
  return at::isFloatingType(x.scalar_type()) ? x.to(dtype) : x;
}

struct Run {
  Opt optimizer = Opt::sgd;
  c10::ScalarType dtype = at::kDouble;
  int accumulation = 1;
  bool set_to_none = true;
  int steps = 10;
  int64_t per_rank_batch = 4;
  /// Samples per rank of each micro-step (one per rank); empty: per_rank_batch each.
  std::vector<int64_t> shares;
  bool cast_model = true;  // false: the model keeps the dtypes it built itself
};

// Trains a DDP replica (rank-dependent initial weights: the broadcast must fix them) and the
// single-process reference side by side; returns the worst relative weight difference.
template <typename Model>
double train_against_reference(const Run& run, ddp::Options options = {}) {
  auto& comm = communicator();
  const int n = comm.size(), r = comm.rank();
  torch::manual_seed(7);
  auto reference = std::make_shared<Model>();
  torch::manual_seed(r == 0 ? 7 : 1000 + r);
  auto model = std::make_shared<Model>();
  if (run.cast_model) {
    reference->to(run.dtype);
    model->to(run.dtype);
  }
  options.first_bucket_bytes = 256;  // several buckets even for tiny models
  options.bucket_bytes = 2048;
  ddp::DistributedDataParallel ddp(model, comm, options);

  auto reference_opt = make_optimizer(run.optimizer, reference->parameters());
  auto opt = make_optimizer(run.optimizer, model->parameters());
  at::Generator data = at::make_generator<at::CPUGeneratorImpl>(1234);
  std::vector<int64_t> shares = run.shares;
  if (shares.empty()) shares.assign(static_cast<size_t>(n), run.per_rank_batch);
  REQUIRE(shares.size() == static_cast<size_t>(n));
  const int64_t global = std::accumulate(shares.begin(), shares.end(), int64_t{0});
  const int64_t offset = std::accumulate(shares.begin(), shares.begin() + r, int64_t{0});
  const int64_t b = shares[static_cast<size_t>(r)];
  // This rank's mean loss weighted by its share of the samples.
  const double divisor = run.accumulation / ddp::sample_weight(b, global, n);
  for (int step = 0; step < run.steps; ++step) {
    for (int micro = 0; micro < run.accumulation; ++micro) {
      auto [x, y] = reference->batch(global, data);  // the global micro-batch, same on every rank
      x = as(x, run.dtype);
      (reference->loss(reference->forward(x), y) / run.accumulation).backward();

      const auto xs = x.narrow(0, offset, b), ys = y.narrow(0, offset, b);
      if (micro + 1 < run.accumulation) {
        auto guard = ddp.no_sync();
        (model->loss(model->forward(xs), ys) / divisor).backward();
      } else {
        ddp.before_forward();
        (model->loss(model->forward(xs), ys) / divisor).backward();
        ddp.finish_backward();
      }
    }
    reference_opt->step();
    opt->step();
    reference_opt->zero_grad(run.set_to_none);
    opt->zero_grad(run.set_to_none);
  }
  return worst_relative_difference(model->parameters(), reference->parameters());
}

template <typename Model>
void check_equivalence(const char* name) {
  for (Opt opt : {Opt::sgd, Opt::adamw}) {
    for (c10::ScalarType dtype : {at::kDouble, at::kFloat}) {
      Run run;
      run.optimizer = opt;
      run.dtype = dtype;
      const double tolerance = dtype == at::kDouble ? 1e-10 : 1e-5;
      const double worst = train_against_reference<Model>(run);
      INFO(name << (opt == Opt::sgd ? " SGD " : " AdamW ") << c10::toString(dtype) << ": worst relative difference "
                << worst);
      CHECK(worst <= tolerance);
    }
  }
}

}  // namespace

TEST_CASE("N ranks x batch B equal one process x batch N*B after 10 steps", "[ddp]") {
  check_equivalence<TinyMlp>("mlp");
  check_equivalence<TinyCnn>("cnn");
  check_equivalence<TinyGpt>("gpt");
}

TEST_CASE("gradient accumulation: N ranks x B x k micro-steps equal one process x N*B*k", "[ddp]") {
  for (Opt opt : {Opt::sgd, Opt::adamw}) {
    Run run;
    run.optimizer = opt;
    run.accumulation = 3;
    run.steps = 5;
    const double mlp = train_against_reference<TinyMlp>(run);
    const double gpt = train_against_reference<TinyGpt>(run);
    INFO("mlp " << mlp << ", gpt " << gpt);
    CHECK(mlp <= 1e-10);
    CHECK(gpt <= 1e-10);
  }
}

TEST_CASE("unequal shares: ranks with different batches, each loss weighted by its share, equal one process", "[ddp][hetero]") {
  const int n = communicator().size();
  // np 2: 3 + 5 = one process x 8; np 4: 1 + 2 + 3 + 6 = one process x 12 (np 1: 7).
  const std::vector<int64_t> shares = n == 2 ? std::vector<int64_t>{3, 5}
                                      : n == 4 ? std::vector<int64_t>{1, 2, 3, 6}
                                               : std::vector<int64_t>(static_cast<size_t>(n), 7);
  CHECK(ddp::sample_weight(3, 8, 2) == 0.75);
  CHECK(ddp::sample_weight(4, 8, 2) == 1.0);
  for (c10::ScalarType dtype : {at::kDouble, at::kFloat}) {
    for (int accumulation : {1, 3}) {
      Run run;
      run.optimizer = Opt::adamw;
      run.dtype = dtype;
      run.accumulation = accumulation;
      run.shares = shares;
      const double tolerance = dtype == at::kDouble ? 1e-10 : 1e-5;
      const double mlp = train_against_reference<TinyMlp>(run);
      const double gpt = train_against_reference<TinyGpt>(run);
      INFO(c10::toString(dtype) << " accumulation " << accumulation << ": mlp " << mlp << ", gpt " << gpt);
      CHECK(mlp <= tolerance);
      CHECK(gpt <= tolerance);
    }
  }
}

TEST_CASE("zero_grad to zero and to none keep hooks and bucket views working", "[ddp]") {
  for (bool set_to_none : {false, true}) {
    Run run;
    run.set_to_none = set_to_none;
    run.steps = 4;
    const double worst = train_against_reference<TinyMlp>(run);
    INFO("set_to_none " << set_to_none << ": " << worst);
    CHECK(worst <= 1e-10);
  }
  // After a synchronised backward, gradients of one bucket are views of one buffer.
  auto model = std::make_shared<TinyMlp>();
  ddp::DistributedDataParallel ddp(model, communicator());
  for (int step = 0; step < 2; ++step) {
    for (auto& p : model->parameters()) p.mutable_grad() = torch::Tensor();  // zero_grad(to none)
    at::Generator g = at::make_generator<at::CPUGeneratorImpl>(5);
    auto [x, y] = model->batch(4, g);
    ddp.before_forward();
    model->loss(model->forward(x), y).backward();
    ddp.finish_backward();
    CHECK(model->fc2->weight.grad().is_alias_of(model->fc2->bias.grad()));
    CHECK(model->head->weight.grad().is_alias_of(model->fc1->weight.grad()));  // one 25 MiB bucket
  }
}

TEST_CASE("no_sync issues no collective; the step after it reduces the accumulation", "[ddp]") {
  RecordingCommunicator recorder(communicator());
  auto model = std::make_shared<TinyMlp>();
  ddp::Options options;
  options.first_bucket_bytes = 256;
  options.bucket_bytes = 2048;
  ddp::DistributedDataParallel ddp(model, recorder, options);
  const size_t buckets = ddp.bucket_layout().size();
  REQUIRE(buckets > 2);
  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(9);
  const size_t before = recorder.calls();
  for (int micro = 0; micro < 3; ++micro) {
    auto guard = ddp.no_sync();
    ddp.before_forward();
    auto [x, y] = model->batch(4, g);
    model->loss(model->forward(x), y).backward();
    ddp.finish_backward();
  }
  CHECK(recorder.calls() == before);
  auto [x, y] = model->batch(4, g);
  ddp.before_forward();
  model->loss(model->forward(x), y).backward();
  ddp.finish_backward();
  CHECK(recorder.calls() == before + buckets);
  CHECK(ddp.stats().synchronised_backwards == 1);
}

TEST_CASE("the first bucket is launched before backward returns, in the same order on every rank", "[ddp]") {
  RecordingCommunicator recorder(communicator());
  auto model = std::make_shared<TinyMlp>(256);
  ddp::Options options;
  options.first_bucket_bytes = 4096;
  options.bucket_bytes = 64 << 10;
  ddp::DistributedDataParallel ddp(model, recorder, options);
  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(11);
  auto [x, y] = model->batch(8, g);
  ddp.before_forward();
  auto loss = model->loss(model->forward(x), y);
  recorder.note("# backward starts");
  loss.backward();
  recorder.note("# backward returned");
  ddp.finish_backward();

  const auto events = recorder.events();
  const auto starts = std::find(events.begin(), events.end(), "# backward starts");
  const auto returned = std::find(events.begin(), events.end(), "# backward returned");
  const auto first_reduce = std::find_if(starts, events.end(), [](const std::string& e) { return e.rfind("all_reduce", 0) == 0; });
  CHECK(first_reduce < returned);
  CHECK(ddp.stats().buckets_launched_during_backward >= 1);

  // Launch order = bucket order: the sizes match the layout, bucket by bucket.
  const auto layout = ddp.bucket_layout();
  std::vector<int64_t> expected;
  for (const auto& bucket : layout) {
    int64_t numel = 0;
    for (const auto& name : bucket) numel += model->named_parameters()[name].numel();
    expected.push_back(numel);
  }
  CHECK(recorder.all_reduce_sizes() == expected);
  // The first bucket holds the last layer: reverse registration order.
  CHECK(layout.front().front() == "head.bias");

  // Every rank recorded the same sequence.
  int64_t signature = 0;
  for (int64_t size : recorder.all_reduce_sizes()) signature = signature * 1000003 + size;
  auto gathered = at::empty({communicator().size()}, at::kLong);
  communicator().all_gather(gathered, at::full({1}, signature, at::kLong));
  CHECK(at::equal(gathered, at::full({communicator().size()}, signature, at::kLong)));
}

TEST_CASE("last_bucket_timings: one entry per bucket, set only while the communicator times", "[ddp]") {
  using Clock = std::chrono::steady_clock;
  auto model = std::make_shared<TinyMlp>(256);
  ddp::Options options;
  options.first_bucket_bytes = 4096;
  options.bucket_bytes = 64 << 10;
  ddp::DistributedDataParallel ddp(model, communicator(), options);
  const size_t buckets = ddp.bucket_layout().size();
  REQUIRE(buckets > 1);
  CHECK(ddp.last_bucket_timings().empty());
  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(13);
  const auto step = [&] {
    auto [x, y] = model->batch(8, g);
    ddp.before_forward();
    model->loss(model->forward(x), y).backward();
    ddp.finish_backward();
  };

  communicator().set_timing(true);
  const auto before = Clock::now();
  step();
  const auto after = Clock::now();
  communicator().set_timing(false);
  const auto timings = ddp.last_bucket_timings();
  REQUIRE(timings.size() == buckets);
  for (size_t b = 0; b < buckets; ++b) {
    INFO("bucket " << b);
    REQUIRE(timings[b].has_value());
    CHECK(before <= timings[b]->started);
    CHECK(timings[b]->started <= timings[b]->completed);
    CHECK(timings[b]->completed <= after);
    if (b > 0) CHECK(timings[b - 1]->started <= timings[b]->started);  // launched in bucket order
  }

  step();
  const auto untimed = ddp.last_bucket_timings();
  REQUIRE(untimed.size() == buckets);
  for (const auto& timing : untimed) CHECK_FALSE(timing.has_value());
}

namespace {

// Half float64, half float32: buckets must split by dtype.
struct MixedModel : TinyModel {
  MixedModel() {
    trunk = register_module("trunk", torch::nn::Linear(12, 16));
    head = register_module("head", torch::nn::Linear(16, 5));
    trunk->to(at::kDouble);
  }
  torch::Tensor forward(const torch::Tensor& x) override {
    return head(torch::relu(trunk(x.to(at::kDouble))).to(at::kFloat));
  }
  std::pair<torch::Tensor, torch::Tensor> batch(int64_t n, at::Generator& g) const override {
    return {at::randn({n, 12}, g, at::kFloat), at::randint(5, {n}, g, at::kLong)};
  }
  torch::nn::Linear trunk{nullptr}, head{nullptr};
};

}  // namespace

TEST_CASE("buffers come from rank 0 in one broadcast per dtype, not one per buffer", "[ddp]") {
  struct Normed : torch::nn::Module {
    Normed() {
      fc = register_module("fc", torch::nn::Linear(4, 6));
      first = register_module("first", torch::nn::BatchNorm1d(6));
      second = register_module("second", torch::nn::BatchNorm1d(6));
    }
    torch::nn::Linear fc{nullptr};
    torch::nn::BatchNorm1d first{nullptr}, second{nullptr};
  };
  RecordingCommunicator recorder(communicator());
  auto model = std::make_shared<Normed>();
  ddp::DistributedDataParallel ddp(model, recorder);
  // Each rank's statistics drift apart, as training on different samples makes them.
  {
    torch::NoGradGuard no_grad;
    for (auto& buffer : model->buffers()) buffer.fill_(world().rank() + 1);
  }
  const std::size_t before = recorder.events().size();
  ddp.before_forward();
  const std::vector<std::string> events = recorder.events();
  // In dtype order: the batch counters (2 x 1 int64), then running means and variances (4 x 6 float32).
  CHECK(std::vector<std::string>(events.begin() + static_cast<std::ptrdiff_t>(before), events.end()) ==
        std::vector<std::string>{"broadcast 2", "broadcast 24"});
  for (const auto& buffer : model->buffers()) CHECK(torch::equal(buffer, torch::ones_like(buffer)));
  {
    auto guard = ddp.no_sync();
    ddp.before_forward();  // nothing inside no_sync
  }
  CHECK(recorder.events().size() == events.size());
}

TEST_CASE("parameters of mixed dtypes: buckets split by dtype, result still the reference", "[ddp]") {
  Run run;
  run.dtype = at::kFloat;
  run.cast_model = false;
  const double worst = train_against_reference<MixedModel>(run);
  INFO(worst);
  CHECK(worst <= 1e-5);

  auto model = std::make_shared<MixedModel>();
  ddp::Options options;
  options.first_bucket_bytes = 1 << 20;
  ddp::DistributedDataParallel ddp(model, communicator(), options);
  for (const auto& bucket : ddp.bucket_layout()) {
    const auto dtype = model->named_parameters()[bucket.front()].scalar_type();
    for (const auto& name : bucket) CHECK(model->named_parameters()[name].scalar_type() == dtype);
  }
  CHECK(ddp.bucket_layout().size() == 2);
}

namespace {

// Two heads; a rank uses one of them, so the other gets no gradient there.
struct TwoHeads : torch::nn::Module {
  TwoHeads() {
    trunk = register_module("trunk", torch::nn::Linear(6, 8));
    head_a = register_module("head_a", torch::nn::Linear(8, 3));
    head_b = register_module("head_b", torch::nn::Linear(8, 3));
  }
  torch::Tensor forward(const torch::Tensor& x, bool use_a) {
    auto h = torch::relu(trunk(x));
    return use_a ? head_a(h) : head_b(h);
  }
  torch::nn::Linear trunk{nullptr}, head_a{nullptr}, head_b{nullptr};
};

}  // namespace

TEST_CASE("an unused parameter is a clear error by default", "[ddp]") {
  auto model = std::make_shared<TwoHeads>();
  model->to(at::kDouble);
  ddp::DistributedDataParallel ddp(model, communicator());
  auto x = at::randn({4, 6}, at::kDouble);
  model->forward(x, /*use_a=*/true).sum().backward();
  CHECK_THROWS_WITH(ddp.finish_backward(), Catch::Contains("'head_b.weight', 'head_b.bias'") &&
                                               Catch::Contains("ddp.find_unused_parameters = true"));
}

TEST_CASE("with find_unused_parameters, ranks using different parameters get the exact average", "[ddp]") {
  auto& comm = communicator();
  const int n = comm.size(), r = comm.rank();
  torch::manual_seed(3);
  auto reference = std::make_shared<TwoHeads>();
  reference->to(at::kDouble);
  auto model = std::make_shared<TwoHeads>();
  model->to(at::kDouble);
  ddp::Options options;
  options.find_unused_parameters = true;
  options.first_bucket_bytes = 64;
  ddp::DistributedDataParallel ddp(model, comm, options);
  // Copy after the broadcast so that the reference starts where rank 0 does.
  {
    torch::NoGradGuard no_grad;
    for (size_t i = 0; i < model->parameters().size(); ++i) reference->parameters()[i].copy_(model->parameters()[i]);
  }
  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(21);
  const auto x = at::randn({n * 4, 6}, g, at::kDouble);
  for (int q = 0; q < n; ++q) (reference->forward(x.narrow(0, q * 4, 4), q % 2 == 0).pow(2).mean() / n).backward();

  ddp.before_forward();
  model->forward(x.narrow(0, r * 4, 4), r % 2 == 0).pow(2).mean().backward();
  ddp.finish_backward();
  std::vector<torch::Tensor> mine, want;
  for (size_t i = 0; i < model->parameters().size(); ++i) {
    mine.push_back(model->parameters()[i].grad());
    const auto& reference_grad = reference->parameters()[i].grad();
    want.push_back(reference_grad.defined() ? reference_grad : at::zeros_like(mine.back()));
  }
  for (size_t i = 0; i < mine.size(); ++i) {
    INFO("parameter " << i);
    CHECK(at::allclose(mine[i], want[i], 1e-12, 1e-14));
  }
}

TEST_CASE("bf16 and fp16 wire formats stay within their precision of fp32", "[ddp]") {
  auto gradients = [](std::optional<c10::ScalarType> wire) {
    torch::manual_seed(5);
    auto model = std::make_shared<TinyMlp>(64);
    ddp::Options options;
    options.wire_dtype = wire;
    ddp::DistributedDataParallel ddp(model, communicator(), options);
    at::Generator g = at::make_generator<at::CPUGeneratorImpl>(100 + communicator().rank());
    auto [x, y] = model->batch(16, g);
    ddp.before_forward();
    model->loss(model->forward(x), y).backward();
    ddp.finish_backward();
    std::vector<torch::Tensor> grads;
    for (auto& p : model->parameters()) grads.push_back(p.grad().clone());
    return grads;
  };
  const auto exact = gradients(std::nullopt);
  const double bf16 = worst_relative_difference(gradients(at::kBFloat16), exact);
  const double fp16 = worst_relative_difference(gradients(at::kHalf), exact);
  INFO("bf16 " << bf16 << ", fp16 " << fp16);
  // One rounding into the wire format plus one per combining step.
  CHECK(bf16 <= (1.0 / 256) * (communicator().size() + 1) * 2);
  CHECK(fp16 <= (1.0 / 2048) * (communicator().size() + 1) * 2);
  CHECK(bf16 > 0);  // the cast really happened
}

TEST_CASE("an fp16 wire averages gradients near fp16's largest value", "[ddp]") {
  // Loss-scaled fp16 training keeps gradients about as large as fp16 allows. The same batch on
  // every rank: each rank's gradient peaks at 40000, which summed over 2 or more ranks before
  // the division would overflow fp16 (65504).
  auto gradients = [](std::optional<c10::ScalarType> wire, double scale) {
    torch::manual_seed(5);
    auto model = std::make_shared<TinyMlp>(64);
    ddp::Options options;
    options.wire_dtype = wire;
    ddp::DistributedDataParallel ddp(model, communicator(), options);
    at::Generator g = at::make_generator<at::CPUGeneratorImpl>(100);
    auto [x, y] = model->batch(16, g);
    ddp.before_forward();
    (model->loss(model->forward(x), y) * scale).backward();
    ddp.finish_backward();
    std::vector<torch::Tensor> grads;
    for (auto& p : model->parameters()) grads.push_back(p.grad().clone());
    return grads;
  };
  double largest = 0;
  for (const auto& g : gradients(std::nullopt, 1.0)) largest = std::max(largest, g.abs().max().item<double>());
  const double scale = 40000 / largest;
  const auto exact = gradients(std::nullopt, scale);
  const auto wired = gradients(at::kHalf, scale);
  for (const auto& g : wired) CHECK(at::isfinite(g).all().item<bool>());
  CHECK(worst_relative_difference(wired, exact) <= (1.0 / 2048) * (communicator().size() + 1) * 2);
}

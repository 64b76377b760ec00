// Optimizer parameter groups, learning-rate schedules at chosen steps, and clipping by global
// norm against a hand computation.
#include <torch/torch.h>
// After torch: c10 defines a CHECK macro of its own that Catch must override.
#include <catch2/catch.hpp>

#include "mpitrain/runtime/error.h"
#include "mpitrain/train/optim.h"

using namespace mpitrain;

namespace {

struct Net : torch::nn::Module {
  Net() {
    fc = register_module("fc", torch::nn::Linear(3, 2));
    norm = register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({2})));
  }
  torch::nn::Linear fc{nullptr};
  torch::nn::LayerNorm norm{nullptr};
};

config::OptimizerConfig optimizer_config(const std::string& name) {
  config::OptimizerConfig c;
  c.name = name;
  c.lr = 0.1;
  c.momentum = 0.9;
  c.betas = {0.9, 0.95};
  c.eps = 1e-8;
  c.weight_decay = 0.5;
  return c;
}

}  // namespace

TEST_CASE("weight decay applies to matrices only, not to biases and norm weights", "[train]") {
  for (const std::string name : {"sgd", "adamw"}) {
    Net net;
    auto optimizer = train::make_optimizer(optimizer_config(name), net);
    REQUIRE(optimizer->param_groups().size() == 2);
    const auto& decay = optimizer->param_groups()[0];
    const auto& no_decay = optimizer->param_groups()[1];
    REQUIRE(decay.params().size() == 1);
    CHECK(decay.params()[0].is_same(net.fc->weight));
    CHECK(no_decay.params().size() == 3);  // fc.bias, norm.weight, norm.bias
    if (name == "sgd") {
      CHECK(static_cast<const torch::optim::SGDOptions&>(decay.options()).weight_decay() == 0.5);
      CHECK(static_cast<const torch::optim::SGDOptions&>(no_decay.options()).weight_decay() == 0.0);
      CHECK(static_cast<const torch::optim::SGDOptions&>(no_decay.options()).momentum() == 0.9);
    } else {
      CHECK(static_cast<const torch::optim::AdamWOptions&>(decay.options()).weight_decay() == 0.5);
      CHECK(static_cast<const torch::optim::AdamWOptions&>(no_decay.options()).weight_decay() == 0.0);
      CHECK(std::get<1>(static_cast<const torch::optim::AdamWOptions&>(no_decay.options()).betas()) == 0.95);
    }
    train::set_learning_rate(*optimizer, 0.25);
    for (auto& group : optimizer->param_groups()) CHECK(group.options().get_lr() == 0.25);
  }
  auto bad = optimizer_config("sgd");
  bad.momentum = 0;
  bad.nesterov = true;
  Net net;
  CHECK_THROWS_WITH(train::make_optimizer(bad, net), Catch::Contains("optimizer.momentum > 0"));
}

TEST_CASE("schedules: warm-up, then constant, cosine or linear to the floor", "[train]") {
  config::ScheduleConfig s;
  s.warmup_steps = 10;
  s.min_lr_ratio = 0.1;
  const double lr = 1.0;
  for (const std::string name : {"constant", "cosine", "linear"}) {
    s.name = name;
    CHECK(train::learning_rate(s, lr, 0, 110) == Approx(0.1));
    CHECK(train::learning_rate(s, lr, 4, 110) == Approx(0.5));
    CHECK(train::learning_rate(s, lr, 9, 110) == Approx(1.0));
    CHECK(train::learning_rate(s, lr, 10, 110) == Approx(1.0));
  }
  s.name = "constant";
  CHECK(train::learning_rate(s, lr, 100, 110) == Approx(1.0));
  s.name = "cosine";  // halfway through the decay: the midpoint of lr and floor
  CHECK(train::learning_rate(s, lr, 60, 110) == Approx(0.55));
  CHECK(train::learning_rate(s, lr, 110, 110) == Approx(0.1));
  CHECK(train::learning_rate(s, lr, 500, 110) == Approx(0.1));
  s.name = "linear";
  CHECK(train::learning_rate(s, lr, 35, 110) == Approx(1.0 - 0.9 * 0.25));
  CHECK(train::learning_rate(s, lr, 110, 110) == Approx(0.1));
}

TEST_CASE("clipping by global norm matches a hand computation", "[train]") {
  auto a = torch::zeros({2}, torch::requires_grad());
  auto b = torch::zeros({1}, torch::requires_grad());
  a.mutable_grad() = torch::tensor({3.0f, 0.0f});
  b.mutable_grad() = torch::tensor({4.0f});  // global norm 5
  const double norm = torch::nn::utils::clip_grad_norm_(std::vector<torch::Tensor>{a, b}, 1.0);
  CHECK(norm == Approx(5.0));
  CHECK(a.grad()[0].item<float>() == Approx(0.6f).epsilon(1e-5));
  CHECK(b.grad()[0].item<float>() == Approx(0.8f).epsilon(1e-5));
}

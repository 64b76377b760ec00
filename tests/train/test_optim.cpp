// Optimizer parameter groups, the fused AdamW against LibTorch's (and its skip of a non-finite
// step on the device), learning-rate schedules at
// chosen steps, and clipping by global norm against a hand computation.
#include <torch/torch.h>
// After torch: c10 defines a CHECK macro of its own that Catch must override.
#include <catch2/catch.hpp>

#include "mpitrain/runtime/error.h"
#include "mpitrain/runtime/host_read.h"
#include "mpitrain/train/optim.h"

using namespace mpitrain;

namespace {

struct Net : torch::nn::Module {
  Net() {
    fc = register_module("fc", torch::nn::Linear(3, 4));
    norm = register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({4})));
  }
  torch::nn::Linear fc{nullptr};
  torch::nn::LayerNorm norm{nullptr};
};

config::OptimizerConfig optimizer_config(const std::string& name) {
  config::OptimizerConfig c;
  c.name = config::parse_word<config::OptimizerName>(name).value();
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
    auto optimizer = train::make_optimizer(optimizer_config(name), net, torch::kCPU);
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
  CHECK_THROWS_WITH(train::make_optimizer(bad, net, torch::kCPU), Catch::Contains("optimizer.momentum > 0"));
}

TEST_CASE("optimizer.decay all: every parameter decays, biases and norm weights too", "[train]") {
  Net net;
  auto config = optimizer_config("sgd");
  config.momentum = 0;
  config.decay = config::Decay::all;
  auto optimizer = train::make_optimizer(config, net, torch::kCPU);
  REQUIRE(optimizer->param_groups()[0].params().size() == 4);
  CHECK(optimizer->param_groups()[1].params().empty());
  std::vector<at::Tensor> before;
  for (const auto& p : net.parameters()) {
    before.push_back(p.detach().clone());
    p.mutable_grad() = at::zeros_like(p);
  }
  optimizer->step();
  // With a zero gradient, SGD's L2 penalty alone moves p to p - lr * weight_decay * p.
  std::size_t i = 0;
  for (const auto& p : net.parameters()) CHECK(at::allclose(p.detach(), before[i++] * (1 - 0.1 * 0.5)));
}

TEST_CASE("fused AdamW: auto means GPUs only; equals torch::optim::AdamW; same checkpoints", "[train]") {
  auto config = optimizer_config("adamw");
  config.fused = config::Fused::automatic;
  CHECK_FALSE(train::use_fused_adamw(config, torch::kCPU));
  CHECK(train::use_fused_adamw(config, c10::Device(torch::kCUDA, 0)));
  config.fused = config::Fused::off;
  CHECK_FALSE(train::use_fused_adamw(config, c10::Device(torch::kCUDA, 0)));
  config.fused = config::Fused::on;
  CHECK(train::use_fused_adamw(config, torch::kCPU));  // LibTorch has a CPU kernel too
  CHECK_FALSE(train::use_fused_adamw(optimizer_config("sgd"), torch::kCPU));

  auto plain_config = config;
  plain_config.fused = config::Fused::off;
  torch::manual_seed(3);
  Net fused_net;
  Net plain_net;
  for (std::size_t i = 0; i < fused_net.parameters().size(); ++i) {
    torch::NoGradGuard no_grad;
    plain_net.parameters()[i].copy_(fused_net.parameters()[i]);
  }
  auto fused = train::make_optimizer(config, fused_net, torch::kCPU);
  auto plain = train::make_optimizer(plain_config, plain_net, torch::kCPU);
  CHECK(dynamic_cast<torch::optim::AdamW*>(fused.get()) != nullptr);
  const auto run_steps = [&](int steps, torch::optim::Optimizer& a, Net& net_a, torch::optim::Optimizer& b, Net& net_b) {
    for (int step = 0; step < steps; ++step) {
      const auto input = torch::randn({4, 3});
      const auto target = torch::randn({4, 4});
      for (auto [optimizer, net] : {std::pair{&a, &net_a}, std::pair{&b, &net_b}}) {
        optimizer->zero_grad();
        (net->norm->forward(net->fc->forward(input)) - target).pow(2).sum().backward();
        optimizer->step();
      }
    }
  };
  run_steps(20, *fused, fused_net, *plain, plain_net);
  for (std::size_t i = 0; i < fused_net.parameters().size(); ++i) {
    INFO("parameter " << i << ": max difference " << (fused_net.parameters()[i] - plain_net.parameters()[i]).abs().max().item<float>()
                       << " of " << plain_net.parameters()[i].abs().max().item<float>());
    CHECK(torch::allclose(fused_net.parameters()[i], plain_net.parameters()[i], /*rtol=*/1e-5, /*atol=*/1e-6));
  }

  // The fused optimizer's state, saved, continues in the plain one as in itself.
  std::stringstream saved;
  torch::save(*fused, saved);
  auto plain_from_fused = train::make_optimizer(plain_config, fused_net, torch::kCPU);
  torch::load(*plain_from_fused, saved);
  const auto& state = static_cast<const torch::optim::AdamWParamState&>(
      *plain_from_fused->state().at(fused_net.fc->weight.unsafeGetTensorImpl()));
  CHECK(state.step() == 20);
  run_steps(5, *plain_from_fused, fused_net, *plain, plain_net);
  for (std::size_t i = 0; i < fused_net.parameters().size(); ++i)
    CHECK(torch::allclose(fused_net.parameters()[i], plain_net.parameters()[i], 1e-5, 1e-6));
}

TEST_CASE("a non-finite step is skipped: fused AdamW on the device without a host read, others after one", "[train]") {
  auto fused_config = optimizer_config("adamw");
  fused_config.fused = config::Fused::on;
  auto plain_config = fused_config;
  plain_config.fused = config::Fused::off;
  torch::manual_seed(4);
  Net fused_net;
  Net plain_net;
  for (std::size_t i = 0; i < fused_net.parameters().size(); ++i) {
    torch::NoGradGuard no_grad;
    plain_net.parameters()[i].copy_(fused_net.parameters()[i]);
  }
  auto fused = train::make_optimizer(fused_config, fused_net, torch::kCPU);
  auto plain = train::make_optimizer(plain_config, plain_net, torch::kCPU);
  CHECK(train::skips_on_device(*fused));
  CHECK_FALSE(train::skips_on_device(*plain));
  const auto weights = [](Net& net) {
    std::vector<torch::Tensor> copies;
    for (const auto& p : net.parameters()) copies.push_back(p.detach().clone());
    return copies;
  };
  // One step of both on the same batch, with the flag given; returns each optimizer's host reads.
  const auto step = [&](float flag) {
    const auto input = torch::randn({4, 3});
    const auto target = torch::randn({4, 4});
    std::vector<std::int64_t> reads;
    for (auto [optimizer, net] : {std::pair{fused.get(), &fused_net}, std::pair{plain.get(), &plain_net}}) {
      optimizer->zero_grad();
      (net->norm->forward(net->fc->forward(input)) - target).pow(2).sum().backward();
      const std::int64_t before = runtime::host_reads();
      train::step_unless_nonfinite(*optimizer, torch::full({1}, flag));
      reads.push_back(runtime::host_reads() - before);
    }
    return reads;
  };
  CHECK(step(0) == std::vector<std::int64_t>{0, 1});
  const auto fused_before = weights(fused_net), plain_before = weights(plain_net);
  CHECK(step(1) == std::vector<std::int64_t>{0, 1});
  for (std::size_t i = 0; i < fused_before.size(); ++i) {
    CHECK(torch::equal(fused_net.parameters()[i], fused_before[i]));
    CHECK(torch::equal(plain_net.parameters()[i], plain_before[i]));
  }
  // The skipped step does not count: bias correction at t = 2, as in the plain optimizer.
  step(0);
  for (std::size_t i = 0; i < fused_net.parameters().size(); ++i)
    CHECK(torch::allclose(fused_net.parameters()[i], plain_net.parameters()[i], 1e-5, 1e-6));
  train::sync_optimizer_state(*fused);
  for (const auto* optimizer : {fused.get(), plain.get()})
    CHECK(static_cast<const torch::optim::AdamWParamState&>(
              *optimizer->state().at((optimizer == fused.get() ? fused_net : plain_net).fc->weight.unsafeGetTensorImpl()))
              .step() == 2);
}

TEST_CASE("schedules: warm-up, then constant, cosine or linear to the floor", "[train]") {
  config::ScheduleConfig s;
  s.warmup_steps = 10;
  s.min_lr_ratio = 0.1;
  const double lr = 1.0;
  for (const config::ScheduleName name :
       {config::ScheduleName::constant, config::ScheduleName::cosine, config::ScheduleName::linear}) {
    s.name = name;
    CHECK(train::learning_rate(s, lr, 0, 110) == Approx(0.1));
    CHECK(train::learning_rate(s, lr, 4, 110) == Approx(0.5));
    CHECK(train::learning_rate(s, lr, 9, 110) == Approx(1.0));
    CHECK(train::learning_rate(s, lr, 10, 110) == Approx(1.0));
  }
  s.name = config::ScheduleName::constant;
  CHECK(train::learning_rate(s, lr, 100, 110) == Approx(1.0));
  s.name = config::ScheduleName::cosine;  // halfway through the decay: the midpoint of lr and floor
  CHECK(train::learning_rate(s, lr, 60, 110) == Approx(0.55));
  CHECK(train::learning_rate(s, lr, 110, 110) == Approx(0.1));
  CHECK(train::learning_rate(s, lr, 500, 110) == Approx(0.1));
  s.name = config::ScheduleName::linear;
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

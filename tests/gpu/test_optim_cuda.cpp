// The fused AdamW (optimizer.fused, LibTorch's _fused_adamw_ kernel) on a GPU steps like
// torch::optim::AdamW: the same gradients, 30 steps, both parameter groups (decayed matrices
// and embeddings, undecayed biases and norms).
#include <torch/torch.h>
// After torch: c10 defines a CHECK macro of its own that Catch must override.
#include <catch2/catch.hpp>

#include "gpu_support.h"
#include "mpitrain/train/optim.h"
#include "tiny_models.h"

using namespace mpitrain;
using namespace mpitrain::testing;

TEST_CASE("fused AdamW on CUDA equals torch::optim::AdamW", "[optim]") {
  config::OptimizerConfig config;
  config.name = config::OptimizerName::adamw;
  config.lr = 0.01;
  config.betas = {0.9, 0.95};
  config.eps = 1e-8;
  config.weight_decay = 0.1;
  config.fused = config::Fused::automatic;
  REQUIRE(train::use_fused_adamw(config, gpu()));
  auto plain_config = config;
  plain_config.fused = config::Fused::off;

  torch::manual_seed(3);
  TinyGpt fused_net;
  torch::manual_seed(3);
  TinyGpt plain_net;
  fused_net.to(gpu());
  plain_net.to(gpu());
  auto fused = train::make_optimizer(config, fused_net, gpu());
  auto plain = train::make_optimizer(plain_config, plain_net, gpu());
  const auto fused_params = fused_net.parameters(), plain_params = plain_net.parameters();

  at::Generator data = at::make_generator<at::CPUGeneratorImpl>(21);
  for (int step = 0; step < 30; ++step) {
    // One gradient for both: the comparison is of the optimizers alone.
    const auto [x, y] = plain_net.batch(16, data);
    plain->zero_grad();
    plain_net.loss(plain_net.forward(x.to(gpu())), y.to(gpu())).backward();
    for (std::size_t i = 0; i < plain_params.size(); ++i) fused_params[i].mutable_grad() = plain_params[i].grad().clone();
    plain->step();
    fused->step();
  }
  for (std::size_t i = 0; i < plain_params.size(); ++i) {
    INFO("parameter " << i << ": max difference " << (fused_params[i] - plain_params[i]).abs().max().item<float>()
                      << " of " << plain_params[i].abs().max().item<float>());
    CHECK(fused_params[i].device() == gpu());
    CHECK(torch::allclose(fused_params[i], plain_params[i], /*rtol=*/1e-5, /*atol=*/1e-6));
  }
  // Both keep AdamW's state: the step count and moments of every parameter, on the GPU. The
  // fused one counts steps on the device; its state() has them after sync_optimizer_state.
  train::sync_optimizer_state(*fused);
  for (std::size_t i = 0; i < fused_params.size(); ++i) {
    const auto& state =
        static_cast<const torch::optim::AdamWParamState&>(*fused->state().at(fused_params[i].unsafeGetTensorImpl()));
    CHECK(state.step() == 30);
    CHECK(state.exp_avg().device() == gpu());
  }
}

// Mixed precision on a GPU: bf16 autocast computes what an explicit bf16 computation gives;
// fp16 with the loss scaler skips a step whose gradients overflowed, leaving every weight as it
// was, and backs the scale off (both for an overflow of the scaled loss itself and for an inf
// put into one gradient).
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/cuda/CUDAContext.h>
#include <torch/torch.h>
// After torch: c10 defines a CHECK macro of its own that Catch must override.
#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <vector>

#include "gpu_support.h"
#include "mpitrain/amp/amp.h"
#include "mpitrain/train/optim.h"
#include "tiny_models.h"

using namespace mpitrain;
using namespace mpitrain::testing;

namespace {

std::vector<at::Tensor> snapshot(const std::vector<at::Tensor>& tensors) {
  std::vector<at::Tensor> out;
  for (const auto& t : tensors) out.push_back(t.detach().clone());
  return out;
}

bool all_equal(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  for (std::size_t i = 0; i < a.size(); ++i)
    if (!at::equal(a[i], b[i])) return false;
  return true;
}

std::vector<at::Tensor> gradients(torch::nn::Module& module) {
  std::vector<at::Tensor> grads;
  for (const auto& p : module.parameters()) grads.push_back(p.grad());
  return grads;
}

}  // namespace

TEST_CASE("AMP on CUDA: auto is bf16 from compute capability 8.0; bf16 autocast equals explicit bf16", "[amp]") {
  const auto* properties = at::cuda::getDeviceProperties(gpu().index());
  CHECK(amp::resolve_precision("auto", gpu()) == (properties->major >= 8 ? amp::Precision::bf16 : amp::Precision::fp16));
  if (properties->major < 8) {
    WARN("compute capability " << properties->major << "." << properties->minor << ": no bf16 tensor cores, bf16 part not run");
    return;
  }
  const auto cuda = at::TensorOptions().device(gpu());
  const at::Tensor a = at::randn({64, 96}, cuda), b = at::randn({96, 32}, cuda);
  at::Tensor inside;
  {
    amp::AutocastScope scope(gpu(), amp::Precision::bf16);
    CHECK(at::autocast::is_autocast_enabled(c10::kCUDA));
    inside = at::mm(a, b);
    {
      amp::AutocastScope fp32(gpu(), amp::Precision::fp32);  // leaves autocast as it is
      CHECK(at::mm(a, b).scalar_type() == at::kBFloat16);
    }
  }
  CHECK(inside.scalar_type() == at::kBFloat16);
  CHECK(at::equal(inside, at::mm(a.to(at::kBFloat16), b.to(at::kBFloat16))));
  CHECK_FALSE(at::autocast::is_autocast_enabled(c10::kCUDA));
  CHECK(at::mm(a, b).scalar_type() == at::kFloat);

  // A model's forward and backward in bf16: float32 weights and gradients, a loss close to fp32's.
  torch::manual_seed(5);
  TinyMlp model;
  model.to(gpu());
  at::Generator data = at::make_generator<at::CPUGeneratorImpl>(9);
  auto [x, y] = model.batch(64, data);
  x = x.to(gpu());
  y = y.to(gpu());
  const at::Tensor fp32_loss = model.loss(model.forward(x), y);
  at::Tensor loss;
  {
    amp::AutocastScope scope(gpu(), amp::Precision::bf16);
    const at::Tensor logits = model.forward(x);
    CHECK(logits.scalar_type() == at::kBFloat16);
    loss = model.loss(logits.to(at::kFloat), y);
  }
  loss.backward();
  for (const auto& p : model.parameters()) {
    CHECK(p.grad().scalar_type() == at::kFloat);
    CHECK(p.grad().isfinite().all().item<bool>());
  }
  INFO("bf16 loss " << loss.item<double>() << ", fp32 loss " << fp32_loss.item<double>());
  CHECK(std::abs(loss.item<double>() - fp32_loss.item<double>()) <= 0.02 * fp32_loss.item<double>());
}

TEST_CASE("AMP on CUDA: fp16 with the loss scaler skips overflowing steps and backs the scale off", "[amp]") {
  auto& comm = nccl();
  torch::manual_seed(6);
  TinyMlp model;
  model.to(gpu());
  torch::optim::SGD optimizer(model.parameters(), torch::optim::SGDOptions(0.1));
  at::Generator data = at::make_generator<at::CPUGeneratorImpl>(10);

  // One step as the trainer takes it; returns whether it was taken.
  const auto step = [&](amp::LossScaler& scaler, bool inject_inf) {
    auto [x, y] = model.batch(32, data);
    at::Tensor loss;
    {
      amp::AutocastScope scope(gpu(), amp::Precision::fp16);
      loss = model.loss(model.forward(x.to(gpu())).to(at::kFloat), y.to(gpu()));
    }
    scaler.scale(loss).backward();
    if (inject_inf) model.fc2->weight.grad()[3][1] = std::numeric_limits<float>::infinity();
    const at::Tensor found_inf = scaler.unscale_and_check(gradients(model), comm);
    CHECK(found_inf.is_cuda());
    train::step_unless_nonfinite(optimizer, found_inf);
    scaler.update(found_inf);
    optimizer.zero_grad();
    return found_inf.item<float>() == 0.0f;
  };

  amp::ScalerOptions options;
  options.growth_interval = 2;
  amp::LossScaler scaler(true, gpu(), options);
  REQUIRE(scaler.current_scale() == 65536.0);
  // A clean step is taken and its gradients were unscaled: weights move, by a sane amount.
  auto before = snapshot(model.parameters());
  REQUIRE(step(scaler, false));
  CHECK_FALSE(all_equal(before, model.parameters()));
  for (std::size_t i = 0; i < before.size(); ++i) CHECK((model.parameters()[i] - before[i]).abs().max().item<double>() < 1.0);
  CHECK(scaler.current_scale() == 65536.0);

  // An inf in one gradient: the step is skipped, nothing moves, the scale halves.
  before = snapshot(model.parameters());
  CHECK_FALSE(step(scaler, true));
  CHECK(all_equal(before, model.parameters()));
  CHECK(scaler.current_scale() == 32768.0);

  // growth_interval clean steps in a row double it again.
  CHECK(step(scaler, false));
  CHECK(step(scaler, false));
  CHECK(scaler.current_scale() == 65536.0);

  // A real overflow: at scale 2^100 the fp16 backward overflows. Skipped, and backed off.
  options.init_scale = std::ldexp(1.0, 100);
  amp::LossScaler huge(true, gpu(), options);
  before = snapshot(model.parameters());
  CHECK_FALSE(step(huge, false));
  CHECK(all_equal(before, model.parameters()));
  CHECK(huge.current_scale() == std::ldexp(1.0, 99));
}

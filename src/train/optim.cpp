#include "mpitrain/train/optim.h"

#include <ATen/ops/_foreach_add.h>
#include <ATen/ops/_foreach_sub.h>
#include <ATen/ops/_fused_adamw.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros_like.h>
#include <torch/optim/adamw.h>
#include <torch/optim/sgd.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "mpitrain/runtime/error.h"
#include "mpitrain/runtime/host_read.h"

namespace mpitrain::train {
namespace {

// AdamW whose update runs in LibTorch's fused multi-tensor kernel (one launch per group on a
// GPU instead of about ten per parameter). The state is torch::optim::AdamW's own
// (AdamWParamState), so checkpoints are the same and either class can load the other's.
//
// A step can be skipped on the device: given the found-inf flag, the kernel leaves parameters
// and moments alone when it is 1, and the step counts (the bias correction's t) live on the
// device as float32 tensors that grow by 1 - found_inf. The host's AdamWParamState::step() is
// brought up to date by sync_steps() (a host read), which save() and sync_optimizer_state() call.
class FusedAdamW : public torch::optim::AdamW {
 public:
  using torch::optim::AdamW::AdamW;

  torch::Tensor step(LossClosure closure) override {
    torch::Tensor loss;
    if (closure) {
      at::AutoGradMode enable_grad(true);
      loss = closure();
    }
    step_unless(at::Tensor());
    return loss;
  }

  // One update, skipped where `found_inf` (undefined: never) is 1.
  void step_unless(const at::Tensor& found_inf) {
    at::NoGradGuard no_grad;
    for (auto& group : param_groups()) {
      const auto& options = static_cast<const torch::optim::AdamWOptions&>(group.options());
      // The kernel takes tensors of one device and dtype per call.
      std::map<std::tuple<DeviceKey, at::ScalarType>, Lists> calls;
      for (auto& parameter : group.params()) {
        if (!parameter.grad().defined()) continue;
        auto& state = state_of(parameter);
        const DeviceKey device{static_cast<int>(parameter.device().type()), parameter.device().index()};
        Lists& lists = calls[{device, parameter.scalar_type()}];
        lists.parameters.push_back(parameter);
        lists.grads.push_back(parameter.grad());
        lists.exp_avgs.push_back(state.exp_avg());
        lists.exp_avg_sqs.push_back(state.exp_avg_sq());
        lists.steps.push_back(device_step(parameter, state));
      }
      const auto [beta1, beta2] = options.betas();
      for (auto& [key, lists] : calls) {
        at::_foreach_add_(lists.steps, 1);
        std::optional<at::Tensor> flag;
        if (found_inf.defined()) flag = found_inf.to(lists.parameters.front().device()).reshape({});
        at::_fused_adamw_(lists.parameters, lists.grads, lists.exp_avgs, lists.exp_avg_sqs, /*max_exp_avg_sqs=*/{},
                          lists.steps, options.lr(), beta1, beta2, options.weight_decay(), options.eps(),
                          /*amsgrad=*/false, /*maximize=*/false, /*grad_scale=*/std::nullopt, flag);
        // A skipped step does not count (as in torch.optim's fused path).
        if (flag) at::_foreach_sub_(lists.steps, std::vector<at::Tensor>(lists.steps.size(), *flag));
      }
    }
  }

  // Writes the device's step counts into the host state.
  void sync_steps() {
    for (auto& [impl, counted] : device_steps_) {
      const auto found = state().find(impl);
      if (found == state().end() || found->second.get() != counted.state) continue;
      auto& state = static_cast<torch::optim::AdamWParamState&>(*found->second);
      state.step(static_cast<std::int64_t>(runtime::read_scalar<float>(counted.steps)));
      counted.host_step = state.step();
    }
  }

  void save(torch::serialize::OutputArchive& archive) const override {
    const_cast<FusedAdamW*>(this)->sync_steps();
    torch::optim::AdamW::save(archive);
  }

 private:
  using DeviceKey = std::pair<int, int>;  // c10::Device has no ordering
  struct Lists {
    std::vector<at::Tensor> parameters, grads, exp_avgs, exp_avg_sqs, steps;
  };
  // A parameter's step count on the device, with the host state it was taken from: a state
  // replaced or changed since (a checkpoint loaded) is taken afresh.
  struct DeviceStep {
    const torch::optim::OptimizerParamState* state = nullptr;
    std::int64_t host_step = 0;
    at::Tensor steps;
  };

  torch::optim::AdamWParamState& state_of(const at::Tensor& parameter) {
    auto& slot = state()[parameter.unsafeGetTensorImpl()];
    if (!slot) {
      auto fresh = std::make_unique<torch::optim::AdamWParamState>();
      fresh->exp_avg(at::zeros_like(parameter, at::MemoryFormat::Preserve));
      fresh->exp_avg_sq(at::zeros_like(parameter, at::MemoryFormat::Preserve));
      slot = std::move(fresh);
    }
    return static_cast<torch::optim::AdamWParamState&>(*slot);
  }

  at::Tensor& device_step(const at::Tensor& parameter, const torch::optim::AdamWParamState& state) {
    DeviceStep& counted = device_steps_[parameter.unsafeGetTensorImpl()];
    if (counted.state != &state || counted.host_step != state.step() || !counted.steps.defined()) {
      counted.state = &state;
      counted.host_step = state.step();
      counted.steps = at::full({}, static_cast<double>(state.step()),
                               at::TensorOptions().device(parameter.device()).dtype(at::kFloat));
    }
    return counted.steps;
  }

  std::map<void*, DeviceStep> device_steps_;
};

}  // namespace

bool use_fused_adamw(const config::OptimizerConfig& config, c10::Device device) {
  if (config.name != config::OptimizerName::adamw) return false;
  switch (config.fused) {
    case config::Fused::on: return true;
    case config::Fused::off: return false;
    case config::Fused::automatic: return device.is_cuda();
  }
  throw std::logic_error("use_fused_adamw(): an optimizer.fused value without a meaning");
}

namespace {

// optimizer.decay: matrices only (biases and norm weights would only be pulled towards zero), or
// every parameter.
bool decays(const config::OptimizerConfig& config, const at::Tensor& parameter) {
  return config.decay == config::Decay::all || parameter.dim() >= 2;
}

std::unique_ptr<torch::optim::Optimizer> make_sgd(const config::OptimizerConfig& config, std::vector<torch::Tensor> decay,
                                                  std::vector<torch::Tensor> no_decay) {
  if (config.nesterov && config.momentum <= 0)
    throw runtime::Error("optimizer.nesterov = true needs optimizer.momentum > 0 (got " +
                             std::to_string(config.momentum) + ")",
                         runtime::ExitCode::bad_input);
  auto with_decay = std::make_unique<torch::optim::SGDOptions>(config.lr);
  with_decay->momentum(config.momentum).nesterov(config.nesterov).weight_decay(config.weight_decay);
  auto without = std::make_unique<torch::optim::SGDOptions>(*with_decay);
  without->weight_decay(0);
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(decay, std::move(with_decay));
  groups.emplace_back(no_decay, std::move(without));
  return std::make_unique<torch::optim::SGD>(std::move(groups), torch::optim::SGDOptions(config.lr));
}

std::unique_ptr<torch::optim::Optimizer> make_adamw(const config::OptimizerConfig& config,
                                                    std::vector<torch::Tensor> decay,
                                                    std::vector<torch::Tensor> no_decay, c10::Device device) {
  auto with_decay = std::make_unique<torch::optim::AdamWOptions>(config.lr);
  with_decay->betas({config.betas[0], config.betas[1]}).eps(config.eps).weight_decay(config.weight_decay);
  auto without = std::make_unique<torch::optim::AdamWOptions>(*with_decay);
  without->weight_decay(0);
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(decay, std::move(with_decay));
  groups.emplace_back(no_decay, std::move(without));
  if (use_fused_adamw(config, device))
    return std::make_unique<FusedAdamW>(std::move(groups), torch::optim::AdamWOptions(config.lr));
  return std::make_unique<torch::optim::AdamW>(std::move(groups), torch::optim::AdamWOptions(config.lr));
}

std::unique_ptr<torch::optim::Optimizer> make_optimizer(const config::OptimizerConfig& config,
                                                        std::vector<torch::Tensor> decay,
                                                        std::vector<torch::Tensor> no_decay, c10::Device device) {
  switch (config.name) {
    case config::OptimizerName::sgd: return make_sgd(config, std::move(decay), std::move(no_decay));
    case config::OptimizerName::adamw: return make_adamw(config, std::move(decay), std::move(no_decay), device);
  }
  throw std::logic_error("make_optimizer(): an optimizer.name value without an optimizer");
}

}  // namespace

std::unique_ptr<torch::optim::Optimizer> make_optimizer(const config::OptimizerConfig& config,
                                                        torch::nn::Module& module, c10::Device device) {
  std::vector<torch::Tensor> decay, no_decay;
  for (const auto& parameter : module.parameters(/*recurse=*/true)) {
    if (!parameter.requires_grad()) continue;
    (decays(config, parameter) ? decay : no_decay).push_back(parameter);
  }
  return make_optimizer(config, std::move(decay), std::move(no_decay), device);
}

std::unique_ptr<torch::optim::Optimizer> make_optimizer(const config::OptimizerConfig& config,
                                                        const std::vector<ddp::ShardSlice>& shard, c10::Device device) {
  std::vector<torch::Tensor> decay, no_decay;
  for (const ddp::ShardSlice& slice : shard) (decays(config, slice.parameter) ? decay : no_decay).push_back(slice.value);
  return make_optimizer(config, std::move(decay), std::move(no_decay), device);
}

void step_unless_nonfinite(torch::optim::Optimizer& optimizer, const at::Tensor& found_inf) {
  if (auto* fused = dynamic_cast<FusedAdamW*>(&optimizer)) {
    fused->step_unless(found_inf);
    return;
  }
  // LibTorch's own optimizers step on the host's word: one read of the flag.
  if (runtime::read_scalar<float>(found_inf) == 0.0f) optimizer.step();
}

bool skips_on_device(const torch::optim::Optimizer& optimizer) {
  return dynamic_cast<const FusedAdamW*>(&optimizer) != nullptr;
}

void sync_optimizer_state(torch::optim::Optimizer& optimizer) {
  if (auto* fused = dynamic_cast<FusedAdamW*>(&optimizer)) fused->sync_steps();
}

std::int64_t optimizer_state_bytes(const torch::optim::Optimizer& optimizer) {
  std::int64_t bytes = 0;
  const auto add = [&](const at::Tensor& t) {
    if (t.defined()) bytes += t.numel() * static_cast<std::int64_t>(t.element_size());
  };
  for (const auto& [key, state] : optimizer.state()) {
    if (const auto* adam = dynamic_cast<const torch::optim::AdamWParamState*>(state.get())) {
      add(adam->exp_avg());
      add(adam->exp_avg_sq());
      add(adam->max_exp_avg_sq());
    } else if (const auto* sgd = dynamic_cast<const torch::optim::SGDParamState*>(state.get())) {
      add(sgd->momentum_buffer());
    }
  }
  return bytes;
}

double learning_rate(const config::ScheduleConfig& schedule, double lr, std::int64_t step, std::int64_t total_steps) {
  if (schedule.warmup_steps > 0 && step < schedule.warmup_steps)
    return lr * static_cast<double>(step + 1) / static_cast<double>(schedule.warmup_steps);
  const double floor = lr * schedule.min_lr_ratio;
  const double span = static_cast<double>(std::max<std::int64_t>(total_steps - schedule.warmup_steps, 1));
  const double progress = std::clamp(static_cast<double>(step - schedule.warmup_steps) / span, 0.0, 1.0);
  switch (schedule.name) {
    case config::ScheduleName::constant: return lr;
    case config::ScheduleName::linear: return floor + (lr - floor) * (1.0 - progress);
    case config::ScheduleName::cosine: return floor + (lr - floor) * 0.5 * (1.0 + std::cos(M_PI * progress));
  }
  throw std::logic_error("learning_rate(): a schedule.name value without a schedule");
}

void set_learning_rate(torch::optim::Optimizer& optimizer, double lr) {
  for (auto& group : optimizer.param_groups()) group.options().set_lr(lr);
}

}  // namespace mpitrain::train

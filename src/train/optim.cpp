#include "mpitrain/train/optim.h"

#include <torch/optim/adamw.h>
#include <torch/optim/sgd.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "mpitrain/runtime/error.h"

namespace mpitrain::train {

std::unique_ptr<torch::optim::Optimizer> make_optimizer(const config::OptimizerConfig& config,
                                                        torch::nn::Module& module) {
  std::vector<torch::Tensor> decay, no_decay;
  for (const auto& parameter : module.parameters(/*recurse=*/true)) {
    if (!parameter.requires_grad()) continue;
    (parameter.dim() >= 2 ? decay : no_decay).push_back(parameter);
  }
  if (config.name == "sgd") {
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
  if (config.name == "adamw") {
    auto with_decay = std::make_unique<torch::optim::AdamWOptions>(config.lr);
    with_decay->betas({config.betas[0], config.betas[1]}).eps(config.eps).weight_decay(config.weight_decay);
    auto without = std::make_unique<torch::optim::AdamWOptions>(*with_decay);
    without->weight_decay(0);
    std::vector<torch::optim::OptimizerParamGroup> groups;
    groups.emplace_back(decay, std::move(with_decay));
    groups.emplace_back(no_decay, std::move(without));
    return std::make_unique<torch::optim::AdamW>(std::move(groups), torch::optim::AdamWOptions(config.lr));
  }
  throw runtime::Error("optimizer.name '" + config.name + "': expected sgd or adamw", runtime::ExitCode::bad_input);
}

double learning_rate(const config::ScheduleConfig& schedule, double lr, std::int64_t step, std::int64_t total_steps) {
  if (schedule.warmup_steps > 0 && step < schedule.warmup_steps)
    return lr * static_cast<double>(step + 1) / static_cast<double>(schedule.warmup_steps);
  if (schedule.name == "constant") return lr;
  const double floor = lr * schedule.min_lr_ratio;
  const double span = static_cast<double>(std::max<std::int64_t>(total_steps - schedule.warmup_steps, 1));
  const double progress = std::clamp(static_cast<double>(step - schedule.warmup_steps) / span, 0.0, 1.0);
  if (schedule.name == "linear") return floor + (lr - floor) * (1.0 - progress);
  // cosine
  return floor + (lr - floor) * 0.5 * (1.0 + std::cos(M_PI * progress));
}

void set_learning_rate(torch::optim::Optimizer& optimizer, double lr) {
  for (auto& group : optimizer.param_groups()) group.options().set_lr(lr);
}

}  // namespace mpitrain::train

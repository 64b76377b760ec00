#pragma once
// Optimizers and learning-rate schedules from the config.
//
// Contract:
// - make_optimizer() builds SGD (momentum, Nesterov) or AdamW over the module's parameters that
//   require grad, in two groups: group 0 with weight decay (tensors of 2 or more dimensions:
//   weight matrices, convolution kernels, embeddings), group 1 without (biases and norm weights,
//   which decay would only pull towards zero); with optimizer.decay "all", every parameter is
//   in group 0 and group 1 is empty. Parameter order within a group is the module's
//   registration order, so optimizer state maps to parameters the same way on every run.
//   AdamW runs in LibTorch's fused kernel (at::_fused_adamw_) when use_fused_adamw() says so
//   (optimizer.fused: on, or auto on a CUDA device); its state and checkpoints are those of
//   torch::optim::AdamW, and its result equals it to float32 rounding.
// - step_unless_nonfinite(optimizer, found_inf) is the trainer's optimizer step: no update where
//   the found-inf flag (amp::LossScaler::unscale_and_check) is 1. Fused AdamW skips on the
//   device (skips_on_device()), with no host read; LibTorch's own optimizers read the flag
//   first (one device-to-host read per step). Fused AdamW keeps its step counts on the device:
//   sync_optimizer_state() writes them into the optimizer's state() (a host read) and must come
//   before that state is read directly (ZeRO shard files); torch::save calls it itself.
// - The overload over a ZeRO shard (ddp::DistributedDataParallel::shard()) builds the same
//   optimizer over the shard's slices, each in the group of its parameter, so that it keeps
//   state for this rank's slices only and steps them exactly as the whole-model optimizer steps
//   those elements.
// - optimizer_state_bytes(): the bytes of every state tensor (moments, momentum buffers) the
//   optimizer holds on this rank.
// - learning_rate() is the schedule: linear warm-up from lr/warmup_steps to lr over
//   warmup_steps, then constant, cosine or linear decay to lr * min_lr_ratio at total_steps.
//   Steps count from 0 (the first optimizer step uses learning_rate(0)).
// - set_learning_rate() writes it into every group.

#include <c10/core/Device.h>
#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "mpitrain/config/config.h"
#include "mpitrain/ddp/ddp.h"

namespace mpitrain::train {

std::unique_ptr<torch::optim::Optimizer> make_optimizer(const config::OptimizerConfig& config,
                                                        torch::nn::Module& module, c10::Device device);
std::unique_ptr<torch::optim::Optimizer> make_optimizer(const config::OptimizerConfig& config,
                                                        const std::vector<ddp::ShardSlice>& shard, c10::Device device);

void step_unless_nonfinite(torch::optim::Optimizer& optimizer, const at::Tensor& found_inf);
bool skips_on_device(const torch::optim::Optimizer& optimizer);
void sync_optimizer_state(torch::optim::Optimizer& optimizer);

std::int64_t optimizer_state_bytes(const torch::optim::Optimizer& optimizer);

bool use_fused_adamw(const config::OptimizerConfig& config, c10::Device device);

double learning_rate(const config::ScheduleConfig& schedule, double lr, std::int64_t step, std::int64_t total_steps);

void set_learning_rate(torch::optim::Optimizer& optimizer, double lr);

}  // namespace mpitrain::train

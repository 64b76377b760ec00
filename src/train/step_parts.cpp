#include "step_parts.h"

#include <ATen/ATen.h>

namespace mpitrain::train {

ddp::Options ddp_options(const config::DdpConfig& config) {
  ddp::Options options;
  options.bucket_bytes = static_cast<std::int64_t>(config.bucket_mb * (1 << 20));
  options.first_bucket_bytes = static_cast<std::int64_t>(config.first_bucket_mb * (1 << 20));
  options.find_unused_parameters = config.find_unused_parameters;
  options.broadcast_buffers = config.broadcast_buffers;
  if (config.wire_dtype == "bf16") options.wire_dtype = at::kBFloat16;
  if (config.wire_dtype == "fp16") options.wire_dtype = at::kHalf;
  options.zero_stage = static_cast<int>(config.zero_stage);
  if (config.compression == "topk") options.compression = ddp::Options::Compression::topk;
  if (config.compression == "powersgd") options.compression = ddp::Options::Compression::powersgd;
  options.topk_ratio = config.topk_ratio;
  options.powersgd_rank = config.powersgd_rank;
  options.powersgd_warmup_steps = config.powersgd_warmup_steps;
  return options;
}

amp::ScalerOptions scaler_options(const config::LossScaleConfig& config) {
  amp::ScalerOptions options;
  options.init_scale = config.init;
  options.growth_factor = config.growth_factor;
  options.backoff_factor = config.backoff_factor;
  options.growth_interval = config.growth_interval;
  return options;
}

at::Tensor loss_of(const at::Tensor& logits, const at::Tensor& targets, models::Task task) {
  if (task == models::Task::language_modeling)
    return at::cross_entropy_loss(logits.reshape({-1, logits.size(-1)}).to(at::kFloat), targets.reshape({-1}).to(at::kLong));
  return at::cross_entropy_loss(logits.to(at::kFloat), targets.reshape({-1}).to(at::kLong));
}

}  // namespace mpitrain::train

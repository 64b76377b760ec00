#include "step_parts.h"

#include <ATen/ATen.h>

#include <stdexcept>

namespace mpitrain::train {
namespace {

[[noreturn]] void unmapped(const char* what) {
  throw std::logic_error(std::string("train: a config ") + what + " value without a mapping");
}

std::optional<c10::ScalarType> wire_dtype(config::WireDtype wire) {
  switch (wire) {
    case config::WireDtype::fp32: return std::nullopt;  // the gradients' own dtype
    case config::WireDtype::bf16: return at::kBFloat16;
    case config::WireDtype::fp16: return at::kHalf;
  }
  unmapped("ddp.wire_dtype");
}

}  // namespace

ddp::Options ddp_options(const config::DdpConfig& config) {
  ddp::Options options;
  options.bucket_bytes = static_cast<std::int64_t>(config.bucket_mb * (1 << 20));
  options.first_bucket_bytes = static_cast<std::int64_t>(config.first_bucket_mb * (1 << 20));
  options.find_unused_parameters = config.find_unused_parameters;
  options.broadcast_buffers = config.broadcast_buffers;
  options.wire_dtype = wire_dtype(config.wire_dtype);
  options.zero_stage = static_cast<int>(config.zero_stage);
  options.compression = config.compression;  // ddp uses the config's enum
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

runtime::DeviceKind device_kind(config::DeviceKind kind) {
  switch (kind) {
    case config::DeviceKind::automatic: return runtime::DeviceKind::automatic;
    case config::DeviceKind::cpu: return runtime::DeviceKind::cpu;
    case config::DeviceKind::cuda: return runtime::DeviceKind::cuda;
  }
  unmapped("device.kind");
}

comm::Backend backend(config::Backend backend) {
  switch (backend) {
    case config::Backend::automatic: return comm::Backend::automatic;
    case config::Backend::mpi: return comm::Backend::mpi;
    case config::Backend::nccl: return comm::Backend::nccl;
  }
  unmapped("device.backend");
}

amp::Precision precision(config::PrecisionMode mode, c10::Device device) {
  switch (mode) {
    case config::PrecisionMode::automatic: return amp::auto_precision(device);
    case config::PrecisionMode::fp32: return amp::Precision::fp32;
    case config::PrecisionMode::bf16: return amp::Precision::bf16;
    case config::PrecisionMode::fp16: return amp::Precision::fp16;
  }
  unmapped("precision.mode");
}

data::Remainder remainder(config::Remainder remainder) {
  switch (remainder) {
    case config::Remainder::drop: return data::Remainder::drop;
    case config::Remainder::wrap: return data::Remainder::wrap;
  }
  unmapped("remainder");
}

data::Kind data_kind(config::DataKind kind, models::Task task) {
  switch (kind) {
    case config::DataKind::automatic:
      return task == models::Task::language_modeling ? data::Kind::tokens : data::Kind::classification;
    case config::DataKind::classification: return data::Kind::classification;
    case config::DataKind::tokens: return data::Kind::tokens;
  }
  unmapped("data.kind");
}

at::Tensor loss_of(const at::Tensor& logits, const at::Tensor& targets, models::Task task) {
  if (task == models::Task::language_modeling)
    return at::cross_entropy_loss(logits.reshape({-1, logits.size(-1)}).to(at::kFloat), targets.reshape({-1}).to(at::kLong));
  return at::cross_entropy_loss(logits.to(at::kFloat), targets.reshape({-1}).to(at::kLong));
}

}  // namespace mpitrain::train

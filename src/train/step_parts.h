#pragma once
// Internal to the train layer, and the benchmarks' header: the pieces of a step the trainer
// builds from the config, for programs that time a step without the trainer (bench_ddp).
//
// Contract: ddp_options() and scaler_options() are DDP's and the loss scaler's options as the
// config sets them; loss_of() is the training loss, cross-entropy in float32 (over every token
// of a language model). device_kind(), backend(), precision(), remainder() and data_kind() are
// the one place where the config's choice enums (config/choices.h) become the types of the
// layers that act on them: config sits below those layers and knows none of them. Each is a
// switch over every value, so a word added to a table without its mapping fails to compile
// (-Wswitch) or, past that, throws std::logic_error.

#include <ATen/core/Tensor.h>

#include "mpitrain/amp/amp.h"
#include "mpitrain/config/config.h"
#include "mpitrain/ddp/ddp.h"
#include "mpitrain/comm/communicator.h"
#include "mpitrain/data/sampler.h"
#include "mpitrain/data/spec.h"
#include "mpitrain/models/model.h"
#include "mpitrain/runtime/device.h"

namespace mpitrain::train {

ddp::Options ddp_options(const config::DdpConfig& config);
amp::ScalerOptions scaler_options(const config::LossScaleConfig& config);
runtime::DeviceKind device_kind(config::DeviceKind kind);
comm::Backend backend(config::Backend backend);
/// automatic: amp::auto_precision(device).
amp::Precision precision(config::PrecisionMode mode, c10::Device device);
data::Remainder remainder(config::Remainder remainder);
/// automatic: tokens for a language model, classification otherwise.
data::Kind data_kind(config::DataKind kind, models::Task task);
at::Tensor loss_of(const at::Tensor& logits, const at::Tensor& targets, models::Task task);

}  // namespace mpitrain::train

#pragma once
// Internal to the train layer, and the benchmarks' header: the pieces of a step the trainer
// builds from the config, for programs that time a step without the trainer (bench_ddp).
//
// Contract: ddp_options() and scaler_options() are DDP's and the loss scaler's options as the
// config sets them; loss_of() is the training loss, cross-entropy in float32 (over every token
// of a language model).

#include <ATen/core/Tensor.h>

#include "mpitrain/amp/amp.h"
#include "mpitrain/config/config.h"
#include "mpitrain/ddp/ddp.h"
#include "mpitrain/models/model.h"

namespace mpitrain::train {

ddp::Options ddp_options(const config::DdpConfig& config);
amp::ScalerOptions scaler_options(const config::LossScaleConfig& config);
at::Tensor loss_of(const at::Tensor& logits, const at::Tensor& targets, models::Task task);

}  // namespace mpitrain::train

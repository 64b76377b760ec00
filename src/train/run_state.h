#pragma once
// Internal to the train layer: saving and restoring the whole run state (docs/checkpoints.md),
// apart from the loop that decides when.
//
// Contract:
// - save_run() (collective) writes one atomic step directory under `root` (checkpoint::Writer):
//   rank 0 the weights (model.safetensors), the optimizer (optimizer.pt at ZeRO stage 0) and
//   trainer.json (step, epoch, world size, ZeRO stage, loss scaler, the resolved config); every
//   rank its ZeRO optimizer shard, its DDP engine state (compression) and rank-N.json (loader
//   position, RNG, the metrics window). Returns the directory. In a pipeline-parallel run rank 0
//   first gathers the whole model (model.safetensors holds it under its ordinary names), each
//   stage's replica 0 writes its stage's optimizer (optimizer-stage-N.pt at ZeRO stage 0), and
//   trainer.json records the stages and their pieces. It reads device values (the
//   window, the scale, fused AdamW's step counts): checkpoint time only.
// - restore_run() (collective) loads such a directory into the run's pieces, every tensor onto
//   this rank's device; afterwards the run continues as if it had never stopped, bit for bit on
//   the CPU at the same world size. Another world size keeps the data order (the loader
//   position is global) and re-shards ZeRO state; per-rank state (RNG, compression residuals,
//   the metrics window) then starts afresh, with a warning. A pipeline checkpoint resumes with
//   the same stages and pieces (any number of replicas); another split is refused with how to
//   start from its weights instead. Config keys that would change what
//   the run computes must be unchanged unless allow_config_change. Every problem is a
//   runtime::Error(bad_input) naming the directory, the file and what to do.

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <torch/optim/optimizer.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "mpitrain/config/config.h"

namespace mpitrain::amp {
class LossScaler;
}
namespace mpitrain::data {
class Loader;
}
namespace mpitrain::ddp {
class DistributedDataParallel;
}
namespace mpitrain::models {
class Model;
}
namespace mpitrain::runtime {
class World;
}

namespace mpitrain::train {

// What the loop has done. The window is what happened since the last log line, kept on the
// device so that no step reads it.
struct Progress {
  std::int64_t steps_done = 0;
  std::int64_t epoch = 0;
  std::int64_t window_steps = 0;
  at::Tensor window_loss;     // float32: the sum of the window's step losses
  at::Tensor window_skipped;  // float32: steps skipped for non-finite gradients
  at::Tensor nonfinite_run;   // float32: skipped steps in a row, up to the last step
};

// Where this rank sits in a pipeline-parallel run (docs/pipeline.md). A run without stages is
// one stage whose replicas are all the ranks (replica = rank, replicas = world size): only
// replica 0 writes the optimizer's state (ZeRO stage 0), a rank reads its own shard first.
struct StagePlace {
  int stages = 1;
  int stage = 0;
  int replica = 0;
  int replicas = 1;
  std::vector<std::int64_t> bounds;        // pieces per stage boundaries (pipeline::split)
  std::function<void()> gather_model;      // collective: the whole model into rank 0's
};

// The run's pieces, as the trainer holds them.
struct RunParts {
  const runtime::World& world;
  const config::Config& config;
  c10::Device device;
  models::Model& model;
  torch::optim::Optimizer& optimizer;
  amp::LossScaler& scaler;
  ddp::DistributedDataParallel& ddp;
  data::Loader& loader;
  Progress& progress;
  StagePlace place;
};

std::string save_run(const RunParts& run, const std::string& root);
void restore_run(const RunParts& run, const std::string& dir, bool allow_config_change);

}  // namespace mpitrain::train

#pragma once
// The training loop.
//
// Contract:
// - Construction is collective: it picks the device and communicator, compares the resolved
//   config's fingerprint across ranks (a mismatch is bad_input on every rank), builds the model
//   (seeded by run.seed, so every rank builds the same one before DDP broadcasts it anyway;
//   then loads model.init_from when set, with an error listing every tensor that does not fit),
//   wraps it in DDP, opens the train (and eval) loaders, and builds the optimizer, scheduler
//   and loss scaler. With batch.micro_batch auto it first finds, on every rank, the largest
//   micro-batch whose forward, backward and optimizer step fit in memory (train/micro_batch.h;
//   real steps on the training data with the learning rate at 0, so the weights do not change),
//   then takes the largest micro-batch that fits on every rank and keeps batch.global; config()
//   is the resolved config with the values chosen.
// - With parallel.pipeline_stages P > 1 the world is P x D ranks: the model is cut into P
//   stages (its pieces, models::Model::pieces()), each rank runs one stage, wrapped in DDP over
//   the stage's D replicas, and a step's accumulation micro-batches flow through the stages in
//   the parallel.schedule order (1f1b or gpipe); the result is that of one process on the same
//   global batch. Checkpoints hold the whole model; a resume keeps P. docs/pipeline.md.
// - data.rank_weights: each rank's share of the micro-steps' samples (train/shares.h); its loss
//   is weighted by its share, so the update is the same whatever the shares.
// - step() runs one optimizer step, the same on every rank: accumulation micro-batches (all but
//   the last under no_sync), forward under autocast, loss divided by the accumulation count and
//   scaled (fp16), backward, wait for DDP, unscale (found-inf agreed across ranks), clip,
//   optimizer step unless skipped, learning rate for the next step. A steady-state step reads
//   nothing from the device (runtime/host_read.h) with fused AdamW: the skip is decided on the
//   device, and the loss, norm and skip flag stay there (StepResult).
// - run() steps until train.steps (or train.epochs) are done or a stop signal is agreed
//   (runtime::StopAgreement: one step after the first rank saw it, every rank at the same step);
//   logs at log.every_steps, where it also reads the step figures, the phase times (CUDA events
//   on a GPU) and the run of skipped steps: more than train.max_nonfinite_steps in a row (bf16,
//   fp32) saves a checkpoint and ends the run with an error. It evaluates at eval.every_steps and
//   at the end. Its result says why it ended. It saves a checkpoint every
//   checkpoint.every_steps, at the end, and when a stop signal ends the run early
//   (checkpoint.save_on_stop).
// - With log.trace_steps > 0, steps log.trace_start_step onwards are traced (train/trace.h):
//   each phase is timed, on CUDA after waiting for the device so phases show device time; when
//   the window, the run or a stop ends, rank 0 writes trace.json in the run directory, logs the
//   share of gradient communication hidden behind backward and adds it to the metrics.
// - save_checkpoint() (collective) writes everything needed to continue the exact run
//   (docs/checkpoints.md); restore() (collective) loads it: afterwards the run continues as if
//   it had never stopped — bit for bit on CPU at the same world size. A different world size is
//   accepted when batch.global is unchanged; config keys that would silently change the run
//   (model, data, seed, batch.global, optimizer, schedule, precision) must be unchanged unless
//   allow_config_change.

#include <cstdint>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include <ATen/core/Tensor.h>

#include "mpitrain/config/config.h"

namespace mpitrain::runtime {
class World;
class StopSignals;
}  // namespace mpitrain::runtime

namespace mpitrain::train {

struct StepResult {
  std::int64_t step = 0;  // optimizer steps done, this one included
  double lr = 0;          // the learning rate this step used
  // Left on the device, so that no step waits for it; read them when they are needed:
  at::Tensor loss;       // this rank's mean loss over the step's micro-batches (scalar)
  at::Tensor skipped;    // float32 [1]: 1 when non-finite gradients (on any rank) skipped the update
  at::Tensor grad_norm;  // float64 [1]: the global norm before clipping; undefined when clipping is off
};

struct EvalResult {
  double loss = 0;
  double accuracy = -1;  // classification only
  std::int64_t samples = 0;
};

enum class Outcome { finished, stopped };

class Trainer {
 public:
  Trainer(const runtime::World& world, const config::Config& config, const std::string& run_dir,
          const runtime::StopSignals& signals);
  ~Trainer();
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;

  StepResult step();
  EvalResult evaluate();
  Outcome run();

  std::string save_checkpoint();
  void restore(const std::string& checkpoint_dir, bool allow_config_change);

  std::int64_t steps_done() const;
  std::int64_t total_steps() const;
  std::int64_t parameter_count() const;
  /// The resolved config the run uses (batch.micro_batch auto replaced by the value found).
  const config::Config& config() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// run.dir/run.name.
std::string run_directory(const config::Config& config);

}  // namespace mpitrain::train

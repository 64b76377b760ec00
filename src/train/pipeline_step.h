#pragma once
// Internal to the train layer: a pipeline stage's part of the trainer (docs/pipeline.md).
//
// Contract:
// - Construction is collective over the world: it forms the P x D grid (pipeline::Grid), cuts
//   the model into stages (pipeline::split over model.pieces(), parallel.stage_pieces), moves
//   this stage's modules to the device (the rest of the model stays on the CPU, where rank 0
//   gathers the whole model for checkpoints) and creates the stage group's communicator (for
//   DDP) and two over the pipeline group (activations forward, their gradients backward), plus
//   one for tied weights when the split separates them. Refusals are runtime::Error(bad_input).
// - forward_backward() runs one optimizer step's m micro-batches through this stage in the
//   schedule's order (pipeline::actions): the first stage feeds each batch's inputs, the last
//   computes the loss of each micro-batch against its targets and backpropagates
//   loss / divisor, scaled by the loss scaler; the others receive activations and gradients
//   from their neighbours. Only the last backward runs with DDP's reduction (NoSync otherwise).
//   Returns the sum of the micro-batch losses on the last stage, zero elsewhere.
// - finish_backward() sums the tied weights' gradients across the stages holding them (after
//   DDP's average); clip_grad_norm() clips by the norm of the whole model's gradient (every
//   stage's, tied copies counted once). Both are collective over the world.
// - gather_model() (collective) copies every stage's parameters and buffers into rank 0's
//   whole model (replica 0 of each stage sends), so model.safetensors holds the whole model.
// - evaluate() runs the eval batches forward through the stages; the last stage returns the
//   totals (loss x n, correct, n), the others zeros.
// - take_peak_bytes() gives the most bytes in use above a step's start since the last call (the
//   activations in flight); the stage's compute and receive-wait times are the Timeline's
//   forward/backward and transfer phases.

#include <ATen/core/Tensor.h>

#include <functional>
#include <memory>
#include <vector>

#include "mpitrain/amp/amp.h"
#include "mpitrain/comm/communicator.h"
#include "mpitrain/config/config.h"
#include "mpitrain/data/loader.h"
#include "mpitrain/ddp/ddp.h"
#include "mpitrain/models/model.h"
#include "mpitrain/pipeline/channel.h"
#include "mpitrain/pipeline/grid.h"
#include "mpitrain/pipeline/schedule.h"
#include "mpitrain/pipeline/stage.h"
#include "timeline.h"

namespace mpitrain::train {

class PipelineStep {
 public:
  using Inputs = std::function<at::Tensor(const at::Tensor&)>;  // a batch's inputs as the model takes them

  PipelineStep(const runtime::World& world, const config::Config& config, models::Model& model, c10::Device device,
               const comm::CommOptions& options, comm::Backend backend);

  const pipeline::Grid& grid() const { return *grid_; }
  std::shared_ptr<pipeline::Stage> stage() const { return stage_; }
  comm::Communicator& stage_comm() { return *stage_comm_; }
  const std::vector<std::int64_t>& bounds() const { return bounds_; }
  const std::vector<models::Piece>& pieces() const { return pieces_; }
  bool has_ties() const { return ties_->any(); }

  at::Tensor forward_backward(const std::vector<data::Batch>& batches, std::int64_t step, double divisor,
                              ddp::DistributedDataParallel& ddp, amp::LossScaler& scaler, amp::Precision precision,
                              Timeline& timeline, const Inputs& inputs);
  void finish_backward();
  at::Tensor clip_grad_norm(ddp::DistributedDataParallel& ddp, double max_norm);
  void gather_model();
  at::Tensor evaluate(const data::Batch& batch, amp::Precision precision, const Inputs& inputs);
  std::int64_t take_peak_bytes();

 private:
  at::Tensor receive_activation();
  void sample_memory();
  void connect();

  const config::Config& config_;
  c10::Device device_;
  models::Task task_;
  std::vector<models::Piece> pieces_;
  std::vector<std::int64_t> bounds_;
  std::unique_ptr<pipeline::Grid> grid_;
  std::shared_ptr<pipeline::Stage> stage_;
  std::unique_ptr<pipeline::Ties> ties_;
  std::unique_ptr<runtime::World> tie_group_;
  std::unique_ptr<comm::Communicator> stage_comm_, forward_comm_, backward_comm_, tie_comm_;
  std::unique_ptr<comm::Communicator> header_comm_;  // on a GPU: the channels' headers, on the host
  std::unique_ptr<pipeline::Channel> activations_in_, activations_out_, gradients_in_, gradients_out_;
  std::int64_t memory_start_ = 0;
  std::int64_t peak_bytes_ = 0;
};

}  // namespace mpitrain::train

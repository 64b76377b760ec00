#include "pipeline_step.h"

#include <ATen/ATen.h>
#include <torch/autograd.h>

#include <optional>
#include <utility>

#ifdef MPITRAIN_HAVE_NCCL
#include <c10/cuda/CUDACachingAllocator.h>
#endif

#include "mpitrain/comm/agreement.h"
#include "mpitrain/runtime/error.h"
#include "mpitrain/runtime/memory_budget.h"
#include "mpitrain/runtime/world.h"
#include "step_parts.h"

namespace mpitrain::train {
namespace {

// Bytes of tensor memory in use on the device: the caching allocator's count on CUDA, the
// counted CPU allocations on the CPU (0 unless MPITRAIN_CPU_MEMORY_BUDGET is set).
std::int64_t memory_in_use(c10::Device device) {
#ifdef MPITRAIN_HAVE_NCCL
  if (device.is_cuda()) {
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index());
    return stats.allocated_bytes[static_cast<std::size_t>(c10::CachingAllocator::StatType::AGGREGATE)].current;
  }
#endif
  (void)device;
  return runtime::cpu_memory_in_use();
}

// The tensors of pieces [begin, end) that a checkpoint holds, in a fixed order.
std::vector<at::Tensor> state_of(const std::vector<models::Piece>& pieces, std::int64_t begin, std::int64_t end) {
  std::vector<at::Tensor> tensors;
  for (std::int64_t i = begin; i < end; ++i)
    for (const auto& module : pieces[static_cast<std::size_t>(i)].owns) {
      for (const auto& parameter : module->parameters()) tensors.push_back(parameter);
      for (const auto& buffer : module->buffers()) tensors.push_back(buffer);
    }
  return tensors;
}

}  // namespace

PipelineStep::PipelineStep(const runtime::World& world, const config::Config& config, models::Model& model,
                           c10::Device device, const comm::CommOptions& options, comm::Backend backend)
    : config_(config), device_(device), task_(model.task()), pieces_(model.pieces()) {
  const int stages = static_cast<int>(config.parallel.pipeline_stages);
  bounds_ = pipeline::split(pieces_, stages, config.parallel.stage_pieces);
  grid_ = std::make_unique<pipeline::Grid>(world, stages);
  const int s = grid_->stage();
  stage_ = std::make_shared<pipeline::Stage>(pieces_, bounds_[static_cast<std::size_t>(s)],
                                             bounds_[static_cast<std::size_t>(s + 1)]);
  ties_ = std::make_unique<pipeline::Ties>(pieces_, bounds_, s);
  if (ties_->any() && config.ddp.zero_stage == 1)
    throw runtime::Error("ddp.zero_stage 1 with parallel.pipeline_stages " + std::to_string(stages) +
                             ": the model's tied weights are split across stages " + comm::list_text(ties_->stages()) +
                             ", whose summed gradient ZeRO's shards cannot hold; set ddp.zero_stage 0, or put the tied "
                             "pieces on one stage (parallel.stage_pieces)",
                         runtime::ExitCode::bad_input);
  stage_->to(device);
  stage_comm_ = comm::make_communicator(grid_->stage_group(), device, options, backend);
  forward_comm_ = comm::make_communicator(grid_->pipeline_group(), device, options, backend);
  backward_comm_ = comm::make_communicator(grid_->pipeline_group(), device, options, backend);
  // The channels' headers travel on the host: a header received on the GPU would be copied
  // back at every message, syncing the stage with all its queued work. One communicator serves
  // both directions: each ordered pair of neighbours carries one kind (activations forward,
  // gradients back), in order.
  if (device.is_cuda())
    header_comm_ =
        comm::make_communicator(grid_->pipeline_group(), c10::Device(c10::kCPU), options, comm::Backend::mpi);
  // Every rank splits (collective); only the stages holding tied weights talk on theirs.
  tie_group_ = world.split(ties_->member() ? grid_->replica() : grid_->replicas() + world.rank(), s);
  if (ties_->member()) tie_comm_ = comm::make_communicator(*tie_group_, device, options, backend);
  const auto channel = [&](comm::Communicator& data, int peer) {
    return std::make_unique<pipeline::Channel>(data, header_comm_ ? *header_comm_ : data, peer);
  };
  if (!grid_->first()) {
    activations_in_ = channel(*forward_comm_, s - 1);
    gradients_out_ = channel(*backward_comm_, s - 1);
  }
  if (!grid_->last()) {
    activations_out_ = channel(*forward_comm_, s + 1);
    gradients_in_ = channel(*backward_comm_, s + 1);
  }
  connect();
}

// NCCL connects two ranks, and sets up a collective's buffers, when they are first used, and
// that allocates device memory, which waits for every kernel on the GPU. In the first step the
// first sends would do it while DDP's all-reduce on the stage's communicator waits for a peer:
// the deadlock of concurrent communicators that NCCL's documentation warns of. So each
// communicator of the step is used once here, one after the other in the same order on every
// rank: the collectives, then a message down the chain of stages and one back up.
void PipelineStep::connect() {
  at::Tensor one = at::zeros({1}, at::TensorOptions().device(device_));
  stage_comm_->all_reduce(one);
  forward_comm_->all_reduce(one);
  if (tie_comm_) tie_comm_->all_reduce(one);
  const int s = grid_->stage();
  const auto pass = [&](comm::Communicator& comm, bool receives, int from, bool sends, int to) {
    if (receives) comm.recv_async(one, from)->wait();
    if (sends) comm.send_async(one, to)->wait();
  };
  pass(*forward_comm_, !grid_->first(), s - 1, !grid_->last(), s + 1);
  pass(*backward_comm_, !grid_->last(), s + 1, !grid_->first(), s - 1);
}

// A neighbour's activation, as a leaf whose gradient goes back to it.
at::Tensor PipelineStep::receive_activation() {
  at::Tensor x = activations_in_->recv();
  if (at::isFloatingType(x.scalar_type())) x.requires_grad_(true);
  return x;
}

// The schedule's actions in order; per micro-batch in flight, the stage's input (whose gradient
// goes back) and output (the last stage: the loss).
at::Tensor PipelineStep::forward_backward(const std::vector<data::Batch>& batches, std::int64_t step, double divisor,
                                          ddp::DistributedDataParallel& ddp, amp::LossScaler& scaler,
                                          amp::Precision precision, Timeline& timeline, const Inputs& inputs) {
  const int m = static_cast<int>(batches.size());
  std::vector<at::Tensor> input(static_cast<std::size_t>(m)), output(static_cast<std::size_t>(m));
  at::Tensor loss_sum = at::zeros({}, at::TensorOptions().device(device_));
  memory_start_ = memory_in_use(device_);
  for (const pipeline::Action& action : pipeline::actions(config_.parallel.schedule, grid_->stages(), grid_->stage(), m)) {
    const auto i = static_cast<std::size_t>(action.micro);
    const bool last_micro = action.micro + 1 == m;
    if (action.kind == pipeline::Action::forward) {
      at::Tensor x;
      if (grid_->first()) {
        x = inputs(batches[i].inputs);
      } else {
        const auto phase = timeline.phase(Phase::transfer, step, action.micro);
        x = receive_activation();
      }
      const auto phase = timeline.phase(Phase::forward, step, action.micro);
      if (last_micro) ddp.before_forward();
      amp::AutocastScope autocast(device_, precision);
      at::Tensor y = stage_->forward(x);
      if (grid_->last()) {
        y = loss_of(y, batches[i].targets, task_);
        loss_sum += y.detach();
      } else {
        activations_out_->send(y);
      }
      input[i] = x;
      output[i] = y;
    } else {
      at::Tensor gradient;
      if (!grid_->last()) {
        const auto phase = timeline.phase(Phase::transfer, step, action.micro);
        gradient = gradients_in_->recv();
      }
      const auto phase = timeline.phase(Phase::backward, step, action.micro);
      std::optional<ddp::DistributedDataParallel::NoSync> no_sync;
      if (!last_micro) no_sync.emplace(ddp.no_sync());
      if (grid_->last())
        scaler.scale(output[i] / divisor).backward();
      else
        torch::autograd::backward({output[i]}, {gradient});
      if (!grid_->first()) gradients_out_->send(input[i].grad());
      input[i] = at::Tensor();
      output[i] = at::Tensor();
    }
    sample_memory();
  }
  for (auto* channel : {activations_out_.get(), gradients_out_.get()})
    if (channel) channel->flush();
  return loss_sum;
}

void PipelineStep::sample_memory() { peak_bytes_ = std::max(peak_bytes_, memory_in_use(device_) - memory_start_); }

void PipelineStep::finish_backward() {
  if (tie_comm_) ties_->sum_gradients(*tie_comm_);
}

// The pipeline group's ranks hold one replica's stages: together, the whole model.
at::Tensor PipelineStep::clip_grad_norm(ddp::DistributedDataParallel& ddp, double max_norm) {
  return ddp.clip_grad_norm(max_norm, forward_comm_.get(), ties_->counted_elsewhere());
}

// Rank 0's pieces are the model's own modules: filling them fills the model.
void PipelineStep::gather_model() {
  if (grid_->replica() != 0 || grid_->stages() == 1) return;
  at::NoGradGuard no_grad;
  if (grid_->first()) {
    for (int s = 1; s < grid_->stages(); ++s)
      for (at::Tensor& tensor : state_of(pieces_, bounds_[static_cast<std::size_t>(s)], bounds_[static_cast<std::size_t>(s + 1)])) {
        at::Tensor received = at::empty(tensor.sizes(), tensor.options().device(device_));
        forward_comm_->recv_async(received, s)->wait();
        tensor.copy_(received);
      }
  } else {
    std::vector<comm::WorkPtr> sends;
    for (const at::Tensor& tensor : state_of(pieces_, stage_->begin(), stage_->end()))
      sends.push_back(forward_comm_->send_async(tensor.contiguous(), 0));
    for (const auto& work : sends) work->wait();
  }
}

at::Tensor PipelineStep::evaluate(const data::Batch& batch, amp::Precision precision, const Inputs& inputs) {
  at::Tensor totals = at::zeros({3}, at::TensorOptions().device(device_).dtype(at::kDouble));
  const at::Tensor x = grid_->first() ? inputs(batch.inputs) : activations_in_->recv();
  at::Tensor y;
  {
    amp::AutocastScope autocast(device_, precision);
    y = stage_->forward(x);
  }
  if (!grid_->last()) {
    activations_out_->send(y);
    activations_out_->flush();
    return totals;
  }
  const at::Tensor loss = loss_of(y, batch.targets, task_);
  const std::int64_t n = batch.targets.numel();
  totals[0] += loss.to(at::kDouble) * static_cast<double>(n);
  if (task_ == models::Task::classification)
    totals[1] += y.argmax(-1).eq(batch.targets.reshape({-1}).to(at::kLong)).sum().to(at::kDouble);
  totals[2] += static_cast<double>(n);
  return totals;
}

std::int64_t PipelineStep::take_peak_bytes() { return std::exchange(peak_bytes_, 0); }

}  // namespace mpitrain::train

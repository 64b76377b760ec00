#include "mpitrain/train/trainer.h"

#include <ATen/ATen.h>
#include <torch/optim/optimizer.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <optional>

#ifdef MPITRAIN_HAVE_NCCL
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDACachingAllocator.h>
#endif

#include "mpitrain/amp/amp.h"
#include "mpitrain/checkpoint/weights.h"
#include "mpitrain/comm/agreement.h"
#include "mpitrain/comm/communicator.h"
#include "mpitrain/data/loader.h"
#include "mpitrain/ddp/ddp.h"
#include "mpitrain/models/registry.h"
#include "mpitrain/runtime/device.h"
#include "mpitrain/runtime/error.h"
#include "mpitrain/runtime/fault.h"
#include "mpitrain/runtime/gpu_info.h"
#include "mpitrain/runtime/host_read.h"
#include "mpitrain/runtime/memory_budget.h"
#include "mpitrain/runtime/signals.h"
#include "mpitrain/runtime/world.h"
#include "metrics.h"
#include "micro_batch.h"
#include "mpitrain/train/optim.h"
#include "pipeline_step.h"
#include "shares.h"
#include "run_state.h"
#include "step_parts.h"
#include "timeline.h"

namespace mpitrain::train {
namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

data::DatasetSpec dataset_spec(const config::Config& config, const config::DataSplit& split, const char* which,
                               models::Task task, std::int64_t context_length, std::int64_t id_limit) {
  if (split.files.size() > 1 && split.manifest.empty())
    throw runtime::Error(std::string("data.") + which + ".files: give one glob (e.g. \"shards/train-*.h5\") or a "
                             "manifest; lists of several patterns are not supported",
                         runtime::ExitCode::bad_input);
  data::DatasetSpec spec;
  spec.source = split.manifest.empty() ? split.files.front() : split.manifest;
  spec.kind = data_kind(config.data.kind, task);
  spec.seq_len = config.data.seq_len > 0 ? config.data.seq_len : context_length;
  spec.id_limit = id_limit;
  spec.file_locking = config.data.file_locking;
  return spec;
}

// Inputs as the model takes them: integer images (uint8) become floats in [0, 1].
at::Tensor model_inputs(const at::Tensor& inputs, models::Task task) {
  if (task == models::Task::classification && !at::isFloatingType(inputs.scalar_type()))
    return inputs.scalar_type() == at::kByte ? inputs.to(at::kFloat).div_(255.0) : inputs.to(at::kFloat);
  return inputs;
}


// data.rank_weights auto: this rank's forward + backward time per sample, on the steps that
// measure it, after waiting for the device so that it is the work's time, not its queueing.
class ShareMeter {
 public:
  ShareMeter(RankShares& shares, std::int64_t step, std::int64_t samples, c10::Device device)
      : shares_(shares), samples_(samples), device_(device), on_(shares.measures(step)) {
    if (!on_) return;
    wait_for_device(device_);
    start_ = Clock::now();
  }
  ~ShareMeter() {
    if (!on_) return;
    wait_for_device(device_);
    shares_.record(seconds_since(start_), samples_);
  }
  ShareMeter(const ShareMeter&) = delete;
  ShareMeter& operator=(const ShareMeter&) = delete;

 private:
  RankShares& shares_;
  std::int64_t samples_;
  c10::Device device_;
  bool on_;
  Clock::time_point start_;
};

// What batch.micro_batch auto's trial steps change besides memory: batch-norm statistics and the
// random streams (dropout). Put back when the search ends, so the run starts as if it had not run.
class TrialGuard {
 public:
  TrialGuard(torch::nn::Module& model, c10::Device device) : model_(model), device_(device) {
    for (const auto& buffer : model.buffers()) buffers_.push_back(buffer.clone());
    cpu_rng_ = at::detail::getDefaultCPUGenerator().get_state();
#ifdef MPITRAIN_HAVE_NCCL
    if (device.is_cuda()) cuda_rng_ = at::cuda::detail::getDefaultCUDAGenerator(device.index()).get_state();
#endif
  }
  ~TrialGuard() {
    at::NoGradGuard no_grad;
    auto buffers = model_.buffers();
    for (std::size_t i = 0; i < buffers.size() && i < buffers_.size(); ++i) buffers[i].copy_(buffers_[i]);
    at::Generator cpu = at::detail::getDefaultCPUGenerator();  // a handle on the process's generator
    cpu.set_state(cpu_rng_);
#ifdef MPITRAIN_HAVE_NCCL
    if (device_.is_cuda()) {
      at::Generator cuda = at::cuda::detail::getDefaultCUDAGenerator(device_.index());
      cuda.set_state(cuda_rng_);
    }
#endif
  }
  TrialGuard(const TrialGuard&) = delete;
  TrialGuard& operator=(const TrialGuard&) = delete;

 private:
  torch::nn::Module& model_;
  c10::Device device_;
  std::vector<at::Tensor> buffers_;
  at::Tensor cpu_rng_;
  at::Tensor cuda_rng_;
};

// Out of memory in a step: what to change, in the error every rank reports.
template <typename Body>
auto explaining_out_of_memory(const config::Config& config, Body&& body) {
  try {
    return body();
  } catch (const c10::Error& e) {
    if (!runtime::out_of_memory(e)) throw;
    throw runtime::Error(std::string("out of GPU memory at batch.micro_batch ") + std::to_string(config.batch.micro_batch) +
                         ": lower batch.micro_batch and raise batch.accumulation (or set batch.global), or use "
                         "precision.mode bf16/fp16. " + e.what_without_backtrace());
  }
}

}  // namespace

std::string run_directory(const config::Config& config) {
  return (std::filesystem::path(config.run.dir) / config.run.name).string();
}

struct Trainer::Impl {
  const runtime::World& world;
  config::Config config;
  std::string run_dir;
  const runtime::StopSignals& signals;

  c10::Device device{c10::kCPU};
  std::unique_ptr<comm::Communicator> comm;
  amp::Precision precision = amp::Precision::fp32;
  std::shared_ptr<models::Model> model;
  std::int64_t parameters = 0;
  std::unique_ptr<ddp::DistributedDataParallel> ddp;
  std::unique_ptr<PipelineStep> pipeline;  // parallel.pipeline_stages > 1: this rank's stage
  std::unique_ptr<RankShares> shares;  // of each micro-batch (data.rank_weights)
  std::int64_t cpu_budget = 0;         // MPITRAIN_CPU_MEMORY_BUDGET, bytes (0 = none)
  std::unique_ptr<data::Loader> train_loader;
  std::unique_ptr<data::Loader> eval_loader;
  data::LoaderState eval_start;
  std::unique_ptr<torch::optim::Optimizer> optimizer;
  std::unique_ptr<amp::LossScaler> scaler;
  std::unique_ptr<Timeline> timeline;
  Progress progress;
  std::int64_t total_steps = 0;
  std::int64_t seq_len = 0;    // tokens per sample (language models)
  double flops_per_token = 0;  // training FLOPs (forward + backward), 0 = unknown
  double peak_tflops = 0;      // the device's peak at the training precision, 0 = unknown
  std::unique_ptr<runtime::GpuInfo> gpu;
  std::int64_t nonfinite_run = 0;      // skipped steps in a row, as of the last log line
  std::int64_t comm_bytes_logged = 0;  // DDP's bytes sent, as of the last log line
  double starved_logged = 0;           // the loader's starved seconds, as of the last log line
  Clock::time_point window_start = Clock::now();

  Impl(const runtime::World& w, const config::Config& c, std::string dir, const runtime::StopSignals& s)
      : world(w), config(c), run_dir(std::move(dir)), signals(s) {}

  // ---- The loop (trainer.h): step, account, then what is due after the step ----------------

  Outcome run() {
    if (world.is_root()) std::filesystem::create_directories(run_dir);
    MetricsLog metrics(world.is_root(), config.log.metrics_file.empty() ? "" : (std::filesystem::path(run_dir) / config.log.metrics_file).string(),
                       config.log.console, progress.steps_done, total_steps);
    runtime::StopAgreement stop(world, signals, comm->options().timeout);
    shares->begin(progress.steps_done);
    while (progress.steps_done < total_steps) {
      account(step());
      const std::int64_t done = progress.steps_done;
      const bool last = done == total_steps;
      if (last || done % config.log.every_steps == 0) log_step(metrics);
      if (last) break;
      if (shares->due(done)) rebalance(metrics);
      if (every(config.eval.every_steps)) log_eval(metrics);
      const bool saved = every(config.checkpoint.every_steps);
      if (saved) save_checkpoint();
      if (timeline->due_to_finish(done)) timeline->finish(metrics, done);
      if (stop.poll()) {
        if (config.checkpoint.save_on_stop && !saved) save_checkpoint();
        timeline->finish(metrics, done);
        return Outcome::stopped;
      }
    }
    log_eval(metrics);
    if (progress.steps_done > 0) save_checkpoint();
    timeline->finish(metrics, progress.steps_done);
    return Outcome::finished;
  }

  // ---- One optimizer step (trainer.h), in the order it runs --------------------------------

  StepResult step() {
    const std::int64_t number = progress.steps_done + 1;
    fault_out_of_memory();
    timeline->begin_step(number);
    const auto whole = timeline->phase(Phase::step, number);
    StepResult result;
    result.lr = learning_rate(config.schedule, config.optimizer.lr, progress.steps_done, total_steps);
    set_learning_rate(*optimizer, result.lr);

    at::Tensor loss_sum = pipeline ? pipeline_forward_backward(number) : at::zeros({}, at::TensorOptions().device(device));
    for (std::int64_t micro = 0; !pipeline && micro < config.batch.accumulation; ++micro) {
      const data::Batch batch = next_batch(number, micro);
      loss_sum += forward_backward(batch, number, micro);
    }
    {
      const auto phase = timeline->phase(Phase::comm, number);
      ddp->finish_backward();
      if (pipeline) pipeline->finish_backward();
    }
    {
      const auto phase = timeline->phase(Phase::optimizer, number);
      update(result);
    }
    timeline->end_step(number);
    // Weighted like the gradient, so that the ranks' average is the global batch's mean loss.
    result.loss = loss_sum / loss_divisor();
    result.step = ++progress.steps_done;
    return result;
  }

  data::Batch next_batch(std::int64_t step, std::int64_t micro) {
    const auto phase = timeline->phase(Phase::data, step, static_cast<int>(micro));
    data::Batch batch = train_loader->next();
    progress.epoch = batch.epoch;
    return batch;
  }

  // A pipeline stage: the step's micro-batches through the stages (train/pipeline_step.h).
  at::Tensor pipeline_forward_backward(std::int64_t step) {
    std::vector<data::Batch> batches;
    for (std::int64_t micro = 0; micro < config.batch.accumulation; ++micro) batches.push_back(next_batch(step, micro));
    const auto task = model->task();
    return pipeline->forward_backward(batches, step, loss_divisor(), *ddp, *scaler, precision, *timeline,
                                      [task](const at::Tensor& inputs) { return model_inputs(inputs, task); });
  }

  // Forward under autocast (DDP's buffer broadcast before the last micro-batch), backward of the
  // scaled loss (all but the last micro-batch without communication). Returns the loss.
  at::Tensor forward_backward(const data::Batch& batch, std::int64_t step, std::int64_t micro) {
    const bool last = micro + 1 == config.batch.accumulation;
    const ShareMeter meter(*shares, step, batch.targets.size(0), device);
    at::Tensor loss;
    {
      const auto phase = timeline->phase(Phase::forward, step, static_cast<int>(micro));
      if (last) ddp->before_forward();
      amp::AutocastScope autocast(device, precision);
      loss = loss_of(model->forward(model_inputs(batch.inputs, model->task())), batch.targets, model->task());
    }
    {
      const auto phase = timeline->phase(Phase::backward, step, static_cast<int>(micro));
      std::optional<ddp::DistributedDataParallel::NoSync> no_sync;
      if (!last) no_sync.emplace(ddp->no_sync());
      scaler->scale(loss / loss_divisor()).backward();
    }
    fault_slow_rank(batch);
    return loss.detach();
  }

  // The averaged gradients the optimizer steps: the whole model's, or this rank's ZeRO shard
  // (then clipping's global norm takes one more all-reduce and the step ends with the
  // parameters' all-gather). Non-finite gradients on any rank skip the update on every rank,
  // decided on the device: nothing here waits for it (with fused AdamW; optim.h).
  void update(StepResult& result) {
    const at::Tensor found_inf = scaler->unscale_and_check(ddp->gradients(), *comm);
    if (config.optimizer.grad_clip > 0)
      result.grad_norm = pipeline ? pipeline->clip_grad_norm(*ddp, config.optimizer.grad_clip)
                                  : ddp->clip_grad_norm(config.optimizer.grad_clip);
    step_unless_nonfinite(*optimizer, found_inf);
    ddp->finish_step();
    scaler->update(found_inf);
    result.skipped = found_inf;
    // Zero in place: gradients stay DDP bucket views, so no copy into the buckets next step.
    model->zero_grad(/*set_to_none=*/false);
  }

  // The mean loss over this rank's samples becomes its part of the step's loss: weighted by its
  // share (RankShares) and divided over the micro-steps.
  double loss_divisor() const { return static_cast<double>(config.batch.accumulation) / shares->loss_factor(); }

  // ---- After the step --------------------------------------------------------------------

  bool every(std::int64_t steps) const { return steps > 0 && progress.steps_done % steps == 0; }

  // On the device: the window's sums and the run of skipped steps.
  void account(const StepResult& result) {
    progress.window_loss += result.loss;
    progress.window_skipped += result.skipped;
    progress.nonfinite_run.mul_(result.skipped).add_(result.skipped);
    ++progress.window_steps;
    last_step = result;
  }
  StepResult last_step;

  // The log line, and the end of a run whose steps have not been finite for too long: fp16 has
  // the loss scaler for this; in bf16 and fp32 a non-finite step is not an overflow that a
  // smaller scale would cure. Every rank has the same count (found-inf is agreed).
  void log_step(MetricsLog& metrics) {
    metrics.write(log_record(last_step));
    if (precision == amp::Precision::fp16 || nonfinite_run <= config.train.max_nonfinite_steps) return;
    const std::string saved = save_checkpoint();
    throw runtime::Error("the loss or gradients were not finite in " + std::to_string(nonfinite_run) +
                         " steps in a row (steps " + std::to_string(progress.steps_done - nonfinite_run + 1) + " to " +
                         std::to_string(progress.steps_done) + "), which were skipped; checkpoint " + saved +
                         " holds the weights from before them. Lower optimizer.lr, set optimizer.grad_clip or check "
                         "the data, then resume with --resume auto (train.max_nonfinite_steps allows more in a row)");
  }

  // The one cross-rank reduction of metrics and the one read of the device's figures, at
  // logging cadence only.
  nlohmann::json log_record(const StepResult& last) {
    const auto steps = static_cast<double>(std::max<std::int64_t>(progress.window_steps, 1));
    // The world's average; in a pipeline only the last stage's ranks (1 in P) have the loss.
    at::Tensor loss = progress.window_loss.reshape({1}).to(at::kDouble) * (static_cast<double>(stages()) / steps);
    comm->all_reduce(loss, comm::ReduceOp::avg);
    const at::Tensor norm = last.grad_norm.defined() ? last.grad_norm.reshape({1}).to(at::kDouble) : at::zeros_like(loss);
    const at::Tensor figures = runtime::read_tensor(at::cat({loss, norm, progress.window_skipped.to(at::kDouble),
                                                             progress.nonfinite_run.to(at::kDouble), read_stats()}));
    const auto* value = figures.data_ptr<double>();
    nonfinite_run = static_cast<std::int64_t>(value[3]);
    const StepTimes times = timeline->take(progress.window_steps);
    const double elapsed = seconds_since(window_start);
    const double samples = static_cast<double>(progress.window_steps * config.batch.global);
    nlohmann::json record = {{"step", last.step},
                             {"epoch", progress.epoch},
                             {"loss", value[0]},
                             {"lr", last.lr},
                             {"grad_norm", value[1]},
                             {"loss_scale", scaler->current_scale()},
                             {"skipped_steps", static_cast<std::int64_t>(value[2])},
                             {"samples_per_s", samples / elapsed},
                             {"step_time_s", elapsed / steps},
                             {"time_data_s", times.data},
                             {"time_compute_s", times.compute},
                             {"time_comm_s", times.comm},
                             {"time_optimizer_s", times.optimizer},
                             {"optimizer_state_bytes", optimizer_state_bytes(*optimizer)}};
    // The part of the data wait the reader was behind, apart from taking a ready batch.
    const double starved = train_loader->starved_seconds();
    record["time_data_starved_s"] = (starved - starved_logged) / steps;
    starved_logged = starved;
    const std::int64_t comm_bytes = ddp->stats().bytes_sent;
    record["comm_bytes_per_step"] = static_cast<double>(comm_bytes - comm_bytes_logged) / steps;
    comm_bytes_logged = comm_bytes;
    if (model->task() == models::Task::language_modeling) {
      const double tokens_per_s = samples * static_cast<double>(seq_len) / elapsed;
      record["tokens_per_s"] = tokens_per_s;
      if (flops_per_token > 0) {
        const double tflops = flops_per_token * tokens_per_s / static_cast<double>(world.size()) / 1e12;
        record["model_tflops_per_rank"] = tflops;
        if (peak_tflops > 0) record["mfu"] = tflops / peak_tflops;
      }
    }
    add_read_figures(record, value + 4);
    add_gpu_figures(record);
    if (pipeline) add_pipeline_figures(record, times);
    progress.window_loss.zero_();
    progress.window_skipped.zero_();
    progress.window_steps = 0;
    window_start = Clock::now();
    return record;
  }

  // Every rank's data reads so far (its loader's counters, read-ahead included): one all-gather.
  at::Tensor read_stats() {
    const data::ReadStats read = train_loader->stats();
    const at::Tensor mine = at::tensor({static_cast<double>(read.bytes_read), static_cast<double>(read.chunks_read),
                                        static_cast<double>(read.cache_hits)},
                                       at::kDouble)
                                .to(device);
    at::Tensor all = at::empty({3 * world.size()}, mine.options());
    comm->all_gather(all, mine);
    return all;
  }

  void add_read_figures(nlohmann::json& record, const double* per_rank) const {
    std::vector<std::int64_t> bytes, chunks, hits;
    for (int r = 0; r < world.size(); ++r) {
      bytes.push_back(static_cast<std::int64_t>(per_rank[3 * r]));
      chunks.push_back(static_cast<std::int64_t>(per_rank[3 * r + 1]));
      hits.push_back(static_cast<std::int64_t>(per_rank[3 * r + 2]));
    }
    record["data_bytes_read"] = bytes;
    record["data_chunks_read"] = chunks;
    record["data_cache_hits"] = hits;
  }

  // Per stage (replica 0's): compute and receive-wait seconds per step, the measured bubble (the
  // share of the schedule's time the stage waited for a neighbour: wait / (compute + wait); data
  // and optimizer time are outside the schedule) against the theory, and the peak memory the
  // step's activations in flight took. One all-gather.
  void add_pipeline_figures(nlohmann::json& record, const StepTimes& times) {
    const at::Tensor figures =
        at::tensor({times.compute, times.transfer, static_cast<double>(pipeline->take_peak_bytes())}, at::kDouble).to(device);
    at::Tensor all = at::empty({3 * world.size()}, figures.options());
    comm->all_gather(all, figures);
    const at::Tensor host = runtime::read_tensor(all);
    const auto* value = host.data_ptr<double>();
    std::vector<double> compute, wait, bubble;
    std::vector<std::int64_t> peak;
    for (int s = 0; s < pipeline->grid().stages(); ++s) {
      const double* v = value + 3 * pipeline->grid().world_rank(s, 0);
      compute.push_back(v[0]);
      wait.push_back(v[1]);
      bubble.push_back(v[0] + v[1] > 0 ? v[1] / (v[0] + v[1]) : 0.0);
      peak.push_back(static_cast<std::int64_t>(v[2]));
    }
    record["time_transfer_s"] = times.transfer;
    record["pipeline_compute_s"] = compute;
    record["pipeline_recv_wait_s"] = wait;
    record["pipeline_bubble"] = bubble;
    record["pipeline_bubble_theory"] =
        pipeline::bubble_fraction(pipeline->grid().stages(), static_cast<int>(config.batch.accumulation));
    record["pipeline_peak_activation_bytes"] = peak;
  }

  int stages() const { return pipeline ? pipeline->grid().stages() : 1; }

  // rank 0's GPU: NVML's utilisation and temperature, the caching allocator's memory.
  void add_gpu_figures(nlohmann::json& record) const {
    if (const auto reading = gpu->read()) {
      record["gpu_utilization_percent"] = reading->utilization_percent;
      record["gpu_temperature_c"] = reading->temperature_c;
    }
#ifdef MPITRAIN_HAVE_NCCL
    if (device.is_cuda()) {
      const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index());
      const auto all = static_cast<std::size_t>(c10::CachingAllocator::StatType::AGGREGATE);
      record["gpu_mem_allocated_bytes"] = stats.allocated_bytes[all].current;
      record["gpu_mem_reserved_bytes"] = stats.reserved_bytes[all].current;
      record["gpu_mem_peak_bytes"] = stats.allocated_bytes[all].peak;
    }
#endif
  }

  void log_eval(MetricsLog& metrics) {
    const EvalResult eval = evaluate();
    if (eval.samples == 0) return;
    nlohmann::json record = {{"step", progress.steps_done}, {"epoch", progress.epoch}, {"eval_loss", eval.loss},
                             {"eval_samples", eval.samples}};
    if (eval.accuracy >= 0) record["eval_accuracy"] = eval.accuracy;
    metrics.write(record);
  }

  EvalResult evaluate() {
    EvalResult result;
    if (!eval_loader) return result;
    const auto phase = timeline->phase(Phase::eval, progress.steps_done);
    runtime::fault_point("train.evaluate", world.rank());
    std::int64_t batches = eval_loader->steps_per_epoch();
    if (config.eval.max_batches > 0) batches = std::min(batches, config.eval.max_batches);
    const auto task = model->task();
    at::Tensor totals = at::zeros({3}, at::TensorOptions().device(device).dtype(at::kDouble));  // loss x n, correct, n
    model->eval();
    {
      at::NoGradGuard no_grad;
      for (std::int64_t b = 0; b < batches; ++b) {
        const data::Batch batch = eval_loader->next();
        if (pipeline) {
          totals += pipeline->evaluate(batch, precision, [task](const at::Tensor& x) { return model_inputs(x, task); });
          continue;
        }
        amp::AutocastScope autocast(device, precision);
        const at::Tensor logits = model->forward(model_inputs(batch.inputs, task));
        const at::Tensor loss = loss_of(logits, batch.targets, task);
        const std::int64_t n = batch.targets.numel();  // samples, or tokens for a language model
        totals[0] += loss.to(at::kDouble) * static_cast<double>(n);
        if (task == models::Task::classification)
          totals[1] += logits.argmax(-1).eq(batch.targets.reshape({-1}).to(at::kLong)).sum().to(at::kDouble);
        totals[2] += static_cast<double>(n);
      }
    }
    model->train();
    // The same eval samples every time. Restored now rather than at the next pass, the loader
    // reads that pass's first batches in the background instead of after it has begun.
    eval_loader->restore(eval_start);
    comm->all_reduce(totals, comm::ReduceOp::sum);
    const at::Tensor host = runtime::read_tensor(totals);
    const auto* total = host.data_ptr<double>();
    result.samples = static_cast<std::int64_t>(total[2]);
    result.loss = result.samples > 0 ? total[0] / static_cast<double>(result.samples) : 0.0;
    if (task == models::Task::classification && result.samples > 0) result.accuracy = total[1] / static_cast<double>(result.samples);
    return result;
  }

  // Collective (data.rank_weights auto): new shares from the measured speeds, if worth it.
  void rebalance(MetricsLog& metrics) {
    if (!shares->rebalance(progress.steps_done, *comm)) return;
    train_loader->set_shares(shares->shares());
    std::string speeds;
    char figure[32];
    for (double seconds : shares->seconds_per_sample()) {
      std::snprintf(figure, sizeof figure, "%s%.3f", speeds.empty() ? "" : ", ", seconds * 1e3);
      speeds += figure;
    }
    world.log().info("data.rank_weights auto after step " + std::to_string(progress.steps_done) +
                     ": shares of each micro-batch " + comm::list_text(shares->shares()) +
                     " (measured ms of forward + backward per sample: " + speeds + ")");
    metrics.write({{"step", progress.steps_done}, {"rank_shares", shares->shares()}, {"rank_seconds_per_sample", shares->seconds_per_sample()}});
  }

  // ---- Checkpoints (train/run_state.h) -----------------------------------------------------

  RunParts parts() {
    RunParts run{world, config, device, *model, *optimizer, *scaler, *ddp, *train_loader, progress, {}};
    // Without stages every rank is a replica of the one stage.
    run.place.replica = world.rank();
    run.place.replicas = world.size();
    if (pipeline) {
      const pipeline::Grid& grid = pipeline->grid();
      run.place = {grid.stages(), grid.stage(), grid.replica(), grid.replicas(), pipeline->bounds(),
                   [this] { pipeline->gather_model(); }};
    }
    return run;
  }

  std::string checkpoint_root() const { return (std::filesystem::path(run_dir) / config.checkpoint.dir).string(); }

  std::string save_checkpoint() {
    const auto start = Clock::now();
    std::string saved;
    {
      const auto phase = timeline->phase(Phase::checkpoint, progress.steps_done);
      saved = save_run(parts(), checkpoint_root());
    }
    world.log().info("checkpoint " + saved + " saved in " + std::to_string(seconds_since(start)) + " s");
    return saved;
  }

  // ---- Set-up ------------------------------------------------------------------------------

  // Each rank's auto choice follows its own GPU; ranks of different generations (an A100 next
  // to a V100) would otherwise sum bf16 gradients with loss-scaled fp16 ones.
  void agree_on_precision() {
    std::vector<amp::Precision> chosen;
    for (const std::int64_t p : comm::gather_per_rank(*comm, static_cast<std::int64_t>(precision)))
      chosen.push_back(static_cast<amp::Precision>(p));
    const amp::Precision agreed = amp::agree_precision(chosen);
    if (agreed != precision)
      world.log().info(std::string("precision auto: ") + amp::to_string(precision) + " on this rank's device, " +
                       amp::to_string(agreed) + " on every rank (some GPUs lack bf16)");
    precision = agreed;
  }

  // PowerSGD's average is computed by every rank itself (a QR, then P Q^T), the same on every
  // rank only when their kernels round the same: GPU types differ there, and replicas that
  // apply slightly different gradients drift apart as the run goes on.
  void warn_if_mixed_devices_for_powersgd(comm::Communicator& replicas) {
    const std::vector<std::int64_t> devices = comm::gather_per_rank(replicas, comm::fnv1a(gpu->name()));
    const std::vector<int> other = comm::ranks_differing(devices, devices.front());
    if (other.empty() || replicas.rank() != 0) return;
    world.log().warn("ddp.compression powersgd with mixed GPU types (" + gpu->name() + " on this rank, others on rank(s) " +
                     comm::list_text(other) + "): each rank multiplies the factors out itself and different GPU types "
                     "round differently, so the replicas' weights drift apart by rounding as the run goes on; use "
                     "ddp.compression topk or none with mixed GPUs");
  }

  void setup() {
    setup_device();
    comm::CommOptions comm_options;
    comm_options.timeout = std::chrono::milliseconds(static_cast<std::int64_t>(config.ddp.comm_timeout_s * 1000));
    comm = comm::make_communicator(world, device, comm_options, backend(config.device.backend));
    check_same_config();
    precision = train::precision(config.precision.mode, device);
    if (config.precision.mode == config::PrecisionMode::automatic) agree_on_precision();

    at::manual_seed(static_cast<std::uint64_t>(config.run.seed));
    model = models::create(config.model.name, config.model.options);
    parameters = models::count_parameters(*model);
    if (!config.model.init_from.empty())
      checkpoint::load_weights(*model, checkpoint::read_weights(config.model.init_from),
                               "model.init_from '" + config.model.init_from + "'");
    std::shared_ptr<torch::nn::Module> trained = model;  // what DDP wraps: the model, or this rank's stage
    comm::Communicator* data_comm = comm.get();     // DDP's group: the world, or this stage's replicas
    if (config.parallel.pipeline_stages > 1) {
      check_pipeline_settings();
      pipeline = std::make_unique<PipelineStep>(world, config, *model, device, comm_options, backend(config.device.backend));
      trained = pipeline->stage();
      data_comm = &pipeline->stage_comm();
      explain_stages();
    } else {
      model->to(device);
    }

    ddp = std::make_unique<ddp::DistributedDataParallel>(trained, *data_comm, ddp_options(config.ddp));
    timeline = std::make_unique<Timeline>(world, *comm, *ddp, config.log.trace_start_step, config.log.trace_steps, run_dir);

    const auto task = model->task();
    const data::DatasetSpec train_spec =
        dataset_spec(config, config.data.train, "train", task, model->context_length(), model->output_classes());
    seq_len = train_spec.seq_len;
    flops_per_token = model->training_flops_per_token(seq_len);
    gpu = std::make_unique<runtime::GpuInfo>(device);
    if (config.ddp.compression == config::Compression::powersgd) warn_if_mixed_devices_for_powersgd(*data_comm);
    const bool half = precision == amp::Precision::bf16 || precision == amp::Precision::fp16;
    peak_tflops = config.device.peak_tflops > 0 ? config.device.peak_tflops : half ? gpu->peak_tflops_16bit() : 0.0;
    if (device.is_cuda() && flops_per_token > 0 && peak_tflops == 0)
      world.log().info("no mfu in the metrics: no " + std::string(amp::to_string(precision)) + " peak is known for " +
                       gpu->name() + "; set device.peak_tflops (dense TFLOP/s) to log it");
    std::vector<std::int64_t> caps;
    if (config.batch.micro_batch == 0) caps = choose_micro_batch(train_spec);
    shares = std::make_unique<RankShares>(config, data_rank(), data_ranks(), caps);
    data::LoaderOptions train_options = loader_options(config.data.train, true);
    train_options.shares = shares->shares();
    train_options.accumulation = config.batch.accumulation;
    train_loader = open_loader(train_spec, train_options);
    explain_partitions();
    if (!config.data.eval.empty()) {
      data::LoaderOptions eval_options = loader_options(config.data.eval, false);
      // Between evaluations its read-ahead sits idle in (pinned) host memory: keep it short.
      eval_options.prefetch = eval_options.prefetch == 1 ? 1 : 2;
      eval_options.workers = 1;
      eval_loader = open_loader(
          dataset_spec(config, config.data.eval, "eval", task, model->context_length(), model->output_classes()),
          eval_options);
      eval_start = eval_loader->state();
    }
    const std::int64_t per_epoch = train_loader->steps_per_epoch();
    // train.steps and train.epochs: whichever is reached first (0 = that bound is off; the
    // config check makes sure one is set). An epoch count too large to multiply is no bound.
    total_steps = config.train.steps;
    if (config.train.epochs > 0) {
      std::int64_t by_epochs = 0;
      if (__builtin_mul_overflow(config.train.epochs, per_epoch, &by_epochs))
        by_epochs = std::numeric_limits<std::int64_t>::max();
      total_steps = total_steps == 0 ? by_epochs : std::min(total_steps, by_epochs);
    }
    if (total_steps <= 0)
      throw runtime::Error("nothing to train: the data gives " + std::to_string(per_epoch) +
                               " optimizer steps per epoch at batch.global " + std::to_string(config.batch.global) +
                               "; set train.steps, or use more data or a smaller batch",
                           runtime::ExitCode::bad_input);

    optimizer = make_run_optimizer(config.optimizer);
    scaler = std::make_unique<amp::LossScaler>(precision == amp::Precision::fp16, device,
                                               scaler_options(config.precision.loss_scale));
    const auto on_device = at::TensorOptions().device(device).dtype(at::kFloat);
    progress.window_loss = at::zeros({}, on_device);
    progress.window_skipped = at::zeros({1}, on_device);
    progress.nonfinite_run = at::zeros({1}, on_device);
    if (config.log.trace_steps > 0 && config.log.trace_start_step > total_steps)
      world.log().info("no step trace: log.trace_start_step " + std::to_string(config.log.trace_start_step) +
                       " is after the run's last step, " + std::to_string(total_steps));
  }

  void setup_device() {
    device = runtime::choose_device(world, {device_kind(config.device.kind), config.device.allow_shared_gpu});
    if (device.is_cpu()) {
      cpu_budget = runtime::cpu_memory_budget_from_environment();
      runtime::install_cpu_memory_budget(cpu_budget);
    }
#ifdef MPITRAIN_HAVE_NCCL
    if (device.is_cuda()) {
      at::cuda::set_device(device.index());
      if (config.device.memory_fraction > 0)
        c10::cuda::CUDACachingAllocator::setMemoryFraction(config.device.memory_fraction, device.index());
      at::globalContext().setAllowTF32CuBLAS(config.precision.tf32);
      at::globalContext().setAllowTF32CuDNN(config.precision.tf32);
    }
#endif
  }

  void check_same_config() {
    comm::check_all_equal(*comm, comm::fnv1a(config::to_json(config).dump()), "the resolved config",
                          "Start every rank with the same --config and --set arguments");
  }

  data::LoaderOptions loader_options(const config::DataSplit& split, bool shuffle) const {
    data::LoaderOptions options;
    options.batch_size = config.batch.micro_batch;
    options.seed = static_cast<std::uint64_t>(config.run.seed);
    options.shuffle = shuffle && split.shuffle;
    options.remainder = train::remainder(split.remainder);
    options.partitions = config.data.partitions;
    options.shuffle_window = config.data.shuffle_window;
    options.cache_bytes = static_cast<std::int64_t>(config.data.cache_mb * (1 << 20));
    options.prefetch = static_cast<int>(config.data.prefetch);
    options.workers = static_cast<int>(config.data.workers);
    options.device = device;
    // A pipeline stage reads only what it uses; the stages between read nothing (their
    // loaders still keep the position).
    if (pipeline) options.fields = data::Fields::of_stage(pipeline->grid().stage(), pipeline->grid().stages());
    return options;
  }

  // A loader of this rank. With data.seq_len 0 the sample length comes from the model, so a
  // refusal that depends on it says which options to look at.
  std::unique_ptr<data::Loader> open_loader(const data::DatasetSpec& spec, const data::LoaderOptions& options) {
    try {
      return std::make_unique<data::Loader>(spec, options, data_rank(), data_ranks(),
                                            pipeline ? pipeline->stage_comm() : *comm);
    } catch (const runtime::Error& e) {
      if (spec.kind != data::Kind::tokens || config.data.seq_len > 0) throw;
      throw runtime::Error(std::string(e.what()) + " (data.seq_len is 0, so a sample is the model's context length, " +
                               std::to_string(spec.seq_len) + " tokens, set by model." + config.model.name + "'s options)",
                           e.code());
    }
  }

  // A world size that does not divide the partitions reads the same batches, but each rank
  // reads every partition its slice touches: say so once, with the sizes that would not.
  void explain_partitions() const {
    const std::int64_t partitions = train_loader->sampler().partitions();
    if (partitions % data_ranks() == 0 || !world.is_root()) return;
    std::vector<std::int64_t> fitting;
    for (std::int64_t n = 1; n <= partitions; ++n)
      if (partitions % n == 0) fitting.push_back(n);
    world.log().info("data: " + std::to_string(data_ranks()) + " ranks do not divide the " + std::to_string(partitions) +
                     " partitions of each global batch, so ranks share partitions and each reads more than 1/" +
                     std::to_string(data_ranks()) + " of the data (the batches are the same). World sizes that read "
                     "1/N: " + comm::list_text(fitting) + "; or set data.partitions to a multiple of " +
                     std::to_string(data_ranks()) + " (it changes the order: a new run, not a resume)");
  }

  // The data-parallel ranks: every rank, or in a pipeline the replicas (each of a replica's
  // stages reads the same batches: the first needs the inputs, the last the targets).
  int data_rank() const { return pipeline ? pipeline->grid().replica() : world.rank(); }
  int data_ranks() const { return pipeline ? pipeline->grid().replicas() : world.size(); }

  // What a pipeline does not combine with, refused before anything is built.
  void check_pipeline_settings() const {
    const std::string stages = "parallel.pipeline_stages " + std::to_string(config.parallel.pipeline_stages);
    const auto refuse = [&](const std::string& what) {
      throw runtime::Error(stages + " with " + what, runtime::ExitCode::bad_input);
    };
    if (config.batch.micro_batch == 0)
      refuse("batch.micro_batch auto: the search measures one whole model per rank; set batch.micro_batch");
    if (config.data.rank_weights.mode == config::RankWeights::Mode::auto_)
      refuse("data.rank_weights auto: a replica's speed is its slowest stage's, which it does not measure; give the "
             "weights per replica, or \"equal\"");
  }

  // Rank 0 says how the grid lies and which pieces each stage runs.
  void explain_stages() const {
    const pipeline::Grid& grid = pipeline->grid();
    const auto& bounds = pipeline->bounds();
    for (int s = 0; s < grid.stages(); ++s)
      world.log().info("pipeline stage " + std::to_string(s) + " of " + std::to_string(grid.stages()) + " (" +
                       config::word(config.parallel.schedule) + ", ranks " + std::to_string(grid.world_rank(s, 0)) + ".." +
                       std::to_string(grid.world_rank(s, grid.replicas() - 1)) + "): " +
                       pipeline::describe(pipeline->pieces(), bounds[static_cast<std::size_t>(s)],
                                          bounds[static_cast<std::size_t>(s + 1)]));
  }

  // ZeRO stage 1: over this rank's shard only, so the state is about 1/N of the model's.
  std::unique_ptr<torch::optim::Optimizer> make_run_optimizer(const config::OptimizerConfig& settings) const {
    if (config.ddp.zero_stage == 1) return make_optimizer(settings, ddp->shard(), device);
    // A pipeline stage steps its own parameters only; the rest of the model is other ranks'.
    return pipeline ? make_optimizer(settings, *pipeline->stage(), device) : make_optimizer(settings, *model, device);
  }

  // ---- batch.micro_batch auto (trainer.h) --------------------------------------------------

  // What fits on each rank, then the micro-batch that fits on all and keeps batch.global.
  // Returns each rank's cap; sets config.batch.
  std::vector<std::int64_t> choose_micro_batch(const data::DatasetSpec& spec) {
    constexpr double kMargin = 0.1;  // allocator fragmentation, eval, checkpoint copies
    const std::int64_t upper = config.batch.global / world.size();  // no accumulation needed
    std::int64_t cap = upper;
    const bool limited = device.is_cuda() || cpu_budget > 0;
    if (comm->backend() == comm::Backend::nccl) warm_up_communicator();
    if (limited) {
      const TrialGuard guard(*model, device);  // trials change batch-norm statistics and RNG
      data::Dataset dataset(spec, /*cache_blocks=*/2);
      config::OptimizerConfig frozen = config.optimizer;
      frozen.lr = 0;  // real optimizer steps (their state takes memory) that leave the weights as they are
      auto trial_optimizer = make_run_optimizer(frozen);
      cap = largest_fitting([&](std::int64_t m) { return trial_step(dataset, *trial_optimizer, m); }, upper, kMargin);
      trial_optimizer.reset();
      release_cached_memory();
    }
    const std::vector<std::int64_t> caps = comm::gather_per_rank(*comm, cap);
    // Equal shares: the smallest cap rules. A list: each weighted share within its cap. auto: each
    // rank starts with a share in proportion to its own cap (RankShares), so none waits on the
    // smallest.
    std::vector<double> weights;
    if (config.data.rank_weights.mode == config::RankWeights::Mode::list) weights = config.data.rank_weights.weights;
    if (config.data.rank_weights.mode == config::RankWeights::Mode::auto_) weights.assign(caps.begin(), caps.end());
    config.batch.micro_batch = micro_batch_for(caps, weights, config.batch.global);
    config.batch.accumulation = 1;
    config = config::resolve(config, world.size());
    world.log().info("batch.micro_batch auto: " + std::to_string(config.batch.micro_batch) + " per rank x " +
                     std::to_string(config.batch.accumulation) + " accumulation x " + std::to_string(world.size()) +
                     " ranks = batch.global " + std::to_string(config.batch.global) + " (fits per rank: " + comm::list_text(caps) +
                     (limited ? "; where memory was the limit, " + std::to_string(static_cast<int>(kMargin * 100)) +
                                    " % below the largest that ran)"
                              : "; no memory limit on CPU)"));
    return caps;
  }

  // NCCL allocates its buffers at a communicator's first collectives (over 1 GiB with NVLS on
  // H100/H200), outside LibTorch's allocator: one bucket-sized all-reduce on every rank before
  // the search, so that what the trials measure leaves room for them.
  void warm_up_communicator() {
    at::Tensor bucket = at::zeros({std::max<std::int64_t>(1, static_cast<std::int64_t>(config.ddp.bucket_mb * (1 << 20)) / 4)},
                                  at::TensorOptions().device(device).dtype(at::kFloat));
    comm->all_reduce(bucket, comm::ReduceOp::sum);
  }

  // One training step at micro-batch m on the first m samples (repeated if fewer), without
  // communication; false when it ran out of memory (cleaned up). Non-finite gradients skip the
  // update so that even lr 0 cannot write NaN into the weights.
  bool trial_step(data::Dataset& dataset, torch::optim::Optimizer& optimizer, std::int64_t m) {
    try {
      data::Batch batch = dataset.allocate(m);
      std::vector<std::int64_t> indices(static_cast<std::size_t>(m));
      for (std::int64_t i = 0; i < m; ++i) indices[static_cast<std::size_t>(i)] = i % dataset.size();
      dataset.read_into(indices, batch);
      const auto task = model->task();
      const at::Tensor inputs = batch.inputs.to(device), targets = batch.targets.to(device);
      {
        auto no_sync = ddp->no_sync();
        at::Tensor loss;
        {
          amp::AutocastScope autocast(device, precision);
          loss = loss_of(model->forward(model_inputs(inputs, task)), targets, task);
        }
        loss.backward();
      }
      bool finite = true;
      for (const auto& parameter : model->parameters())
        if (parameter.grad().defined()) finite = finite && parameter.grad().isfinite().all().item<bool>();
      if (finite) optimizer.step();
      // The model's gradients, which at ZeRO stage 1 are not the optimizer's (its are the shard's).
      model->zero_grad(/*set_to_none=*/false);
      return true;
    } catch (const c10::Error& e) {
      if (!runtime::out_of_memory(e)) throw;
      model->zero_grad(/*set_to_none=*/false);
      release_cached_memory();
      return false;
    }
  }

  void release_cached_memory() {
#ifdef MPITRAIN_HAVE_NCCL
    if (device.is_cuda()) c10::cuda::CUDACachingAllocator::emptyCache();
#endif
  }

  // ---- Test fault points (runtime/fault.h): one line each where the step reaches them ------

  void fault_out_of_memory() const {
    if (runtime::fault_armed("train.out_of_memory", world.rank()))
      TORCH_CHECK_WITH(OutOfMemoryError, false, "out of memory (injected by MPITRAIN_FAULT_AT for a test)");
  }

  // train.slow_rank, a stand-in for a slower device in tests and benchmarks: three more forwards
  // of the micro-batch, without gradients, so the extra time grows with its size (about twice
  // the compute of a step on this rank).
  void fault_slow_rank(const data::Batch& batch) {
    if (!runtime::fault_armed("train.slow_rank", world.rank())) return;
    at::NoGradGuard no_grad;
    amp::AutocastScope autocast(device, precision);
    for (int k = 0; k < 3; ++k) model->forward(model_inputs(batch.inputs, model->task()));
  }
};

Trainer::Trainer(const runtime::World& world, const config::Config& config, const std::string& run_dir,
                 const runtime::StopSignals& signals)
    : impl_(std::make_unique<Impl>(world, config, run_dir, signals)) {
  impl_->setup();
}

Trainer::~Trainer() = default;

StepResult Trainer::step() {
  return explaining_out_of_memory(impl_->config, [&] { return impl_->step(); });
}

EvalResult Trainer::evaluate() { return impl_->evaluate(); }

Outcome Trainer::run() {
  return explaining_out_of_memory(impl_->config, [&] { return impl_->run(); });
}

std::string Trainer::save_checkpoint() { return impl_->save_checkpoint(); }

void Trainer::restore(const std::string& checkpoint_dir, bool allow_config_change) {
  restore_run(impl_->parts(), checkpoint_dir, allow_config_change);
}

std::int64_t Trainer::steps_done() const { return impl_->progress.steps_done; }
std::int64_t Trainer::total_steps() const { return impl_->total_steps; }
std::int64_t Trainer::parameter_count() const { return impl_->parameters; }
const config::Config& Trainer::config() const { return impl_->config; }

}  // namespace mpitrain::train

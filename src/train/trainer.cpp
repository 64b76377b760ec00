#include "mpitrain/train/trainer.h"

#include <ATen/ATen.h>
#include <torch/optim/optimizer.h>
#include <torch/serialize.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <limits>

#ifdef MPITRAIN_HAVE_NCCL
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDACachingAllocator.h>
#endif

#include "mpitrain/amp/amp.h"
#include "mpitrain/checkpoint/checkpoint.h"
#include "mpitrain/checkpoint/safetensors.h"
#include "mpitrain/checkpoint/weights.h"
#include "mpitrain/comm/communicator.h"
#include "mpitrain/data/loader.h"
#include "mpitrain/ddp/ddp.h"
#include "mpitrain/models/registry.h"
#include "mpitrain/runtime/device.h"
#include "mpitrain/runtime/error.h"
#include "mpitrain/runtime/fault.h"
#include "mpitrain/runtime/gpu_info.h"
#include "mpitrain/runtime/memory_budget.h"
#include "mpitrain/runtime/signals.h"
#include "mpitrain/runtime/world.h"
#include "mpitrain/train/metrics.h"
#include "mpitrain/train/micro_batch.h"
#include "mpitrain/train/optim.h"
#include "mpitrain/train/shard_state.h"
#include "mpitrain/train/shares.h"
#include "mpitrain/train/trace.h"
#include "per_rank.h"

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
  const std::string kind = config.data.kind != "auto" ? config.data.kind
                           : task == models::Task::language_modeling ? "tokens" : "classification";
  spec.kind = data::parse_kind(kind);
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

// A checkpoint file of one rank: rank-00003.json, optimizer-rank-00003.safetensors, ...
std::string rank_file(int rank, const char* prefix = "", const char* extension = ".json") {
  char name[64];
  std::snprintf(name, sizeof name, "%srank-%05d%s", prefix, rank, extension);
  return name;
}
constexpr const char* kShardFile = "optimizer-";  // ZeRO stage 1: each rank's optimizer state
constexpr const char* kDdpFile = "ddp-";          // the DDP engine's state (compression residuals)

nlohmann::json generator_state(at::Generator generator) {
  const at::Tensor state = generator.get_state();
  const auto* bytes = state.data_ptr<std::uint8_t>();
  return std::vector<int>(bytes, bytes + state.numel());
}

void set_generator_state(at::Generator generator, const nlohmann::json& json) {
  const auto bytes = json.get<std::vector<int>>();
  at::Tensor state = at::empty({static_cast<std::int64_t>(bytes.size())}, at::kByte);
  std::copy(bytes.begin(), bytes.end(), state.data_ptr<std::uint8_t>());
  generator.set_state(state);
}

// Keys that may change between a checkpoint and the run resuming from it: they do not change
// what the run computes. Prefix match on the dotted path.
bool safe_to_change(const std::string& path) {
  for (const char* prefix : {"/model/init_from", "/train/", "/log/", "/eval/", "/checkpoint/", "/ddp/comm_timeout_s", "/data/prefetch",
                             "/data/file_locking", "/device/", "/run/dir", "/run/name", "/batch/micro_batch",
                             "/batch/accumulation", "/data/rank_weights", "/data/rebalance_every"})
    if (path.rfind(prefix, 0) == 0) return true;
  return false;
}

}  // namespace

std::string run_directory(const config::Config& config) {
  return (std::filesystem::path(config.run.dir) / config.run.name).string();
}

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
  std::unique_ptr<RankShares> shares;  // of each micro-batch (data.rank_weights)
  std::int64_t cpu_budget = 0;         // MPITRAIN_CPU_MEMORY_BUDGET, bytes (0 = none)
  std::unique_ptr<data::Loader> train_loader;
  std::unique_ptr<data::Loader> eval_loader;
  data::LoaderState eval_start;
  std::unique_ptr<torch::optim::Optimizer> optimizer;
  std::unique_ptr<amp::LossScaler> scaler;
  std::int64_t steps_done = 0;
  std::int64_t total_steps = 0;
  std::int64_t epoch = 0;
  std::int64_t nonfinite_run = 0;  // consecutive steps skipped for a non-finite loss or gradient
  std::int64_t seq_len = 0;  // tokens per sample (language models)
  double flops_per_token = 0;  // training FLOPs (forward + backward), 0 = unknown
  double peak_tflops = 0;      // the device's peak at the training precision, 0 = unknown
  std::unique_ptr<runtime::GpuInfo> gpu;
  StepTrace trace;
  std::int64_t trace_from = 0;  // the first step this run traced

  // What happened since the last log line.
  at::Tensor window_loss;
  std::int64_t window_steps = 0;
  std::int64_t window_skipped = 0;
  StepTimes window_times;
  std::int64_t comm_bytes_logged = 0;  // DDP's bytes sent, as of the last log line
  Clock::time_point window_start = Clock::now();

  Impl(const runtime::World& w, const config::Config& c, std::string dir, const runtime::StopSignals& s)
      : world(w), config(c), run_dir(std::move(dir)), signals(s),
        trace(c.log.trace_start_step, c.log.trace_steps, w.rank()) {}

  void check_same_config() {
    const auto fingerprint = static_cast<std::int64_t>(config::fingerprint(config));
    const std::vector<std::int64_t> all = detail::gather_per_rank(*comm, fingerprint);
    for (int r = 0; r < comm->size(); ++r)
      if (all[static_cast<std::size_t>(r)] != fingerprint)
        throw runtime::Error("the resolved config differs between rank " + std::to_string(r) + " and rank " +
                                 std::to_string(comm->rank()) + ": start every rank with the same --config and --set "
                                 "arguments",
                             runtime::ExitCode::bad_input);
  }

  data::LoaderOptions loader_options(const config::DataSplit& split, bool shuffle) const {
    data::LoaderOptions options;
    options.batch_size = config.batch.micro_batch;
    options.seed = static_cast<std::uint64_t>(config.run.seed);
    options.shuffle = shuffle && split.shuffle;
    options.remainder = data::parse_remainder(split.remainder);
    options.prefetch = static_cast<int>(config.data.prefetch);
    options.device = device;
    return options;
  }

  // A loader of this rank. With data.seq_len 0 the sample length comes from the model, so a
  // refusal that depends on it says which options to look at.
  std::unique_ptr<data::Loader> open_loader(const data::DatasetSpec& spec, const data::LoaderOptions& options) {
    try {
      return std::make_unique<data::Loader>(spec, options, world.rank(), world.size(), *comm);
    } catch (const runtime::Error& e) {
      if (spec.kind != data::Kind::tokens || config.data.seq_len > 0) throw;
      throw runtime::Error(std::string(e.what()) + " (data.seq_len is 0, so a sample is the model's context length, " +
                               std::to_string(spec.seq_len) + " tokens, set by model." + config.model.name + "'s options)",
                           e.code());
    }
  }

  void setup_device() {
    device = runtime::choose_device(world, {runtime::parse_device_kind(config.device.kind), config.device.allow_shared_gpu});
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

  void setup() {
    setup_device();
    comm::CommOptions comm_options;
    comm_options.timeout = std::chrono::milliseconds(static_cast<std::int64_t>(config.ddp.comm_timeout_s * 1000));
    comm = comm::make_communicator(world, device, comm_options, comm::parse_backend(config.device.backend));
    check_same_config();
    precision = amp::resolve_precision(config.precision.mode, device);

    at::manual_seed(static_cast<std::uint64_t>(config.run.seed));
    model = models::create(config.model.name, config.model.options);
    parameters = models::count_parameters(*model);
    if (!config.model.init_from.empty())
      checkpoint::load_weights(*model, checkpoint::read_weights(config.model.init_from),
                               "model.init_from '" + config.model.init_from + "'");
    model->to(device);

    ddp = std::make_unique<ddp::DistributedDataParallel>(model, *comm, ddp_options(config.ddp));

    const auto task = model->task();
    const data::DatasetSpec train_spec =
        dataset_spec(config, config.data.train, "train", task, model->context_length(), model->output_classes());
    seq_len = train_spec.seq_len;
    flops_per_token = model->training_flops_per_token(seq_len);
    gpu = std::make_unique<runtime::GpuInfo>(device);
    const bool half = precision == amp::Precision::bf16 || precision == amp::Precision::fp16;
    peak_tflops = config.device.peak_tflops > 0 ? config.device.peak_tflops : half ? gpu->peak_tflops_16bit() : 0.0;
    std::vector<std::int64_t> caps;
    if (config.batch.micro_batch == 0) caps = choose_micro_batch(train_spec);
    shares = std::make_unique<RankShares>(config, world.rank(), world.size(), caps);
    data::LoaderOptions train_options = loader_options(config.data.train, true);
    train_options.shares = shares->shares();
    train_loader = open_loader(train_spec, train_options);
    if (!config.data.eval.empty()) {
      eval_loader = open_loader(
          dataset_spec(config, config.data.eval, "eval", task, model->context_length(), model->output_classes()),
          loader_options(config.data.eval, false));
      eval_start = eval_loader->state();
    }
    const std::int64_t per_epoch = train_loader->steps_per_epoch() / config.batch.accumulation;
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
    window_loss = at::zeros({}, at::TensorOptions().device(device));
    if (config.log.trace_steps > 0 && config.log.trace_start_step > total_steps)
      world.log().info("no step trace: log.trace_start_step " + std::to_string(config.log.trace_start_step) +
                       " is after the run's last step, " + std::to_string(total_steps));
  }

  // ZeRO stage 1: over this rank's shard only, so the state is about 1/N of the model's.
  std::unique_ptr<torch::optim::Optimizer> make_run_optimizer(const config::OptimizerConfig& settings) const {
    return config.ddp.zero_stage == 1 ? make_optimizer(settings, ddp->shard(), device)
                                      : make_optimizer(settings, *model, device);
  }

  // batch.micro_batch auto (trainer.h): what fits on each rank, then the micro-batch that fits
  // on all and keeps batch.global. Returns each rank's cap; sets config.batch.
  std::vector<std::int64_t> choose_micro_batch(const data::DatasetSpec& spec) {
    constexpr double kMargin = 0.1;  // allocator fragmentation, eval, checkpoint copies
    const std::int64_t upper = config.batch.global / world.size();  // no accumulation needed
    std::int64_t cap = upper;
    const bool limited = device.is_cuda() || cpu_budget > 0;
    if (limited) {
      data::Dataset dataset(spec, /*cache_blocks=*/2);
      config::OptimizerConfig frozen = config.optimizer;
      frozen.lr = 0;  // real optimizer steps (their state takes memory) that leave the weights as they are
      auto trial_optimizer = make_run_optimizer(frozen);
      cap = largest_fitting([&](std::int64_t m) { return trial_step(dataset, *trial_optimizer, m); }, upper, kMargin);
      trial_optimizer.reset();
      release_cached_memory();
    }
    const std::vector<std::int64_t> caps = detail::gather_per_rank(*comm, cap);
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
                     " ranks = batch.global " + std::to_string(config.batch.global) + " (fits per rank: " + detail::per_rank_text(caps) +
                     (limited ? "; where memory was the limit, " + std::to_string(static_cast<int>(kMargin * 100)) +
                                    " % below the largest that ran)"
                              : "; no memory limit on CPU)"));
    return caps;
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
    } catch (const c10::OutOfMemoryError&) {
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

  // Waits for the work queued on the device: on CUDA a traced phase then ends when its kernels
  // have run rather than when they were queued.
  void settle_device() {
#ifdef MPITRAIN_HAVE_NCCL
    if (device.is_cuda()) at::cuda::getCurrentCUDAStream(device.index()).synchronize();
#endif
  }

  // Records [start, now] while the step trace records.
  void trace_phase(const char* name, std::int64_t step, Clock::time_point start, int micro_step = -1,
                   TraceCategory category = TraceCategory::phase) {
    if (!trace.recording()) return;
    settle_device();
    trace.add(name, category, step, start, Clock::now(), micro_step);
  }

  // Collective: starts the trace at the first step of its window that this run reaches. The
  // barrier gives every rank the same time zero.
  void start_trace_if_due(std::int64_t step) {
    if (trace.recording() || !trace.covers(step)) return;
    settle_device();
    world.barrier(comm->options().timeout, "the barrier that starts the step trace (log.trace_steps)");
    comm->set_timing(true);
    trace_from = step;
    trace.start();
  }

  // Each bucket's all-reduce of this step; all have completed, since the optimizer phase waited
  // for the device.
  void trace_buckets(std::int64_t step) {
    if (!trace.recording()) return;
    const auto timings = ddp->last_bucket_timings();
    for (std::size_t b = 0; b < timings.size(); ++b)
      if (timings[b])
        trace.add("all-reduce bucket " + std::to_string(b), TraceCategory::comm, step, timings[b]->started,
                  timings[b]->completed, static_cast<int>(b), TraceThread::comm);
  }

  // Collective: ends the trace; rank 0 writes trace.json, logs the overlap figure and adds it to
  // the metrics.
  void finish_trace(MetricsLog& metrics) {
    comm->set_timing(false);
    const std::vector<TraceEvent> events = gather_trace(world, trace.stop(), comm->options().timeout);
    if (!world.is_root()) return;
    const std::filesystem::path path = std::filesystem::path(run_dir) / "trace.json";
    {
      std::ofstream out(path);
      out << chrome_trace(events, world.size()).dump() << '\n';
      if (!out.flush())
        throw runtime::Error("cannot write the step trace " + path.string() +
                             ": check that the run directory is writable and has space, or set log.trace_steps=0");
    }
    const Overlap overlap = communication_overlap(events);
    const std::size_t buckets = ddp->bucket_layout().size();
    nlohmann::json record = {{"step", steps_done},
                             {"trace_file", path.filename().string()},
                             {"trace_steps", {trace_from, steps_done}},
                             {"trace_buckets", buckets}};
    std::string line = "trace: steps " + std::to_string(trace_from) + "-" + std::to_string(steps_done) +
                       " written to " + path.string() + "; ";
    if (world.size() == 1) {
      line += "one rank, so no gradient communication to hide behind backward";
    } else if (const auto fraction = overlap.fraction()) {
      char figure[160];
      std::snprintf(figure, sizeof figure, "gradient communication hidden behind backward: %.1f %% (%.2f ms of %.2f ms)",
                    *fraction * 100, overlap.hidden_us / 1e3, overlap.total_us / 1e3);
      line += figure;
      record["trace_overlap"] = *fraction;
      record["trace_comm_hidden_s"] = overlap.hidden_us / 1e6;
      record["trace_comm_s"] = overlap.total_us / 1e6;
    } else {
      line += "no gradient all-reduce was recorded (" + std::to_string(buckets) + " DDP buckets), so no overlap figure";
    }
    world.log().info(line);
    metrics.write(record);
  }

  // One micro-batch: forward under autocast (after DDP's buffer broadcast before the last one),
  // backward of the scaled loss. Returns the loss.
  at::Tensor forward_backward(const data::Batch& batch, std::int64_t step, std::int64_t micro) {
    const bool last = micro + 1 == config.batch.accumulation;
    const auto task = model->task();
    auto start = Clock::now();
    if (last) ddp->before_forward();
    at::Tensor loss;
    {
      amp::AutocastScope autocast(device, precision);
      loss = loss_of(model->forward(model_inputs(batch.inputs, task)), batch.targets, task);
    }
    trace_phase("forward", step, start, static_cast<int>(micro));
    start = Clock::now();
    if (last) {
      scaler->scale(loss / loss_divisor()).backward();
    } else {
      auto no_sync = ddp->no_sync();
      scaler->scale(loss / loss_divisor()).backward();
    }
    trace_phase("backward", step, start, static_cast<int>(micro));
    return loss.detach();
  }

  // The mean loss over this rank's samples becomes its part of the step's loss: weighted by its
  // share (RankShares) and divided over the micro-steps.
  double loss_divisor() const { return static_cast<double>(config.batch.accumulation) / shares->loss_factor(); }

  // A stand-in for a slower device in tests and benchmarks (fault point train.slow_rank): three
  // more forwards of the micro-batch, without gradients, so the extra time grows with its size
  // (about twice the compute of a step on this rank).
  void forward_again(const data::Batch& batch) {
    at::NoGradGuard no_grad;
    amp::AutocastScope autocast(device, precision);
    for (int k = 0; k < 3; ++k) model->forward(model_inputs(batch.inputs, model->task()));
  }

  // Collective (data.rank_weights auto): new shares from the measured speeds, if worth it.
  void rebalance(MetricsLog& metrics) {
    if (!shares->rebalance(steps_done, *comm)) return;
    train_loader->set_shares(shares->shares());
    std::string speeds;
    char figure[32];
    for (double seconds : shares->seconds_per_sample()) {
      std::snprintf(figure, sizeof figure, "%s%.3f", speeds.empty() ? "" : ", ", seconds * 1e3);
      speeds += figure;
    }
    world.log().info("data.rank_weights auto after step " + std::to_string(steps_done) + ": shares of each micro-batch " +
                     detail::per_rank_text(shares->shares()) + " (measured ms of forward + backward per sample: " +
                     speeds + ")");
    metrics.write({{"step", steps_done}, {"rank_shares", shares->shares()}, {"rank_seconds_per_sample", shares->seconds_per_sample()}});
  }

  StepResult step() {
    if (runtime::fault_armed("train.out_of_memory", world.rank()))
      TORCH_CHECK_WITH(OutOfMemoryError, false, "out of memory (injected by MPITRAIN_FAULT_AT for a test)");
    const std::int64_t number = steps_done + 1;
    start_trace_if_due(number);
    const auto step_start = Clock::now();
    StepResult result;
    result.lr = learning_rate(config.schedule, config.optimizer.lr, steps_done, total_steps);
    set_learning_rate(*optimizer, result.lr);

    at::Tensor loss_sum = at::zeros({}, at::TensorOptions().device(device));
    const bool measured = shares->measures(number);
    for (std::int64_t micro = 0; micro < config.batch.accumulation; ++micro) {
      auto start = Clock::now();
      const data::Batch batch = train_loader->next();
      epoch = batch.epoch;
      result.times.data += seconds_since(start);
      trace_phase("data wait", number, start, static_cast<int>(micro));

      if (measured) settle_device();
      start = Clock::now();
      loss_sum += forward_backward(batch, number, micro);
      if (runtime::fault_armed("train.slow_rank", world.rank())) forward_again(batch);
      if (measured) settle_device();
      const double compute = seconds_since(start);
      result.times.compute += compute;
      if (measured) shares->record(compute, batch.targets.size(0));
    }

    auto start = Clock::now();
    ddp->finish_backward();
    result.times.comm = seconds_since(start);
    trace_phase("all-reduce wait", number, start);

    // The averaged gradients the optimizer steps: the whole model's, or this rank's ZeRO shard
    // (then clipping's global norm takes one more all-reduce and the step ends with the
    // parameters' all-gather).
    start = Clock::now();
    const bool finite = scaler->unscale_and_check(ddp->gradients(), *comm);
    if (finite) {
      if (config.optimizer.grad_clip > 0) result.grad_norm = ddp->clip_grad_norm(config.optimizer.grad_clip);
      optimizer->step();
      ddp->finish_step();
    }
    scaler->update(!finite);
    nonfinite_run = finite ? 0 : nonfinite_run + 1;
    // Zero in place: gradients stay DDP bucket views, so no copy into the buckets next step.
    model->zero_grad(/*set_to_none=*/false);
    result.times.optimizer = seconds_since(start);
    trace_phase("optimizer", number, start);
    trace_buckets(number);
    trace_phase("step", number, step_start, -1, TraceCategory::step);

    result.skipped = !finite;
    // Weighted like the gradient, so that the ranks' average is the global batch's mean loss.
    result.loss = loss_sum / loss_divisor();
    result.step = ++steps_done;
    return result;
  }

  EvalResult evaluate() {
    EvalResult result;
    if (!eval_loader) return result;
    const auto start = Clock::now();
    runtime::fault_point("train.evaluate", world.rank());
    eval_loader->restore(eval_start);  // the same eval samples every time
    std::int64_t batches = eval_loader->steps_per_epoch();
    if (config.eval.max_batches > 0) batches = std::min(batches, config.eval.max_batches);
    const auto task = model->task();
    const auto options = at::TensorOptions().device(device).dtype(at::kDouble);
    at::Tensor totals = at::zeros({3}, options);  // loss * samples, correct, samples
    model->eval();
    {
      at::NoGradGuard no_grad;
      for (std::int64_t b = 0; b < batches; ++b) {
        const data::Batch batch = eval_loader->next();
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
    comm->all_reduce(totals, comm::ReduceOp::sum);
    const at::Tensor host = totals.cpu();
    result.samples = static_cast<std::int64_t>(host[2].item<double>());
    result.loss = result.samples > 0 ? host[0].item<double>() / static_cast<double>(result.samples) : 0.0;
    if (task == models::Task::classification && result.samples > 0)
      result.accuracy = host[1].item<double>() / static_cast<double>(result.samples);
    trace_phase("eval", steps_done, start);
    return result;
  }

  std::string checkpoint_root() const { return (std::filesystem::path(run_dir) / config.checkpoint.dir).string(); }

  // A failed save (disk full, no permission) ends the run with what to do; the checkpoints
  // already there are untouched (docs/checkpoints.md).
  std::string save_checkpoint() {
    try {
      return write_checkpoint();
    } catch (const runtime::Error& e) {
      throw runtime::Error(saving_failed(e.what()), e.code());
    } catch (const c10::Error& e) {
      throw runtime::Error(saving_failed(e.what_without_backtrace()));
    } catch (const std::exception& e) {
      throw runtime::Error(saving_failed(e.what()));
    }
  }

  std::string saving_failed(const std::string& why) const {
    return "saving the checkpoint of step " + std::to_string(steps_done) + " under " + checkpoint_root() +
           " failed: " + why + ". The checkpoints already there are untouched; free space or fix the folder, then "
           "resume with --resume auto";
  }

  std::string write_checkpoint() {
    const auto start = Clock::now();
    checkpoint::Writer writer(world, checkpoint_root(), steps_done,
                              std::chrono::milliseconds(static_cast<std::int64_t>(config.checkpoint.save_timeout_s * 1000)),
                              comm->options().timeout);
    const std::filesystem::path dir = writer.path();
    const auto write_tensors = [&](const std::string& name, const std::map<std::string, at::Tensor>& tensors) {
      checkpoint::write_safetensors((dir / name).string(), tensors);
      checkpoint::fsync_path((dir / name).string());
    };
    if (world.is_root()) {
      write_tensors("model.safetensors", checkpoint::state_dict_of(*model));
      if (config.ddp.zero_stage == 0) {
        // Serialised in memory: LibTorch's file writer aborts the process (an exception from a
        // destructor) when the disk fills, where write_file reports it.
        std::ostringstream optimizer_bytes;
        torch::save(*optimizer, optimizer_bytes);
        checkpoint::write_file((dir / "optimizer.pt").string(), optimizer_bytes.str());
      }
      const nlohmann::json state = {{"step", steps_done},     {"epoch", epoch},
                                    {"world_size", world.size()}, {"zero_stage", config.ddp.zero_stage},
                                    {"scaler", scaler->state()},  {"config", config::to_json(config)}};
      checkpoint::write_file((dir / "trainer.json").string(), state.dump(2));
    }
    if (config.ddp.zero_stage == 1)
      write_tensors(rank_file(world.rank(), kShardFile, ".safetensors"), shard_state(*optimizer, ddp->shard()));
    if (const auto ddp_state = ddp->state(); !ddp_state.empty())
      write_tensors(rank_file(world.rank(), kDdpFile, ".safetensors"), ddp_state);
    nlohmann::json mine = {{"loader", train_loader->state()},
                           {"window_loss", window_loss.item<double>()},
                           {"window_steps", window_steps},
                           {"window_skipped", window_skipped},
                           {"rng_cpu", generator_state(at::detail::getDefaultCPUGenerator())}};
#ifdef MPITRAIN_HAVE_NCCL
    if (device.is_cuda()) mine["rng_cuda"] = generator_state(at::cuda::detail::getDefaultCUDAGenerator(device.index()));
#endif
    checkpoint::write_file((dir / rank_file(world.rank())).string(), mine.dump());
    const std::string saved = writer.commit({config.checkpoint.keep_last, config.checkpoint.keep_every});
    trace_phase("checkpoint", steps_done, start);
    world.log().info("checkpoint " + saved + " saved in " + std::to_string(seconds_since(start)) + " s");
    return saved;
  }

  void check_config_change(const std::string& dir, const nlohmann::json& saved, bool allow) {
    const nlohmann::json now = config::to_json(config);
    std::string changed;
    for (const auto& op : nlohmann::json::diff(saved, now)) {
      const std::string path = op.at("path").get<std::string>();
      if (!safe_to_change(path)) changed += (changed.empty() ? "" : ", ") + path.substr(1);
    }
    if (changed.empty()) return;
    std::replace(changed.begin(), changed.end(), '/', '.');
    if (allow) {
      world.log().warn("resuming with changed settings: " + changed);
      return;
    }
    throw runtime::Error("checkpoint " + dir + " was written with different settings (its trainer.json) for: " + changed +
                             ". Resuming would silently change the run; restore those settings, or pass "
                             "--allow-config-change to resume anyway",
                         runtime::ExitCode::bad_input);
  }

  void restore(const std::string& dir, bool allow_config_change) {
    const std::string problem = checkpoint::verify(dir);
    const std::string what_to_do = ". Pick another one, or use --resume auto to take the newest complete one";
    if (!problem.empty())
      throw runtime::Error("checkpoint " + dir + " cannot be used: " + problem + what_to_do, runtime::ExitCode::bad_input);
    // The manifest proves the files are as saved; this catches what it cannot: a checkpoint
    // from another program or edited and resealed by hand.
    const auto reading = [&](const std::string& name, const auto& read) {
      try {
        return read((std::filesystem::path(dir) / name).string());
      } catch (const runtime::Error&) {
        throw;
      } catch (const std::exception& e) {
        const std::string why = e.what();
        throw runtime::Error("checkpoint " + dir + " cannot be used: " + name + ": " +
                                 why.substr(0, why.find('\n')) + what_to_do,
                             runtime::ExitCode::bad_input);
      }
    };
    const auto read_json = [](const std::string& path) {
      std::ifstream in(path);
      if (!in) throw std::runtime_error("cannot be read");
      return nlohmann::json::parse(in);
    };
    const auto count = [](const nlohmann::json& state, const char* key, std::int64_t min) {
      const auto v = state.at(key).get<std::int64_t>();
      if (v < min) throw std::out_of_range(std::string(key) + " is " + std::to_string(v));
      return v;
    };

    std::int64_t step = 0, saved_epoch = 0, saved_world = 0, saved_zero = 0;
    reading("trainer.json", [&](const std::string& path) {
      const nlohmann::json state = read_json(path);
      if (!state.at("config").is_object()) throw std::invalid_argument("\"config\" is not an object");
      check_config_change(dir, state.at("config"), allow_config_change);
      step = count(state, "step", 0);
      saved_epoch = count(state, "epoch", 0);
      saved_world = count(state, "world_size", 1);
      saved_zero = state.contains("zero_stage") ? count(state, "zero_stage", 0) : 0;
      scaler->load_state(state.at("scaler"));
      return 0;
    });
    if (saved_zero != config.ddp.zero_stage)
      throw runtime::Error("checkpoint " + dir + " holds the optimizer state of ddp.zero_stage " + std::to_string(saved_zero) +
                               "; this run has ddp.zero_stage " + std::to_string(config.ddp.zero_stage) +
                               ". Resume with ddp.zero_stage " + std::to_string(saved_zero),
                           runtime::ExitCode::bad_input);
    reading("model.safetensors", [&](const std::string& path) {
      checkpoint::load_weights(*model, checkpoint::read_safetensors(path), "checkpoint " + dir);
      return 0;
    });
    if (config.ddp.zero_stage == 1) {
      // This rank's own file first: at the same world size it holds exactly this shard.
      std::vector<std::string> files;
      for (std::int64_t k = 0; k < saved_world; ++k)
        files.push_back((std::filesystem::path(dir) / rank_file(static_cast<int>((world.rank() + k) % saved_world),
                                                                kShardFile, ".safetensors")).string());
      reading(rank_file(world.rank() % static_cast<int>(saved_world), kShardFile, ".safetensors"), [&](const std::string&) {
        load_shard_state(*optimizer, ddp->shard(), files);
        return 0;
      });
    } else {
      reading("optimizer.pt", [&](const std::string& path) {
        torch::load(*optimizer, path);
        return 0;
      });
    }
    steps_done = step;
    epoch = saved_epoch;

    // The loader's position is global, so any rank's file gives it; the rest is per rank and
    // only carries over at the same world size.
    const bool same_world = saved_world == world.size();
    reading(rank_file(same_world ? world.rank() : 0), [&](const std::string& path) {
      const nlohmann::json mine = read_json(path);
      train_loader->restore(mine.at("loader").get<data::LoaderState>());
      if (!same_world) return 0;
      window_loss.fill_(mine.at("window_loss").get<double>());
      window_steps = count(mine, "window_steps", 0);
      window_skipped = count(mine, "window_skipped", 0);
      set_generator_state(at::detail::getDefaultCPUGenerator(), mine.at("rng_cpu"));
#ifdef MPITRAIN_HAVE_NCCL
      if (device.is_cuda() && mine.contains("rng_cuda"))
        set_generator_state(at::cuda::detail::getDefaultCUDAGenerator(device.index()), mine.at("rng_cuda"));
#endif
      return 0;
    });
    const std::string ddp_file = rank_file(world.rank(), kDdpFile, ".safetensors");
    const bool ddp_saved = std::filesystem::exists(std::filesystem::path(dir) / ddp_file);
    if (same_world && ddp_saved) {
      reading(ddp_file, [&](const std::string& path) {
        ddp->load_state(checkpoint::read_safetensors(path));
        return 0;
      });
    } else if (!ddp->state().empty()) {
      world.log().warn("checkpoint " + dir + " holds no gradient compression state for " + std::to_string(world.size()) +
                       " ranks: error feedback starts from zero");
    }
    if (!same_world)
      world.log().warn("resuming " + std::to_string(saved_world) + " ranks' checkpoint on " +
                       std::to_string(world.size()) + " ranks: the data order continues exactly; random "
                       "streams (dropout) start afresh" +
                       (config.ddp.zero_stage == 1 ? "; the optimizer state is re-sharded exactly" : ""));
    world.log().info("resumed from " + dir + " at step " + std::to_string(steps_done));
  }

  nlohmann::json log_record(const StepResult& last) {
    // The one cross-rank reduction of metrics, at logging cadence only.
    at::Tensor loss = window_loss / static_cast<double>(std::max<std::int64_t>(window_steps, 1));
    comm->all_reduce(loss, comm::ReduceOp::avg);
    const double elapsed = seconds_since(window_start);
    const double samples = static_cast<double>(window_steps * config.batch.global);
    nlohmann::json record = {{"step", last.step},
                             {"epoch", epoch},
                             {"loss", loss.item<double>()},
                             {"lr", last.lr},
                             {"grad_norm", last.grad_norm},
                             {"loss_scale", scaler->current_scale()},
                             {"skipped_steps", window_skipped},
                             {"samples_per_s", samples / elapsed},
                             {"step_time_s", elapsed / static_cast<double>(window_steps)},
                             {"time_data_s", window_times.data / static_cast<double>(window_steps)},
                             {"time_compute_s", window_times.compute / static_cast<double>(window_steps)},
                             {"time_comm_s", window_times.comm / static_cast<double>(window_steps)},
                             {"time_optimizer_s", window_times.optimizer / static_cast<double>(window_steps)},
                             {"optimizer_state_bytes", optimizer_state_bytes(*optimizer)}};
    const std::int64_t comm_bytes = ddp->stats().bytes_sent;
    record["comm_bytes_per_step"] = static_cast<double>(comm_bytes - comm_bytes_logged) / static_cast<double>(window_steps);
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
    if (const auto reading = gpu->read()) {  // rank 0's GPU
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
    window_loss.zero_();
    window_steps = 0;
    window_skipped = 0;
    window_times = {};
    window_start = Clock::now();
    return record;
  }
};

Trainer::Trainer(const runtime::World& world, const config::Config& config, const std::string& run_dir,
                 const runtime::StopSignals& signals)
    : impl_(std::make_unique<Impl>(world, config, run_dir, signals)) {
  impl_->setup();
}

Trainer::~Trainer() = default;

StepResult Trainer::step() {
  try {
    return impl_->step();
  } catch (const c10::OutOfMemoryError& e) {
    throw runtime::Error(std::string("out of GPU memory at batch.micro_batch ") + std::to_string(impl_->config.batch.micro_batch) +
                         ": lower batch.micro_batch and raise batch.accumulation (or set batch.global), or use "
                         "precision.mode bf16/fp16. " + e.what_without_backtrace());
  }
}

EvalResult Trainer::evaluate() { return impl_->evaluate(); }

Outcome Trainer::run() {
  Impl& s = *impl_;
  if (s.world.is_root()) std::filesystem::create_directories(s.run_dir);
  MetricsLog metrics(s.world.is_root(),
                     s.config.log.metrics_file.empty() ? "" : (std::filesystem::path(s.run_dir) / s.config.log.metrics_file).string(),
                     s.config.log.console, s.steps_done, s.total_steps);
  auto log_eval = [&] {
    const EvalResult eval = s.evaluate();
    if (eval.samples == 0) return;
    nlohmann::json record = {{"step", s.steps_done}, {"epoch", s.epoch}, {"eval_loss", eval.loss}, {"eval_samples", eval.samples}};
    if (eval.accuracy >= 0) record["eval_accuracy"] = eval.accuracy;
    metrics.write(record);
  };
  s.shares->begin(s.steps_done);
  while (s.steps_done < s.total_steps) {
    const StepResult result = step();
    s.window_loss += result.loss;
    ++s.window_steps;
    s.window_skipped += result.skipped ? 1 : 0;
    s.window_times.data += result.times.data;
    s.window_times.compute += result.times.compute;
    s.window_times.comm += result.times.comm;
    s.window_times.optimizer += result.times.optimizer;
    const bool last = s.steps_done == s.total_steps;
    // fp16 has the loss scaler for this; in bf16 and fp32 a non-finite step is not an overflow
    // that a smaller scale would cure. Every rank has the same count (found-inf is agreed).
    const bool diverged = s.precision != amp::Precision::fp16 && s.nonfinite_run > s.config.train.max_nonfinite_steps;
    if (last || diverged || s.steps_done % s.config.log.every_steps == 0) metrics.write(s.log_record(result));
    if (diverged) {
      const std::string saved = s.save_checkpoint();
      throw runtime::Error("the loss or gradients were not finite in " + std::to_string(s.nonfinite_run) +
                           " steps in a row (steps " + std::to_string(s.steps_done - s.nonfinite_run + 1) + " to " +
                           std::to_string(s.steps_done) + "), which were skipped; checkpoint " + saved +
                           " holds the weights from before them. Lower optimizer.lr, set optimizer.grad_clip or check "
                           "the data, then resume with --resume auto (train.max_nonfinite_steps allows more in a row)");
    }
    if (!last && s.shares->due(s.steps_done)) s.rebalance(metrics);
    if (!last && s.config.eval.every_steps > 0 && s.steps_done % s.config.eval.every_steps == 0) log_eval();
    const bool cadence = s.config.checkpoint.every_steps > 0 && s.steps_done % s.config.checkpoint.every_steps == 0;
    if (!last && cadence) s.save_checkpoint();
    // The trace's window ends after its last step's eval and checkpoint (the run's last step's
    // after the final ones, below).
    if (!last && s.trace.recording() && s.steps_done >= s.trace.last_step()) s.finish_trace(metrics);
    // Every rank asks at the same step boundary, so all stop at the same step.
    if (!last && s.signals.agree(s.world, s.comm->options().timeout)) {
      if (s.config.checkpoint.save_on_stop && !cadence) s.save_checkpoint();
      if (s.trace.recording()) s.finish_trace(metrics);
      return Outcome::stopped;
    }
  }
  log_eval();
  if (s.steps_done > 0) s.save_checkpoint();
  if (s.trace.recording()) s.finish_trace(metrics);
  return Outcome::finished;
}

std::string Trainer::save_checkpoint() { return impl_->save_checkpoint(); }

void Trainer::restore(const std::string& checkpoint_dir, bool allow_config_change) {
  impl_->restore(checkpoint_dir, allow_config_change);
}

std::int64_t Trainer::steps_done() const { return impl_->steps_done; }
std::int64_t Trainer::total_steps() const { return impl_->total_steps; }
std::int64_t Trainer::parameter_count() const { return impl_->parameters; }
const config::Config& Trainer::config() const { return impl_->config; }

}  // namespace mpitrain::train

// DDP cost, two measurements:
//
// Default: (1) at world size 1, the training step with DDP against the same LibTorch loop
// without it, on an MLP of >= 10 M parameters (goal: <= 3 % overhead); (2) at any world size,
// the gradient bytes reduced per second of backward-plus-wait.
//
//   build/bin/bench_ddp --out bench/results/ddp_np1.json
//   mpirun -np 2 build/bin/bench_ddp --out bench/results/ddp_np2.json
//
// --train-step: steps/s of mpitrain's real training step (Trainer::step without the loader), set
// up from mpitrain config keys (--set KEY=VALUE), measured exactly as bench/torch_ddp.py measures
// PyTorch's DDP with the same --set list; scripts/bench compares the two (torch_ddp_gpt/_mlp).
// The model, its initialisation and the data are the same on both sides, so the first step's
// loss agrees (JSON loss_first); torch_ddp.py's docstring describes the measurement. After the
// timed steps, --trace-steps more are traced for the overlap figure of the trainer's step
// timeline (JSON comm_hidden_behind_backward; train/trace.h), apart from the timing because
// tracing waits for the device.
//
//   mpirun -np 2 build/bin/bench_ddp --train-step --set model.name=gpt --set batch.micro_batch=8 ...
#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#ifdef MPITRAIN_HAVE_NCCL
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAFunctions.h>
#endif

#include "harness.h"
#include "mpitrain/amp/amp.h"
#include "mpitrain/apps/cli.h"
#include "mpitrain/comm/communicator.h"
#include "mpitrain/config/config.h"
#include "mpitrain/ddp/ddp.h"
#include "mpitrain/models/registry.h"
#include "mpitrain/runtime/device.h"
#include "mpitrain/runtime/error.h"
#include "mpitrain/runtime/gpu_info.h"
#include "mpitrain/runtime/world.h"
#include "mpitrain/train/optim.h"
#include "train/step_parts.h"
#include "train/trace.h"
#include "mpitrain/train/trainer.h"

using namespace mpitrain;

namespace {

struct Options {
  int64_t width = 2048;
  int layers = 4;
  int64_t batch = 32;
  int warmup = 3;
  int steps = 20;
  double goal = 0.03;
  std::string out;
  bool train_step = false;
  std::vector<std::string> sets;  // --train-step: mpitrain config keys, KEY=VALUE
  int trace_steps = 3;            // --train-step: steps traced for the overlap figure
};

torch::nn::Sequential make_mlp(const Options& options) {
  torch::nn::Sequential mlp;
  for (int i = 0; i < options.layers; ++i) {
    mlp->push_back(torch::nn::Linear(options.width, options.width));
    mlp->push_back(torch::nn::ReLU());
  }
  return mlp;
}

double median(std::vector<double> values) {
  std::nth_element(values.begin(), values.begin() + values.size() / 2, values.end());
  return values[values.size() / 2];
}

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

int run_overhead(const runtime::World& world, const Options& options) {
  auto comm = comm::make_communicator(world, c10::Device(c10::kCPU));
  torch::manual_seed(0);
  auto x = torch::randn({options.batch, options.width});
  auto target = torch::randn({options.batch, options.width});

  // The same step, with and without DDP; models built identically.
  auto time_steps = [&](torch::nn::Sequential model, ddp::DistributedDataParallel* ddp,
                        std::vector<double>* backward_seconds) {
    torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(1e-3));
    std::vector<double> steps;
    for (int i = 0; i < options.warmup + options.steps; ++i) {
      MPI_Barrier(world.comm());
      const auto start = Clock::now();
      if (ddp != nullptr) ddp->before_forward();
      auto loss = torch::mse_loss(model->forward(x), target);
      const auto backward_start = Clock::now();
      loss.backward();
      if (ddp != nullptr) ddp->finish_backward();
      const double backward = seconds_since(backward_start);
      optimizer.step();
      // Zero in place, as the trainer does: both loops keep their gradient tensors.
      optimizer.zero_grad(/*set_to_none=*/false);
      if (i >= options.warmup) {
        steps.push_back(seconds_since(start));
        if (backward_seconds != nullptr) backward_seconds->push_back(backward);
      }
    }
    return median(steps);
  };

  torch::manual_seed(1);
  auto plain_model = make_mlp(options);
  const int64_t parameters = [&] {
    int64_t n = 0;
    for (const auto& p : plain_model->parameters()) n += p.numel();
    return n;
  }();
  const double plain = time_steps(plain_model, nullptr, nullptr);

  torch::manual_seed(1);
  auto ddp_model = make_mlp(options);
  ddp::DistributedDataParallel ddp(ddp_model.ptr(), *comm);
  std::vector<double> backward_seconds;
  const double with_ddp = time_steps(ddp_model, &ddp, &backward_seconds);

  const auto& stats = ddp.stats();
  const double bytes_per_step = static_cast<double>(stats.bytes_reduced) / static_cast<double>(stats.synchronised_backwards);
  const double reduced_gbps = bytes_per_step / median(backward_seconds) / 1e9;
  const double overhead = with_ddp / plain - 1.0;
  if (!world.is_root()) return 0;

  std::cout << "MLP " << options.layers << " x " << options.width << " (" << parameters << " parameters), batch "
            << options.batch << " per rank, " << world.size() << " rank(s), CPU\n";
  bench::print_table({"loop", "step ms", "backward+wait ms", "reduced GB/s"},
                     {{"LibTorch, no DDP", bench::fixed(plain * 1e3, 2), "", ""},
                      {"mpitrain DDP", bench::fixed(with_ddp * 1e3, 2), bench::fixed(median(backward_seconds) * 1e3, 2),
                       bench::fixed(reduced_gbps, 3)}});
  std::cout << "DDP overhead " << bench::fixed(overhead * 100, 2) << " %; buckets launched during backward: "
            << stats.buckets_launched_during_backward << " of " << stats.buckets_launched << '\n';
  if (world.size() == 1)
    std::cout << "goal: overhead <= " << options.goal * 100 << " % at world size 1: "
              << (overhead <= options.goal ? "met" : "NOT met") << '\n';
  if (!options.out.empty()) {
    bench::write_json(options.out,
                      {{"name", "ddp_np" + std::to_string(world.size())},
                       {"what", "training step time of an MLP with and without mpitrain DDP (CPU, MPI backend), "
                                "and gradient bytes reduced per second of backward + wait"},
                       {"machine", bench::machine_description(world.size(), "")},
                       {"date", bench::utc_now()},
                       {"git_commit", bench::git_commit()},
                       {"model", {{"layers", options.layers}, {"width", options.width}, {"parameters", parameters}}},
                       {"batch_per_rank", options.batch},
                       {"steps", options.steps},
                       {"plain_step_s", plain},
                       {"ddp_step_s", with_ddp},
                       {"overhead", overhead},
                       {"backward_and_wait_s", median(backward_seconds)},
                       {"bytes_reduced_per_step", bytes_per_step},
                       {"reduced_gbps", reduced_gbps},
                       {"buckets_launched_during_backward", stats.buckets_launched_during_backward},
                       {"buckets_launched", stats.buckets_launched},
                       {"goal", {{"overhead_at_most", options.goal}, {"applies_at_world_size", 1}}},
                       {"goal_met", world.size() != 1 || overhead <= options.goal}});
    std::cout << "wrote " << options.out << '\n';
  }
  return 0;
}

// ---------------------------------------------------------------------------------------------
// --train-step: mpitrain's training step against bench/torch_ddp.py

// The resolved config, from mpitrain's defaults and the --set list. train.steps and a data file
// only satisfy validation: this mode reads no data and runs its own number of steps.
config::Config train_step_config(const runtime::World& world, const std::vector<std::string>& sets) {
  const config::ModelSchemas schemas = models::option_schemas();
  nlohmann::json tree = {{"train", {{"steps", 1}}}, {"data", {{"train", {{"files", {"unused"}}}}}}};
  for (const auto& assignment : sets) config::apply_override(tree, assignment, schemas);
  config::Config config = config::resolve(config::validate(tree, "bench_ddp --set", schemas), world.size());
  if (config.batch.micro_batch == 0)
    throw runtime::Error("bench_ddp --train-step times a given batch: set batch.micro_batch to a number, not auto",
                         runtime::ExitCode::bad_input);
  return config;
}

// What one step needs, set up as Trainer::setup sets it up (no loader, no checkpoint).
struct Training {
  c10::Device device{c10::kCPU};
  std::unique_ptr<comm::Communicator> comm;
  amp::Precision precision = amp::Precision::fp32;
  std::shared_ptr<models::Model> model;
  std::int64_t parameters = 0;
  std::unique_ptr<ddp::DistributedDataParallel> ddp;
  std::unique_ptr<torch::optim::Optimizer> optimizer;
  std::unique_ptr<amp::LossScaler> scaler;
};

Training set_up(const runtime::World& world, const config::Config& config) {
  Training t;
  t.device = runtime::choose_device(world, {train::device_kind(config.device.kind), config.device.allow_shared_gpu});
#ifdef MPITRAIN_HAVE_NCCL
  if (t.device.is_cuda()) {
    at::cuda::set_device(t.device.index());
    at::globalContext().setAllowTF32CuBLAS(config.precision.tf32);
    at::globalContext().setAllowTF32CuDNN(config.precision.tf32);
  }
#endif
  t.comm = comm::make_communicator(world, t.device, {}, train::backend(config.device.backend));
  t.precision = train::precision(config.precision.mode, t.device);

  // Seeded right before the model is built, as the trainer and torch_ddp.py do: equal weights.
  at::manual_seed(static_cast<std::uint64_t>(config.run.seed));
  t.model = models::create(config.model.name, config.model.options);
  t.parameters = models::count_parameters(*t.model);
  t.model->to(t.device);

  t.ddp = std::make_unique<ddp::DistributedDataParallel>(t.model, *t.comm, train::ddp_options(config.ddp));

  // The learning rate stays optimizer.lr: the schedule is the trainer's, and torch_ddp.py has none.
  t.optimizer = train::make_optimizer(config.optimizer, *t.model, t.device);
  t.scaler = std::make_unique<amp::LossScaler>(t.precision == amp::Precision::fp16, t.device,
                                               train::scaler_options(config.precision.loss_scale));
  return t;
}

struct Batch {
  at::Tensor inputs;
  at::Tensor targets;
};

// Tokens per sample of a language model: data.seq_len, or the model's context when 0.
std::int64_t seq_len_of(const config::Config& config, const models::Model& model) {
  return config.data.seq_len > 0 ? config.data.seq_len : model.context_length();
}

// batch.accumulation micro-batches of random data, made once and reused every step. The draws
// are torch_ddp.py's make_batches, call for call on the same CPU generator, so both sides see
// the same numbers.
std::vector<Batch> make_batches(const config::Config& config, const models::Model& model, int rank,
                                c10::Device device) {
  auto generator = at::make_generator<at::CPUGeneratorImpl>(static_cast<std::uint64_t>(config.run.seed * 1000 + rank + 1));
  const std::int64_t b = config.batch.micro_batch;
  const auto& options = config.model.options;
  std::vector<Batch> batches;
  for (std::int64_t micro = 0; micro < config.batch.accumulation; ++micro) {
    Batch batch;
    if (config.model.name == "gpt") {
      const std::int64_t t = seq_len_of(config, model);
      const at::Tensor tokens = at::randint(options.at("vocab_size").get<std::int64_t>(), {b, t + 1}, generator);
      batch.inputs = tokens.slice(1, 0, t).contiguous();
      batch.targets = tokens.slice(1, 1, t + 1).contiguous();
    } else if (config.model.name == "mlp") {
      batch.inputs = at::randn({b, options.at("input_dim").get<std::int64_t>()}, generator);
      batch.targets = at::randint(options.at("num_classes").get<std::int64_t>(), {b}, generator);
    } else {
      throw runtime::Error("bench_ddp --train-step: model.name " + config.model.name +
                               ": only gpt and mlp have a PyTorch twin in bench/torch_ddp.py",
                           runtime::ExitCode::bad_input);
    }
    batches.push_back({batch.inputs.to(device), batch.targets.to(device)});
  }
  return batches;
}

void synchronize(c10::Device device) {
#ifdef MPITRAIN_HAVE_NCCL
  if (device.is_cuda()) c10::cuda::device_synchronize();
#else
  (void)device;
#endif
}

// One optimizer step, as Trainer::step with the loader's batches given. Returns the mean loss
// over the micro-batches as a device tensor, so that the step never waits for the device —
// unless `trace` is given: then it records the backwards and the bucket all-reduces there, as
// the trainer's step timeline does, waiting for the device to take their ends.
at::Tensor train_step(Training& t, const config::Config& config, const std::vector<Batch>& batches,
                      train::StepTrace* trace = nullptr, std::int64_t step = 0) {
  const auto accumulation = static_cast<double>(batches.size());
  at::Tensor loss_sum = at::zeros({}, at::TensorOptions().device(t.device));
  for (std::size_t micro = 0; micro < batches.size(); ++micro) {
    const bool last = micro + 1 == batches.size();
    if (last) t.ddp->before_forward();
    at::Tensor loss;
    {
      amp::AutocastScope autocast(t.device, t.precision);
      loss = train::loss_of(t.model->forward(batches[micro].inputs), batches[micro].targets, t.model->task());
    }
    // Only the last micro-batch's backward all-reduces; the earlier ones accumulate locally.
    const auto start = Clock::now();
    if (last) {
      t.scaler->scale(loss / accumulation).backward();
    } else {
      auto no_sync = t.ddp->no_sync();
      t.scaler->scale(loss / accumulation).backward();
    }
    if (trace != nullptr) {
      synchronize(t.device);
      trace->add("backward", train::TraceCategory::phase, step, start, Clock::now(), static_cast<int>(micro));
    }
    loss_sum += loss.detach();
  }
  t.ddp->finish_backward();

  std::vector<at::Tensor> grads;
  for (const auto& parameter : t.model->parameters()) grads.push_back(parameter.grad());
  const at::Tensor found_inf = t.scaler->unscale_and_check(grads, *t.comm);
  if (config.optimizer.grad_clip > 0) t.ddp->clip_grad_norm(config.optimizer.grad_clip);
  train::step_unless_nonfinite(*t.optimizer, found_inf);
  t.scaler->update(found_inf);
  // Zero in place: gradients stay DDP bucket views, so no copy into the buckets next step.
  t.optimizer->zero_grad(/*set_to_none=*/false);
  if (trace != nullptr) {
    synchronize(t.device);
    const auto timings = t.ddp->last_bucket_timings();
    for (std::size_t b = 0; b < timings.size(); ++b)
      if (timings[b])
        trace->add("all-reduce", train::TraceCategory::comm, step, timings[b]->started, timings[b]->completed,
                   static_cast<int>(b), train::TraceThread::comm);
  }
  return loss_sum / accumulation;
}

int run_train_step(const runtime::World& world, const Options& options) {
  const config::Config config = train_step_config(world, options.sets);
  Training t = set_up(world, config);
  const std::vector<Batch> batches = make_batches(config, *t.model, world.rank(), t.device);

  // As torch_ddp.py: the time of the whole run of steps, not a median of single steps, so the
  // device queue stays full; the losses stay on the device until the clock has stopped.
  std::vector<at::Tensor> losses;
  for (int i = 0; i < options.warmup; ++i) losses.push_back(train_step(t, config, batches));
  synchronize(t.device);
  MPI_Barrier(world.comm());
  const auto start = Clock::now();
  for (int i = 0; i < options.steps; ++i) losses.push_back(train_step(t, config, batches));
  synchronize(t.device);
  MPI_Barrier(world.comm());
  double seconds = seconds_since(start);
  MPI_Allreduce(MPI_IN_PLACE, &seconds, 1, MPI_DOUBLE, MPI_MAX, world.comm());

  train::StepTrace trace(1, options.trace_steps, world.rank());
  t.comm->set_timing(true);
  trace.start();
  for (int i = 1; i <= options.trace_steps; ++i) train_step(t, config, batches, &trace, i);
  t.comm->set_timing(false);
  const train::Overlap overlap =
      train::communication_overlap(train::gather_trace(world, trace.stop(), t.comm->options().timeout));
  if (!world.is_root()) return 0;

  // Key names as torch_ddp.py's, so that scripts/bench reads both sides alike.
  const bool language_model = t.model->task() == models::Task::language_modeling;
  const double steps_per_s = options.steps / seconds;
  const double samples_per_s = steps_per_s * static_cast<double>(config.batch.global);
  const std::string gpu_name = t.device.is_cuda() ? runtime::GpuInfo(t.device).name() : "";
  const nlohmann::json machine = bench::machine_description(world.size(), gpu_name);
  const char* omp = std::getenv("OMP_NUM_THREADS");
  const bool fused = train::use_fused_adamw(config.optimizer, t.device);
  nlohmann::json result = {
      {"name", "ddp_train_step"},
      {"what", "training steps/s of mpitrain's training step (Trainer::step without the loader) under mpitrain "
               "DDP, measured as bench/torch_ddp.py measures PyTorch DDP"},
      {"machine", machine},
      {"date", bench::utc_now()},
      {"git_commit", bench::git_commit()},
      {"framework", "mpitrain"},
      {"model", config.model.name},
      {"model_options", config.model.options},
      {"parameters", t.parameters},
      {"world_size", world.size()},
      {"device", c10::DeviceTypeName(t.device.type(), /*lower_case=*/true)},
      {"device_name", gpu_name.empty() ? machine.at("cpu").get<std::string>() : gpu_name},
      {"backend", comm::to_string(t.comm->backend())},
      {"precision", amp::to_string(t.precision)},
      {"threads", at::get_num_threads()},
      {"omp_num_threads", omp != nullptr ? nlohmann::json(std::atoi(omp)) : nlohmann::json()},
      {"micro_batch", config.batch.micro_batch},
      {"accumulation", config.batch.accumulation},
      {"global_batch", config.batch.global},
      {"optimizer", {{"name", config.optimizer.name},
                     {"kind", fused ? "fused" : "per-tensor"},
                     {"lr", config.optimizer.lr},
                     {"betas", config.optimizer.betas},
                     {"eps", config.optimizer.eps},
                     {"weight_decay", config.optimizer.weight_decay},
                     {"grad_clip", config.optimizer.grad_clip}}},
      {"ddp", {{"bucket_mb", config.ddp.bucket_mb},
               {"first_bucket_mb", config.ddp.first_bucket_mb},
               {"gradient_as_bucket_view", true},
               {"broadcast_buffers", config.ddp.broadcast_buffers},
               {"find_unused_parameters", config.ddp.find_unused_parameters},
               {"wire_dtype", config.ddp.wire_dtype}}},
      {"seed", config.run.seed},
      {"warmup_steps", options.warmup},
      {"steps", options.steps},
      {"seconds", seconds},
      {"steps_per_s", steps_per_s},
      {"samples_per_s", samples_per_s},
      // Rank 0's loss on its own data: the first step's depends only on the init and the data.
      {"loss_first", losses.front().item<double>()},
      {"loss_last", losses.back().item<double>()}};
  if (world.size() > 1 && overlap.fraction()) {
    result["comm_hidden_behind_backward"] = *overlap.fraction();
    result["comm_traced_s"] = overlap.total_us / 1e6;
  }
  if (language_model) {
    result["seq_len"] = seq_len_of(config, *t.model);
    result["tokens_per_s"] = samples_per_s * static_cast<double>(seq_len_of(config, *t.model));
  }
  std::cout << result.dump() << std::endl;
  if (!options.out.empty()) bench::write_json(options.out, result);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  runtime::World world(&argc, &argv);
  CLI::App app{"DDP overhead and reduction bandwidth on CPU; with --train-step, mpitrain's training step "
               "against bench/torch_ddp.py"};
  Options options;
  app.add_option("--width", options.width, "MLP width");
  app.add_option("--layers", options.layers, "MLP layers");
  app.add_option("--batch", options.batch, "batch per rank");
  app.add_option("--warmup", options.warmup, "untimed steps");
  app.add_option("--steps", options.steps, "timed steps (the median is reported; --train-step: their total time)");
  app.add_option("--out", options.out, "JSON result file (written by rank 0)");
  app.add_flag("--train-step", options.train_step,
               "instead: steps/s of mpitrain's training step, set up from config keys, measured as "
               "bench/torch_ddp.py measures PyTorch DDP (scripts/bench torch_ddp)");
  app.add_option("--set", options.sets, "with --train-step: an mpitrain config key, KEY=VALUE as train --set takes it "
                                        "(repeatable)");
  app.add_option("--trace-steps", options.trace_steps,
                 "with --train-step: steps traced after the timed ones for the share of gradient all-reduce "
                 "hidden behind backward (0 = none)")
      ->check(CLI::NonNegativeNumber);
  return apps::parse_and_run(world, app, argc, argv, [&] {
    return options.train_step ? run_train_step(world, options) : run_overhead(world, options);
  });
}

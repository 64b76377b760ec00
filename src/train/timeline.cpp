#include "timeline.h"

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <vector>

#ifdef MPITRAIN_HAVE_NCCL
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#endif

#include "mpitrain/comm/communicator.h"
#include "mpitrain/ddp/ddp.h"
#include "mpitrain/runtime/error.h"
#include "mpitrain/runtime/world.h"
#include "metrics.h"

namespace mpitrain::train {
namespace {

using Clock = std::chrono::steady_clock;

const char* trace_name(Phase phase) {
  switch (phase) {
    case Phase::data: return "data wait";
    case Phase::forward: return "forward";
    case Phase::backward: return "backward";
    case Phase::comm: return "all-reduce wait";
    case Phase::optimizer: return "optimizer";
    case Phase::step: return "step";
    case Phase::eval: return "eval";
    case Phase::checkpoint: return "checkpoint";
    case Phase::transfer: return "recv wait";
  }
  return "?";
}

bool metered(Phase phase) {
  return phase == Phase::data || phase == Phase::forward || phase == Phase::backward || phase == Phase::comm ||
         phase == Phase::optimizer || phase == Phase::transfer;
}

// The data wait is the host's (blocked in the loader). A pipeline neighbour's tensor is awaited
// by the device on CUDA (the stream waits for NCCL's receive; only the small header stops the
// host), so that wait is timed on the stream like compute: host-timed, it read about 0.
bool device_timed(Phase phase) { return metered(phase) && phase != Phase::data; }

}  // namespace

// The window's event pairs, reused from window to window so that no step creates events.
struct Timeline::Events {
#ifdef MPITRAIN_HAVE_NCCL
  struct Pair {
    at::cuda::CUDAEvent start{cudaEventDefault};
    at::cuda::CUDAEvent end{cudaEventDefault};
    Phase phase = Phase::step;
  };
  std::vector<std::unique_ptr<Pair>> pairs;
  std::size_t used = 0;
#endif
};

Timeline::Timeline(const runtime::World& world, comm::Communicator& comm, const ddp::DistributedDataParallel& ddp,
                   std::int64_t trace_start_step, std::int64_t trace_steps, std::string run_dir)
    : world_(world),
      comm_(comm),
      ddp_(ddp),
      device_(comm.device()),
      run_dir_(std::move(run_dir)),
      trace_(trace_start_step, trace_steps, world.rank()),
      events_(std::make_unique<Events>()) {}

Timeline::~Timeline() = default;

Timeline::Scope::Scope(Timeline& timeline, Phase phase, std::int64_t step, int index)
    : timeline_(timeline), phase_(phase), step_(step), index_(index), start_(Clock::now()) {
#ifdef MPITRAIN_HAVE_NCCL
  if (timeline.device_.is_cuda() && device_timed(phase) && !timeline.recording()) {
    Events& events = *timeline.events_;
    if (events.used == events.pairs.size()) events.pairs.push_back(std::make_unique<Events::Pair>());
    events_ = static_cast<int>(events.used++);
    Events::Pair& pair = *events.pairs[static_cast<std::size_t>(events_)];
    pair.phase = phase;
    pair.start.record(at::cuda::getCurrentCUDAStream(timeline.device_.index()));
  }
#endif
}

Timeline::Scope::~Scope() {
#ifdef MPITRAIN_HAVE_NCCL
  if (events_ >= 0) {
    timeline_.events_->pairs[static_cast<std::size_t>(events_)]->end.record(
        at::cuda::getCurrentCUDAStream(timeline_.device_.index()));
    return;
  }
#endif
  // Host-timed: the CPU, the data wait, and every phase while the trace records (after the
  // device has caught up, so the phase ends when its work has run).
  if (timeline_.recording()) wait_for_device(timeline_.device_);
  const Clock::time_point end = Clock::now();
  if (metered(phase_)) timeline_.add(phase_, std::chrono::duration<double>(end - start_).count());
  if (timeline_.recording())
    timeline_.trace_.add(trace_name(phase_), phase_ == Phase::step ? TraceCategory::step : TraceCategory::phase, step_,
                         start_, end, index_);
}

void Timeline::add(Phase phase, double seconds) {
  switch (phase) {
    case Phase::data: window_.data += seconds; break;
    case Phase::forward:
    case Phase::backward: window_.compute += seconds; break;
    case Phase::comm: window_.comm += seconds; break;
    case Phase::optimizer: window_.optimizer += seconds; break;
    case Phase::transfer: window_.transfer += seconds; break;
    default: break;
  }
}

StepTimes Timeline::take(std::int64_t steps) {
#ifdef MPITRAIN_HAVE_NCCL
  Events& events = *events_;
  if (events.used > 0) {
    events.pairs[events.used - 1]->end.synchronize();
    for (std::size_t i = 0; i < events.used; ++i) {
      const Events::Pair& pair = *events.pairs[i];
      add(pair.phase, static_cast<double>(pair.start.elapsed_time(pair.end)) / 1e3);
    }
    events.used = 0;
  }
#endif
  StepTimes per_step = window_;
  const double n = static_cast<double>(std::max<std::int64_t>(steps, 1));
  per_step.data /= n;
  per_step.compute /= n;
  per_step.comm /= n;
  per_step.optimizer /= n;
  per_step.transfer /= n;
  window_ = {};
  return per_step;
}

void wait_for_device(c10::Device device) {
#ifdef MPITRAIN_HAVE_NCCL
  if (device.is_cuda()) at::cuda::getCurrentCUDAStream(device.index()).synchronize();
#else
  (void)device;
#endif
}

// The world's operations and DDP's, which in a pipeline run go on the stage's own communicator.
void Timeline::set_timing(bool on) {
  comm_.set_timing(on);
  ddp_.communicator().set_timing(on);
}

void Timeline::begin_step(std::int64_t step) {
  if (recording() || !trace_.covers(step)) return;
  wait_for_device(device_);
  world_.barrier(comm_.options().timeout, "the barrier that starts the step trace (log.trace_steps)");
  set_timing(true);
  trace_from_ = step;
  trace_.start();
}

// Each bucket's all-reduce of this step; all have completed, since the optimizer phase waited
// for the device.
void Timeline::end_step(std::int64_t step) {
  if (!recording()) return;
  const auto timings = ddp_.last_bucket_timings();
  for (std::size_t b = 0; b < timings.size(); ++b)
    if (timings[b])
      trace_.add("all-reduce bucket " + std::to_string(b), TraceCategory::comm, step, timings[b]->started,
                 timings[b]->completed, static_cast<int>(b), TraceThread::comm);
}

void Timeline::finish(MetricsLog& metrics, std::int64_t steps_done) {
  if (!recording()) return;
  set_timing(false);
  const std::vector<TraceEvent> events = gather_trace(world_, trace_.stop(), comm_.options().timeout);
  if (!world_.is_root()) return;
  const std::filesystem::path path = std::filesystem::path(run_dir_) / "trace.json";
  {
    std::ofstream out(path);
    out << chrome_trace(events, world_.size()).dump() << '\n';
    if (!out.flush())
      throw runtime::Error("cannot write the step trace " + path.string() +
                           ": check that the run directory is writable and has space, or set log.trace_steps=0");
  }
  const Overlap overlap = communication_overlap(events);
  const std::size_t buckets = ddp_.bucket_layout().size();
  nlohmann::json record = {{"step", steps_done},
                           {"trace_file", path.filename().string()},
                           {"trace_steps", {trace_from_, steps_done}},
                           {"trace_buckets", buckets}};
  std::string line = "trace: steps " + std::to_string(trace_from_) + "-" + std::to_string(steps_done) +
                     " written to " + path.string() + "; ";
  if (world_.size() == 1) {
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
  world_.log().info(line);
  metrics.write(record);
}

}  // namespace mpitrain::train

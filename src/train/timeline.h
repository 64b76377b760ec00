#pragma once
// Internal to the train layer: where a step's time goes. Phase timing is a scope object, so
// the trainer's step says only which phase it is in, and timing, tracing and the step trace's
// start and end live here.
//
// Contract:
// - phase(p, step, index) returns a scope that times phase p until it ends. data is host time
//   (the host waiting for the loader). forward, backward, comm, optimizer and transfer (a
//   pipeline neighbour's tensor, which on CUDA the stream waits for) are device time: on CUDA a
//   pair of timing events on the compute stream, read at log time by take(), so no step waits
//   for the device; on the CPU the host clock. step, eval and checkpoint are traced only.
// - take(steps) returns the seconds per step of each metered phase since the last take() and
//   starts a new window: log time only (it waits for the last CUDA event).
// - While the step trace (log.trace_steps, train/trace.h) records, each scope also adds its
//   event, after waiting for the device, so the trace shows when the work ran.
//   begin_step() starts the trace at the first step of its window (collective: a barrier gives
//   every rank the same time zero); end_step() adds the step's bucket all-reduces; finish()
//   (collective) ends it: rank 0 writes trace.json, logs the overlap figure and adds it to the
//   metrics. recording() and due_to_finish() say when.

#include <c10/core/Device.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "trace.h"

namespace mpitrain::comm {
class Communicator;
}
namespace mpitrain::ddp {
class DistributedDataParallel;
}
namespace mpitrain::runtime {
class World;
}

namespace mpitrain::train {

class MetricsLog;

enum class Phase { data, forward, backward, comm, optimizer, step, eval, checkpoint, transfer };

struct StepTimes {
  double data = 0;       // waiting for batches
  double compute = 0;    // forward and backward
  double comm = 0;       // waiting for DDP's reductions after backward
  double optimizer = 0;  // unscale, clip, step
  double transfer = 0;   // pipeline stages: waiting for a neighbour's activations or gradients
};

/// Waits until the device has run the work queued on this thread's current stream (the CPU: at once).
void wait_for_device(c10::Device device);

class Timeline {
 public:
  Timeline(const runtime::World& world, comm::Communicator& comm, const ddp::DistributedDataParallel& ddp,
           std::int64_t trace_start_step, std::int64_t trace_steps, std::string run_dir);
  ~Timeline();
  Timeline(const Timeline&) = delete;
  Timeline& operator=(const Timeline&) = delete;

  class Scope {
   public:
    Scope(Timeline& timeline, Phase phase, std::int64_t step, int index);
    ~Scope();
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;

   private:
    Timeline& timeline_;
    Phase phase_;
    std::int64_t step_;
    int index_;
    std::chrono::steady_clock::time_point start_;
    int events_ = -1;  // the CUDA event pair, -1 when host-timed
  };

  [[nodiscard]] Scope phase(Phase phase, std::int64_t step, int index = -1) { return Scope(*this, phase, step, index); }

  StepTimes take(std::int64_t steps);

  void begin_step(std::int64_t step);
  void end_step(std::int64_t step);
  bool recording() const { return trace_.recording(); }
  bool due_to_finish(std::int64_t steps_done) const { return recording() && steps_done >= trace_.last_step(); }
  void finish(MetricsLog& metrics, std::int64_t steps_done);

 private:
  void set_timing(bool on);
  struct Events;  // the CUDA event pairs of the window (CUDA builds)
  void add(Phase phase, double seconds);

  const runtime::World& world_;
  comm::Communicator& comm_;
  const ddp::DistributedDataParallel& ddp_;
  c10::Device device_;
  std::string run_dir_;
  StepTrace trace_;
  std::int64_t trace_from_ = 0;  // the first step this run traced
  StepTimes window_;
  std::unique_ptr<Events> events_;
};

}  // namespace mpitrain::train

#pragma once
// The step timeline: each rank's phases per optimizer step (data wait, forward, backward, each
// DDP bucket's all-reduce, optimizer, checkpoint, eval) over a window of steps, written as one
// Chrome trace-event file, and the overlap figure computed from it.
//
// Contract:
// - StepTrace records only while started: add() is a vector push then and does nothing
//   otherwise, so tracing costs nothing outside the window. Times are microseconds since
//   start(); the trainer calls start() right after a barrier, so the ranks' time zero agrees to
//   within the barrier's exit skew (also across nodes, whose steady clocks are unrelated).
// - gather_trace() is collective over the world, on the CPU through MPI whatever the device:
//   rank 0 gets every rank's events in rank order, the other ranks an empty list.
// - chrome_trace() is the trace-event format Perfetto (ui.perfetto.dev) and chrome://tracing
//   open: {"traceEvents": [...]} with one complete event ("ph": "X"; name, cat, ts, dur in µs;
//   pid = rank, tid = thread; args: step and micro-step or bucket) per TraceEvent, and metadata
//   naming each process "rank N" and its threads.
// - communication_overlap() is the overlap figure: per rank and step, hidden = the length of
//   (the union of the step's comm events) ∩ (the union of its phase events named "backward"),
//   total = the length of the union of its comm events; both summed over ranks and steps.
//   All-reduce time after backward has returned counts in total only: it is what the step
//   waits for before the optimizer.

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace mpitrain::runtime {
class World;
}

namespace mpitrain::train {

enum class TraceCategory {
  step,   // one optimizer step, enclosing its phases
  phase,  // data wait, forward, backward, ddp wait, optimizer, checkpoint, eval
  comm,   // one bucket's all-reduce, from its start to its completion
};
const char* to_string(TraceCategory category);

/// A row of the timeline's thread column: the trainer's own work, or communication.
enum class TraceThread { train = 0, comm = 1 };

struct TraceEvent {
  std::string name;
  TraceCategory category = TraceCategory::phase;
  std::int64_t step = 0;  // the optimizer step it belongs to, 1-based as in metrics.jsonl
  int index = -1;         // micro-step (data wait, forward, backward) or bucket (all-reduce); -1: none
  double start_us = 0;    // since the trace's time zero
  double duration_us = 0;
  int rank = 0;
  TraceThread thread = TraceThread::train;
};

class StepTrace {
 public:
  using Clock = std::chrono::steady_clock;

  /// The window is steps first_step .. first_step + steps - 1; steps 0 = off.
  StepTrace(std::int64_t first_step, std::int64_t steps, int rank);

  bool covers(std::int64_t step) const { return step >= first_ && step <= last_step(); }
  std::int64_t last_step() const { return first_ + steps_ - 1; }
  bool recording() const { return recording_; }

  /// Starts recording; time zero is now.
  void start();
  /// Records [start, end] while recording.
  void add(std::string name, TraceCategory category, std::int64_t step, Clock::time_point start,
           Clock::time_point end, int index = -1, TraceThread thread = TraceThread::train);
  /// Stops recording and hands over what was recorded.
  std::vector<TraceEvent> stop();

 private:
  double since_origin_us(Clock::time_point t) const;

  std::int64_t first_;
  std::int64_t steps_;
  int rank_;
  bool recording_ = false;
  Clock::time_point origin_;
  std::vector<TraceEvent> events_;
};

/// Collective: every rank's events to rank 0 (see the contract); a rank still waiting after
/// timeout ends the job.
std::vector<TraceEvent> gather_trace(const runtime::World& world, const std::vector<TraceEvent>& mine,
                                     std::chrono::milliseconds timeout);

/// The trace-event document of `events` from `ranks` ranks.
nlohmann::json chrome_trace(const std::vector<TraceEvent>& events, int ranks);

struct Overlap {
  double hidden_us = 0;  // all-reduce time inside backward
  double total_us = 0;   // all-reduce time
  /// hidden / total; nothing when no all-reduce was recorded.
  std::optional<double> fraction() const;
};

Overlap communication_overlap(const std::vector<TraceEvent>& events);

}  // namespace mpitrain::train

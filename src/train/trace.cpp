#include "trace.h"

#include <mpi.h>

#include <algorithm>
#include <climits>
#include <map>
#include <utility>

#include "mpitrain/runtime/check.h"
#include "mpitrain/runtime/error.h"
#include "mpitrain/runtime/world.h"

namespace mpitrain::train {

const char* to_string(TraceCategory category) {
  switch (category) {
    case TraceCategory::step: return "step";
    case TraceCategory::phase: return "phase";
    case TraceCategory::comm: return "comm";
  }
  return "?";
}

namespace {

TraceCategory parse_category(const std::string& text) {
  for (TraceCategory c : {TraceCategory::step, TraceCategory::phase, TraceCategory::comm})
    if (text == to_string(c)) return c;
  throw runtime::Error("step trace: unknown event category '" + text + "' received from another rank");
}

// The wire form between ranks; doubles round-trip exactly through nlohmann's dump.
nlohmann::json to_wire(const TraceEvent& e) {
  return {e.name, to_string(e.category), e.step, e.index, e.start_us, e.duration_us, e.rank, static_cast<int>(e.thread)};
}

TraceEvent from_wire(const nlohmann::json& j) {
  TraceEvent e;
  e.name = j.at(0).get<std::string>();
  e.category = parse_category(j.at(1).get<std::string>());
  e.step = j.at(2).get<std::int64_t>();
  e.index = j.at(3).get<int>();
  e.start_us = j.at(4).get<double>();
  e.duration_us = j.at(5).get<double>();
  e.rank = j.at(6).get<int>();
  e.thread = static_cast<TraceThread>(j.at(7).get<int>());
  return e;
}

struct Interval {
  double start;
  double end;
};

// Sorted, disjoint intervals covering the same time as `intervals`.
std::vector<Interval> merged(std::vector<Interval> intervals) {
  std::sort(intervals.begin(), intervals.end(), [](const Interval& a, const Interval& b) { return a.start < b.start; });
  std::vector<Interval> out;
  for (const Interval& i : intervals) {
    if (!out.empty() && i.start <= out.back().end)
      out.back().end = std::max(out.back().end, i.end);
    else
      out.push_back(i);
  }
  return out;
}

double length(const std::vector<Interval>& disjoint) {
  double sum = 0;
  for (const Interval& i : disjoint) sum += i.end - i.start;
  return sum;
}

double intersection(const std::vector<Interval>& a, const std::vector<Interval>& b) {
  double sum = 0;
  for (const Interval& x : a)
    for (const Interval& y : b) sum += std::max(0.0, std::min(x.end, y.end) - std::max(x.start, y.start));
  return sum;
}

}  // namespace

StepTrace::StepTrace(std::int64_t first_step, std::int64_t steps, int rank)
    : first_(first_step), steps_(steps), rank_(rank) {}

void StepTrace::start() {
  origin_ = Clock::now();
  recording_ = true;
}

double StepTrace::since_origin_us(Clock::time_point t) const {
  return std::chrono::duration<double, std::micro>(t - origin_).count();
}

void StepTrace::add(std::string name, TraceCategory category, std::int64_t step, Clock::time_point start,
                    Clock::time_point end, int index, TraceThread thread) {
  if (!recording_) return;
  events_.push_back({std::move(name), category, step, index, since_origin_us(start),
                     std::chrono::duration<double, std::micro>(end - start).count(), rank_, thread});
}

std::vector<TraceEvent> StepTrace::stop() {
  recording_ = false;
  return std::exchange(events_, {});
}

std::vector<TraceEvent> gather_trace(const runtime::World& world, const std::vector<TraceEvent>& mine,
                                     std::chrono::milliseconds timeout) {
  nlohmann::json wire = nlohmann::json::array();
  for (const TraceEvent& e : mine) wire.push_back(to_wire(e));
  const std::string bytes = wire.dump();
  if (bytes.size() > static_cast<std::size_t>(INT_MAX))
    throw runtime::Error("the step trace of rank " + std::to_string(world.rank()) +
                         " is larger than 2 GiB: trace fewer steps (log.trace_steps)");
  int length = static_cast<int>(bytes.size());
  std::vector<int> lengths(static_cast<std::size_t>(world.size()));
  MPI_Request request = MPI_REQUEST_NULL;
  MPITRAIN_CHECK_MPI(MPI_Igather(&length, 1, MPI_INT, lengths.data(), 1, MPI_INT, 0, world.comm(), &request));
  runtime::wait_or_die(&request, timeout, "gathering the step trace's sizes to rank 0");

  // Offsets matter on rank 0 only, which checks that they fit.
  std::vector<int> offsets(lengths.size(), 0);
  long long total = 0;
  for (std::size_t r = 0; r < lengths.size(); ++r) {
    if (world.is_root() && total + lengths[r] > INT_MAX)
      throw runtime::Error("the step traces of all ranks add up to more than 2 GiB: trace fewer steps (log.trace_steps)");
    offsets[r] = static_cast<int>(total);
    total += lengths[r];
  }
  std::string all(world.is_root() ? static_cast<std::size_t>(total) : 0, '\0');
  MPITRAIN_CHECK_MPI(MPI_Igatherv(bytes.data(), length, MPI_CHAR, all.data(), lengths.data(), offsets.data(), MPI_CHAR,
                                  0, world.comm(), &request));
  runtime::wait_or_die(&request, timeout, "gathering the step trace to rank 0");
  if (!world.is_root()) return {};

  std::vector<TraceEvent> events;
  for (std::size_t r = 0; r < lengths.size(); ++r)
    for (const auto& j : nlohmann::json::parse(all.substr(static_cast<std::size_t>(offsets[r]),
                                                          static_cast<std::size_t>(lengths[r]))))
      events.push_back(from_wire(j));
  return events;
}

nlohmann::json chrome_trace(const std::vector<TraceEvent>& events, int ranks) {
  nlohmann::json list = nlohmann::json::array();
  for (int r = 0; r < ranks; ++r) {
    list.push_back({{"name", "process_name"}, {"ph", "M"}, {"pid", r}, {"tid", 0}, {"args", {{"name", "rank " + std::to_string(r)}}}});
    list.push_back({{"name", "process_sort_index"}, {"ph", "M"}, {"pid", r}, {"tid", 0}, {"args", {{"sort_index", r}}}});
    list.push_back({{"name", "thread_name"}, {"ph", "M"}, {"pid", r}, {"tid", static_cast<int>(TraceThread::train)},
                    {"args", {{"name", "train"}}}});
    list.push_back({{"name", "thread_name"}, {"ph", "M"}, {"pid", r}, {"tid", static_cast<int>(TraceThread::comm)},
                    {"args", {{"name", "gradient all-reduce"}}}});
  }
  for (const TraceEvent& e : events) {
    nlohmann::json args = {{"step", e.step}};
    if (e.index >= 0) args[e.category == TraceCategory::comm ? "bucket" : "micro_step"] = e.index;
    list.push_back({{"name", e.name},
                    {"cat", to_string(e.category)},
                    {"ph", "X"},
                    {"ts", e.start_us},
                    {"dur", e.duration_us},
                    {"pid", e.rank},
                    {"tid", static_cast<int>(e.thread)},
                    {"args", std::move(args)}});
  }
  return {{"traceEvents", std::move(list)}, {"displayTimeUnit", "ms"}};
}

std::optional<double> Overlap::fraction() const {
  if (total_us <= 0) return std::nullopt;
  return hidden_us / total_us;
}

Overlap communication_overlap(const std::vector<TraceEvent>& events) {
  struct Step {
    std::vector<Interval> comm;
    std::vector<Interval> backward;
  };
  std::map<std::pair<int, std::int64_t>, Step> steps;  // by (rank, step)
  for (const TraceEvent& e : events) {
    const Interval interval{e.start_us, e.start_us + e.duration_us};
    if (e.category == TraceCategory::comm) steps[{e.rank, e.step}].comm.push_back(interval);
    if (e.category == TraceCategory::phase && e.name == "backward") steps[{e.rank, e.step}].backward.push_back(interval);
  }
  Overlap overlap;
  for (auto& entry : steps) {
    const std::vector<Interval> comm = merged(std::move(entry.second.comm));
    overlap.total_us += length(comm);
    overlap.hidden_us += intersection(comm, merged(std::move(entry.second.backward)));
  }
  return overlap;
}

}  // namespace mpitrain::train

// The step timeline's pieces: the overlap figure on hand-made intervals, the recording window,
// the trace-event document, and the gather of every rank's events to rank 0 (run at np 1 and 2).
#include <catch2/catch.hpp>

#include "train/trace.h"
#include "test_world.h"

using namespace mpitrain;
using train::TraceCategory;
using train::TraceEvent;
using train::TraceThread;

namespace {

TraceEvent event(std::string name, TraceCategory category, int rank, std::int64_t step, double start, double end) {
  TraceEvent e;
  e.name = std::move(name);
  e.category = category;
  e.rank = rank;
  e.step = step;
  e.start_us = start;
  e.duration_us = end - start;
  e.thread = category == TraceCategory::comm ? TraceThread::comm : TraceThread::train;
  return e;
}

TraceEvent backward(int rank, std::int64_t step, double start, double end) {
  return event("backward", TraceCategory::phase, rank, step, start, end);
}

TraceEvent all_reduce(int rank, std::int64_t step, double start, double end) {
  return event("all-reduce", TraceCategory::comm, rank, step, start, end);
}

}  // namespace

TEST_CASE("the overlap is the all-reduce time inside backward over all all-reduce time", "[trace]") {
  const std::vector<TraceEvent> events = {
      // rank 0, step 1: all-reduces [50, 120] and [110, 130] overlap each other; their union
      // [50, 130] is 80 long, of which [50, 100] (50) lies inside backward.
      event("forward", TraceCategory::phase, 0, 1, -100, 0),
      backward(0, 1, 0, 100),
      all_reduce(0, 1, 50, 120),
      all_reduce(0, 1, 110, 130),
      event("optimizer", TraceCategory::phase, 0, 1, 130, 150),
      // rank 0, step 2: two micro-steps' backwards; one all-reduce [290, 310] of which 10 hidden.
      // A forward covering it does not count, nor does step 1's backward.
      backward(0, 2, 150, 180),
      backward(0, 2, 200, 300),
      event("forward", TraceCategory::phase, 0, 2, 280, 320),
      all_reduce(0, 2, 290, 310),
      // rank 1, step 1: nested all-reduces [10, 20] and [15, 30], all inside backward: 20 of 20.
      backward(1, 1, 0, 100),
      all_reduce(1, 1, 10, 20),
      all_reduce(1, 1, 15, 30),
      // rank 1, step 2: an all-reduce wholly after backward: 0 of 40 hidden.
      backward(1, 2, 200, 300),
      all_reduce(1, 2, 300, 340),
  };
  const train::Overlap overlap = train::communication_overlap(events);
  CHECK(overlap.hidden_us == 80.0);   // 50 + 10 + 20 + 0
  CHECK(overlap.total_us == 160.0);   // 80 + 20 + 20 + 40
  REQUIRE(overlap.fraction().has_value());
  CHECK(*overlap.fraction() == 0.5);
}

TEST_CASE("without all-reduce events there is no overlap figure", "[trace]") {
  const train::Overlap overlap = train::communication_overlap({backward(0, 1, 0, 100)});
  CHECK(overlap.total_us == 0.0);
  CHECK_FALSE(overlap.fraction().has_value());
}

TEST_CASE("a StepTrace records only between start and stop, in microseconds since start", "[trace]") {
  train::StepTrace trace(5, 3, 7);
  CHECK_FALSE(trace.covers(4));
  CHECK(trace.covers(5));
  CHECK(trace.covers(7));
  CHECK_FALSE(trace.covers(8));
  CHECK(trace.last_step() == 7);

  using Clock = train::StepTrace::Clock;
  const auto before = Clock::now();
  trace.add("forward", TraceCategory::phase, 4, before, Clock::now());
  CHECK_FALSE(trace.recording());
  trace.start();
  const auto t0 = Clock::now();
  trace.add("backward", TraceCategory::phase, 5, t0, t0 + std::chrono::microseconds(250), 1);
  const std::vector<TraceEvent> events = trace.stop();
  CHECK_FALSE(trace.recording());
  REQUIRE(events.size() == 1);
  CHECK(events[0].name == "backward");
  CHECK(events[0].step == 5);
  CHECK(events[0].index == 1);
  CHECK(events[0].rank == 7);
  CHECK(events[0].start_us >= 0.0);
  CHECK(events[0].start_us < 1e6);
  CHECK(events[0].duration_us == Approx(250.0));
  CHECK(trace.stop().empty());
}

TEST_CASE("the trace-event document has complete events and names every rank", "[trace]") {
  TraceEvent comm = all_reduce(1, 6, 10.5, 12.25);
  comm.name = "all-reduce bucket 2";
  comm.index = 2;
  TraceEvent data = event("data wait", TraceCategory::phase, 0, 6, 0, 3);
  data.index = 1;
  const nlohmann::json doc = train::chrome_trace({data, comm}, 2);
  const auto& list = doc.at("traceEvents");
  int names = 0;
  std::vector<nlohmann::json> complete;
  for (const auto& e : list) {
    if (e.at("ph") == "M" && e.at("name") == "process_name") {
      CHECK(e.at("args").at("name") == "rank " + std::to_string(e.at("pid").get<int>()));
      ++names;
    }
    if (e.at("ph") == "X") complete.push_back(e);
  }
  CHECK(names == 2);
  REQUIRE(complete.size() == 2);
  CHECK(complete[0] == nlohmann::json{{"name", "data wait"}, {"cat", "phase"}, {"ph", "X"}, {"ts", 0.0}, {"dur", 3.0},
                                      {"pid", 0}, {"tid", 0}, {"args", {{"step", 6}, {"micro_step", 1}}}});
  CHECK(complete[1] == nlohmann::json{{"name", "all-reduce bucket 2"}, {"cat", "comm"}, {"ph", "X"}, {"ts", 10.5},
                                      {"dur", 1.75}, {"pid", 1}, {"tid", 1}, {"args", {{"step", 6}, {"bucket", 2}}}});
}

TEST_CASE("gather_trace brings every rank's events to rank 0 in rank order, exactly", "[trace][mpi]") {
  const runtime::World& world = testing::world();
  std::vector<TraceEvent> mine;
  for (int k = 0; k <= world.rank(); ++k) {  // rank r sends r + 1 events
    TraceEvent e = all_reduce(world.rank(), 3 + k, 0.1 * k + 1.0 / 3.0, 1e7 / 7.0);
    e.name = "all-reduce bucket " + std::to_string(k);
    e.index = k;
    mine.push_back(e);
  }
  const std::vector<TraceEvent> all = train::gather_trace(world, mine, std::chrono::seconds(60));
  if (!world.is_root()) {
    CHECK(all.empty());
    return;
  }
  REQUIRE(all.size() == static_cast<std::size_t>(world.size() * (world.size() + 1) / 2));
  std::size_t i = 0;
  for (int r = 0; r < world.size(); ++r)
    for (int k = 0; k <= r; ++k, ++i) {
      CHECK(all[i].rank == r);
      CHECK(all[i].name == "all-reduce bucket " + std::to_string(k));
      CHECK(all[i].category == TraceCategory::comm);
      CHECK(all[i].thread == TraceThread::comm);
      CHECK(all[i].step == 3 + k);
      CHECK(all[i].index == k);
      CHECK(all[i].start_us == 0.1 * k + 1.0 / 3.0);  // doubles cross ranks bit for bit
      CHECK(all[i].duration_us == 1e7 / 7.0 - (0.1 * k + 1.0 / 3.0));
    }
}

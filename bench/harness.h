#pragma once
// The shared benchmark harness: a size sweep, warm-up, repetitions, the median, and results as
// a printed table plus a JSON file.
//
// Contract:
// - Every rank calls time_collective() with the same arguments; the time of one repetition is
//   the slowest rank's (an all-reduce MAX), and the reported figure is the median repetition.
// - Bandwidths follow nccl-tests: algbw = bytes / time; busbw = algbw * factor, where factor
//   is 2(n-1)/n for all-reduce and (n-1)/n for all-gather and reduce-scatter.
// - write_json() is called on rank 0 only; the file holds the benchmark's name, what it
//   measures, the machine, the date, the git commit, the goal and every row.

#include <mpi.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace mpitrain::bench {

/// Sizes from min_bytes to max_bytes, multiplying by 4 (1 KiB, 4 KiB, ... 256 MiB).
std::vector<std::int64_t> size_sweep(std::int64_t min_bytes, std::int64_t max_bytes);

/// Repetitions for a size: fewer for large buffers so a sweep stays within minutes.
int repetitions_for(std::int64_t bytes, int base_reps);

/// Median seconds of `reps` timed calls of `run` (after `warmup` untimed ones); each call's
/// time is the maximum over the ranks of comm.
double time_collective(MPI_Comm comm, int warmup, int reps, const std::function<void()>& run);

double algbw_gbps(std::int64_t bytes, double seconds);
double allreduce_busbw_factor(int ranks);

/// Host name, CPU model, core count and, when given, the accelerator's name.
nlohmann::json machine_description(int ranks, const std::string& device_name);

/// "2026-11-23T12:00:00Z" and the checkout's commit ("unknown" outside a git checkout).
std::string utc_now();
std::string git_commit();

/// A fixed-width table: header and rows of already formatted cells.
void print_table(const std::vector<std::string>& header, const std::vector<std::vector<std::string>>& rows);

/// Writes json to path (directories created), atomically: a temporary file renamed into place.
void write_json(const std::string& path, const nlohmann::json& json);

std::string format_size(std::int64_t bytes);  // "1 KiB", "256 MiB"
std::string fixed(double value, int decimals);

}  // namespace mpitrain::bench

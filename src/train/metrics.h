#pragma once
// Training metrics: one JSON object per logged step in metrics.jsonl and a console progress
// line (for training and eval records; others, such as the step trace's, are only written), both
// from rank 0 only (other ranks' MetricsLog does nothing).
//
// Contract: write() appends one line and flushes it, so a killed run keeps every line written
// so far; the file is opened in append mode so a resumed run continues it.

#include <chrono>
#include <cstdint>
#include <fstream>
#include <string>

#include <nlohmann/json.hpp>

namespace mpitrain::train {

class MetricsLog {
 public:
  /// path empty: no file. console: print progress lines. first_step: steps already done
  /// (a resumed run), for the throughput-based ETA.
  MetricsLog(bool is_root, const std::string& path, bool console, std::int64_t first_step, std::int64_t total_steps);

  void write(const nlohmann::json& record);

 private:
  void print_progress(const nlohmann::json& record);

  bool is_root_;
  bool console_;
  std::int64_t total_steps_;
  std::ofstream file_;
  std::chrono::steady_clock::time_point start_;
  std::int64_t first_step_;
};

}  // namespace mpitrain::train

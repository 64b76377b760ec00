#include "metrics.h"

#include <cstdio>
#include <iostream>

#include "mpitrain/runtime/error.h"

namespace mpitrain::train {

MetricsLog::MetricsLog(bool is_root, const std::string& path, bool console, std::int64_t first_step,
                       std::int64_t total_steps)
    : is_root_(is_root),
      console_(console),
      total_steps_(total_steps),
      start_(std::chrono::steady_clock::now()),
      first_step_(first_step) {
  if (!is_root_ || path.empty()) return;
  file_.open(path, std::ios::app);
  if (!file_)
    throw runtime::Error("cannot open the metrics file '" + path + "' for appending: check that the run "
                         "directory is writable");
}

void MetricsLog::write(const nlohmann::json& record) {
  if (!is_root_) return;
  if (file_.is_open()) {
    file_ << record.dump() << '\n';
    file_.flush();
  }
  if (console_) print_progress(record);
}

void MetricsLog::print_progress(const nlohmann::json& record) {
  const std::int64_t step = record.value("step", std::int64_t{0});
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  char line[512];
  if (record.contains("eval_loss")) {
    const int n = std::snprintf(line, sizeof line, "step %lld/%lld  eval loss %.4f", static_cast<long long>(step),
                                static_cast<long long>(total_steps_), record["eval_loss"].get<double>());
    if (record.contains("eval_accuracy") && n > 0 && static_cast<std::size_t>(n) < sizeof line)
      std::snprintf(line + n, sizeof line - static_cast<std::size_t>(n), "  accuracy %.2f %%",
                    record["eval_accuracy"].get<double>() * 100);
  } else if (record.contains("loss")) {
    const double per_step = step > first_step_ ? elapsed / static_cast<double>(step - first_step_) : 0.0;
    const double eta = per_step * static_cast<double>(total_steps_ - step);
    std::snprintf(line, sizeof line, "step %lld/%lld  loss %.4f  lr %.3g  %.0f samples/s  ETA %.0f s",
                  static_cast<long long>(step), static_cast<long long>(total_steps_), record.value("loss", 0.0),
                  record.value("lr", 0.0), record.value("samples_per_s", 0.0), eta);
  } else {
    return;  // other records (the step trace's) say what they are in their own log line
  }
  std::cout << line << std::endl;
}

}  // namespace mpitrain::train

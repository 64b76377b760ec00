#pragma once
// Rank-aware logging. Progress and information come from rank 0 only; warnings and errors are
// about this rank and are printed by whichever rank has them, prefixed with rank and host, so
// that a job log of many ranks stays readable.

#include <string>

namespace mpitrain::runtime {

class Logger {
 public:
  Logger(int rank, std::string host);

  /// Rank 0 only, to stdout.
  void info(const std::string& message) const;
  /// Any rank, to stderr: "[mpitrain rank 3 (node01)] warning: ...".
  void warn(const std::string& message) const;
  /// Any rank, to stderr: "[mpitrain rank 3 (node01)] error: ...".
  void error(const std::string& message) const;

  bool is_root() const { return rank_ == 0; }

 private:
  int rank_;
  std::string prefix_;
};

}  // namespace mpitrain::runtime

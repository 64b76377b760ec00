#include "mpitrain/runtime/log.h"

#include <cstdio>

namespace mpitrain::runtime {

Logger::Logger(int rank, std::string host)
    : rank_(rank), prefix_("[mpitrain rank " + std::to_string(rank) + " (" + host + ")] ") {}

void Logger::info(const std::string& message) const {
  if (rank_ != 0) return;
  std::fprintf(stdout, "%s\n", message.c_str());
  std::fflush(stdout);
}

void Logger::warn(const std::string& message) const {
  std::fprintf(stderr, "%swarning: %s\n", prefix_.c_str(), message.c_str());
  std::fflush(stderr);
}

void Logger::error(const std::string& message) const {
  std::fprintf(stderr, "%serror: %s\n", prefix_.c_str(), message.c_str());
  std::fflush(stderr);
}

}  // namespace mpitrain::runtime

#include "mpitrain/runtime/fault.h"

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "mpitrain/runtime/fatal.h"

namespace mpitrain::runtime {

bool fault_armed(const char* name, int rank) {
  static const char* const at = std::getenv("MPITRAIN_FAULT_AT");
  static const int at_rank = [] {
    const char* text = std::getenv("MPITRAIN_FAULT_RANK");
    return text != nullptr && *text != '\0' ? std::atoi(text) : -1;
  }();
  return at != nullptr && std::strcmp(at, name) == 0 && (at_rank < 0 || at_rank == rank);
}

void fault_point(const char* name, int rank) {
  static const int signal = [] {
    const char* text = std::getenv("MPITRAIN_FAULT_SIGNAL");
    return text != nullptr && std::strcmp(text, "STOP") == 0 ? SIGSTOP : SIGKILL;
  }();
  if (!fault_armed(name, rank)) return;
  // Said first, so a test can time the job's end from the fault.
  std::fprintf(stderr, "[mpitrain %s] fault point %s: raising %s\n", where().c_str(), name,
               signal == SIGSTOP ? "SIGSTOP" : "SIGKILL");
  std::fflush(stderr);
  std::raise(signal);
}

bool fault_armed(const char* name) { return fault_armed(name, own_rank()); }
void fault_point(const char* name) { fault_point(name, own_rank()); }

}  // namespace mpitrain::runtime

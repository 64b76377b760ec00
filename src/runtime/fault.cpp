#include "mpitrain/runtime/fault.h"

#include <csignal>
#include <cstdlib>
#include <cstring>
#include <string>

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
  if (fault_armed(name, rank)) std::raise(SIGKILL);
}

}  // namespace mpitrain::runtime

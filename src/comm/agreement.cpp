#include "mpitrain/comm/agreement.h"

#include <cstring>

#include "mpitrain/runtime/error.h"

namespace mpitrain::comm {

std::int64_t fnv1a(std::string_view text) {
  std::uint64_t hash = 14695981039346656037ull;
  for (const unsigned char c : text) hash = (hash ^ c) * 1099511628211ull;
  std::int64_t bits;
  std::memcpy(&bits, &hash, sizeof bits);
  return bits;
}

void check_all_equal(Communicator& comm, std::int64_t value, const std::string& what, const std::string& what_to_do) {
  const std::vector<int> others = ranks_differing(gather_per_rank(comm, value), value);
  if (others.empty()) return;
  throw runtime::Error(what + " differs between ranks: rank " + std::to_string(comm.rank()) + " and rank(s) " +
                           list_text(others) + " do not agree. " + what_to_do,
                       runtime::ExitCode::bad_input);
}

}  // namespace mpitrain::comm

#pragma once
// The cross-rank model check run before any gradient collective.

#include <string>
#include <vector>

#include "mpitrain/comm/communicator.h"

namespace mpitrain::ddp::detail {

/// entries: one line per parameter and buffer ("name [shape] dtype requires_grad"), in order.
/// Collective. Throws runtime::Error (bad_input) on every rank when any rank's entries differ
/// from rank 0's: a differing rank names the first differing entry and both sides; the others
/// name the ranks that differ.
void verify_same_model(const std::vector<std::string>& entries, comm::Communicator& comm);

}  // namespace mpitrain::ddp::detail

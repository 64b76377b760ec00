#pragma once
// batch.micro_batch auto: the largest micro-batch that fits in memory, and the one that keeps
// batch.global over all ranks.
//
// Contract:
// - largest_fitting(fits, upper, margin): fits(m) runs a real training step at micro-batch m and
//   says whether it ran (false: out of memory, already cleaned up). It is tried at 1, 2, 4, ...
//   up to `upper`, then bisected between the largest m that ran and the smallest that did not.
//   When `upper` runs, the result is `upper` (memory is not what limits it); otherwise it is
//   the largest m that ran, less the safety margin (a fraction, e.g. 0.1), and at least 1.
//   When even 1 does not run it throws runtime::Error(bad_input) saying so.
// - micro_batch_for(caps, weights, global): the largest micro-batch m (the mean per rank) such
//   that m x ranks divides `global` and every rank's share of m x ranks (data::apportion by
//   `weights`, equal when empty) is at most its cap (caps: one per rank, what fits there).
//   Throws runtime::Error(bad_input) when there is none.

#include <cstdint>
#include <functional>
#include <vector>

namespace mpitrain::train {

std::int64_t largest_fitting(const std::function<bool(std::int64_t)>& fits, std::int64_t upper, double margin);

std::int64_t micro_batch_for(const std::vector<std::int64_t>& caps, const std::vector<double>& weights,
                             std::int64_t global);

}  // namespace mpitrain::train

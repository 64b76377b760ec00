#include "micro_batch.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "mpitrain/data/sampler.h"
#include "mpitrain/runtime/error.h"
#include "mpitrain/comm/agreement.h"

namespace mpitrain::train {

std::int64_t largest_fitting(const std::function<bool(std::int64_t)>& fits, std::int64_t upper, double margin) {
  std::int64_t good = 0, bad = 0;  // the largest that ran, the smallest that did not (0: none yet)
  for (std::int64_t m = 1; bad == 0; m = std::min(upper, 2 * m)) {
    if (fits(m)) good = m;
    else bad = m;
    if (m == upper) break;
  }
  if (good == upper) return upper;
  if (good == 0)
    throw runtime::Error("batch.micro_batch auto: not even a micro-batch of 1 fits in memory; use a smaller model, "
                         "precision.mode bf16/fp16, or a device with more memory",
                         runtime::ExitCode::bad_input);
  while (bad - good > 1) {
    const std::int64_t m = good + (bad - good) / 2;
    if (fits(m)) good = m;
    else bad = m;
  }
  return std::max<std::int64_t>(1, static_cast<std::int64_t>(std::floor(static_cast<double>(good) * (1.0 - margin))));
}

std::int64_t micro_batch_for(const std::vector<std::int64_t>& caps, const std::vector<double>& weights,
                             std::int64_t global) {
  const auto ranks = static_cast<std::int64_t>(caps.size());
  const std::vector<double> w = weights.empty() ? std::vector<double>(caps.size(), 1.0) : weights;
  const auto none = [&](const std::string& what) {
    return runtime::Error("batch.micro_batch auto: no micro-batch keeps batch.global " + std::to_string(global) + " over " +
                              std::to_string(ranks) + " ranks within what fits on each (" + comm::list_text(caps) + "): " + what,
                          runtime::ExitCode::bad_input);
  };
  if (ranks < 1 || global % ranks != 0) throw none("make batch.global a multiple of the number of ranks");
  // m x ranks divides global exactly when m divides global / ranks. Every share within its cap
  // needs m x ranks <= the caps' sum, so the search starts at most there (caps are what fit in
  // memory, so this loop is short unless memory is no limit, where it ends at once).
  const std::int64_t per_rank = global / ranks;
  std::int64_t room = 0;
  for (std::int64_t cap : caps)
    if (__builtin_add_overflow(room, cap, &room)) room = global;
  room = std::min(room, global);
  for (std::int64_t m = std::min(per_rank, room / ranks); m >= 1; --m) {
    if (per_rank % m != 0) continue;
    std::vector<std::int64_t> shares;
    try {
      shares = data::apportion(m * ranks, w);
    } catch (const runtime::Error&) {
      continue;  // a weight too small to get a sample of so few
    }
    bool within = true;
    for (std::size_t r = 0; r < caps.size(); ++r) within = within && shares[r] <= caps[r];
    if (within) return m;
  }
  throw none("lower the model's memory use or set data.rank_weights to fit the caps");
}

}  // namespace mpitrain::train

#pragma once
// Each rank's share of every micro-batch (data.rank_weights), and for `auto` the measurement
// that sets the shares so that ranks of different speeds finish backward together.
//
// Contract:
// - A micro-step's global sample count M = batch.micro_batch x ranks stays fixed; the shares
//   split it: equal (micro_batch each), proportional to the configured weights, or (auto)
//   equal (in proportion to the caps when given) until the first measurement, then
//   proportional to each rank's measured samples per second of forward + backward. data::apportion() does the split: every share >= 1, the sum
//   exactly M, the same on every rank.
// - loss_factor() = share x ranks / M: the trainer multiplies its rank's mean loss by it, so
//   that DDP's average over ranks is the mean over all M samples (the sum of the per-rank sums
//   divided by M once) and the update equals the single-process update on the global batch.
//   It is exactly 1 with equal shares.
// - auto: steps are counted from begin(steps_done). The steps measured are the last three (at
//   most) before each re-balance, never the run's first (it warms up); the first re-balance
//   follows step 4 of the run, later ones every data.rebalance_every steps (0: only the first). rebalance() is collective (one all-gather of seconds per sample), called by
//   every rank after the same step; it adopts the new shares only when they shorten the
//   slowest rank's predicted compute by at least 3 %, so noise does not churn the loader. No
//   share exceeds its rank's cap (what fits in its memory) when caps are given.
// - Throws runtime::Error(bad_input) naming data.rank_weights when a share would be 0.

#include <cstdint>
#include <vector>

#include "mpitrain/config/config.h"

namespace mpitrain::comm {
class Communicator;
}

namespace mpitrain::train {

class RankShares {
 public:
  /// `caps`: the most samples each rank can take (batch.micro_batch auto), or empty.
  RankShares(const config::Config& config, int rank, int world_size, std::vector<std::int64_t> caps = {});

  const std::vector<std::int64_t>& shares() const { return shares_; }
  std::int64_t mine() const { return shares_[static_cast<std::size_t>(rank_)]; }
  double loss_factor() const;
  bool automatic() const { return automatic_; }

  /// Starts counting steps (auto): `steps_done` is the step the run starts after.
  void begin(std::int64_t steps_done);
  /// Whether step `step` (1-based) is measured: time its forward and backward, then record().
  bool measures(std::int64_t step) const;
  void record(double compute_seconds, std::int64_t samples);
  /// Whether rebalance() is due after step `step`.
  bool due(std::int64_t step) const;
  /// Collective; see the contract. Returns true when the shares changed.
  bool rebalance(std::int64_t step, comm::Communicator& comm);
  /// Each rank's measured seconds per sample at the last rebalance() (empty before).
  const std::vector<double>& seconds_per_sample() const { return seconds_per_sample_; }

 private:
  int rank_;
  std::int64_t total_;  // samples of one micro-step over all ranks
  std::int64_t every_;
  bool automatic_;
  std::vector<std::int64_t> shares_;
  std::vector<std::int64_t> caps_;
  std::int64_t start_ = 0;       // the step the run started after
  std::int64_t next_ = 0;        // the step after which the next rebalance() is due
  double seconds_ = 0;           // measured since the last rebalance()
  std::int64_t samples_ = 0;
  std::vector<double> seconds_per_sample_;
};

}  // namespace mpitrain::train

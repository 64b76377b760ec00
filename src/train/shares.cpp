#include "shares.h"

#include <algorithm>
#include <cmath>

#include "mpitrain/comm/communicator.h"
#include "mpitrain/data/sampler.h"
#include "mpitrain/ddp/ddp.h"
#include "mpitrain/runtime/error.h"
#include "mpitrain/comm/agreement.h"

namespace mpitrain::train {
namespace {

using Mode = config::RankWeights::Mode;

constexpr std::int64_t kMeasuredSteps = 3;
constexpr std::int64_t kFirstRebalance = 4;  // steps after the start; the first step warms up
constexpr double kWorthwhile = 0.97;         // adopt shares that cut the slowest compute by 3 %

std::vector<std::int64_t> split(std::int64_t total, const std::vector<double>& weights) {
  try {
    return data::apportion(total, weights);
  } catch (const runtime::Error& e) {
    throw runtime::Error(std::string("data.rank_weights: ") + e.what(), runtime::ExitCode::bad_input);
  }
}

// Shares by weight with none above its cap: a share over its cap is fixed at the cap and the
// rest shared out again among the others. Empty when the caps cannot hold `total`.
std::vector<std::int64_t> capped(std::int64_t total, const std::vector<double>& weights,
                                 const std::vector<std::int64_t>& caps) {
  std::vector<std::int64_t> shares(weights.size(), 0);
  std::vector<bool> fixed(weights.size(), false);
  for (;;) {
    std::vector<double> open_weights;
    std::vector<std::size_t> open;
    std::int64_t left = total;
    for (std::size_t r = 0; r < weights.size(); ++r) {
      if (fixed[r]) left -= shares[r];
      else open.push_back(r), open_weights.push_back(weights[r]);
    }
    if (open.empty() || left < static_cast<std::int64_t>(open.size())) return {};
    const std::vector<std::int64_t> part = split(left, open_weights);
    bool over = false;
    for (std::size_t k = 0; k < open.size(); ++k) {
      shares[open[k]] = part[k];
      if (!caps.empty() && part[k] > caps[open[k]]) shares[open[k]] = caps[open[k]], fixed[open[k]] = true, over = true;
    }
    if (!over) return shares;
  }
}

// The slowest rank's compute for shares at the measured seconds per sample.
double slowest(const std::vector<std::int64_t>& shares, const std::vector<double>& seconds_per_sample) {
  double worst = 0;
  for (std::size_t r = 0; r < shares.size(); ++r)
    worst = std::max(worst, static_cast<double>(shares[r]) * seconds_per_sample[r]);
  return worst;
}

}  // namespace

RankShares::RankShares(const config::Config& config, int rank, int world_size, std::vector<std::int64_t> caps)
    : rank_(rank),
      total_(config.batch.micro_batch * world_size),
      every_(config.data.rebalance_every),
      automatic_(config.data.rank_weights.mode == Mode::auto_),
      caps_(std::move(caps)) {
  if (config.data.rank_weights.mode == Mode::list)
    shares_ = split(total_, config.data.rank_weights.weights);
  else if (automatic_ && !caps_.empty())
    shares_ = capped(total_, std::vector<double>(caps_.begin(), caps_.end()), caps_);
  if (shares_.empty()) shares_.assign(static_cast<std::size_t>(world_size), config.batch.micro_batch);
}

double RankShares::loss_factor() const {
  return ddp::sample_weight(mine(), total_, static_cast<int>(shares_.size()));
}

void RankShares::begin(std::int64_t steps_done) {
  start_ = steps_done;
  next_ = steps_done + kFirstRebalance;
  seconds_ = 0;
  samples_ = 0;
}

bool RankShares::measures(std::int64_t step) const {
  return automatic_ && next_ > 0 && step <= next_ && step > std::max(start_ + 1, next_ - kMeasuredSteps);
}

void RankShares::record(double compute_seconds, std::int64_t samples) {
  seconds_ += compute_seconds;
  samples_ += samples;
}

bool RankShares::due(std::int64_t step) const { return automatic_ && next_ > 0 && step == next_; }

bool RankShares::rebalance(std::int64_t step, comm::Communicator& comm) {
  seconds_per_sample_ = comm::gather_per_rank(comm, samples_ > 0 ? seconds_ / static_cast<double>(samples_) : 0.0);
  seconds_ = 0;
  samples_ = 0;
  next_ = every_ > 0 ? step + every_ : 0;

  // Every rank computes the same shares from the same gathered figures.
  std::vector<double> speeds;
  for (double s : seconds_per_sample_) {
    if (!(s > 0) || !std::isfinite(s)) return false;  // nothing measured: keep the shares
    speeds.push_back(1.0 / s);
  }
  const std::vector<std::int64_t> proposed = capped(total_, speeds, caps_);
  if (proposed.empty() || proposed == shares_ || slowest(proposed, seconds_per_sample_) > kWorthwhile * slowest(shares_, seconds_per_sample_))
    return false;
  shares_ = proposed;
  return true;
}

}  // namespace mpitrain::train

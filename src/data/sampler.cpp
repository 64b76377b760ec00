#include "mpitrain/data/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "mpitrain/runtime/error.h"

namespace mpitrain::data {
namespace {

using runtime::Error;
using runtime::ExitCode;

std::uint64_t mix(std::uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// splitmix64: tiny, fast, well distributed, and fully specified here, unlike std::
// distributions whose output differs between standard libraries.
class Rng {
 public:
  Rng(std::uint64_t seed, std::uint64_t stream) : state_(mix(seed) ^ mix(stream + 0x632BE59BD9B4E019ull)) {}

  std::uint64_t next() { return mix(state_ += 0x9E3779B97F4A7C15ull); }

  // Uniform in [0, n) without modulo bias: reject the few draws below 2^64 mod n. That
  // threshold is below n, so a draw of at least n (all but about n / 2^64 of them) passes
  // without the division that computes it.
  std::uint64_t below(std::uint64_t n) {
    for (;;) {
      const std::uint64_t x = next();
      if (x >= n || x >= (0 - n) % n) return x % n;
    }
  }

  template <class T>
  void shuffle(T* first, std::size_t n) {
    for (std::size_t i = n; i > 1; --i) std::swap(first[i - 1], first[below(i)]);
  }

 private:
  std::uint64_t state_;
};

}  // namespace

Remainder parse_remainder(const std::string& text) {
  if (text == "drop") return Remainder::drop;
  if (text == "wrap") return Remainder::wrap;
  throw Error("unknown remainder policy '" + text + "': expected drop or wrap", ExitCode::bad_input);
}

const char* to_string(Remainder remainder) { return remainder == Remainder::wrap ? "wrap" : "drop"; }

void to_json(nlohmann::json& json, const LoaderState& state) {
  json = {{"epoch", state.epoch},
          {"step", state.step},
          {"micro", state.micro},
          {"seed", state.seed},
          {"global_batch", state.global_batch},
          {"partitions", state.partitions},
          {"samples", state.samples}};
}

void from_json(const nlohmann::json& json, LoaderState& state) {
  try {
    state.epoch = json.at("epoch").get<std::int64_t>();
    state.step = json.at("step").get<std::int64_t>();
    state.micro = json.value("micro", std::int64_t{0});
    state.seed = json.at("seed").get<std::uint64_t>();
    state.global_batch = json.at("global_batch").get<std::int64_t>();
    state.partitions = json.at("partitions").get<std::int64_t>();
    state.samples = json.at("samples").get<std::int64_t>();
  } catch (const nlohmann::json::exception& e) {
    throw Error(std::string("data loader state ") + json.dump() + " is not valid (" + e.what() +
                    "): it needs epoch, step, seed, global_batch, partitions and samples (a state without "
                    "partitions comes from an mpitrain older than the partitioned order and cannot resume it)",
                ExitCode::bad_input);
  }
}

std::vector<std::int64_t> permutation(std::int64_t n, std::uint64_t seed) {
  std::vector<std::int64_t> order(static_cast<std::size_t>(std::max<std::int64_t>(0, n)));
  std::iota(order.begin(), order.end(), std::int64_t{0});
  Rng rng(seed, /*stream=*/~std::uint64_t{0});
  rng.shuffle(order.data(), order.size());
  return order;
}

Sampler::Sampler(std::vector<std::int64_t> blocks, const SamplerOptions& options)
    : blocks_(std::move(blocks)), options_(options) {
  samples_ = std::accumulate(blocks_.begin(), blocks_.end(), std::int64_t{0});
  if (options_.global_batch < 1)
    throw Error("global batch " + std::to_string(options_.global_batch) + ": it must be at least 1", ExitCode::bad_input);
  if (samples_ < options_.global_batch)
    throw Error("the dataset has " + std::to_string(samples_) + " samples, fewer than one global batch of " +
                    std::to_string(options_.global_batch) + ": use a smaller batch or more data",
                ExitCode::bad_input);
  if (options_.window < 0)
    throw Error("shuffle window " + std::to_string(options_.window) + ": it must be >= 0 (0: all blocks)",
                ExitCode::bad_input);
  if (options_.partitions < 1)
    throw Error("partitions " + std::to_string(options_.partitions) + ": there must be at least 1",
                ExitCode::bad_input);
  partitions_ = std::min(options_.partitions, options_.global_batch);
}

std::int64_t Sampler::steps_per_epoch() const {
  const std::int64_t g = options_.global_batch;
  return options_.remainder == Remainder::wrap ? (samples_ + g - 1) / g : samples_ / g;
}

std::int64_t Sampler::partition_share(std::int64_t p) const {
  const std::int64_t g = options_.global_batch;
  return g / partitions_ + (p < g % partitions_ ? 1 : 0);
}

std::pair<std::int64_t, std::int64_t> Sampler::partitions_of(std::int64_t begin, std::int64_t end) const {
  std::int64_t first = -1, last = -1;
  for (std::int64_t p = 0, offset = 0; p < partitions_ && offset < end; offset += partition_share(p), ++p) {
    if (offset + partition_share(p) <= begin) continue;
    if (first < 0) first = p;
    last = p;
  }
  return {first, last};
}

// The epoch's block sequence (every sample once, blocks kept together, blocks permuted) without
// writing it out: which block is where, and where each begins. O(blocks).
struct Sampler::Sequence {
  std::vector<std::size_t> blocks;   // block at each place
  std::vector<std::int64_t> begins;  // sequence position where it begins (ascending)
  std::vector<std::int64_t> starts;  // its first sample's index
};

Sampler::Sequence Sampler::sequence(std::int64_t epoch) const {
  Sequence out;
  out.blocks.resize(blocks_.size());
  std::iota(out.blocks.begin(), out.blocks.end(), std::size_t{0});
  Rng rng(options_.seed, static_cast<std::uint64_t>(epoch));
  if (options_.shuffle) rng.shuffle(out.blocks.data(), out.blocks.size());
  std::vector<std::int64_t> first_sample(blocks_.size());
  std::exclusive_scan(blocks_.begin(), blocks_.end(), first_sample.begin(), std::int64_t{0});
  std::int64_t position = 0;
  for (const std::size_t block : out.blocks) {
    out.begins.push_back(position);
    out.starts.push_back(first_sample[block]);
    position += blocks_[block];
  }
  return out;
}

// Partition p's samples in the order it deals them out: its stretch of the sequence, each window
// of `window` blocks permuted with the partition's own random stream (so that a rank computes
// only the partitions it reads).
std::vector<std::int64_t> Sampler::stretch(const Sequence& sequence, std::int64_t epoch, std::int64_t p) const {
  const std::int64_t steps = steps_per_epoch();
  std::int64_t first = 0;
  for (std::int64_t q = 0; q < p; ++q) first += steps * partition_share(q);
  const std::int64_t length = steps * partition_share(p);
  std::vector<std::int64_t> out(static_cast<std::size_t>(length));
  Rng rng(options_.seed + 0x9E3779B97F4A7C15ull * static_cast<std::uint64_t>(p + 1), static_cast<std::uint64_t>(epoch));
  // The place (block) holding sequence position `first`, then walk on.
  std::size_t place = static_cast<std::size_t>(
      std::upper_bound(sequence.begins.begin(), sequence.begins.end(), first % samples_) - sequence.begins.begin() - 1);
  std::int64_t window_begin = 0, blocks_in_window = 0;
  // (first + i) % samples_, kept by a wrap instead of a division per sample.
  std::int64_t at = first % samples_;
  for (std::int64_t i = 0; i < length; ++i) {
    if (i > 0 && ++at == samples_) at = 0;
    if (i > 0 && at == 0) place = 0;
    else if (place + 1 < sequence.begins.size() && at == sequence.begins[place + 1]) ++place;
    const bool block_start = at == sequence.begins[place];
    // With wrap, the stretch that continues from the sequence's start opens a window of its own.
    const bool wrapped = i > 0 && at == 0;
    if (i == 0 || block_start) {
      if ((options_.window > 0 && blocks_in_window == options_.window) || wrapped) {
        if (options_.shuffle) rng.shuffle(out.data() + window_begin, static_cast<std::size_t>(i - window_begin));
        window_begin = i;
        blocks_in_window = 0;
      }
      ++blocks_in_window;
    }
    out[static_cast<std::size_t>(i)] = sequence.starts[place] + (at - sequence.begins[place]);
  }
  if (options_.shuffle) rng.shuffle(out.data() + window_begin, static_cast<std::size_t>(length - window_begin));
  return out;
}

std::vector<std::int64_t> Sampler::order(std::int64_t epoch) const { return order(epoch, 0, options_.global_batch); }

std::vector<std::int64_t> Sampler::order(std::int64_t epoch, std::int64_t begin, std::int64_t end) const {
  const std::int64_t g = options_.global_batch, steps = steps_per_epoch(), width = end - begin;
  if (begin < 0 || end > g || width < 1)
    throw Error("positions [" + std::to_string(begin) + ", " + std::to_string(end) + ") are not a slice of a global batch of " +
                std::to_string(g));
  const Sequence seq = sequence(epoch);
  std::vector<std::int64_t> out(static_cast<std::size_t>(steps * width));
  for (std::int64_t p = 0, offset = 0; p < partitions_ && offset < end; offset += partition_share(p), ++p) {
    const std::int64_t share = partition_share(p);
    const std::int64_t from = std::max(begin, offset), to = std::min(end, offset + share);
    if (from >= to) continue;
    const std::vector<std::int64_t> dealt = stretch(seq, epoch, p);
    for (std::int64_t step = 0; step < steps; ++step)
      std::copy(dealt.begin() + step * share + (from - offset), dealt.begin() + step * share + (to - offset),
                out.begin() + step * width + (from - begin));
  }
  return out;
}

double Sampler::blocks_per_batch(std::int64_t epoch) const {
  std::vector<std::int64_t> block_of(static_cast<std::size_t>(samples_));
  std::int64_t index = 0;
  for (std::size_t b = 0; b < blocks_.size(); ++b)
    for (std::int64_t i = 0; i < blocks_[b]; ++i) block_of[static_cast<std::size_t>(index++)] = static_cast<std::int64_t>(b);
  const std::vector<std::int64_t> all = order(epoch);
  const std::int64_t g = options_.global_batch, steps = steps_per_epoch();
  std::int64_t distinct = 0;
  std::vector<std::int64_t> seen;
  for (std::int64_t s = 0; s < steps; ++s) {
    seen.clear();
    for (std::int64_t k = 0; k < g; ++k) seen.push_back(block_of[static_cast<std::size_t>(all[static_cast<std::size_t>(s * g + k)])]);
    std::sort(seen.begin(), seen.end());
    distinct += std::unique(seen.begin(), seen.end()) - seen.begin();
  }
  return static_cast<double>(distinct) / static_cast<double>(steps);
}

std::vector<std::int64_t> Sampler::global_batch(const std::vector<std::int64_t>& order, std::int64_t step) const {
  const std::int64_t g = options_.global_batch;
  return std::vector<std::int64_t>(order.begin() + step * g, order.begin() + (step + 1) * g);
}

std::vector<std::int64_t> Sampler::slice(const std::vector<std::int64_t>& global_batch, int rank, int world) {
  const auto g = static_cast<std::int64_t>(global_batch.size());
  if (world < 1 || rank < 0 || rank >= world || g % world != 0)
    throw Error("rank " + std::to_string(rank) + " of " + std::to_string(world) + " cannot take an equal slice of a global batch of " +
                    std::to_string(g),
                ExitCode::bad_input);
  return slice(global_batch, std::vector<std::int64_t>(static_cast<std::size_t>(world), g / world), rank);
}

std::vector<std::int64_t> Sampler::slice(const std::vector<std::int64_t>& global_batch,
                                         const std::vector<std::int64_t>& shares, int rank) {
  if (rank < 0 || static_cast<std::size_t>(rank) >= shares.size() ||
      std::accumulate(shares.begin(), shares.end(), std::int64_t{0}) != static_cast<std::int64_t>(global_batch.size()))
    throw Error("rank " + std::to_string(rank) + " of " + std::to_string(shares.size()) +
                    " cannot take its share of a global batch of " + std::to_string(global_batch.size()) +
                    ": the shares do not add up to it",
                ExitCode::bad_input);
  const std::int64_t begin = std::accumulate(shares.begin(), shares.begin() + rank, std::int64_t{0});
  return std::vector<std::int64_t>(global_batch.begin() + begin, global_batch.begin() + begin + shares[rank]);
}

std::vector<std::int64_t> apportion(std::int64_t total, const std::vector<double>& weights) {
  const auto n = static_cast<std::int64_t>(weights.size());
  double sum = 0;
  for (std::size_t i = 0; i < weights.size(); ++i) {
    if (!std::isfinite(weights[i]) || weights[i] <= 0)
      throw Error("weight " + std::to_string(i) + " is " + std::to_string(weights[i]) + ": weights must be positive numbers",
                  ExitCode::bad_input);
    sum += weights[i];
  }
  if (n == 0 || total < n)
    throw Error(std::to_string(total) + " samples cannot be shared out to " + std::to_string(n) +
                    " ranks with at least one each",
                ExitCode::bad_input);
  // Largest remainder: floor of each exact share, then one more to the largest fractions.
  std::vector<std::int64_t> shares(weights.size());
  std::vector<std::pair<double, std::size_t>> fractions;
  std::int64_t given = 0;
  for (std::size_t i = 0; i < weights.size(); ++i) {
    const double exact = static_cast<double>(total) * (weights[i] / sum);
    shares[i] = std::min(total, static_cast<std::int64_t>(std::floor(exact)));
    given += shares[i];
    fractions.emplace_back(exact - std::floor(exact), i);
  }
  std::stable_sort(fractions.begin(), fractions.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  for (std::size_t k = 0; given < total; k = (k + 1) % fractions.size(), ++given) ++shares[fractions[k].second];
  for (std::size_t k = fractions.size(); given > total && k-- > 0;)
    if (shares[fractions[k].second] > 0) --shares[fractions[k].second], --given;
  for (std::size_t i = 0; i < shares.size(); ++i)
    if (shares[i] < 1)
      throw Error(std::to_string(total) + " samples shared out by weight give rank " + std::to_string(i) +
                      " none (weight " + std::to_string(weights[i]) + " of " + std::to_string(sum) +
                      "): raise its weight or the batch",
                  ExitCode::bad_input);
  return shares;
}

}  // namespace mpitrain::data

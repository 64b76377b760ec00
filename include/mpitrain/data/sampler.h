#pragma once
// Which samples make up each global batch, and which slice of it each rank reads.
//
// Contract:
// - order(epoch) is a permutation of every sample index and a function of (seed, epoch, the
//   dataset's blocks, shuffle, window) only: never of the world size or rank. With shuffle the
//   blocks (runs of samples that share a block of HDF5 chunks, see Dataset) are permuted, then the
//   samples inside each window of `window` consecutive permuted blocks are permuted; window 0
//   permutes all samples uniformly. The generator is mpitrain's own (splitmix64 with unbiased
//   bounded draws), so an order is the same on every platform and library version.
// - Global batch `step` of an epoch is order[step*G, (step+1)*G) with G = global_batch; rank r
//   of w takes its contiguous slice [r*G/w, (r+1)*G/w), or, with per-rank shares s (summing to
//   G), [s_0 + ... + s_{r-1}, s_0 + ... + s_r). All ranks therefore run the same number of
//   steps, and the union of their slices is the global batch, whatever the shares.
// - Remainder policy for N % G != 0: drop runs N / G steps (the last N % G samples of the order
//   are not used in that epoch; the order changes every epoch, so different ones are dropped);
//   wrap runs ceil(N / G) steps and fills the last batch from the start of the same order (those
//   samples are seen twice). Either way every sample is seen once per epoch when G divides N.
// - LoaderState is the position: the next global batch to hand out. It carries the seed,
//   global batch and sample count it refers to, so a state from another run is refused. It does
//   not carry the world size: a state restores on any world size that divides global_batch.

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace mpitrain::data {

enum class Remainder { drop, wrap };
Remainder parse_remainder(const std::string& text);  // "drop" | "wrap"
const char* to_string(Remainder remainder);

struct SamplerOptions {
  std::int64_t global_batch = 1;
  std::uint64_t seed = 0;
  bool shuffle = true;
  std::int64_t window = 16;  // blocks per shuffle window; 0: one window of every block
  Remainder remainder = Remainder::drop;
};

struct LoaderState {
  std::int64_t epoch = 0;
  std::int64_t step = 0;  // global batches of this epoch already handed out
  std::uint64_t seed = 0;
  std::int64_t global_batch = 0;
  std::int64_t samples = 0;
};
void to_json(nlohmann::json& json, const LoaderState& state);
/// Throws runtime::Error(bad_input) on a missing or mistyped field.
void from_json(const nlohmann::json& json, LoaderState& state);

/// Splits `total` samples into one share per weight, proportional to the weights (largest
/// remainder; ties go to the lower index), every share at least 1. Throws
/// runtime::Error(bad_input) when a weight is not finite and positive or a share would be 0.
std::vector<std::int64_t> apportion(std::int64_t total, const std::vector<double>& weights);

/// A uniform permutation of 0..n-1 from the same generator (train/validation splits).
std::vector<std::int64_t> permutation(std::int64_t n, std::uint64_t seed);

class Sampler {
 public:
  /// Throws runtime::Error(bad_input) when there are fewer samples than one global batch.
  Sampler(std::vector<std::int64_t> blocks, const SamplerOptions& options);

  std::int64_t samples() const { return samples_; }
  std::int64_t steps_per_epoch() const;
  const SamplerOptions& options() const { return options_; }

  std::vector<std::int64_t> order(std::int64_t epoch) const;
  /// The global batch `step` of the epoch whose order is given.
  std::vector<std::int64_t> global_batch(const std::vector<std::int64_t>& order, std::int64_t step) const;
  /// Rank `rank`'s slice of one global batch; world must divide its size.
  static std::vector<std::int64_t> slice(const std::vector<std::int64_t>& global_batch, int rank, int world);
  /// Rank `rank`'s slice of one global batch shared out by `shares` (one per rank, summing to
  /// the batch's size).
  static std::vector<std::int64_t> slice(const std::vector<std::int64_t>& global_batch,
                                         const std::vector<std::int64_t>& shares, int rank);

 private:
  std::vector<std::int64_t> blocks_;
  SamplerOptions options_;
  std::int64_t samples_ = 0;
};

}  // namespace mpitrain::data

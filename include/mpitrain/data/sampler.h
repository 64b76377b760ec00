#pragma once
// Which samples make up each global batch, and which slice of it each rank reads.
//
// Contract:
// - A global batch of G samples is made of P canonical partitions (P = min(partitions, G)),
//   partition p giving b_p = G / P samples (the first G % P partitions one more). Each epoch the
//   blocks (runs of samples that share a block of HDF5 chunks, see Dataset) are permuted, and
//   partition p owns the consecutive stretch of S * b_p samples of that block sequence that
//   follows the partitions before it (S = steps_per_epoch()); inside it, the samples of each
//   window of `window` consecutive blocks are permuted (window 0: all of the partition's).
//   Global batch `step` is partition 0's samples [step*b_0, (step+1)*b_0), then partition 1's,
//   and so on. order(epoch) is those batches one after the other.
// - The order is a function of (seed, epoch, the dataset's blocks, shuffle, window, P, G) only:
//   never of the world size, the rank, the shares or the micro-batch split. The generator is
//   mpitrain's own (splitmix64 with unbiased bounded draws), so an order is the same on every
//   platform and library version: one stream permutes the blocks, and each partition has its
//   own stream for its windows, so a rank computes only the partitions it reads.
// - A rank's slice of a global batch is a contiguous range of it: equal shares of G / w, or
//   per-rank shares s (summing to G) [s_0 + ... + s_{r-1}, s_0 + ... + s_r). When w divides P
//   each rank's slice is P / w whole partitions, so over an epoch a rank reads only its
//   partitions' stretches: about 1/w of the data. Otherwise slices share partitions (exact, but
//   a rank then reads every partition its slice touches).
// - Remainder policy for N % G != 0: drop runs N / G steps (the last N % G samples of the block
//   sequence are not used that epoch; the blocks are permuted every epoch, so different ones are
//   dropped); wrap runs ceil(N / G) steps and the last partition continues from the start of the
//   block sequence, in a window of its own (those samples are seen twice). Either way every
//   sample is seen once per epoch when G divides N.
// - LoaderState is the position: the next global batch to hand out (and micro-batch of it). It
//   carries the seed, global batch, partition count and sample count it refers to, so a state
//   from another run is refused. It does not carry the world size or the micro-batch split.

#include <cstdint>
#include <string>
#include <utility>
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
  std::int64_t window = 4;  // blocks per shuffle window of a partition; 0: all its blocks
  Remainder remainder = Remainder::drop;
  std::int64_t partitions = 16;  // canonical partitions of a global batch (at most G are used)
};

struct LoaderState {
  std::int64_t epoch = 0;
  std::int64_t step = 0;   // global batches of this epoch already handed out
  std::int64_t micro = 0;  // micro-batches of the next global batch already handed out
  std::uint64_t seed = 0;
  std::int64_t global_batch = 0;
  std::int64_t partitions = 0;
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
  /// Partitions in use: min(options().partitions, global batch).
  std::int64_t partitions() const { return partitions_; }
  /// Samples partition p gives each global batch.
  std::int64_t partition_share(std::int64_t p) const;
  /// The first and last partition that positions [begin, end) of a global batch come from.
  std::pair<std::int64_t, std::int64_t> partitions_of(std::int64_t begin, std::int64_t end) const;

  /// The epoch's global batches, one after the other (steps_per_epoch() * global batch entries).
  std::vector<std::int64_t> order(std::int64_t epoch) const;
  /// Positions [begin, end) of each of the epoch's global batches, one batch's after the other:
  /// a rank's slices, computed from the partitions they touch only.
  std::vector<std::int64_t> order(std::int64_t epoch, std::int64_t begin, std::int64_t end) const;
  /// Shuffle quality of an epoch: the mean number of distinct blocks the samples of one global
  /// batch come from (at most min(G, blocks); higher mixes more).
  double blocks_per_batch(std::int64_t epoch) const;
  /// The global batch `step` of the epoch whose order is given.
  std::vector<std::int64_t> global_batch(const std::vector<std::int64_t>& order, std::int64_t step) const;
  /// Rank `rank`'s slice of one global batch; world must divide its size.
  static std::vector<std::int64_t> slice(const std::vector<std::int64_t>& global_batch, int rank, int world);
  /// Rank `rank`'s slice of one global batch shared out by `shares` (one per rank, summing to
  /// the batch's size).
  static std::vector<std::int64_t> slice(const std::vector<std::int64_t>& global_batch,
                                         const std::vector<std::int64_t>& shares, int rank);

 private:
  struct Sequence;
  Sequence sequence(std::int64_t epoch) const;
  std::vector<std::int64_t> stretch(const Sequence& sequence, std::int64_t epoch, std::int64_t p) const;

  std::vector<std::int64_t> blocks_;
  SamplerOptions options_;
  std::int64_t samples_ = 0;
  std::int64_t partitions_ = 1;
};

}  // namespace mpitrain::data

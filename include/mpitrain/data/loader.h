#pragma once
// The loader: each rank's batches of a dataset of HDF5 shards, read ahead on a background
// thread and handed over on the training device.
//
// Contract:
// - Construction is collective over `comm`: every rank of it constructs its Loader at the same
//   point. It opens the dataset, then one all-gather compares what every rank opened (sample
//   counts, block layout, dtypes, shapes) and the options that shape the order (batch size,
//   world size, seed, shuffle, window, remainder). A rank that could not open the dataset, or
//   any disagreement, is a runtime::Error(bad_input) on every rank, never a hang.
// - rank/world_size choose this rank's slice of each global batch (global batch = batch_size *
//   world_size, or the sum of LoaderOptions::shares when given, rank r reading shares[r]
//   samples); comm is used for the agreement only. Sampler documents the order, the slices and
//   the remainder policy; every rank runs steps_per_epoch() steps per epoch.
// - set_shares() changes the shares between two next() calls, keeping their sum: the batches
//   read ahead are dropped and reading restarts at state(), so the global order is unchanged.
//   Every rank must make the same call before its next next().
// - next() returns this rank's next batch and never ends: after the last step of an epoch
//   comes step 0 of the next. Batch::epoch/step say which global batch it is a slice of.
//   On a CUDA device the tensors are read into pinned host memory and copied on a side stream;
//   next() makes the caller's current stream wait for that copy (an event), so they can be used
//   at once on the current stream. On CPU they are plain tensors, whose memory the loader
//   reuses for a later batch once nothing refers to it any more (no tensor, no view): keep a
//   tensor, not a raw pointer, to data you want to keep.
// - A background thread reads at most `prefetch` batches ahead. An error on it (a damaged
//   chunk, a file gone) is rethrown by next() as runtime::Error naming file, dataset, epoch and
//   step; the loader is unusable afterwards (next() keeps rethrowing it). The destructor stops
//   and joins the thread, whatever state it is in.
// - state() is the position after the last batch next() returned; restore(state) makes the
//   following next() calls return exactly what an uninterrupted run would have returned after
//   that point, on any world size and shares that keep the global batch equal.
//   A state from a different seed, global batch or dataset is refused (bad_input).

#include <c10/core/Device.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "mpitrain/data/dataset.h"
#include "mpitrain/data/sampler.h"
#include "mpitrain/data/spec.h"

namespace mpitrain::comm {
class Communicator;
}

namespace mpitrain::data {

struct LoaderOptions {
  std::int64_t batch_size = 1;  // per rank, when `shares` is empty
  /// Samples per rank of each global batch, one entry per rank (empty: batch_size each).
  std::vector<std::int64_t> shares;
  std::uint64_t seed = 0;
  bool shuffle = true;
  std::int64_t shuffle_window = 16;  // blocks per shuffle window, see Sampler; 0: uniform
  Remainder remainder = Remainder::drop;
  int prefetch = 4;  // batches read ahead, >= 1
  c10::Device device = c10::Device(c10::kCPU);
};

class Loader {
 public:
  Loader(const DatasetSpec& spec, const LoaderOptions& options, int rank, int world_size,
         comm::Communicator& comm);
  ~Loader();
  Loader(const Loader&) = delete;
  Loader& operator=(const Loader&) = delete;

  Batch next();
  LoaderState state() const;
  void restore(const LoaderState& state);
  /// New per-rank shares with the same sum; see the contract.
  void set_shares(const std::vector<std::int64_t>& shares);
  /// This rank's samples per batch.
  std::int64_t batch_size() const;

  std::int64_t steps_per_epoch() const;
  std::int64_t global_batch() const;
  const Dataset& dataset() const;
  const Sampler& sampler() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace mpitrain::data

#pragma once
// The loader: each rank's batches of a dataset of HDF5 shards, read ahead on background
// threads and handed over on the training device.
//
// Contract:
// - Construction is collective over `comm`: every rank of it constructs its Loader at the same
//   point. It opens the dataset, then one all-gather compares what every rank opened (sample
//   counts, block layout, dtypes, shapes) and the options that shape the order (batch size,
//   world size, seed, shuffle, window, remainder). A rank that could not open the dataset, or
//   any disagreement, is a runtime::Error(bad_input) on every rank, never a hang.
// - rank/world_size choose this rank's slice of each global batch: global batch = accumulation
//   * batch_size * world_size (or accumulation * the sum of LoaderOptions::shares, rank r
//   reading shares[r] samples per micro-batch). Rank r's slice is the contiguous range
//   accumulation * (shares of the ranks before it) onwards, cut into `accumulation`
//   micro-batches; so the samples of one global batch, and therefore of one optimizer step,
//   are the same for every world size and micro-batch x accumulation split. comm is used for
//   the agreement only. Sampler documents the order (partitions), the slices and the remainder
//   policy; every rank runs steps_per_epoch() global batches per epoch.
// - Reading: a rank reads only the blocks its own samples lie in. Each epoch it announces its
//   samples to the dataset (Dataset::expect), so a block leaves the cache once this rank has no
//   later sample in it, and with a cache of cache_bytes (0: a shuffle window of blocks and the
//   next one, for each partition its slices touch) each block is read at most once per epoch.
//   stats() counts what was read, including batches read ahead.
// - set_shares() changes the shares between two global batches, keeping their sum: the batches
//   read ahead are dropped and reading restarts at state(), so the global order is unchanged.
//   Every rank must make the same call before its next next().
// - next() returns this rank's next micro-batch and never ends: after the last step of an
//   epoch comes step 0 of the next. Batch::epoch/step/micro say which global batch it is part
//   of and which of this rank's micro-batches.
//   On a CUDA device the tensors are read into pinned host memory; next() copies them on a side
//   stream one batch ahead (the batch it returns, unless the previous call started its copy,
//   then the following one), so the loader holds two batches on the device however far it
//   reads ahead. It makes the caller's current stream wait for the copy (an event), so the
//   tensors can be used at once on the current stream. On CPU they are plain tensors, whose memory the loader
//   reuses for a later batch once nothing refers to it any more (no tensor, no view): keep a
//   tensor, not a raw pointer, to data you want to keep.
// - `workers` background threads (SCHED_BATCH: they never preempt the training thread when
//   woken) read at most `prefetch` batches ahead, each worker a different batch; once that many
//   are read or being read they sleep until next() has taken half of them (prefetch / 2 left),
//   then refill; a next() that finds the queue empty sleeps until half of it is ready (at least
//   one batch). Batches come out in order and are the same, bit for bit, whatever `workers`;
//   so are the dataset's counters: workers take their blocks from the dataset in read order
//   and copy rows in parallel (for uncompressed shards the copy is most of the work; gzip
//   shards decompress one block at a time, HDF5 being serial). starved_seconds() is
//   the time next() has waited on an empty queue: the loader's own delay, apart from taking
//   a ready batch (and any preemption of the caller meanwhile). An error on a worker (a damaged
//   chunk, a file gone) is rethrown by next() as runtime::Error naming file, dataset, epoch and
//   step; the loader is unusable afterwards (next() keeps rethrowing it). The destructor stops
//   and joins the workers, whatever state they are in.
// - state() is the position after the last micro-batch next() returned; restore(state) of a
//   state taken between global batches makes the following next() calls return exactly the
//   samples an uninterrupted run would have returned after that point, on any world size,
//   shares and accumulation that keep the global batch (a state taken inside a global batch
//   needs the same shares and accumulation). A state from a different seed, global batch,
//   partition count or dataset is refused (bad_input).

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
  std::int64_t batch_size = 1;  // per rank and micro-batch, when `shares` is empty
  /// Samples per rank of each micro-batch, one entry per rank (empty: batch_size each).
  std::vector<std::int64_t> shares;
  std::int64_t accumulation = 1;  // micro-batches per global batch
  std::uint64_t seed = 0;
  bool shuffle = true;
  std::int64_t shuffle_window = 4;  // blocks per shuffle window of a partition, see Sampler; 0: uniform
  std::int64_t partitions = 16;     // canonical partitions, see Sampler
  std::int64_t cache_bytes = 0;     // decompressed-block cache; 0: sized to the shuffle window
  Remainder remainder = Remainder::drop;
  int prefetch = 0;  // batches read ahead, >= 1; 0: as many as hold 1 MiB, 8 to 64 (see prefetch())
  int workers = 1;   // threads reading batches at once, >= 1
  /// The tensors next() delivers; one not wanted is undefined and its dataset is not read
  /// (a batch of neither only says where the loader is: epoch, step, micro).
  Fields fields;
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
  /// This rank's samples per micro-batch.
  std::int64_t batch_size() const;
  /// Batches read ahead: options.prefetch, or for 0 what fills 1 MiB with micro-batches of
  /// the size at construction (the delivered fields' bytes), at least 8 and at most 64.
  int prefetch() const;
  /// What this rank's reads cost so far.
  ReadStats stats() const;
  /// Seconds next() has waited on an empty queue since the loader was made (consumer's thread).
  double starved_seconds() const;
  /// What reading the batches of one epoch cost (so far, while the reader is in it; zeros for
  /// an epoch this loader did not read). A restore mid-epoch starts its count again.
  ReadStats stats(std::int64_t epoch) const;

  std::int64_t steps_per_epoch() const;
  std::int64_t global_batch() const;
  const Dataset& dataset() const;
  const Sampler& sampler() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace mpitrain::data

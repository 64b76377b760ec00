#pragma once
// A dataset of HDF5 shards opened for reading: the sample count, what one sample is, and
// batched reads of arbitrary sample indices.
//
// Contract:
// - The constructor opens and checks every shard (files exist and are HDF5, named datasets
//   exist, supported dtypes, inputs/targets first dimensions agree, filters available, a
//   manifest's counts/dtypes/shapes match the files, at least one sample) and throws
//   runtime::Error(bad_input) naming the file, the dataset and the problem.
// - Samples are numbered 0..size()-1 shard after shard. A shard's samples are grouped into
//   blocks of whole HDF5 chunks (blocks(), DatasetSpec::block_bytes); the sampler shuffles
//   blocks and then samples within windows of blocks, so a block is decompressed once per
//   window, not once per sample.
// - read_into() fills a batch in the order of the indices given. Each block it needs and does
//   not hold is read with one chunk-aligned hyperslab into a cache of decompressed blocks
//   (least recently used out) of about cache_blocks blocks, or set_cache_bytes() bytes.
// - expect(indices) announces the samples the next reads will ask for, in order (replacing
//   what was announced before). A cached block that no announced sample still needs is dropped
//   as soon as its last announced sample was read, so a reader whose upcoming samples are
//   announced keeps only the blocks it will use again: with a cache that can hold those, each
//   block is read once per announcement (an epoch, for the loader).
// - stats() counts, since construction: decompressed bytes and HDF5 chunks read, and block
//   lookups the cache served. footprint(indices, fields) is what reading those samples' fields
//   with an empty, unbounded cache would read, without reading anything.
// - Delivered dtypes: classification inputs keep their stored dtype (uint16/uint32 widen to
//   int32/int64); integer targets and all tokens are int64; float targets keep their dtype.
//   Tokens: inputs = window[0, seq_len), targets = window[1, seq_len + 1).
// - A read in three phases lets several threads read batches at once (the loader's workers):
//   prepare() finds the blocks a batch's rows lie in and touches nothing shared; acquire()
//   takes those blocks from the cache or the files and moves the announcement on by the
//   batch's samples, one call at a time inside (HDF5 reads are serial anyway), and must come
//   in the order in which expect() announced the batches; fill() copies the rows into the batch and may run on many
//   threads at once. read_into() is the three in a row. expect() and set_cache_bytes() must not
//   run while another thread is inside acquire(). HDF5 errors while reading (a damaged chunk)
//   throw runtime::Error naming the file, dataset and rows.

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "mpitrain/data/spec.h"

namespace mpitrain::data {

/// What one sample of a delivered tensor looks like.
struct Field {
  std::string name;                 // the HDF5 dataset it comes from
  c10::ScalarType dtype;            // as delivered
  std::vector<std::int64_t> shape;  // per sample
  std::string stored;               // stored dtype ("uint8", ...)
};

struct Batch {
  at::Tensor inputs;
  at::Tensor targets;
  std::int64_t epoch = 0;  // the global batch this is a slice of (set by the loader)
  std::int64_t step = 0;
  std::int64_t micro = 0;  // which micro-batch of this rank's slice of it
};

/// Which of a sample's tensors a reader wants. A pipeline stage needs only the inputs (the
/// first stage), only the targets (the last) or neither (the stages between).
struct Fields {
  bool inputs = true;
  bool targets = true;

  /// What stage `stage` of `stages` reads: the first the inputs, the last the targets.
  static Fields of_stage(std::int64_t stage, std::int64_t stages) { return {stage == 0, stage == stages - 1}; }
};

/// What reading cost: decompressed bytes and HDF5 chunks read from the files, and the block
/// lookups the cache answered.
struct ReadStats {
  std::int64_t bytes_read = 0;
  std::int64_t chunks_read = 0;
  std::int64_t cache_hits = 0;
};

class Dataset {
 public:
  /// One batch's read between prepare() and fill(): the blocks it needs, held until fill()
  /// has copied them. A reader thread keeps one and reuses it batch after batch.
  class Reading {
   public:
    Reading();
    ~Reading();
    Reading(Reading&&) noexcept;
    Reading& operator=(Reading&&) noexcept;

   private:
    friend class Dataset;
    struct State;
    std::unique_ptr<State> state_;
  };

  explicit Dataset(const DatasetSpec& spec, std::int64_t cache_blocks = 4);
  ~Dataset();
  Dataset(const Dataset&) = delete;
  Dataset& operator=(const Dataset&) = delete;

  const DatasetSpec& spec() const;
  const std::vector<std::string>& files() const;
  std::int64_t size() const;
  const Field& inputs() const;
  const Field& targets() const;
  /// Sample counts of the blocks, in sample order (they add up to size()).
  const std::vector<std::int64_t>& blocks() const;
  /// One line naming what every rank must agree on (counts, blocks, names, dtypes, shapes).
  std::string description() const;
  /// Decompressed bytes of every dataset of every shard.
  std::int64_t bytes() const;
  /// The most the cache holds for one block, in bytes.
  std::int64_t block_bytes() const;
  void set_cache_bytes(std::int64_t bytes);
  std::int64_t cache_bytes() const;

  void expect(c10::ArrayRef<std::int64_t> indices);
  /// Safe to call from any thread.
  ReadStats stats() const;
  ReadStats footprint(const std::vector<std::int64_t>& indices, Fields fields = {}) const;

  /// Empty CPU tensors of the right shape and dtype for n samples (pinned when asked); a field
  /// not wanted is an undefined tensor.
  Batch allocate(std::int64_t n, bool pinned = false, Fields fields = {}) const;
  /// Fills the defined ones of out.inputs/targets, rows 0..indices.size()-1, with the samples
  /// named by indices; a dataset that only an undefined tensor needs is not read.
  void read_into(c10::ArrayRef<std::int64_t> indices, Batch& out);
  /// read_into() in phases (see the contract): which samples and fields (those `out` defines),
  /// then the blocks, then the copy into `out`, which must be the batch given to prepare().
  void prepare(c10::ArrayRef<std::int64_t> indices, const Batch& out, Reading& reading) const;
  void acquire(Reading& reading);
  void fill(Reading& reading, Batch& out) const;
  Batch read(const std::vector<std::int64_t>& indices);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace mpitrain::data

#pragma once
// Writing, inspecting and verifying shard sets: what the h5shard tool does, as functions.
//
// Contract:
// - write_shards() splits equal-length columns (first dimension = rows) into shards of about
//   equal row counts, writes each as <out>/<name>-NNNNN-of-MMMMM.h5 with chunked datasets
//   (chunk ~ chunk_bytes, gzip + shuffle when gzip > 0) and a manifest <out>/<name>.json that
//   lists them. Everything is written under temporary names and renamed into place only when
//   all of it was written: a failure leaves no partial output (the manifest is renamed last).
// - inspect_file() describes every dataset of one file; verify() reads every chunk of every
//   shard a source names and checks row counts (per file, and against a manifest), dtypes and
//   shapes, returning totals or throwing runtime::Error(bad_input) at the first problem.
// - plan_reads() says, without reading any data, what each of `ranks` equal ranks will read in
//   one epoch of the loader's order (Sampler): its partitions, blocks, chunks and bytes, and how
//   far the global batches mix blocks (against one partition and a window of 16 blocks: the
//   order before partitions). With `stages` pipeline stages, rank w is stage w / D and replica
//   w % D of D = ranks / stages data-parallel replicas, which share the global batch; the first
//   stage reads the inputs, the last the targets, the stages between nothing (as the trainer).

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "mpitrain/data/sampler.h"
#include "mpitrain/data/spec.h"

namespace mpitrain::data {

struct ShardOptions {
  std::int64_t shards = 0;             // number of shards; 0: from shard_bytes
  std::int64_t shard_bytes = 256 << 20;  // target shard size when shards == 0
  std::int64_t chunk_bytes = 1 << 20;  // target chunk size (rows = chunk_bytes / row bytes)
  int gzip = 4;                        // 0: no compression; 1..9: gzip level (with shuffle)
};

struct Column {
  std::string name;
  at::Tensor rows;  // CPU, first dimension = rows
};

struct ShardSet {
  std::string manifest;
  std::vector<std::string> files;
  std::int64_t rows = 0;
};

ShardSet write_shards(const std::string& out_dir, const std::string& name, const std::vector<Column>& columns,
                      const ShardOptions& options, const nlohmann::json& metadata = nlohmann::json::object());

struct DatasetInfo {
  std::string name;
  std::string dtype;                 // "uint8", ..., or the unsupported type's description
  bool supported = false;            // a dtype the loader reads
  std::vector<std::int64_t> shape;   // full shape, rows first
  std::vector<std::int64_t> chunks;  // empty: not chunked
  std::vector<std::string> filters;  // "deflate(4)", "shuffle", "lzf (not available)"
  std::int64_t stored_bytes = 0;     // on disk
  std::int64_t bytes = 0;            // uncompressed
};

struct FileInfo {
  std::string path;
  std::int64_t file_bytes = 0;
  std::vector<DatasetInfo> datasets;
};

/// Opens with file locking as given (see DatasetSpec::file_locking).
FileInfo inspect_file(const std::string& path, bool file_locking = true);

struct VerifyReport {
  std::int64_t files = 0;
  std::int64_t rows = 0;        // of the first dataset, over all files
  std::int64_t chunks = 0;      // chunk-aligned reads done
  std::int64_t bytes_read = 0;  // uncompressed
};

/// source: manifest or glob (see spec.h). Every dataset of every file is read.
VerifyReport verify(const std::string& source, bool file_locking = true);

struct RankReads {
  int stage = 0, replica = 0;                            // replica = the data-parallel rank
  std::int64_t first_partition = 0, last_partition = 0;  // those its slices touch
  std::int64_t samples_per_batch = 0;
  std::int64_t blocks = 0;  // distinct blocks its samples lie in
  std::int64_t chunks = 0;  // HDF5 chunks, all datasets
  std::int64_t bytes = 0;   // decompressed
};

struct ReadPlan {
  std::int64_t samples = 0, blocks = 0, bytes = 0;  // the dataset's
  std::int64_t steps_per_epoch = 0, partitions = 0;
  std::vector<RankReads> ranks;
  double blocks_per_batch = 0;            // Sampler::blocks_per_batch
  double blocks_per_batch_before = 0;  // with one partition and window 16 (before partitions)
};

/// Throws runtime::Error(bad_input) when `stages` does not divide `ranks`, the replicas do not
/// divide the global batch, or for what the Dataset and Sampler refuse.
ReadPlan plan_reads(const DatasetSpec& spec, const SamplerOptions& options, int ranks, std::int64_t epoch = 0,
                    int stages = 1);

}  // namespace mpitrain::data

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

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

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

}  // namespace mpitrain::data

#pragma once
// What a dataset is: which HDF5 shards, which datasets in them, and how samples are cut.
// docs/data.md describes the file format.
//
// Contract:
// - DatasetSpec::source is either a manifest (a path ending in .json, written by h5shard or by
//   hand) or a glob of .h5 files (a plain path is a glob matching itself). Shards are taken in
//   the manifest's order, or in sorted path order for a glob; that order numbers the samples.
// - classification: datasets `inputs` and `targets` (names configurable) whose first dimension
//   is the sample index. tokens: one 1-D dataset `tokens`; sample i of a shard is the window
//   tokens[i*seq_len, i*seq_len + seq_len + 1), so a shard of T tokens holds (T - 1) / seq_len
//   samples and windows never cross shards.
// - resolve_files() and read_manifest() throw runtime::Error(bad_input) naming the source and
//   the problem (no match, missing file, malformed manifest).

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace mpitrain::data {

enum class Kind { classification, tokens };
Kind parse_kind(const std::string& text);  // "classification" | "tokens"
const char* to_string(Kind kind);

struct DatasetSpec {
  std::string source;  // manifest .json, or glob of .h5 shards
  Kind kind = Kind::classification;
  std::string inputs = "inputs";
  std::string targets = "targets";
  std::string tokens = "tokens";
  std::int64_t seq_len = 0;  // tokens only: inputs and targets are seq_len tokens each
  /// > 0: every target, and for tokens every input token, must be in [0, id_limit) (the
  /// model's classes or vocabulary); reading a sample outside it throws Error(bad_input)
  /// naming the file and sample. 0: not checked.
  std::int64_t id_limit = 0;
  /// Unit of reading, caching and shuffling (a "block", see Sampler): the whole number of HDF5
  /// chunks along the rows nearest to this many bytes, at least one (rows of about this size
  /// for an unchunked dataset). 0: one chunk per block.
  std::int64_t block_bytes = std::int64_t{1} << 20;
  /// false turns HDF5's file locking off (shared file systems without lock support).
  /// HDF5_USE_FILE_LOCKING in the environment, when set, takes precedence.
  bool file_locking = true;

  static DatasetSpec classification(std::string source);
  static DatasetSpec token_stream(std::string source, std::int64_t seq_len);
};

/// A manifest: the shard list and what each shard holds. Paths are relative to the manifest's
/// folder unless absolute; rows is the first dimension (samples, or tokens for a token stream).
struct Manifest {
  struct File {
    std::string path;
    std::int64_t rows = 0;
  };
  struct Dataset {
    std::string name;
    std::string dtype;                // "uint8", "int64", "float32", ...
    std::vector<std::int64_t> shape;  // per row, without the first dimension
  };
  std::vector<File> files;
  std::vector<Dataset> datasets;
  nlohmann::json metadata = nlohmann::json::object();  // free-form: source, vocabulary, classes
};

Manifest read_manifest(const std::string& path);
/// Written to a temporary name and renamed into place.
void write_manifest(const std::string& path, const Manifest& manifest);

/// The shard paths a source names (manifest paths resolved against its folder).
std::vector<std::string> resolve_files(const std::string& source);
/// True when source names a manifest rather than a glob.
bool is_manifest(const std::string& source);

}  // namespace mpitrain::data

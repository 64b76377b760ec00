#pragma once
// Readers for the local data that h5shard turns into shards: IDX image/label files (the MNIST
// and Fashion-MNIST format, gzip-compressed or not), CSV tables, and text for byte- or
// character-level token streams.
//
// Contract: each reader returns CPU tensors whose first dimension is the row (or token), plus
// metadata for the manifest, or throws runtime::Error(bad_input) naming the file, the place in
// it (line, byte offset) and the problem. Nothing is written.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

namespace mpitrain::data {

struct Table {
  at::Tensor inputs;   // (rows, ...)
  at::Tensor targets;  // (rows)
  nlohmann::json metadata = nlohmann::json::object();
};

/// images: IDX of any element type and rank >= 1; labels: 1-D IDX with as many rows.
Table read_idx(const std::string& images, const std::string& labels);

struct CsvOptions {
  std::string label;  // label column: header name or 0-based index; empty: the last column
  char delimiter = ',';
};
/// Features become float32 (rows, columns - 1). Labels that are all integers become int64,
/// other numbers float32, and text labels class ids in sorted name order (metadata.classes).
/// The first line is a header when one of its feature fields is not a number.
Table read_csv(const std::string& path, const CsvOptions& options);

enum class TokenLevel { byte, character };
TokenLevel parse_token_level(const std::string& text);  // "byte" | "char"

struct Document {
  std::string file;  // where it came from, for messages
  std::string text;
};
/// The documents of some text files: each file one document, or, with a separator, the runs
/// of lines between lines equal to it (fortune files use "%"). Empty documents are dropped.
std::vector<Document> read_documents(const std::vector<std::string>& files, const std::string& separator);

struct Vocabulary {
  TokenLevel level = TokenLevel::byte;
  std::vector<char32_t> symbols;  // character level: token id -> code point
};
/// Character level: every code point in the documents, sorted; byte level: the 256 bytes.
/// Invalid UTF-8 at character level is an error naming the file and byte offset.
Vocabulary make_vocabulary(const std::vector<Document>& documents, TokenLevel level);
/// The documents encoded and concatenated: uint8 when the vocabulary has <= 256 symbols,
/// else int32.
at::Tensor encode(const std::vector<Document>& documents, const Vocabulary& vocabulary);
nlohmann::json describe(const Vocabulary& vocabulary);

/// A seeded split of n rows into (train, validation) with round(n * fraction) validation
/// rows; each part keeps the original order.
std::pair<std::vector<std::int64_t>, std::vector<std::int64_t>> split_rows(std::int64_t n, double fraction,
                                                                           std::uint64_t seed);

}  // namespace mpitrain::data

#include "mpitrain/data/sources.h"

#include <ATen/ATen.h>
#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <numeric>
#include <set>
#include <sstream>

#include "mpitrain/data/sampler.h"
#include "mpitrain/runtime/error.h"

namespace mpitrain::data {
namespace {

using runtime::Error;
using runtime::ExitCode;

// gzread reads gzip-compressed and plain files alike.
class GzFile {
 public:
  explicit GzFile(const std::string& path) : path_(path), file_(gzopen(path.c_str(), "rb")) {
    if (file_ == nullptr)
      throw Error("file '" + path + "' cannot be read: " + std::strerror(errno) + ": check the path", ExitCode::bad_input);
  }
  ~GzFile() { gzclose(file_); }
  GzFile(const GzFile&) = delete;
  GzFile& operator=(const GzFile&) = delete;

  // Exactly n bytes, or an error saying what is missing.
  void read(void* out, std::size_t n, const char* what) {
    auto* bytes = static_cast<char*>(out);
    std::size_t done = 0;
    while (done < n) {
      const unsigned ask = static_cast<unsigned>(std::min<std::size_t>(n - done, 1u << 30));
      const int got = gzread(file_, bytes + done, ask);
      if (got < 0) {
        int code = 0;
        const char* message = gzerror(file_, &code);
        throw Error("file '" + path_ + "': cannot read " + what + ": " + message + " (a damaged gzip file?)",
                    ExitCode::bad_input);
      }
      if (got == 0)
        throw Error("file '" + path_ + "' is truncated: " + what + " needs " + std::to_string(n) + " bytes, it has " +
                        std::to_string(done),
                    ExitCode::bad_input);
      done += static_cast<std::size_t>(got);
    }
  }

 private:
  std::string path_;
  gzFile file_;
};

at::Tensor read_idx_file(const std::string& path) {
  GzFile file(path);
  unsigned char magic[4];
  file.read(magic, 4, "the IDX header");
  struct Type {
    unsigned char code;
    c10::ScalarType dtype;
  };
  static constexpr Type kTypes[] = {{0x08, c10::kByte}, {0x09, c10::kChar},  {0x0B, c10::kShort},
                                    {0x0C, c10::kInt},  {0x0D, c10::kFloat}, {0x0E, c10::kDouble}};
  const Type* type = std::find_if(std::begin(kTypes), std::end(kTypes), [&](const Type& t) { return t.code == magic[2]; });
  if (magic[0] != 0 || magic[1] != 0 || type == std::end(kTypes) || magic[3] == 0)
    throw Error("file '" + path + "' is not an IDX file (its header is not 0x00 0x00 <type> <rank>): give the "
                "MNIST-format images/labels files (e.g. train-images-idx3-ubyte.gz)",
                ExitCode::bad_input);
  std::vector<std::int64_t> dims(magic[3]);
  for (auto& dim : dims) {
    unsigned char be[4];
    file.read(be, 4, "the IDX dimensions");
    dim = (std::int64_t{be[0]} << 24) | (be[1] << 16) | (be[2] << 8) | be[3];
  }
  at::Tensor data = at::empty(dims, at::TensorOptions().dtype(type->dtype));
  file.read(data.data_ptr(), static_cast<std::size_t>(data.nbytes()), "the IDX data");
  // IDX stores multi-byte elements big-endian.
  const auto size = static_cast<std::size_t>(data.element_size());
  if (size > 1) {
    auto* bytes = static_cast<unsigned char*>(data.data_ptr());
    for (std::int64_t i = 0; i < data.numel(); ++i) std::reverse(bytes + i * static_cast<std::int64_t>(size), bytes + (i + 1) * static_cast<std::int64_t>(size));
  }
  return data;
}

bool parse_number(const std::string& text, double& value) {
  if (text.empty()) return false;
  char* end = nullptr;
  errno = 0;
  value = std::strtod(text.c_str(), &end);
  return end == text.c_str() + text.size() && errno == 0;
}

bool parse_integer(const std::string& text, std::int64_t& value) {
  if (text.empty()) return false;
  char* end = nullptr;
  errno = 0;
  value = std::strtoll(text.c_str(), &end, 10);
  return end == text.c_str() + text.size() && errno == 0;
}

std::string trim(const std::string& text) {
  const auto first = text.find_first_not_of(" \t\r");
  if (first == std::string::npos) return "";
  return text.substr(first, text.find_last_not_of(" \t\r") - first + 1);
}

// One CSV line into fields; double quotes may enclose a field ("" inside is a quote).
std::vector<std::string> split_csv(const std::string& line, char delimiter) {
  std::vector<std::string> fields(1);
  bool quoted = false;
  for (std::size_t i = 0; i < line.size(); ++i) {
    const char c = line[i];
    if (quoted) {
      if (c == '"' && i + 1 < line.size() && line[i + 1] == '"') {
        fields.back() += '"';
        ++i;
      } else if (c == '"') {
        quoted = false;
      } else {
        fields.back() += c;
      }
    } else if (c == '"') {
      quoted = true;
    } else if (c == delimiter) {
      fields.emplace_back();
    } else {
      fields.back() += c;
    }
  }
  for (auto& field : fields) field = trim(field);
  return fields;
}

// Decodes one UTF-8 code point at text[i], advancing i; false on an invalid sequence.
bool next_code_point(const std::string& text, std::size_t& i, char32_t& out) {
  const auto byte = [&](std::size_t k) { return static_cast<unsigned char>(text[k]); };
  const unsigned char lead = byte(i);
  int extra = 0;
  if (lead < 0x80) {
    out = lead;
  } else if ((lead & 0xE0) == 0xC0) {
    out = lead & 0x1F;
    extra = 1;
  } else if ((lead & 0xF0) == 0xE0) {
    out = lead & 0x0F;
    extra = 2;
  } else if ((lead & 0xF8) == 0xF0) {
    out = lead & 0x07;
    extra = 3;
  } else {
    return false;
  }
  if (i + static_cast<std::size_t>(extra) >= text.size()) return false;  // cut short
  for (int k = 1; k <= extra; ++k) {
    if ((byte(i + static_cast<std::size_t>(k)) & 0xC0) != 0x80) return false;
    out = (out << 6) | (byte(i + static_cast<std::size_t>(k)) & 0x3F);
  }
  static constexpr char32_t kMin[] = {0, 0x80, 0x800, 0x10000};
  if (out < kMin[extra] || out > 0x10FFFF || (out >= 0xD800 && out <= 0xDFFF)) return false;
  i += static_cast<std::size_t>(extra) + 1;
  return true;
}

std::string to_utf8(char32_t c) {
  std::string out;
  if (c < 0x80) {
    out += static_cast<char>(c);
  } else if (c < 0x800) {
    out += static_cast<char>(0xC0 | (c >> 6));
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else if (c < 0x10000) {
    out += static_cast<char>(0xE0 | (c >> 12));
    out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (c >> 18));
    out += static_cast<char>(0x80 | ((c >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  }
  return out;
}

}  // namespace

Table read_idx(const std::string& images, const std::string& labels) {
  Table table;
  table.inputs = read_idx_file(images);
  table.targets = read_idx_file(labels);
  if (table.targets.dim() != 1)
    throw Error("file '" + labels + "' has " + std::to_string(table.targets.dim()) +
                    " dimensions: labels must be 1-D (one per image)",
                ExitCode::bad_input);
  if (table.inputs.size(0) != table.targets.size(0))
    throw Error("file '" + images + "' has " + std::to_string(table.inputs.size(0)) + " images but '" + labels + "' has " +
                    std::to_string(table.targets.size(0)) + " labels: the first dimensions must agree",
                ExitCode::bad_input);
  table.metadata = {{"source", "idx"}, {"images", images}, {"labels", labels}};
  return table;
}

Table read_csv(const std::string& path, const CsvOptions& options) {
  std::ifstream in(path);
  if (!in) throw Error("file '" + path + "' cannot be read: check the path", ExitCode::bad_input);
  std::vector<std::pair<std::size_t, std::vector<std::string>>> lines;  // line number, fields
  std::string line;
  for (std::size_t number = 1; std::getline(in, line); ++number) {
    if (!trim(line).empty()) lines.emplace_back(number, split_csv(line, options.delimiter));
  }
  if (lines.empty()) throw Error("file '" + path + "' has no rows", ExitCode::bad_input);
  const std::size_t columns = lines.front().second.size();
  if (columns < 2) throw Error("file '" + path + "': a table needs at least one feature and a label column", ExitCode::bad_input);

  // The label column: an index, a header name, or the last column.
  std::int64_t label_index = static_cast<std::int64_t>(columns) - 1;
  const bool label_by_name = !options.label.empty() && !parse_integer(options.label, label_index);
  double number = 0;
  bool header = label_by_name;
  for (std::size_t c = 0; c < columns && !header; ++c)
    header = static_cast<std::int64_t>(c) != label_index && !parse_number(lines.front().second[c], number);
  std::vector<std::string> names;
  if (header) {
    names = lines.front().second;
    lines.erase(lines.begin());
  }
  if (label_by_name) {
    const auto found = std::find(names.begin(), names.end(), options.label);
    if (found == names.end())
      throw Error("file '" + path + "' has no column '" + options.label + "' in its header", ExitCode::bad_input);
    label_index = found - names.begin();
  }
  if (label_index < 0 || label_index >= static_cast<std::int64_t>(columns))
    throw Error("file '" + path + "': label column " + std::to_string(label_index) + " is out of range (" +
                    std::to_string(columns) + " columns)",
                ExitCode::bad_input);
  if (lines.empty()) throw Error("file '" + path + "' has a header but no rows", ExitCode::bad_input);

  const auto rows = static_cast<std::int64_t>(lines.size());
  const auto features = static_cast<std::int64_t>(columns) - 1;
  at::Tensor inputs = at::empty({rows, features}, at::kFloat);
  float* x = inputs.data_ptr<float>();
  std::vector<std::string> labels;
  for (std::int64_t r = 0; r < rows; ++r) {
    const auto& [number_of_line, fields] = lines[static_cast<std::size_t>(r)];
    if (fields.size() != columns)
      throw Error("file '" + path + "', line " + std::to_string(number_of_line) + ": " + std::to_string(fields.size()) +
                      " fields, the first row has " + std::to_string(columns),
                  ExitCode::bad_input);
    std::int64_t f = 0;
    for (std::size_t c = 0; c < columns; ++c) {
      if (static_cast<std::int64_t>(c) == label_index) {
        labels.push_back(fields[c]);
        continue;
      }
      if (!parse_number(fields[c], number))
        throw Error("file '" + path + "', line " + std::to_string(number_of_line) + ", column " + std::to_string(c + 1) +
                        ": '" + fields[c] + "' is not a number",
                    ExitCode::bad_input);
      x[r * features + f++] = static_cast<float>(number);
    }
  }
  Table table;
  table.inputs = inputs;
  table.metadata = {{"source", "csv"}, {"file", path}};
  if (!names.empty()) {
    std::vector<std::string> feature_names = names;
    feature_names.erase(feature_names.begin() + label_index);
    table.metadata["features"] = feature_names;
    table.metadata["label"] = names[static_cast<std::size_t>(label_index)];
  }
  std::int64_t integer = 0;
  if (std::all_of(labels.begin(), labels.end(), [&](const std::string& l) { return parse_integer(l, integer); })) {
    table.targets = at::empty({rows}, at::kLong);
    for (std::int64_t r = 0; r < rows; ++r) {
      parse_integer(labels[static_cast<std::size_t>(r)], integer);
      table.targets.data_ptr<std::int64_t>()[r] = integer;
    }
  } else if (std::all_of(labels.begin(), labels.end(), [&](const std::string& l) { return parse_number(l, number); })) {
    table.targets = at::empty({rows}, at::kFloat);
    for (std::int64_t r = 0; r < rows; ++r) {
      parse_number(labels[static_cast<std::size_t>(r)], number);
      table.targets.data_ptr<float>()[r] = static_cast<float>(number);
    }
  } else {
    const std::set<std::string> classes(labels.begin(), labels.end());
    std::map<std::string, std::int64_t> id;
    for (const auto& name : classes) id.emplace(name, static_cast<std::int64_t>(id.size()));
    table.targets = at::empty({rows}, at::kLong);
    for (std::int64_t r = 0; r < rows; ++r) table.targets.data_ptr<std::int64_t>()[r] = id[labels[static_cast<std::size_t>(r)]];
    table.metadata["classes"] = std::vector<std::string>(classes.begin(), classes.end());
  }
  return table;
}

TokenLevel parse_token_level(const std::string& text) {
  if (text == "byte") return TokenLevel::byte;
  if (text == "char") return TokenLevel::character;
  throw Error("unknown token level '" + text + "': expected byte or char", ExitCode::bad_input);
}

std::vector<Document> read_documents(const std::vector<std::string>& files, const std::string& separator) {
  std::vector<Document> documents;
  for (const auto& path : files) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw Error("file '" + path + "' cannot be read: check the path", ExitCode::bad_input);
    std::ostringstream whole;
    whole << in.rdbuf();
    std::string text = whole.str();
    if (separator.empty()) {
      if (!text.empty()) documents.push_back({path, std::move(text)});
      continue;
    }
    std::string current;
    std::istringstream lines(text);
    std::string line;
    while (std::getline(lines, line)) {
      if (line == separator) {
        if (!current.empty()) documents.push_back({path, std::move(current)});
        current.clear();
      } else {
        current += line + "\n";
      }
    }
    if (!current.empty()) documents.push_back({path, std::move(current)});
  }
  if (documents.empty()) throw Error("no text in the input files: give non-empty text files", ExitCode::bad_input);
  return documents;
}

Vocabulary make_vocabulary(const std::vector<Document>& documents, TokenLevel level) {
  Vocabulary vocabulary;
  vocabulary.level = level;
  if (level == TokenLevel::byte) return vocabulary;
  std::set<char32_t> seen;
  for (const auto& document : documents) {
    for (std::size_t i = 0; i < document.text.size();) {
      const std::size_t at = i;
      char32_t c = 0;
      if (!next_code_point(document.text, i, c))
        throw Error("file '" + document.file + "': invalid UTF-8 near byte " + std::to_string(at) +
                        " of a document: use the byte level for non-UTF-8 text",
                    ExitCode::bad_input);
      seen.insert(c);
    }
  }
  vocabulary.symbols.assign(seen.begin(), seen.end());
  return vocabulary;
}

at::Tensor encode(const std::vector<Document>& documents, const Vocabulary& vocabulary) {
  std::int64_t bytes = 0;
  for (const auto& d : documents) bytes += static_cast<std::int64_t>(d.text.size());
  if (vocabulary.level == TokenLevel::byte) {
    at::Tensor tokens = at::empty({bytes}, at::kByte);
    auto* out = tokens.data_ptr<std::uint8_t>();
    for (const auto& d : documents) out = std::copy(d.text.begin(), d.text.end(), out);
    return tokens;
  }
  std::map<char32_t, std::int32_t> id;
  for (const char32_t c : vocabulary.symbols) id.emplace(c, static_cast<std::int32_t>(id.size()));
  std::vector<std::int32_t> ids;
  ids.reserve(static_cast<std::size_t>(bytes));
  for (const auto& d : documents) {
    for (std::size_t i = 0; i < d.text.size();) {
      char32_t c = 0;
      const std::size_t at = i;
      const auto found = next_code_point(d.text, i, c) ? id.find(c) : id.end();
      if (found == id.end())
        throw Error("file '" + d.file + "': the character near byte " + std::to_string(at) + " is not in the vocabulary",
                    ExitCode::bad_input);
      ids.push_back(found->second);
    }
  }
  const at::Tensor all = at::from_blob(ids.data(), {static_cast<std::int64_t>(ids.size())}, at::kInt);
  return vocabulary.symbols.size() <= 256 ? all.to(at::kByte) : all.clone();
}

nlohmann::json describe(const Vocabulary& vocabulary) {
  if (vocabulary.level == TokenLevel::byte) return {{"tokenizer", "byte"}, {"vocab_size", 256}};
  std::string symbols;
  for (const char32_t c : vocabulary.symbols) symbols += to_utf8(c);
  return {{"tokenizer", "char"}, {"vocab_size", vocabulary.symbols.size()}, {"vocab", symbols}};
}

std::pair<std::vector<std::int64_t>, std::vector<std::int64_t>> split_rows(std::int64_t n, double fraction,
                                                                           std::uint64_t seed) {
  if (!(fraction >= 0.0 && fraction < 1.0))
    throw Error("validation fraction " + std::to_string(fraction) + ": it must be in [0, 1)", ExitCode::bad_input);
  const auto validation = static_cast<std::int64_t>(std::llround(static_cast<double>(n) * fraction));
  std::vector<std::int64_t> order = permutation(n, seed);
  std::vector<std::int64_t> held(order.begin(), order.begin() + validation);
  std::vector<std::int64_t> kept(order.begin() + validation, order.end());
  std::sort(held.begin(), held.end());
  std::sort(kept.begin(), kept.end());
  return {kept, held};
}

}  // namespace mpitrain::data

#include "mpitrain/data/token_files.h"

#include <ATen/ATen.h>

#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <regex>
#include <vector>

#include "mpitrain/runtime/error.h"

namespace mpitrain::data {
namespace {

constexpr std::int32_t kLlmcMagic = 20240520;
constexpr std::int64_t kLlmcHeaderBytes = 256 * 4;

[[noreturn]] void bad(const std::string& path, const std::string& what) {
  throw runtime::Error("token file '" + path + "': " + what, runtime::ExitCode::bad_input);
}

std::vector<char> read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) bad(path, "cannot be opened: check the path");
  return std::vector<char>((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

std::int32_t int32_at(const std::vector<char>& bytes, std::size_t index) {
  std::uint32_t value = 0;
  for (int i = 3; i >= 0; --i) value = (value << 8) | static_cast<unsigned char>(bytes[4 * index + i]);
  return static_cast<std::int32_t>(value);
}

// The tokens of `count` elements of `dtype` at `offset`, copied out of the file's bytes.
at::Tensor tokens_at(const std::vector<char>& bytes, std::size_t offset, std::int64_t count, at::ScalarType dtype) {
  at::Tensor tokens = at::empty({count}, at::TensorOptions().dtype(dtype));
  std::memcpy(tokens.data_ptr(), bytes.data() + offset, tokens.nbytes());
  return tokens;
}

at::Tensor read_llmc(const std::string& path, const std::vector<char>& bytes) {
  const auto size = static_cast<std::int64_t>(bytes.size());
  if (size < kLlmcHeaderBytes) bad(path, "shorter (" + std::to_string(size) + " bytes) than llm.c's 1024-byte header");
  if (int32_at(bytes, 0) != kLlmcMagic)
    bad(path, "header magic is " + std::to_string(int32_at(bytes, 0)) + ", not llm.c's " + std::to_string(kLlmcMagic));
  if (int32_at(bytes, 1) != 1)
    bad(path, "header version is " + std::to_string(int32_at(bytes, 1)) + "; version 1 (uint16 tokens) is the one known");
  const std::int64_t count = int32_at(bytes, 2);
  const std::int64_t stored = (size - kLlmcHeaderBytes) / 2;
  if (count <= 0 || (size - kLlmcHeaderBytes) % 2 != 0 || stored != count)
    bad(path, "header says " + std::to_string(count) + " tokens, but the file holds " + std::to_string(size - kLlmcHeaderBytes) +
                  " bytes (" + std::to_string(stored) + " uint16 tokens) after it: truncated or not an llm.c shard");
  return tokens_at(bytes, kLlmcHeaderBytes, count, at::kUInt16);
}

at::Tensor read_nanogpt(const std::string& path, const std::vector<char>& bytes) {
  if (bytes.empty()) bad(path, "is empty");
  if (bytes.size() % 2 != 0)
    bad(path, "has an odd size (" + std::to_string(bytes.size()) + " bytes): a raw uint16 token file has 2 bytes per token");
  return tokens_at(bytes, 0, static_cast<std::int64_t>(bytes.size() / 2), at::kUInt16);
}

at::Tensor read_npy(const std::string& path, const std::vector<char>& bytes) {
  if (bytes.size() < 10 || std::memcmp(bytes.data(), "\x93NUMPY", 6) != 0) bad(path, "is not a .npy file (no \\x93NUMPY magic)");
  const int major = static_cast<unsigned char>(bytes[6]);
  std::size_t length = 0, start = 0;
  if (major == 1) {
    length = static_cast<unsigned char>(bytes[8]) | static_cast<std::size_t>(static_cast<unsigned char>(bytes[9])) << 8;
    start = 10;
  } else if (major == 2 || major == 3) {
    if (bytes.size() < 12) bad(path, "truncated in its header");
    for (int i = 3; i >= 0; --i) length = (length << 8) | static_cast<unsigned char>(bytes[8 + i]);
    start = 12;
  } else {
    bad(path, "npy format version " + std::to_string(major) + " is not one of 1, 2, 3");
  }
  if (start + length > bytes.size()) bad(path, "truncated in its header");
  const std::string header(bytes.data() + start, length);
  std::smatch descr, order, shape;
  if (!std::regex_search(header, descr, std::regex(R"('descr':\s*'([<>|=])([a-z])(\d+)')")) ||
      !std::regex_search(header, order, std::regex(R"('fortran_order':\s*(True|False))")) ||
      !std::regex_search(header, shape, std::regex(R"('shape':\s*\(([^)]*)\))")))
    bad(path, "npy header is not understood: " + header);
  const std::string byte_order = descr[1], kind = descr[2], width = descr[3];
  if (byte_order == ">") bad(path, "holds big-endian numbers; save it little-endian (arr.astype('<u2'))");
  static const std::map<std::string, at::ScalarType> types = {{"u1", at::kByte},   {"i2", at::kShort}, {"u2", at::kUInt16},
                                                             {"i4", at::kInt},    {"u4", at::kUInt32}, {"i8", at::kLong}};
  const auto type = types.find(kind + width);
  if (type == types.end())
    bad(path, "holds dtype " + kind + width + "; token ids must be integers: uint8, int16, uint16, int32, uint32 or int64");
  std::vector<std::int64_t> dims;
  const std::string dims_text = shape[1];
  static const std::regex number(R"(\d+)");
  for (std::sregex_iterator it(dims_text.begin(), dims_text.end(), number), end; it != end; ++it)
    dims.push_back(std::stoll(it->str()));
  if (dims.size() != 1)
    bad(path, "is an array of shape (" + dims_text + "); save the tokens as one 1-D array (arr.reshape(-1))");
  const std::size_t data = start + length;
  const std::int64_t element = std::stoll(width);
  if (static_cast<std::int64_t>(bytes.size() - data) != dims[0] * element)
    bad(path, "shape says " + std::to_string(dims[0]) + " tokens, but " + std::to_string(bytes.size() - data) +
                  " bytes follow the header: truncated");
  if (dims[0] == 0) bad(path, "holds no tokens");
  return tokens_at(bytes, data, dims[0], type->second);
}

}  // namespace

TokenFileFormat parse_token_file_format(const std::string& text) {
  if (text == "auto") return TokenFileFormat::automatic;
  if (text == "llmc") return TokenFileFormat::llmc;
  if (text == "nanogpt") return TokenFileFormat::nanogpt;
  if (text == "npy") return TokenFileFormat::npy;
  throw runtime::Error("token file format '" + text + "': expected auto, llmc, nanogpt or npy", runtime::ExitCode::bad_input);
}

const char* to_string(TokenFileFormat format) {
  switch (format) {
    case TokenFileFormat::automatic: return "auto";
    case TokenFileFormat::llmc: return "llmc";
    case TokenFileFormat::nanogpt: return "nanogpt";
    case TokenFileFormat::npy: return "npy";
  }
  return "?";
}

TokenFile read_token_file(const std::string& path, TokenFileFormat format, std::int64_t vocab_size) {
  const std::vector<char> bytes = read_all(path);
  if (format == TokenFileFormat::automatic) {
    if (bytes.size() >= 4 && int32_at(bytes, 0) == kLlmcMagic) format = TokenFileFormat::llmc;
    else if (bytes.size() >= 6 && std::memcmp(bytes.data(), "\x93NUMPY", 6) == 0) format = TokenFileFormat::npy;
    else format = TokenFileFormat::nanogpt;
  }
  at::Tensor tokens = format == TokenFileFormat::llmc      ? read_llmc(path, bytes)
                      : format == TokenFileFormat::nanogpt ? read_nanogpt(path, bytes)
                                                           : read_npy(path, bytes);
  const at::Tensor wide = tokens.to(at::kLong);
  const auto check = [&](const at::Tensor& outside, const std::string& what) {
    if (!outside.any().item<bool>()) return;
    const std::int64_t index = outside.nonzero()[0][0].item<std::int64_t>();
    bad(path, "token " + std::to_string(index) + " is " + std::to_string(wide[index].item<std::int64_t>()) + ", " + what);
  };
  check(wide < 0, "a negative id");
  if (vocab_size > 0)
    check(wide >= vocab_size, "outside the vocabulary [0, " + std::to_string(vocab_size) + ") (--vocab-size)");
  const bool narrow = wide.max().item<std::int64_t>() < 65536;
  return {narrow ? wide.to(at::kUInt16) : wide.to(at::kInt), format};
}

}  // namespace mpitrain::data

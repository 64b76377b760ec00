#pragma once
// Token files that other GPT training code writes, read for h5shard's `tokens` command:
//   llm.c       a header of 256 little-endian int32 (magic 20240520, version 1, token count),
//               then the tokens as uint16 (its fineweb/tinyshakespeare .bin shards);
//   nanogpt     raw little-endian uint16 tokens, no header (nanoGPT's train.bin / val.bin);
//   npy         a 1-D numpy array (.npy, format 1.0 to 3.0) of uint8, int16, uint16, int32,
//               uint32 or int64 tokens, little-endian, e.g. np.save of a tokenizer's output.
// `auto` takes llm.c when the file starts with its magic, npy when it starts with "\x93NUMPY",
// nanogpt otherwise.
//
// Contract: read_token_file() returns the file's tokens as a 1-D CPU tensor (uint16 when every
// id fits, else int32), or throws runtime::Error(bad_input) naming the file and what is wrong:
// a bad magic or version, a token count that disagrees with the file's size, an odd size, an
// unsupported numpy dtype, shape or byte order, a token id < 0 or >= vocab_size (with its
// position; vocab_size 0 = not checked), an empty file. Nothing is written.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

namespace mpitrain::data {

enum class TokenFileFormat { automatic, llmc, nanogpt, npy };
TokenFileFormat parse_token_file_format(const std::string& text);  // "auto" | "llmc" | "nanogpt" | "npy"
const char* to_string(TokenFileFormat format);

struct TokenFile {
  at::Tensor tokens;        // 1-D, uint16 or int32
  TokenFileFormat format;   // as read (never automatic)
};

TokenFile read_token_file(const std::string& path, TokenFileFormat format, std::int64_t vocab_size);

}  // namespace mpitrain::data

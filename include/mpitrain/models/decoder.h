#pragma once
// Incremental decoding for text generation: a language model that keeps the keys and values of
// the tokens it has seen (a KV cache), so that each new token costs one position's work
// instead of a forward pass over the whole context.
//
// Contract:
// - A model that supports it (the built-in gpt does) is also a Decoder; find it with
//   dynamic_cast<models::Decoder*>(model.get()).
// - new_cache(batch) returns an empty cache for `batch` sequences, on the model's device and in
//   its dtype, with room for context_length() tokens.
// - decode(tokens, cache) takes the next tokens [N, t] of each sequence (N = the cache's batch),
//   appends their keys and values to the cache and returns their logits [N, t, vocab]: the
//   logits equal those forward() gives at the same positions for the whole sequence so far
//   (within floating-point rounding). It runs without autograd; t may be more than 1 (a prompt).
//   A sequence longer than the cache's room is runtime::Error(bad_input); start a new cache
//   with a shorter tail of the text (the generate program does).

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace mpitrain::models {

struct KvCache {
  std::vector<at::Tensor> keys, values;  // per block: [N, heads, room, head_dim]
  std::int64_t length = 0;                // positions filled
  std::int64_t room() const { return keys.empty() ? 0 : keys.front().size(2); }
};

class Decoder {
 public:
  virtual ~Decoder() = default;
  virtual KvCache new_cache(std::int64_t batch) const = 0;
  virtual at::Tensor decode(const at::Tensor& tokens, KvCache& cache) = 0;
};

}  // namespace mpitrain::models

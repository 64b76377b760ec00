// gpt: a GPT-2 style decoder-only transformer for language modelling.
//
//   x = dropout(wte[tokens] + wpe[positions])
//   per block:  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))     (pre-norm)
//     attn: c_attn (C -> 3C), causal scaled-dot-product attention over n_head heads, c_proj
//     mlp:  c_fc (C -> 4C), GELU, c_proj (4C -> C)
//   logits = ln_f(x) @ wte^T     (the output head is the token embedding: weights tied)
//
// This is GPT-2's architecture (layer norm eps 1e-5, biases, tied head) with one choice: GELU is
// exact (erf) by default, as in nanoGPT; `activation: gelu_tanh` is the tanh approximation that
// GPT-2, llm.c and Hugging Face's "gelu_new" use, which OpenAI's GPT-2 weights were trained with.
//
// Generation (models::Decoder) runs the same blocks over new tokens only, keeping every block's
// keys and values in a KV cache: a prompt is one causal pass, each next token attends to all
// cached positions.
//
// Initialisation as GPT-2: weights of linear layers and embeddings ~ N(0, 0.02), biases 0,
// layer norms 1 and 0, and the two residual projections (attn.c_proj, mlp.c_proj) ~ N(0, 0.02 /
// sqrt(2 n_layer)) so that the residual stream's variance does not grow with depth.
// Parameter names follow GPT-2's (wte, wpe, h.<i>.attn.c_attn, ..., ln_f).
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/dropout.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/layer_norm.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/scaled_dot_product_attention.h>
#include <ATen/ops/zeros.h>
#include <c10/util/StringUtil.h>
#include <torch/nn/init.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>

#include <cmath>
#include <optional>

#include "builtin.h"
#include "mpitrain/models/decoder.h"
#include "mpitrain/runtime/error.h"

namespace mpitrain::models::builtin {

namespace {

constexpr double kInitStd = 0.02;

enum class Activation { gelu, gelu_tanh };

torch::nn::Linear linear(std::int64_t in, std::int64_t out, bool bias, double std) {
  torch::nn::Linear layer(torch::nn::LinearOptions(in, out).bias(bias));
  torch::nn::init::normal_(layer->weight, 0.0, std);
  if (bias) torch::nn::init::zeros_(layer->bias);
  return layer;
}

// LibTorch's LayerNorm has a bias whenever it has a weight; GPT's `bias: false` needs none.
class LayerNorm : public torch::nn::Module {
 public:
  LayerNorm(std::int64_t dim, bool bias) : dim_(dim) {
    weight_ = register_parameter("weight", at::ones({dim}));
    if (bias) bias_ = register_parameter("bias", at::zeros({dim}));
  }
  at::Tensor forward(const at::Tensor& x) { return at::layer_norm(x, {dim_}, weight_, bias_); }

 private:
  std::int64_t dim_;
  at::Tensor weight_, bias_;
};

class CausalSelfAttention : public torch::nn::Module {
 public:
  CausalSelfAttention(std::int64_t n_embd, std::int64_t n_head, double dropout, bool bias,
                      double proj_std)
      : n_head_(n_head), dropout_(dropout) {
    c_attn_ = register_module("c_attn", linear(n_embd, 3 * n_embd, bias, kInitStd));
    c_proj_ = register_module("c_proj", linear(n_embd, n_embd, bias, proj_std));
  }

  at::Tensor forward(const at::Tensor& x) { return attend(x, nullptr, nullptr, 0); }

  // The new positions [start, start + T) of x attend to the cached ones and to each other
  // causally; their keys and values are written into the cache first.
  at::Tensor forward_cached(const at::Tensor& x, at::Tensor& keys, at::Tensor& values, std::int64_t start) {
    return attend(x, &keys, &values, start);
  }

  std::int64_t heads() const { return n_head_; }

 private:
  at::Tensor attend(const at::Tensor& x, at::Tensor* keys, at::Tensor* values, std::int64_t start) {
    const std::int64_t batch = x.size(0), time = x.size(1), channels = x.size(2);
    const auto heads = [&](const at::Tensor& t) {
      return t.view({batch, time, n_head_, channels / n_head_}).transpose(1, 2);
    };
    const std::vector<at::Tensor> qkv = c_attn_->forward(x).split(channels, 2);
    at::Tensor k = heads(qkv[1]), v = heads(qkv[2]);
    std::optional<at::Tensor> mask;
    if (keys != nullptr) {
      keys->narrow(2, start, time).copy_(k);
      values->narrow(2, start, time).copy_(v);
      k = keys->narrow(2, 0, start + time);
      v = values->narrow(2, 0, start + time);
      // sdpa's is_causal aligns the mask top-left, right only when nothing is cached before.
      if (start > 0 && time > 1) {
        const auto options = x.options().dtype(at::kLong);
        mask = (at::arange(time, options).unsqueeze(1) + start) >= at::arange(start + time, options).unsqueeze(0);
      }
    }
    const at::Tensor y = at::scaled_dot_product_attention(
        heads(qkv[0]), k, v, mask, /*dropout_p=*/is_training() ? dropout_ : 0.0,
        /*is_causal=*/start == 0 && time > 1);
    const at::Tensor merged = y.transpose(1, 2).contiguous().view({batch, time, channels});
    return at::dropout(c_proj_->forward(merged), dropout_, is_training());
  }


  std::int64_t n_head_;
  double dropout_;
  torch::nn::Linear c_attn_{nullptr}, c_proj_{nullptr};
};

class FeedForward : public torch::nn::Module {
 public:
  FeedForward(std::int64_t n_embd, double dropout, bool bias, double proj_std, Activation activation)
      : dropout_(dropout), approximate_(activation == Activation::gelu_tanh ? "tanh" : "none") {
    c_fc_ = register_module("c_fc", linear(n_embd, 4 * n_embd, bias, kInitStd));
    c_proj_ = register_module("c_proj", linear(4 * n_embd, n_embd, bias, proj_std));
  }

  at::Tensor forward(const at::Tensor& x) {
    return at::dropout(c_proj_->forward(at::gelu(c_fc_->forward(x), approximate_)), dropout_, is_training());
  }

 private:
  double dropout_;
  const char* approximate_;  // at::gelu's name of the approximation
  torch::nn::Linear c_fc_{nullptr}, c_proj_{nullptr};
};

class Block : public torch::nn::Module {
 public:
  Block(std::int64_t n_embd, std::int64_t n_head, double dropout, bool bias, double proj_std, Activation activation) {
    ln_1_ = register_module("ln_1", std::make_shared<LayerNorm>(n_embd, bias));
    attn_ = register_module(
        "attn", std::make_shared<CausalSelfAttention>(n_embd, n_head, dropout, bias, proj_std));
    ln_2_ = register_module("ln_2", std::make_shared<LayerNorm>(n_embd, bias));
    mlp_ = register_module("mlp", std::make_shared<FeedForward>(n_embd, dropout, bias, proj_std, activation));
  }

  at::Tensor forward(at::Tensor x) {
    x = x + attn_->forward(ln_1_->forward(x));
    return x + mlp_->forward(ln_2_->forward(x));
  }

  at::Tensor forward_cached(at::Tensor x, at::Tensor& keys, at::Tensor& values, std::int64_t start) {
    x = x + attn_->forward_cached(ln_1_->forward(x), keys, values, start);
    return x + mlp_->forward(ln_2_->forward(x));
  }

  std::int64_t heads() const { return attn_->heads(); }

 private:
  std::shared_ptr<LayerNorm> ln_1_, ln_2_;
  std::shared_ptr<CausalSelfAttention> attn_;
  std::shared_ptr<FeedForward> mlp_;
};

struct GptOptions {
  std::int64_t vocab_size, seq_len, n_layer, n_head, n_embd;
  double dropout;
  bool bias;
  Activation activation;
};

class Gpt : public Model, public Decoder {
 public:
  explicit Gpt(const GptOptions& o)
      : seq_len_(o.seq_len), n_layer_(o.n_layer), n_embd_(o.n_embd), dropout_(o.dropout) {
    wte_ = register_module("wte", torch::nn::Embedding(o.vocab_size, o.n_embd));
    wpe_ = register_module("wpe", torch::nn::Embedding(o.seq_len, o.n_embd));
    torch::nn::init::normal_(wte_->weight, 0.0, kInitStd);
    torch::nn::init::normal_(wpe_->weight, 0.0, kInitStd);
    const double proj_std = kInitStd / std::sqrt(2.0 * static_cast<double>(o.n_layer));
    torch::nn::ModuleList h;
    for (std::int64_t i = 0; i < o.n_layer; ++i) {
      blocks_.push_back(std::make_shared<Block>(o.n_embd, o.n_head, o.dropout, o.bias, proj_std, o.activation));
      h->push_back(blocks_.back());
    }
    register_module("h", h);
    ln_f_ = register_module("ln_f", std::make_shared<LayerNorm>(o.n_embd, o.bias));
  }

  at::Tensor forward(const at::Tensor& tokens) override {
    at::Tensor x = embed(tokens);
    for (const auto& block : blocks_) x = block->forward(x);
    return head(x);
  }

  // One piece per block: the embeddings with the first, the final norm and the tied head with
  // the last (which borrows wte from the first when they are different pieces).
  std::vector<Piece> pieces() override {
    std::vector<Piece> result;
    const auto layers = static_cast<std::int64_t>(blocks_.size());
    for (std::int64_t i = 0; i < layers; ++i) {
      const bool first = i == 0, last = i + 1 == layers;
      Piece piece;
      piece.name = "h." + std::to_string(i) + (first ? " (with wte, wpe)" : "") + (last ? " (with ln_f, head)" : "");
      if (first) piece.owns = {wte_.ptr(), wpe_.ptr()};
      piece.owns.push_back(blocks_[static_cast<std::size_t>(i)]);
      if (last) piece.owns.push_back(ln_f_);
      if (last && !first) piece.borrows.push_back(wte_.ptr());
      piece.forward = [this, i, first, last](const at::Tensor& input) {
        at::Tensor x = blocks_[static_cast<std::size_t>(i)]->forward(first ? embed(input) : input);
        return last ? head(x) : x;
      };
      result.push_back(std::move(piece));
    }
    return result;
  }

  KvCache new_cache(std::int64_t batch) const override {
    KvCache cache;
    const std::int64_t heads = blocks_.front()->heads();
    for (std::size_t i = 0; i < blocks_.size(); ++i) {
      cache.keys.push_back(at::empty({batch, heads, seq_len_, n_embd_ / heads}, wte_->weight.options()));
      cache.values.push_back(at::empty_like(cache.keys.back()));
    }
    return cache;
  }

  at::Tensor decode(const at::Tensor& tokens, KvCache& cache) override {
    check_tokens(tokens, cache.length);
    if (cache.keys.size() != blocks_.size() || tokens.size(0) != cache.keys.front().size(0))
      throw runtime::Error("gpt: the KV cache was made for another model or batch size (new_cache)",
                           runtime::ExitCode::bad_input);
    at::NoGradGuard no_grad;
    const std::int64_t start = cache.length;
    const at::Tensor positions = at::arange(start, start + tokens.size(1), tokens.options().dtype(at::kLong));
    at::Tensor x = wte_->forward(tokens) + wpe_->forward(positions);
    for (std::size_t i = 0; i < blocks_.size(); ++i)
      x = blocks_[i]->forward_cached(x, cache.keys[i], cache.values[i], start);
    cache.length = start + tokens.size(1);
    return at::linear(ln_f_->forward(x), wte_->weight);
  }

  Task task() const override { return Task::language_modeling; }
  std::int64_t context_length() const override { return seq_len_; }
  std::int64_t output_classes() const override { return wte_->weight.size(0); }

  // PaLM's estimate (appendix B), as nanoGPT and llm.c count it: 6 per parameter per token for
  // the matmuls of forward and backward (the tied wte counted once, as the output head; wpe is a
  // lookup), plus 12 * layers * width * T for attention's scores and weighted sum.
  double training_flops_per_token(std::int64_t seq_len) const override {
    const auto matmul_parameters = static_cast<double>(count_parameters(*this) - wpe_->weight.numel());
    return 6.0 * matmul_parameters +
           12.0 * static_cast<double>(n_layer_) * static_cast<double>(n_embd_) * static_cast<double>(seq_len);
  }

 private:
  at::Tensor embed(const at::Tensor& tokens) {
    check_tokens(tokens, 0);
    const at::Tensor positions = at::arange(tokens.size(1), tokens.options().dtype(at::kLong));
    return at::dropout(wte_->forward(tokens) + wpe_->forward(positions), dropout_, is_training());
  }

  at::Tensor head(const at::Tensor& x) { return at::linear(ln_f_->forward(x), wte_->weight); }

  // Token ids [N, T] after `before` positions already seen, within the context length.
  void check_tokens(const at::Tensor& tokens, std::int64_t before) const {
    if (tokens.dim() != 2 ||
        !(tokens.scalar_type() == at::kLong || tokens.scalar_type() == at::kInt))
      throw runtime::Error("gpt: inputs must be token ids of shape [N, T] (int64 or int32), got " +
                               std::string(tokens.dtype().name()) + " " + c10::str(tokens.sizes()),
                           runtime::ExitCode::bad_input);
    const std::int64_t time = before + tokens.size(1);
    if (time > seq_len_)
      throw runtime::Error("gpt: a sequence of " + std::to_string(time) +
                               " tokens is longer than the context length " +
                               std::to_string(seq_len_) + " (model.gpt.seq_len)",
                           runtime::ExitCode::bad_input);
  }

  std::int64_t seq_len_;
  std::int64_t n_layer_;
  std::int64_t n_embd_;
  double dropout_;
  torch::nn::Embedding wte_{nullptr}, wpe_{nullptr};
  std::vector<std::shared_ptr<Block>> blocks_;
  std::shared_ptr<LayerNorm> ln_f_;
};

}  // namespace

ModelSpec gpt() {
  using namespace config;
  Schema options{
      {
          integer("vocab_size", 50257, "tokens in the vocabulary", Range::at_least(1)),
          integer("seq_len", 1024, "context length: the longest input sequence",
                  Range::at_least(1)),
          integer("n_layer", 12, "transformer blocks", Range::at_least(1)),
          integer("n_head", 12, "attention heads per block", Range::at_least(1)),
          integer("n_embd", 768, "embedding width (a multiple of n_head)", Range::at_least(1)),
          number("dropout", 0.0, "dropout probability on embeddings, attention and residuals",
                 Range::half_open(0, 1)),
          flag("bias", true, "biases in the linear layers and layer norms"),
          text("activation", "gelu",
               "the MLP's GELU: gelu = exact (erf), as nanoGPT; gelu_tanh = the tanh approximation of "
               "GPT-2, llm.c and Hugging Face's gelu_new",
               {"gelu", "gelu_tanh"}),
      },
      [](const Section& o) -> std::string {
        if (o.integer("n_embd") % o.integer("n_head") != 0)
          return "n_embd (" + std::to_string(o.integer("n_embd")) +
                 ") must be a multiple of n_head (" + std::to_string(o.integer("n_head")) + ")";
        return "";
      }};
  return {"gpt", std::move(options), [](const Section& o) -> std::shared_ptr<Model> {
            return std::make_shared<Gpt>(GptOptions{
                o.integer("vocab_size"), o.integer("seq_len"), o.integer("n_layer"),
                o.integer("n_head"), o.integer("n_embd"), o.number("dropout"), o.boolean("bias"),
                o.text("activation") == "gelu_tanh" ? Activation::gelu_tanh : Activation::gelu});
          }};
}

}  // namespace mpitrain::models::builtin

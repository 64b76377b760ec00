#pragma once
// Small models for the DDP tests, each a stand-in for a family: an MLP, a CNN, and a GPT-style
// decoder (embedding, causal self-attention, MLP, tied output head — a parameter used twice).
// No dropout and no batch norm, so one process with a large batch is an exact reference.

#include <torch/torch.h>

namespace mpitrain::testing {

struct TinyModel : torch::nn::Module {
  virtual torch::Tensor forward(const torch::Tensor& inputs) = 0;
  /// A batch of `n` samples drawn from `generator`: (inputs, integer class targets).
  virtual std::pair<torch::Tensor, torch::Tensor> batch(int64_t n, at::Generator& generator) const = 0;
  virtual torch::Tensor loss(const torch::Tensor& outputs, const torch::Tensor& targets) const {
    return torch::nn::functional::cross_entropy(outputs, targets);
  }
};

struct TinyMlp : TinyModel {
  explicit TinyMlp(int64_t hidden = 32) {
    fc1 = register_module("fc1", torch::nn::Linear(12, hidden));
    fc2 = register_module("fc2", torch::nn::Linear(hidden, hidden));
    head = register_module("head", torch::nn::Linear(hidden, 5));
  }
  torch::Tensor forward(const torch::Tensor& x) override {
    return head(torch::tanh(fc2(torch::relu(fc1(x)))));
  }
  std::pair<torch::Tensor, torch::Tensor> batch(int64_t n, at::Generator& g) const override {
    return {at::randn({n, 12}, g, at::kFloat), at::randint(5, {n}, g, at::kLong)};
  }
  torch::nn::Linear fc1{nullptr}, fc2{nullptr}, head{nullptr};
};

struct TinyCnn : TinyModel {
  TinyCnn() {
    conv1 = register_module("conv1", torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 4, 3).padding(1)));
    conv2 = register_module("conv2", torch::nn::Conv2d(torch::nn::Conv2dOptions(4, 8, 3).padding(1)));
    head = register_module("head", torch::nn::Linear(8 * 2 * 2, 3));
  }
  torch::Tensor forward(const torch::Tensor& x) override {
    auto h = torch::max_pool2d(torch::relu(conv1(x)), 2);
    h = torch::max_pool2d(torch::relu(conv2(h)), 2);
    return head(h.flatten(1));
  }
  std::pair<torch::Tensor, torch::Tensor> batch(int64_t n, at::Generator& g) const override {
    return {at::randn({n, 1, 8, 8}, g, at::kFloat), at::randint(3, {n}, g, at::kLong)};
  }
  torch::nn::Conv2d conv1{nullptr}, conv2{nullptr};
  torch::nn::Linear head{nullptr};
};

struct TinyGpt : TinyModel {
  static constexpr int64_t kVocab = 17, kSeq = 6, kEmbd = 16, kHeads = 2;
  TinyGpt() {
    tokens = register_module("tokens", torch::nn::Embedding(kVocab, kEmbd));
    positions = register_module("positions", torch::nn::Embedding(kSeq, kEmbd));
    norm1 = register_module("norm1", torch::nn::LayerNorm(torch::nn::LayerNormOptions({kEmbd})));
    // No bias: the key bias's gradient is zero in exact arithmetic, and AdamW turns the
    // rounding noise left in its place into full-size steps, so float32 runs could not be
    // compared at 1e-5.
    qkv = register_module("qkv", torch::nn::Linear(torch::nn::LinearOptions(kEmbd, 3 * kEmbd).bias(false)));
    proj = register_module("proj", torch::nn::Linear(kEmbd, kEmbd));
    norm2 = register_module("norm2", torch::nn::LayerNorm(torch::nn::LayerNormOptions({kEmbd})));
    up = register_module("up", torch::nn::Linear(kEmbd, 4 * kEmbd));
    down = register_module("down", torch::nn::Linear(4 * kEmbd, kEmbd));
    norm_f = register_module("norm_f", torch::nn::LayerNorm(torch::nn::LayerNormOptions({kEmbd})));
  }
  torch::Tensor forward(const torch::Tensor& idx) override {
    const int64_t b = idx.size(0), t = idx.size(1);
    auto x = tokens(idx) + positions(torch::arange(t, idx.options()));
    auto q_k_v = qkv(norm1(x)).chunk(3, -1);
    auto heads = [&](const torch::Tensor& y) { return y.view({b, t, kHeads, kEmbd / kHeads}).transpose(1, 2); };
    auto attention = at::scaled_dot_product_attention(heads(q_k_v[0]), heads(q_k_v[1]), heads(q_k_v[2]),
                                                      {}, 0.0, /*is_causal=*/true);
    x = x + proj(attention.transpose(1, 2).reshape({b, t, kEmbd}));
    x = x + down(torch::gelu(up(norm2(x))));
    // Weight tying: the output head is the token embedding.
    return torch::matmul(norm_f(x), tokens->weight.t());
  }
  std::pair<torch::Tensor, torch::Tensor> batch(int64_t n, at::Generator& g) const override {
    auto stream = at::randint(kVocab, {n, kSeq + 1}, g, at::kLong);
    return {stream.narrow(1, 0, kSeq).contiguous(), stream.narrow(1, 1, kSeq).contiguous()};
  }
  torch::Tensor loss(const torch::Tensor& logits, const torch::Tensor& targets) const override {
    return torch::nn::functional::cross_entropy(logits.reshape({-1, kVocab}), targets.reshape({-1}));
  }
  torch::nn::Embedding tokens{nullptr}, positions{nullptr};
  torch::nn::LayerNorm norm1{nullptr}, norm2{nullptr}, norm_f{nullptr};
  torch::nn::Linear qkv{nullptr}, proj{nullptr}, up{nullptr}, down{nullptr};
};

}  // namespace mpitrain::testing

// The models layer: the registry (built-ins, user registration, errors), each built-in model's
// output shapes and exact parameter count, GPT's weight tying, causality and initialisation.
#include <ATen/ATen.h>  // before Catch: c10 defines its own CHECK
#include <torch/nn/modules/linear.h>

#include <catch2/catch.hpp>

#include <cmath>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "mpitrain/config/config.h"
#include "mpitrain/models/decoder.h"
#include "mpitrain/models/registry.h"
#include "expect_error.h"
#include "mpitrain/runtime/error.h"

using namespace mpitrain;
using mpitrain::testing::error_of;
using nlohmann::json;

namespace {

// A user model registered the way users do it: from a static initialiser.
class Affine : public models::Model {
 public:
  Affine(std::int64_t in, std::int64_t out) {
    linear_ = register_module("linear", torch::nn::Linear(in, out));
  }
  at::Tensor forward(const at::Tensor& inputs) override { return linear_->forward(inputs); }
  models::Task task() const override { return models::Task::classification; }

 private:
  torch::nn::Linear linear_{nullptr};
};

const bool registered = models::register_model(
    {"test_affine",
     {{config::integer("in_features", 4, "inputs", config::Range::at_least(1)),
       config::integer("out_features", 2, "outputs", config::Range::at_least(1))},
      {}},
     [](const config::Section& o) -> std::shared_ptr<models::Model> {
       return std::make_shared<Affine>(o.integer("in_features"), o.integer("out_features"));
     }});


at::Tensor param(const models::Model& model, const std::string& name) {
  return model.named_parameters()[name];
}

// All parameters whose name ends with `suffix`, flattened into one tensor.
at::Tensor params_ending(const models::Model& model, const std::string& suffix) {
  std::vector<at::Tensor> found;
  for (const auto& p : model.named_parameters())
    if (p.key().size() >= suffix.size() &&
        p.key().compare(p.key().size() - suffix.size(), suffix.size(), suffix) == 0)
      found.push_back(p.value().detach().flatten());
  REQUIRE_FALSE(found.empty());
  return at::cat(found);
}

const json kTinyGpt = json::parse(
    R"({"vocab_size": 50, "seq_len": 8, "n_layer": 2, "n_head": 2, "n_embd": 16})");

}  // namespace

TEST_CASE("the registry holds the built-ins and statically registered models", "[models]") {
  CHECK(registered);
  CHECK(models::model_names() == std::vector<std::string>{"cnn", "gpt", "mlp", "test_affine"});
  const config::ModelSchemas schemas = models::option_schemas();
  CHECK(schemas.size() == 4);
  CHECK(schemas.at("test_affine").find("in_features") != nullptr);

  auto model = models::create("test_affine", {{"in_features", 3}});
  CHECK(model->forward(at::ones({5, 3})).sizes() == at::IntArrayRef{5, 2});
  CHECK(models::count_parameters(*model) == 3 * 2 + 2);

  // A user model's options are config keys like the built-ins'.
  const json tree = json::parse(R"({"model": {"name": "test_affine",
                                              "test_affine": {"out_features": 7}},
                                    "data": {"train": {"files": "x.h5"}}, "train": {"steps": 1}})");
  const config::Config c = config::validate(tree, "test", schemas);
  CHECK(c.model.options == json::parse(R"({"in_features": 4, "out_features": 7})"));
  CHECK(models::create(c.model.name, c.model.options)->forward(at::ones({1, 4})).size(1) == 7);
}

TEST_CASE("registration rejects duplicates and bad names", "[models]") {
  const auto factory = [](const config::Section&) -> std::shared_ptr<models::Model> {
    return std::make_shared<Affine>(1, 1);
  };
  CHECK_THROWS_AS(models::register_model({"mlp", {}, factory}), std::invalid_argument);
  CHECK_THROWS_AS(models::register_model({"Bad-Name", {}, factory}), std::invalid_argument);
  CHECK_THROWS_AS(models::register_model({"name", {}, factory}), std::invalid_argument);
  CHECK_THROWS_AS(models::register_model({"init_from", {}, factory}), std::invalid_argument);
  CHECK_THROWS_AS(models::register_model({"no_factory", {}, {}}), std::invalid_argument);
  CHECK(models::model_names().size() == 4);
}

TEST_CASE("create validates the name and the options", "[models]") {
  CHECK(error_of([] { models::create("gtp"); }) ==
        "unknown model \"gtp\"; did you mean \"gpt\"? Registered models: cnn gpt mlp test_affine");
  CHECK(error_of([] { models::create("gpt", {{"n_layr", 2}}); }) ==
        "options of model \"gpt\": unknown key \"model.gpt.n_layr\"; did you mean "
        "\"model.gpt.n_layer\"?");
  CHECK(error_of([] { models::create("gpt", {{"n_embd", 30}, {"n_head", 4}}); }) ==
        "options of model \"gpt\": in \"model.gpt\": n_embd (30) must be a multiple of n_head (4)");
  CHECK(error_of([] { models::create("mlp", {{"hidden", 0}}); }) ==
        "options of model \"mlp\": \"model.mlp.hidden\" must be an integer >= 1, got 0");
}

TEST_CASE("mlp: shapes and parameter count", "[models]") {
  const std::int64_t in = 12, hidden = 7, classes = 3;
  for (const std::int64_t layers : {0, 1, 3}) {
    INFO("layers = " << layers);
    auto model = models::create("mlp", {{"input_dim", in},
                                        {"hidden", hidden},
                                        {"layers", layers},
                                        {"num_classes", classes},
                                        {"dropout", 0.1}});
    CHECK(model->task() == models::Task::classification);
    CHECK(model->context_length() == 0);
    CHECK(model->forward(at::randn({4, in})).sizes() == at::IntArrayRef{4, classes});
    // Any shape with input_dim values per sample is flattened.
    CHECK(model->forward(at::randn({4, 3, 4})).sizes() == at::IntArrayRef{4, classes});
    // Linear(in, hidden), then layers - 1 of Linear(hidden, hidden), then Linear(hidden, classes).
    const std::int64_t expected =
        layers == 0 ? in * classes + classes
                    : (in * hidden + hidden) + (layers - 1) * (hidden * hidden + hidden) +
                          (hidden * classes + classes);
    CHECK(models::count_parameters(*model) == expected);
  }
  auto model = models::create("mlp", {{"input_dim", 12}});
  CHECK(error_of([&] { model->forward(at::randn({2, 5})); }) ==
        "mlp: inputs of shape [2, 5] do not have 12 features per sample (model.mlp.input_dim)");
}

TEST_CASE("cnn: shapes and parameter count", "[models]") {
  auto model = models::create("cnn", {{"in_channels", 3},
                                      {"image_size", 9},
                                      {"channels", {4, 6}},
                                      {"num_classes", 5}});
  CHECK(model->task() == models::Task::classification);
  CHECK(model->forward(at::randn({2, 3, 9, 9})).sizes() == at::IntArrayRef{2, 5});
  CHECK(model->forward(at::randn({2, 3 * 9 * 9})).sizes() == at::IntArrayRef{2, 5});
  // 3x3 convolutions with bias: 3 -> 4 and 4 -> 6 channels; the image goes 9 -> 4 -> 2 through
  // the pools, so the head sees 6 * 2 * 2 features.
  const std::int64_t conv1 = 3 * 4 * 9 + 4, conv2 = 4 * 6 * 9 + 6, head = 6 * 2 * 2 * 5 + 5;
  CHECK(models::count_parameters(*model) == conv1 + conv2 + head);
  CHECK(error_of([&] { model->forward(at::randn({2, 1, 9, 9})); }) ==
        "cnn: inputs of shape [2, 1, 9, 9] are not [N, 3, 9, 9] (model.cnn.in_channels, "
        "model.cnn.image_size)");
}

TEST_CASE("gpt: shapes and parameter count", "[models]") {
  const std::int64_t V = 50, T = 8, L = 2, C = 16;
  for (const bool bias : {true, false}) {
    INFO("bias = " << bias);
    json options = kTinyGpt;
    options["bias"] = bias;
    auto model = models::create("gpt", options);
    CHECK(model->task() == models::Task::language_modeling);
    CHECK(model->context_length() == T);
    const at::Tensor tokens = at::randint(V, {3, T}, at::kLong);
    CHECK(model->forward(tokens).sizes() == at::IntArrayRef{3, T, V});
    CHECK(model->forward(tokens.slice(1, 0, 5).to(at::kInt)).sizes() == at::IntArrayRef{3, 5, V});

    const std::int64_t b = bias ? 1 : 0;
    const std::int64_t layer_norm = C + b * C;
    const std::int64_t attention = (C * 3 * C + b * 3 * C) + (C * C + b * C);
    const std::int64_t mlp = (C * 4 * C + b * 4 * C) + (4 * C * C + b * C);
    const std::int64_t block = 2 * layer_norm + attention + mlp;
    // Token and position embeddings, the blocks, the final norm; no head (tied to wte).
    CHECK(models::count_parameters(*model) == V * C + T * C + L * block + layer_norm);
    // Each tensor is registered once, so parameters() counts the same.
    std::int64_t listed = 0;
    for (const at::Tensor& p : model->parameters()) listed += p.numel();
    CHECK(listed == models::count_parameters(*model));
    // Training FLOPs per token: 6 per matmul parameter (all but the position embedding), plus
    // attention's 12 * L * C * T.
    const std::int64_t matmul_parameters = V * C + L * block + layer_norm;
    CHECK(model->training_flops_per_token(T) == static_cast<double>(6 * matmul_parameters + 12 * L * C * T));
    CHECK(model->training_flops_per_token(4) == static_cast<double>(6 * matmul_parameters + 12 * L * C * 4));
  }
  CHECK(models::create("mlp")->training_flops_per_token(1) == 0.0);  // not known: no MFU
  auto model = models::create("gpt", kTinyGpt);
  CHECK(error_of([&] { model->forward(at::zeros({1, 9}, at::kLong)); }) ==
        "gpt: a sequence of 9 tokens is longer than the context length 8 (model.gpt.seq_len)");
  CHECK(error_of([&] { model->forward(at::zeros({1, 4})); }) ==
        "gpt: inputs must be token ids of shape [N, T] (int64 or int32), got float [1, 4]");
}

TEST_CASE("gpt: the output head is the token embedding", "[models]") {
  auto model = models::create("gpt", kTinyGpt);
  model->eval();
  const at::Tensor wte = param(*model, "wte.weight");
  for (const auto& p : model->named_parameters())
    if (p.key() != "wte.weight") CHECK(p.value().sizes() != wte.sizes());  // no separate head

  // Tokens 0..47 only, so rows 48 and 49 of wte reach the logits through the head alone.
  const at::Tensor tokens = at::randint(48, {2, 8}, at::kLong);
  {
    at::NoGradGuard no_grad;
    wte[49].zero_();
  }
  const at::Tensor logits = model->forward(tokens);
  CHECK(at::equal(logits.select(2, 49), at::zeros({2, 8})));  // h . 0 = 0, exactly
  CHECK(logits.select(2, 48).abs().min().item<float>() > 0);

  logits.select(2, 48).sum().backward();
  CHECK(wte.grad()[48].abs().sum().item<float>() > 0);  // the head's gradient lands in wte
}

TEST_CASE("gpt: attention is causal", "[models]") {
  at::manual_seed(1);
  auto model = models::create("gpt", kTinyGpt);
  model->eval();
  at::Tensor tokens = at::randint(50, {2, 8}, at::kLong);
  const at::Tensor before = model->forward(tokens);
  tokens.select(1, 5).add_(1).remainder_(50);  // change token 5 in both sequences
  const at::Tensor after = model->forward(tokens);
  CHECK(at::equal(before.slice(1, 0, 5), after.slice(1, 0, 5)));  // positions 0..4: unchanged
  for (std::int64_t t = 5; t < 8; ++t)
    CHECK_FALSE(at::allclose(before.select(1, t), after.select(1, t)));
}

TEST_CASE("gpt: decoding with the KV cache gives forward()'s logits", "[models]") {
  at::manual_seed(2);
  for (const char* activation : {"gelu", "gelu_tanh"}) {
    INFO("activation " << activation);
    json options = kTinyGpt;
    options["activation"] = activation;
    auto model = models::create("gpt", options);
    model->eval();
    auto* decoder = dynamic_cast<models::Decoder*>(model.get());
    REQUIRE(decoder != nullptr);
    const at::Tensor tokens = at::randint(50, {2, 8}, at::kLong);
    const at::Tensor full = model->forward(tokens);
    // A prompt of 3, one token, a chunk of 3 after cached positions (the offset causal mask),
    // one more token: every piece's logits are forward()'s at the same positions.
    models::KvCache cache = decoder->new_cache(2);
    CHECK(cache.room() == 8);
    std::int64_t done = 0;
    for (const std::int64_t piece : {3, 1, 3, 1}) {
      const at::Tensor logits = decoder->decode(tokens.narrow(1, done, piece), cache);
      CHECK(at::allclose(logits, full.narrow(1, done, piece), /*rtol=*/0, /*atol=*/1e-5));
      done += piece;
      CHECK(cache.length == done);
    }
    CHECK(error_of([&] { decoder->decode(tokens.narrow(1, 0, 1), cache); }) ==
          "gpt: a sequence of 9 tokens is longer than the context length 8 (model.gpt.seq_len)");
    models::KvCache other = decoder->new_cache(1);
    CHECK(error_of([&] { decoder->decode(tokens.narrow(1, 0, 1), other); }) ==
          "gpt: the KV cache was made for another model or batch size (new_cache)");
  }
  // The two activations are different functions of the same weights.
  at::manual_seed(3);
  auto exact = models::create("gpt", kTinyGpt);
  at::manual_seed(3);
  json tanh_options = kTinyGpt;
  tanh_options["activation"] = "gelu_tanh";
  auto tanh = models::create("gpt", tanh_options);
  const at::Tensor tokens = at::randint(50, {1, 8}, at::kLong);
  CHECK_FALSE(at::equal(exact->forward(tokens), tanh->forward(tokens)));
  CHECK(at::allclose(exact->forward(tokens), tanh->forward(tokens), 0, 1e-2));
}

TEST_CASE("gpt: dropout acts in training mode only", "[models]") {
  json options = kTinyGpt;
  options["dropout"] = 0.5;
  auto model = models::create("gpt", options);
  const at::Tensor tokens = at::randint(50, {2, 8}, at::kLong);
  CHECK_FALSE(at::equal(model->forward(tokens), model->forward(tokens)));
  model->eval();
  CHECK(at::equal(model->forward(tokens), model->forward(tokens)));
}

TEST_CASE("gpt: GPT-2 initialisation", "[models]") {
  at::manual_seed(0);
  const std::int64_t layers = 4;
  auto model = models::create("gpt", {{"vocab_size", 512},
                                      {"seq_len", 64},
                                      {"n_layer", layers},
                                      {"n_head", 4},
                                      {"n_embd", 64}});
  at::NoGradGuard no_grad;
  const auto std_of = [](const at::Tensor& t) { return t.std().item<double>(); };
  const auto mean_of = [](const at::Tensor& t) { return t.mean().item<double>(); };

  // N(0, 0.02) everywhere but the residual projections. Tolerances are several standard errors
  // of the estimate (0.02 / sqrt(2n) for n samples), so a wrong std cannot pass.
  const at::Tensor wte = param(*model, "wte.weight");  // 32768 values
  CHECK(std::abs(std_of(wte) - 0.02) < 5e-4);
  CHECK(std::abs(mean_of(wte)) < 5e-4);
  CHECK(std::abs(std_of(param(*model, "wpe.weight")) - 0.02) < 1e-3);  // 4096 values
  CHECK(std::abs(std_of(params_ending(*model, "c_attn.weight")) - 0.02) < 5e-4);
  CHECK(std::abs(std_of(params_ending(*model, "c_fc.weight")) - 0.02) < 5e-4);

  // Residual projections: 0.02 / sqrt(2 * n_layer) = 0.00707...
  const double residual = 0.02 / std::sqrt(2.0 * layers);
  CHECK(std::abs(std_of(params_ending(*model, "attn.c_proj.weight")) - residual) < 2e-4);
  CHECK(std::abs(std_of(params_ending(*model, "mlp.c_proj.weight")) - residual) < 1e-4);

  // Biases zero, layer norms the identity, exactly.
  const at::Tensor biases = params_ending(*model, ".bias");
  CHECK(biases.numel() == layers * (2 * 64 + 3 * 64 + 64 + 4 * 64 + 64) + 64);
  CHECK(at::equal(biases, at::zeros_like(biases)));
  const at::Tensor norms = at::cat({params_ending(*model, "ln_1.weight"),
                                    params_ending(*model, "ln_2.weight"),
                                    param(*model, "ln_f.weight")});
  CHECK(at::equal(norms, at::ones_like(norms)));
}

TEST_CASE("count_parameters counts a shared tensor once", "[models]") {
  torch::nn::Module module;
  const at::Tensor shared = at::zeros({3, 4});
  module.register_parameter("a", shared);
  module.register_module("child", std::make_shared<torch::nn::Module>())
      ->register_parameter("b", shared);
  CHECK(module.parameters().size() == 2);
  CHECK(models::count_parameters(module) == 12);
}

// A residual MLP classifier, registered as "resmlp" from a static initialiser: linking this
// file into a program is all it takes for `"model": {"name": "resmlp"}` to work.
//
//   x = stem(flatten(inputs));  depth times: x = x + fc(gelu(norm(x)));  logits = head(norm_f(x))
#include <ATen/ops/gelu.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>

#include <algorithm>

#include "mpitrain/models/registry.h"

namespace {

using mpitrain::config::Range;
using mpitrain::config::Section;

class ResMlp : public mpitrain::models::Model {
 public:
  ResMlp(std::int64_t input_dim, std::int64_t width, std::int64_t depth, std::int64_t classes)
      : input_dim_(input_dim) {
    stem_ = register_module("stem", torch::nn::Linear(input_dim, width));
    for (std::int64_t i = 0; i < depth; ++i) {
      norms_->push_back(torch::nn::LayerNorm(torch::nn::LayerNormOptions({width})));
      fcs_->push_back(torch::nn::Linear(width, width));
    }
    register_module("norms", norms_);
    register_module("fcs", fcs_);
    norm_f_ = register_module("norm_f", torch::nn::LayerNorm(torch::nn::LayerNormOptions({width})));
    head_ = register_module("head", torch::nn::Linear(width, classes));
  }

  at::Tensor forward(const at::Tensor& inputs) override {
    at::Tensor x = stem(inputs);
    for (std::size_t i = 0; i < fcs_->size(); ++i) x = block(i, x);
    return head(x);
  }

  // Pipeline stages (parallel.pipeline_stages): one piece per residual block, the stem with the
  // first and the head with the last. Their forwards, composed, are forward().
  std::vector<mpitrain::models::Piece> pieces() override {
    const std::size_t blocks = std::max<std::size_t>(fcs_->size(), 1);
    std::vector<mpitrain::models::Piece> result;
    for (std::size_t i = 0; i < blocks; ++i) {
      const bool first = i == 0, last = i + 1 == blocks, has_block = i < fcs_->size();
      mpitrain::models::Piece piece;
      piece.name = "block " + std::to_string(i);
      if (first) piece.owns.push_back(stem_.ptr());
      if (has_block) piece.owns.insert(piece.owns.end(), {norms_[i], fcs_[i]});
      if (last) piece.owns.insert(piece.owns.end(), {norm_f_.ptr(), head_.ptr()});
      piece.forward = [this, i, first, last, has_block](const at::Tensor& input) {
        at::Tensor x = first ? stem(input) : input;
        if (has_block) x = block(i, x);
        return last ? head(x) : x;
      };
      result.push_back(std::move(piece));
    }
    return result;
  }

  mpitrain::models::Task task() const override { return mpitrain::models::Task::classification; }

 private:
  at::Tensor stem(const at::Tensor& inputs) { return stem_->forward(inputs.reshape({inputs.size(0), input_dim_})); }
  at::Tensor block(std::size_t i, const at::Tensor& x) {
    return x + fcs_[i]->as<torch::nn::Linear>()->forward(at::gelu(norms_[i]->as<torch::nn::LayerNorm>()->forward(x)));
  }
  at::Tensor head(const at::Tensor& x) { return head_->forward(norm_f_->forward(x)); }

  std::int64_t input_dim_;
  torch::nn::Linear stem_{nullptr}, head_{nullptr};
  torch::nn::ModuleList norms_, fcs_;
  torch::nn::LayerNorm norm_f_{nullptr};
};

// The options schema: each option's name, default, one-line doc and range. In a config they are
// model.resmlp.<option>; unknown keys, wrong types and out-of-range values are errors there.
const bool registered = mpitrain::models::register_model({
    "resmlp",
    {{
         mpitrain::config::integer("input_dim", 64, "features per sample", Range::at_least(1)),
         mpitrain::config::integer("width", 32, "width of the residual stream", Range::at_least(1)),
         mpitrain::config::integer("depth", 2, "residual blocks", Range::at_least(0)),
         mpitrain::config::integer("num_classes", 10, "output classes", Range::at_least(1)),
     },
     {}},
    [](const Section& o) -> std::shared_ptr<mpitrain::models::Model> {
      return std::make_shared<ResMlp>(o.integer("input_dim"), o.integer("width"),
                                      o.integer("depth"), o.integer("num_classes"));
    },
});

}  // namespace

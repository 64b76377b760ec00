// A residual MLP classifier, registered as "resmlp" from a static initialiser: linking this
// file into a program is all it takes for `"model": {"name": "resmlp"}` to work.
//
//   x = stem(flatten(inputs));  depth times: x = x + fc(gelu(norm(x)));  logits = head(norm_f(x))
#include <ATen/ops/gelu.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>

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
    at::Tensor x = stem_->forward(inputs.reshape({inputs.size(0), input_dim_}));
    for (std::size_t i = 0; i < fcs_->size(); ++i)
      x = x + fcs_[i]->as<torch::nn::Linear>()->forward(
                  at::gelu(norms_[i]->as<torch::nn::LayerNorm>()->forward(x)));
    return head_->forward(norm_f_->forward(x));
  }

  mpitrain::models::Task task() const override { return mpitrain::models::Task::classification; }

 private:
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

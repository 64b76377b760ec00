// mlp: a multi-layer perceptron classifier. Inputs are flattened per sample; each hidden layer
// is Linear, ReLU and (when dropout > 0) Dropout; a final Linear gives the logits.
#include <c10/util/StringUtil.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/linear.h>

#include "builtin.h"
#include "mpitrain/runtime/error.h"

namespace mpitrain::models::builtin {

namespace {

class Mlp : public Model {
 public:
  Mlp(std::int64_t input_dim, std::int64_t hidden, std::int64_t layers, std::int64_t num_classes,
      double dropout)
      : input_dim_(input_dim), num_classes_(num_classes) {
    std::int64_t width = input_dim;
    for (std::int64_t i = 0; i < layers; ++i) {
      net_->push_back(torch::nn::Linear(width, hidden));
      net_->push_back(torch::nn::ReLU());
      if (dropout > 0) net_->push_back(torch::nn::Dropout(dropout));
      width = hidden;
    }
    net_->push_back(torch::nn::Linear(width, num_classes));
    register_module("net", net_);
  }

  at::Tensor forward(const at::Tensor& inputs) override { return net_->forward(flat(inputs)); }

  // One piece per Linear layer, with the activation and dropout that follow it.
  std::vector<Piece> pieces() override {
    std::vector<Piece> result;
    const auto layers = static_cast<std::int64_t>(net_->size());
    for (std::int64_t begin = 0; begin < layers;) {
      std::int64_t end = begin + 1;
      while (end < layers && !net_->ptr(end)->as<torch::nn::Linear>()) ++end;
      const bool first = begin == 0;
      Piece piece;
      piece.name = "net." + std::to_string(begin);
      piece.owns.push_back(net_->ptr(begin));
      piece.forward = [this, begin, end, first](const at::Tensor& x) {
        at::Tensor y = first ? flat(x) : x;
        for (std::int64_t i = begin; i < end; ++i) y = (net_->begin() + i)->forward(y);
        return y;
      };
      result.push_back(std::move(piece));
      begin = end;
    }
    return result;
  }

  Task task() const override { return Task::classification; }
  std::int64_t output_classes() const override { return num_classes_; }

 private:
  at::Tensor flat(const at::Tensor& inputs) const {
    if (inputs.dim() < 2 || inputs.numel() != inputs.size(0) * input_dim_)
      throw runtime::Error("mlp: inputs of shape " + c10::str(inputs.sizes()) + " do not have " +
                               std::to_string(input_dim_) +
                               " features per sample (model.mlp.input_dim)",
                           runtime::ExitCode::bad_input);
    return inputs.reshape({inputs.size(0), input_dim_});
  }

  std::int64_t input_dim_;
  std::int64_t num_classes_;
  torch::nn::Sequential net_;
};

}  // namespace

ModelSpec mlp() {
  using namespace config;
  Schema options{
      {
          integer("input_dim", 784, "features per sample (inputs are flattened)",
                  Range::at_least(1)),
          integer("hidden", 256, "width of each hidden layer", Range::at_least(1)),
          integer("layers", 2, "hidden layers (0 = a linear classifier)", Range::at_least(0)),
          integer("num_classes", 10, "output classes", Range::at_least(1)),
          number("dropout", 0.0, "dropout probability after each hidden layer",
                 Range::half_open(0, 1)),
      },
      {}};  // no rule across options
  return {"mlp", std::move(options), [](const Section& o) -> std::shared_ptr<Model> {
            return std::make_shared<Mlp>(o.integer("input_dim"), o.integer("hidden"),
                                         o.integer("layers"), o.integer("num_classes"),
                                         o.number("dropout"));
          }};
}

}  // namespace mpitrain::models::builtin

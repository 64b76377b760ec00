// cnn: an image classifier. Each stage is a 3x3 convolution (padding 1), ReLU and a 2x2 max-pool
// that halves the image; the last stage's feature map is flattened into one Linear layer.
#include <c10/util/StringUtil.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/pooling.h>

#include "builtin.h"
#include "mpitrain/runtime/error.h"

namespace mpitrain::models::builtin {

namespace {

class Cnn : public Model {
 public:
  Cnn(std::int64_t in_channels, std::int64_t image_size, const std::vector<std::int64_t>& channels,
      std::int64_t num_classes)
      : in_channels_(in_channels), image_size_(image_size), num_classes_(num_classes) {
    std::int64_t width = in_channels;
    std::int64_t size = image_size;
    for (const std::int64_t c : channels) {
      features_->push_back(torch::nn::Conv2d(torch::nn::Conv2dOptions(width, c, 3).padding(1)));
      features_->push_back(torch::nn::ReLU());
      features_->push_back(torch::nn::MaxPool2d(2));
      width = c;
      size /= 2;
    }
    register_module("features", features_);
    head_ = register_module("head", torch::nn::Linear(width * size * size, num_classes));
  }

  at::Tensor forward(const at::Tensor& inputs) override {
    return head_->forward(features_->forward(images(inputs)).flatten(1));
  }

  // One piece per stage (convolution, ReLU, pool); the last one ends with the head.
  std::vector<Piece> pieces() override {
    std::vector<Piece> result;
    const auto stages = static_cast<std::int64_t>(features_->size()) / 3;
    for (std::int64_t k = 0; k < stages; ++k) {
      const bool first = k == 0, last = k + 1 == stages;
      Piece piece;
      piece.name = "features." + std::to_string(3 * k) + (last ? " (with head)" : "");
      piece.owns.push_back(features_->ptr(3 * k));
      if (last) piece.owns.push_back(head_.ptr());
      piece.forward = [this, k, first, last](const at::Tensor& x) {
        at::Tensor y = first ? images(x) : x;
        for (std::int64_t i = 3 * k; i < 3 * k + 3; ++i) y = (features_->begin() + i)->forward(y);
        return last ? head_->forward(y.flatten(1)) : y;
      };
      result.push_back(std::move(piece));
    }
    return result;
  }

  Task task() const override { return Task::classification; }
  std::int64_t output_classes() const override { return num_classes_; }

 private:
  // [N, C, S, S], or the same values flattened per sample as [N, C*S*S].
  at::Tensor images(const at::Tensor& inputs) const {
    const std::int64_t per_sample = in_channels_ * image_size_ * image_size_;
    if (inputs.dim() < 2 || inputs.numel() != inputs.size(0) * per_sample)
      throw runtime::Error("cnn: inputs of shape " + c10::str(inputs.sizes()) + " are not [N, " +
                               std::to_string(in_channels_) + ", " + std::to_string(image_size_) +
                               ", " + std::to_string(image_size_) +
                               "] (model.cnn.in_channels, model.cnn.image_size)",
                           runtime::ExitCode::bad_input);
    return inputs.reshape({inputs.size(0), in_channels_, image_size_, image_size_});
  }

  std::int64_t in_channels_;
  std::int64_t image_size_;
  std::int64_t num_classes_;
  torch::nn::Sequential features_;
  torch::nn::Linear head_{nullptr};
};

}  // namespace

ModelSpec cnn() {
  using namespace config;
  Schema options;
  options.settings = {
      integer("in_channels", 3, "channels of the input images", Range::at_least(1)),
      integer("image_size", 32, "height and width of the square input images",
              Range::at_least(1)),
      integers("channels", {32, 64},
               "output channels of each stage (3x3 convolution, ReLU, 2x2 max-pool)",
               Range::at_least(1))
          .items(1, 8),
      integer("num_classes", 10, "output classes", Range::at_least(1)),
  };
  options.check = [](const Section& o) -> std::string {
    const auto stages = static_cast<int>(o.integers("channels").size());
    if ((o.integer("image_size") >> stages) < 1)
      return "image_size (" + std::to_string(o.integer("image_size")) + ") must be at least " +
             std::to_string(1 << stages) + ": each of the " + std::to_string(stages) +
             " stages halves it";
    return "";
  };
  return {"cnn", std::move(options), [](const Section& o) -> std::shared_ptr<Model> {
            return std::make_shared<Cnn>(o.integer("in_channels"), o.integer("image_size"),
                                         o.integers("channels"), o.integer("num_classes"));
          }};
}

}  // namespace mpitrain::models::builtin

#include "grad_hooks.h"

#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <memory>
#include <utility>

namespace mpitrain::ddp::detail {
namespace {

class GradReadyHook final : public torch::autograd::PostAccumulateGradHook {
 public:
  explicit GradReadyHook(std::function<void()> hook) : hook_(std::move(hook)) {}
  void operator()(const torch::autograd::Variable&) override { hook_(); }

 private:
  std::function<void()> hook_;
};

}  // namespace

void set_grad_ready_hook(const at::Tensor& parameter, std::function<void()> hook) {
  torch::autograd::impl::set_post_acc_grad_hooks(parameter, std::make_unique<GradReadyHook>(std::move(hook)));
}

void clear_grad_ready_hook(const at::Tensor& parameter) {
  torch::autograd::impl::set_post_acc_grad_hooks(parameter, nullptr);
}

}  // namespace mpitrain::ddp::detail

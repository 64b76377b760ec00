#pragma once
// The one place that touches LibTorch's internal autograd hook API (torch::autograd::impl), so
// that a LibTorch upgrade changes one file.
//
// A grad-ready hook runs after autograd has accumulated a leaf's gradient into `.grad` (a
// Tensor::register_hook would run before, the wrong moment for DDP). It runs on the autograd
// engine's thread for the device, with the gradient's producing stream current. A tensor has
// one such slot: setting a hook replaces any other.

#include <ATen/core/Tensor.h>

#include <functional>

namespace mpitrain::ddp::detail {

void set_grad_ready_hook(const at::Tensor& parameter, std::function<void()> hook);
void clear_grad_ready_hook(const at::Tensor& parameter);

}  // namespace mpitrain::ddp::detail

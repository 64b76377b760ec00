#pragma once
// What the DDP tests share: the CPU communicator of the test world, and the weight comparison.

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <stdexcept>
#include <vector>

#include "mpitrain/comm/communicator.h"
#include "test_world.h"

namespace mpitrain::testing {

inline comm::Communicator& communicator() {
  static std::unique_ptr<comm::Communicator> comm = [] {
    comm::CommOptions options;
    options.timeout = std::chrono::seconds(120);
    options.verify_collectives = true;  // a protocol slip fails loudly instead of hanging
    return comm::make_communicator(world(), c10::Device(c10::kCPU), options);
  }();
  return *comm;
}

// max |a - b| / max |b| over every tensor pair.
inline double worst_relative_difference(const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b) {
  if (a.size() != b.size()) throw std::invalid_argument("worst_relative_difference: different tensor counts");
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double scale = std::max(b[i].abs().max().item<double>(), 1e-300);
    worst = std::max(worst, (a[i] - b[i]).abs().max().item<double>() / scale);
  }
  return worst;
}

}  // namespace mpitrain::testing

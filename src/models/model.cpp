#include "mpitrain/models/model.h"

#include <unordered_set>

namespace mpitrain::models {

const char* to_string(Task task) {
  switch (task) {
    case Task::classification:
      return "classification";
    case Task::language_modeling:
      return "language_modeling";
  }
  return "unknown";
}

std::int64_t count_parameters(const torch::nn::Module& module) {
  std::unordered_set<const void*> seen;
  std::int64_t total = 0;
  for (const at::Tensor& p : module.parameters())
    if (seen.insert(p.unsafeGetTensorImpl()).second) total += p.numel();
  return total;
}

}  // namespace mpitrain::models

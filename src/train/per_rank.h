#pragma once
// Internal to the train layer: one value from every rank, and a list of per-rank figures as
// text for log lines and messages.

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "mpitrain/comm/communicator.h"

namespace mpitrain::train::detail {

/// Collective: every rank's `value`, in rank order (one all-gather on the communicator's device).
template <typename T>
std::vector<T> gather_per_rank(comm::Communicator& comm, T value) {
  const auto options = at::TensorOptions().device(comm.device()).dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor all = at::empty({comm.size()}, options);
  comm.all_gather(all, at::full({1}, value, options));
  const at::Tensor host = all.cpu();
  return std::vector<T>(host.data_ptr<T>(), host.data_ptr<T>() + comm.size());
}

/// "3, 5, 8".
inline std::string per_rank_text(const std::vector<std::int64_t>& values) {
  std::string text;
  for (std::int64_t v : values) text += (text.empty() ? "" : ", ") + std::to_string(v);
  return text;
}

}  // namespace mpitrain::train::detail

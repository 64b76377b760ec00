#pragma once
// What the ranks check together, in one place: one value from every rank, the ranks that
// differ from this one, lists of ranks or per-rank figures as text, and the one hash every
// cross-rank fingerprint uses (the config's, the dataset's, the model's).
//
// Contract:
// - fnv1a(text) is FNV-1a 64 (offset basis 14695981039346656037, prime 1099511628211), its
//   bits as an int64 so that it travels in an int64 tensor; equal text gives equal values on
//   every rank and every run.
// - gather_per_rank(comm, value) is a collective (one all-gather on the communicator's device):
//   every rank's value, in rank order, on every rank.
// - ranks_differing(all, mine): the ranks whose value is not `mine`, in rank order.
// - list_text(values): "3, 5, 8", for rank lists and per-rank figures in messages.
// - check_all_equal(comm, value, what, what_to_do) is a collective: every rank gathers every
//   rank's value; if any differs, every rank throws runtime::Error(bad_input) saying that
//   `what` differs, naming this rank and the ranks whose value differs from its own, and
//   `what_to_do`. No rank can go on alone, so none is left waiting in a later collective.

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "mpitrain/comm/communicator.h"

namespace mpitrain::comm {

std::int64_t fnv1a(std::string_view text);

template <typename T>
std::vector<T> gather_per_rank(Communicator& comm, T value) {
  const auto options = at::TensorOptions().device(comm.device()).dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor all = at::empty({comm.size()}, options);
  comm.all_gather(all, at::full({1}, value, options));
  const at::Tensor host = all.cpu();
  return std::vector<T>(host.data_ptr<T>(), host.data_ptr<T>() + comm.size());
}

template <typename T>
std::vector<int> ranks_differing(const std::vector<T>& all, const T& mine) {
  std::vector<int> ranks;
  for (std::size_t r = 0; r < all.size(); ++r)
    if (all[r] != mine) ranks.push_back(static_cast<int>(r));
  return ranks;
}

template <typename T>
std::string list_text(const std::vector<T>& values) {
  std::string text;
  for (const T& v : values) text += (text.empty() ? "" : ", ") + std::to_string(v);
  return text;
}

void check_all_equal(Communicator& comm, std::int64_t value, const std::string& what, const std::string& what_to_do);

}  // namespace mpitrain::comm

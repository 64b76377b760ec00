#include "fingerprint.h"

#include <ATen/ATen.h>

#include <cstdint>
#include <sstream>

#include "mpitrain/comm/agreement.h"
#include "mpitrain/runtime/error.h"

namespace mpitrain::ddp::detail {
namespace {

std::string join(const std::vector<std::string>& entries) {
  std::string text;
  for (const std::string& entry : entries) text += entry + '\n';
  return text;
}

std::vector<std::string> split(const std::string& text) {
  std::vector<std::string> lines;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

// Rank 0's entries, sent to every rank (only on the mismatch path).
std::string broadcast_root_text(const std::string& mine, comm::Communicator& comm) {
  const auto options = at::TensorOptions().device(comm.device());
  at::Tensor length = at::full({1}, static_cast<std::int64_t>(mine.size()), options.dtype(at::kLong));
  comm.broadcast(length, 0);
  const std::int64_t n = length.cpu().item<std::int64_t>();
  at::Tensor bytes = at::zeros({n}, options.dtype(at::kByte));
  if (comm.rank() == 0 && n > 0) bytes.copy_(at::from_blob(const_cast<char*>(mine.data()), {n}, at::kByte));
  comm.broadcast(bytes, 0);
  const at::Tensor host = bytes.cpu();
  return std::string(static_cast<const char*>(host.data_ptr()), static_cast<std::size_t>(n));
}

}  // namespace

void verify_same_model(const std::vector<std::string>& entries, comm::Communicator& comm) {
  const std::string text = join(entries);
  const std::vector<std::int64_t> all = comm::gather_per_rank(comm, comm::fnv1a(text));
  const std::vector<int> differing = comm::ranks_differing(all, all[0]);
  if (differing.empty()) return;

  const std::vector<std::string> root = split(broadcast_root_text(text, comm));
  if (all[static_cast<std::size_t>(comm.rank())] == all[0]) {
    throw runtime::Error("DDP: the model on rank(s) " + comm::list_text(differing) + " differs from rank 0's; see their messages. "
                         "Every rank must build the same model (same config, same code)",
                         runtime::ExitCode::bad_input);
  }
  std::size_t k = 0;
  while (k < root.size() && k < entries.size() && root[k] == entries[k]) ++k;
  const std::string theirs = k < root.size() ? "'" + root[k] + "'" : "nothing (rank 0 has fewer entries)";
  const std::string ours = k < entries.size() ? "'" + entries[k] + "'" : "nothing (this rank has fewer entries)";
  throw runtime::Error("DDP: the model differs across ranks at parameter/buffer #" + std::to_string(k) +
                           ": rank 0 has " + theirs + ", rank " + std::to_string(comm.rank()) + " has " + ours +
                           ". Every rank must build the same model (same config, same code)",
                       runtime::ExitCode::bad_input);
}

}  // namespace mpitrain::ddp::detail

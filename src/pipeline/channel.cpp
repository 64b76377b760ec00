#include "mpitrain/pipeline/channel.h"

#include <ATen/ATen.h>
#include <c10/util/StringUtil.h>

#include "mpitrain/runtime/error.h"
#include "mpitrain/runtime/host_read.h"

namespace mpitrain::pipeline {

void Channel::send(const at::Tensor& tensor) {
  if (tensor.dim() > kMaxDims)
    throw runtime::Error("pipeline: a stage's output of shape " + c10::str(tensor.sizes()) + " has more than " +
                         std::to_string(kMaxDims) + " dimensions");
  std::vector<std::int64_t> header(static_cast<std::size_t>(kMaxDims + 2), 0);
  header[0] = static_cast<std::int64_t>(tensor.scalar_type());
  header[1] = tensor.dim();
  for (std::int64_t d = 0; d < tensor.dim(); ++d) header[static_cast<std::size_t>(d + 2)] = tensor.size(d);
  const at::Tensor head = at::tensor(header, at::kLong).to(headers_.device());
  const at::Tensor data = tensor.detach().contiguous();
  sends_.push_back(headers_.send_async(head, peer_));
  sends_.push_back(data_.send_async(data, peer_));
}

at::Tensor Channel::recv() {
  at::Tensor head = at::empty({kMaxDims + 2}, at::TensorOptions().dtype(at::kLong).device(headers_.device()));
  headers_.recv_async(head, peer_)->wait();
  // A header on the host (the header communicator on a GPU) is read as it is; one on the
  // device is a device read, counted as such.
  const at::Tensor header = head.is_cpu() ? head : runtime::read_tensor(head);
  const auto* h = header.data_ptr<std::int64_t>();
  std::vector<std::int64_t> sizes(h + 2, h + 2 + h[1]);
  const auto options = at::TensorOptions().dtype(static_cast<c10::ScalarType>(h[0])).device(data_.device());
  at::Tensor data = at::empty(sizes, options);
  data_.recv_async(data, peer_)->wait();
  return data;
}

void Channel::flush() {
  for (const auto& work : sends_) work->wait();
  sends_.clear();
}

}  // namespace mpitrain::pipeline

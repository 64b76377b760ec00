#pragma once
// One direction between two pipeline stages: tensors of any shape and floating dtype sent by
// one side and received, in the same order, by the other.
//
// Contract:
// - Each message is a fixed-size int64 header (dtype, number of dimensions, sizes; at most
//   kMaxDims dimensions) followed by the data, so the receiver needs to know nothing in advance
//   and a mismatch cannot go unnoticed. The data goes over `data`'s send/recv, the header over
//   `headers`' (by default the same communicator). On a GPU give a host (MPI) communicator of
//   the same ranks for the headers: a header on the device would have to be copied back, which
//   waits for all the receiver's queued work, at every message.
// - send() is asynchronous: it returns once the transfer is queued, and the channel keeps the
//   tensor alive until flush() (call it before the next step reuses or frees memory).
// - recv() blocks the host until the header is here, then until the tensor is (CPU) or orders
//   it before the caller's next work on its current stream (CUDA), and returns a fresh tensor
//   on `data`'s device.
// - Timeouts and aborts are the communicator's.

#include <ATen/core/Tensor.h>

#include <vector>

#include "mpitrain/comm/communicator.h"

namespace mpitrain::pipeline {

class Channel {
 public:
  static constexpr int kMaxDims = 8;

  Channel(comm::Communicator& data, int peer) : Channel(data, data, peer) {}
  Channel(comm::Communicator& data, comm::Communicator& headers, int peer)
      : data_(data), headers_(headers), peer_(peer) {}

  void send(const at::Tensor& tensor);
  at::Tensor recv();
  void flush();

 private:
  comm::Communicator& data_;
  comm::Communicator& headers_;
  int peer_;
  std::vector<comm::WorkPtr> sends_;
};

}  // namespace mpitrain::pipeline

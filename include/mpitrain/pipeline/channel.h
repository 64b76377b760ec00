#pragma once
// One direction between two pipeline stages: tensors of any shape and floating dtype sent by
// one side and received, in the same order, by the other.
//
// Contract:
// - Each message is a fixed-size int64 header (dtype, number of dimensions, sizes; at most
//   kMaxDims dimensions) followed by the data, both over the communicator's send/recv, so the
//   receiver needs to know nothing in advance and a mismatch cannot go unnoticed.
// - send() is asynchronous: it returns once the transfer is queued, and the channel keeps the
//   tensor alive until flush() (call it before the next step reuses or frees memory).
// - recv() blocks the host until the tensor is here (CPU) or orders it before the caller's
//   next work on its current stream (CUDA), and returns a fresh tensor on the communicator's
//   device.
// - Timeouts and aborts are the communicator's.

#include <ATen/core/Tensor.h>

#include <vector>

#include "mpitrain/comm/communicator.h"

namespace mpitrain::pipeline {

class Channel {
 public:
  static constexpr int kMaxDims = 8;

  Channel(comm::Communicator& comm, int peer) : comm_(comm), peer_(peer) {}

  void send(const at::Tensor& tensor);
  at::Tensor recv();
  void flush();

 private:
  comm::Communicator& comm_;
  int peer_;
  std::vector<comm::WorkPtr> sends_;
};

}  // namespace mpitrain::pipeline

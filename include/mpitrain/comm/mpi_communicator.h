#pragma once
// MpiCommunicator: collectives on CPU tensors over MPI.
//
// Contract (beyond communicator.h):
// - Operations run as non-blocking MPI collectives on a private duplicate of the world
//   communicator. One progress thread per communicator starts them in call order and polls
//   them (MPI only progresses inside MPI calls), so an async all-reduce advances while the
//   caller computes. The thread sleeps when nothing is in flight, and backs off between polls
//   (runtime::Backoff) when an operation takes long, so a withheld collective costs little CPU.
//   The duplicate is made with MPI_Comm_idup, bounded by options().timeout.
// - bfloat16 and float16 are reduced with user-defined MPI operations that accumulate each
//   pair in float32 and round back, as NCCL does; max/min are exact.
// - The progress thread enforces the timeout: an operation in flight longer than
//   options().timeout ends the job.

#include <memory>

#include "mpitrain/comm/communicator.h"

namespace mpitrain::comm {

class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator(const runtime::World& world, const CommOptions& options = {});
  ~MpiCommunicator() override;

  c10::Device device() const override { return c10::Device(c10::kCPU); }
  Backend backend() const override { return Backend::mpi; }
  void abort() noexcept override;

 protected:
  WorkPtr do_all_reduce(at::Tensor& tensor, ReduceOp op) override;
  WorkPtr do_broadcast(at::Tensor& tensor, int root) override;
  WorkPtr do_all_gather(at::Tensor& output, const at::Tensor& input) override;
  WorkPtr do_reduce_scatter(at::Tensor& output, const at::Tensor& input, ReduceOp op) override;
  WorkPtr do_barrier() override;
  WorkPtr do_send(const at::Tensor& tensor, int peer) override;
  WorkPtr do_recv(at::Tensor& tensor, int peer) override;

 private:
  class Engine;
  std::unique_ptr<Engine> engine_;
};

}  // namespace mpitrain::comm

#pragma once
// NcclCommunicator: collectives on CUDA tensors over NCCL (built when the CUDA path is).
//
// Contract (beyond communicator.h):
// - Bootstrap: rank 0 creates the unique id, MPI broadcasts it (with a timeout), and every rank
//   creates a non-blocking communicator (ncclCommInitRankConfig, blocking = 0) on its device.
// - Every operation runs on the communicator's own CUDA stream, ordered after the caller's
//   current stream by an event; the tensors are recorded on that stream so the caching
//   allocator does not hand their memory out while NCCL still uses it. Work::wait() makes the
//   caller's current stream wait for the result (the host does not block), except barrier,
//   whose wait() returns on the host when every rank has arrived.
// - Nothing blocks in cudaStreamSynchronize: completion is polled with cudaEventQuery.
// - A watchdog thread polls in-flight operations and ncclCommGetAsyncError. An operation older
//   than options().timeout, or an asynchronous NCCL error, ends the job: the communicator is
//   aborted (ncclCommAbort) and then MPI_Abort ends every rank. The watchdog sets the rank's
//   device before any CUDA call; an exception on it goes to runtime::fatal.
// - abort() is serialised with every other call on the NCCL communicator, so it never frees it
//   under the watchdog or a caller. Completion events come from a pool, not one per call.
// - NCCL refuses two ranks of one communicator on the same GPU: one rank per GPU.

#include <memory>

#include "mpitrain/comm/communicator.h"

namespace mpitrain::comm {

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(const runtime::World& world, c10::Device device, const CommOptions& options = {});
  ~NcclCommunicator() override;

  c10::Device device() const override { return device_; }
  Backend backend() const override { return Backend::nccl; }
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
  class State;  // keeps nccl.h and the CUDA headers out of users' translation units
  c10::Device device_;
  std::unique_ptr<State> state_;
};

}  // namespace mpitrain::comm

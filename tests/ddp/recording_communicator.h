#pragma once
// A Communicator that forwards to a real one and records every call, so tests can see what
// DDP sends and when.

#include <mutex>
#include <string>
#include <vector>

#include "mpitrain/comm/communicator.h"
#include "test_world.h"

namespace mpitrain::testing {

class RecordingCommunicator final : public comm::Communicator {
 public:
  explicit RecordingCommunicator(comm::Communicator& inner)
      : Communicator(world(), inner.options()), inner_(inner) {}

  c10::Device device() const override { return inner_.device(); }
  comm::Backend backend() const override { return inner_.backend(); }
  void abort() noexcept override { inner_.abort(); }

  /// Appends a marker to the event log (e.g. "backward returned").
  void note(const std::string& event) {
    std::lock_guard<std::mutex> lock(mutex_);
    events_.push_back(event);
  }
  std::vector<std::string> events() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return events_;
  }
  /// Collectives issued so far (markers not counted).
  std::size_t calls() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return calls_;
  }
  /// Element counts of the all-reduces, in call order.
  std::vector<int64_t> all_reduce_sizes() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return all_reduce_sizes_;
  }

 protected:
  comm::WorkPtr do_all_reduce(at::Tensor& tensor, comm::ReduceOp op) override {
    record("all_reduce " + std::to_string(tensor.numel()), tensor.numel());
    return inner_.all_reduce_async(tensor, op);
  }
  comm::WorkPtr do_broadcast(at::Tensor& tensor, int root) override {
    record("broadcast " + std::to_string(tensor.numel()));
    return inner_.broadcast_async(tensor, root);
  }
  comm::WorkPtr do_all_gather(at::Tensor& output, const at::Tensor& input) override {
    record("all_gather " + std::to_string(input.numel()));
    return inner_.all_gather_async(output, input);
  }
  comm::WorkPtr do_reduce_scatter(at::Tensor& output, const at::Tensor& input, comm::ReduceOp op) override {
    record("reduce_scatter " + std::to_string(input.numel()));
    return inner_.reduce_scatter_async(output, input, op);
  }
  comm::WorkPtr do_barrier() override {
    record("barrier 0");
    return inner_.barrier_async();
  }
  comm::WorkPtr do_send(const at::Tensor& tensor, int peer) override {
    record("send " + std::to_string(tensor.numel()));
    return inner_.send_async(tensor, peer);
  }
  comm::WorkPtr do_recv(at::Tensor& tensor, int peer) override {
    record("recv " + std::to_string(tensor.numel()));
    return inner_.recv_async(tensor, peer);
  }

 private:
  void record(const std::string& event, int64_t all_reduce_numel = -1) {
    std::lock_guard<std::mutex> lock(mutex_);
    events_.push_back(event);
    ++calls_;
    if (all_reduce_numel >= 0) all_reduce_sizes_.push_back(all_reduce_numel);
  }

  comm::Communicator& inner_;
  mutable std::mutex mutex_;
  std::vector<std::string> events_;
  std::vector<int64_t> all_reduce_sizes_;
  std::size_t calls_ = 0;
};

}  // namespace mpitrain::testing

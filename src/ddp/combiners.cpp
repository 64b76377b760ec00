#include "combiners.h"

#include <ATen/ATen.h>

#include <cmath>
#include <utility>

#include "mpitrain/runtime/error.h"

namespace mpitrain::ddp::detail {
namespace {

std::int64_t bytes_of(const at::Tensor& t) { return t.numel() * static_cast<std::int64_t>(t.element_size()); }

// The wire copy of a buffer when a narrower dtype was asked for and applies (floating point).
at::Tensor wire_copy(const at::Tensor& buffer, std::optional<c10::ScalarType> wire_dtype) {
  if (!wire_dtype || *wire_dtype == buffer.scalar_type() || !at::isFloatingType(buffer.scalar_type())) return {};
  return at::empty_like(buffer, buffer.options().dtype(*wire_dtype));
}

class AllReduce final : public Combiner {
 public:
  AllReduce(comm::Communicator& comm, const std::vector<at::Tensor>& buffers, std::optional<c10::ScalarType> wire)
      : comm_(comm) {
    for (const at::Tensor& buffer : buffers) wire_.push_back(wire_copy(buffer, wire));
  }

  Launch start(std::size_t b, const at::Tensor& buffer) override {
    at::Tensor payload = buffer;
    if (wire_[b].defined()) payload = wire_[b].copy_(buffer);
    return {comm_.all_reduce_async(payload, comm::ReduceOp::sum), bytes_of(payload),
            ring_bytes(bytes_of(payload), comm_.size(), /*all_reduce=*/true)};
  }

  void finish(std::size_t b, at::Tensor& buffer) override {
    if (wire_[b].defined()) buffer.copy_(wire_[b]);
    if (comm_.size() > 1) buffer.div_(comm_.size());
  }

 private:
  comm::Communicator& comm_;
  std::vector<at::Tensor> wire_;
};

class Shard final : public Combiner {
 public:
  Shard(comm::Communicator& comm, const std::vector<at::Tensor>& buffers, std::vector<at::Tensor> shard_grads,
        std::optional<c10::ScalarType> wire)
      : comm_(comm), grads_(std::move(shard_grads)) {
    for (std::size_t b = 0; b < buffers.size(); ++b) {
      wire_.push_back(wire_copy(buffers[b], wire));
      wire_grads_.push_back(wire_[b].defined() ? at::empty_like(grads_[b], wire_[b].options()) : at::Tensor());
    }
  }

  Launch start(std::size_t b, const at::Tensor& buffer) override {
    at::Tensor payload = buffer;
    if (wire_[b].defined()) payload = wire_[b].copy_(buffer);
    at::Tensor& out = wire_[b].defined() ? wire_grads_[b] : grads_[b];
    return {comm_.reduce_scatter_async(out, payload, comm::ReduceOp::sum), bytes_of(payload),
            ring_bytes(bytes_of(payload), comm_.size(), /*all_reduce=*/false)};
  }

  void finish(std::size_t b, at::Tensor&) override {
    if (wire_grads_[b].defined()) grads_[b].copy_(wire_grads_[b]);
    if (comm_.size() > 1) grads_[b].div_(comm_.size());
  }

 private:
  comm::Communicator& comm_;
  std::vector<at::Tensor> grads_, wire_, wire_grads_;
};

// Indices travel as int32: a bucket holds far fewer than 2^31 elements (25 MiB by default).
class TopK final : public Combiner {
 public:
  TopK(comm::Communicator& comm, const std::vector<at::Tensor>& buffers, double ratio) : comm_(comm) {
    const std::int64_t n = comm.size();
    for (const at::Tensor& buffer : buffers) {
      const std::int64_t k =
          std::min(buffer.numel(), std::max<std::int64_t>(1, static_cast<std::int64_t>(std::ceil(ratio * buffer.numel()))));
      Bucket bucket;
      bucket.residual = at::zeros_like(buffer);
      bucket.sent_indices = at::empty({k}, buffer.options().dtype(at::kInt));
      bucket.sent_values = at::empty({k}, buffer.options());
      bucket.indices = at::empty({n * k}, bucket.sent_indices.options());
      bucket.values = at::empty({n * k}, buffer.options());
      buckets_.push_back(std::move(bucket));
    }
  }

  Launch start(std::size_t b, const at::Tensor& buffer) override {
    Bucket& bucket = buckets_[b];
    const std::int64_t k = bucket.sent_values.numel();
    // What this rank owes: this step's gradient plus what earlier steps did not send.
    bucket.residual.add_(buffer);
    const at::Tensor chosen = std::get<1>(at::topk(bucket.residual.abs(), k, 0, /*largest=*/true, /*sorted=*/false));
    bucket.sent_indices.copy_(chosen);
    bucket.sent_values.copy_(bucket.residual.index_select(0, chosen));
    bucket.residual.index_fill_(0, chosen, 0);
    comm_.all_gather_async(bucket.indices, bucket.sent_indices);
    const std::int64_t gathered = bytes_of(bucket.indices) + bytes_of(bucket.values);
    return {comm_.all_gather_async(bucket.values, bucket.sent_values),
            bytes_of(bucket.sent_indices) + bytes_of(bucket.sent_values),
            ring_bytes(gathered, comm_.size(), /*all_reduce=*/false)};
  }

  void finish(std::size_t b, at::Tensor& buffer) override {
    const Bucket& bucket = buckets_[b];
    buffer.zero_();
    buffer.index_add_(0, bucket.indices, bucket.values);
    if (comm_.size() > 1) buffer.div_(comm_.size());
  }

  std::map<std::string, at::Tensor> state() const override {
    std::map<std::string, at::Tensor> state;
    for (std::size_t b = 0; b < buckets_.size(); ++b) state[name(b)] = buckets_[b].residual;
    return state;
  }

  void load_state(const std::map<std::string, at::Tensor>& state) override {
    Combiner::load_state(state);  // refuses unknown names
    for (std::size_t b = 0; b < buckets_.size(); ++b) {
      const auto it = state.find(name(b));
      if (it == state.end())
        throw runtime::Error("DDP state: no top-k residual '" + name(b) + "' (saved with other ddp settings?)",
                             runtime::ExitCode::bad_input);
      at::Tensor& residual = buckets_[b].residual;
      if (!it->second.sizes().equals(residual.sizes()) || it->second.scalar_type() != residual.scalar_type())
        throw runtime::Error("DDP state: top-k residual '" + name(b) + "' has " + std::to_string(it->second.numel()) +
                                 " elements of " + c10::toString(it->second.scalar_type()) + ", this model's bucket " +
                                 std::to_string(residual.numel()) + " of " + c10::toString(residual.scalar_type()) +
                                 " (saved with other ddp.bucket_mb settings?)",
                             runtime::ExitCode::bad_input);
      residual.copy_(it->second);
    }
  }

 private:
  struct Bucket {
    at::Tensor residual;                   // error feedback: the bucket's gradient not sent yet
    at::Tensor sent_indices, sent_values;  // this rank's k
    at::Tensor indices, values;            // every rank's k, rank by rank
  };
  static std::string name(std::size_t b) { return "topk_residual." + std::to_string(b); }

  comm::Communicator& comm_;
  std::vector<Bucket> buckets_;
};

}  // namespace

std::int64_t ring_bytes(std::int64_t bytes, int ranks, bool all_reduce) {
  return bytes * (all_reduce ? 2 : 1) * (ranks - 1) / ranks;
}

void Combiner::load_state(const std::map<std::string, at::Tensor>& state) {
  const std::map<std::string, at::Tensor> mine = this->state();
  for (const auto& [name, tensor] : state)
    if (mine.count(name) == 0)
      throw runtime::Error("DDP state holds '" + name + "', which this run's gradient reduction does not keep "
                           "(saved with another ddp.compression?)",
                           runtime::ExitCode::bad_input);
}

std::unique_ptr<Combiner> make_all_reduce(comm::Communicator& comm, const std::vector<at::Tensor>& buffers,
                                          std::optional<c10::ScalarType> wire_dtype) {
  return std::make_unique<AllReduce>(comm, buffers, wire_dtype);
}

std::unique_ptr<Combiner> make_shard(comm::Communicator& comm, const std::vector<at::Tensor>& buffers,
                                     std::vector<at::Tensor> shard_grads, std::optional<c10::ScalarType> wire_dtype) {
  return std::make_unique<Shard>(comm, buffers, std::move(shard_grads), wire_dtype);
}

std::unique_ptr<Combiner> make_topk(comm::Communicator& comm, const std::vector<at::Tensor>& buffers, double ratio) {
  return std::make_unique<TopK>(comm, buffers, ratio);
}

}  // namespace mpitrain::ddp::detail

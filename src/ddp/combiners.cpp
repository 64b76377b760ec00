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

// What a narrow wire carries: the buffer already divided by the world size (in the buffer's
// precision, rounded once). Summed first, fp16 would overflow at 65504 / ranks, about where
// loss scaling keeps fp16 gradients.
at::Tensor& to_wire(at::Tensor& wire, const at::Tensor& buffer, int ranks) {
  // A 0-dim CPU divisor: the Scalar overload of div_out refuses an out of another dtype.
  return at::div_out(wire, buffer, at::scalar_tensor(ranks, at::kDouble));
}

class AllReduce final : public Combiner {
 public:
  AllReduce(comm::Communicator& comm, const std::vector<at::Tensor>& buffers, std::optional<c10::ScalarType> wire)
      : comm_(comm) {
    for (const at::Tensor& buffer : buffers) wire_.push_back(wire_copy(buffer, wire));
  }

  Launch start(std::size_t b, const at::Tensor& buffer) override {
    at::Tensor payload = buffer;
    if (wire_[b].defined()) payload = to_wire(wire_[b], buffer, comm_.size());
    return {comm_.all_reduce_async(payload, comm::ReduceOp::sum),
            {bytes_of(payload), ring_bytes(bytes_of(payload), comm_.size(), /*all_reduce=*/true)}};
  }

  Bytes finish(std::size_t b, at::Tensor& buffer) override {
    if (wire_[b].defined()) buffer.copy_(wire_[b]);
    else if (comm_.size() > 1) buffer.div_(comm_.size());
    return {};
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
    if (wire_[b].defined()) payload = to_wire(wire_[b], buffer, comm_.size());
    at::Tensor& out = wire_[b].defined() ? wire_grads_[b] : grads_[b];
    return {comm_.reduce_scatter_async(out, payload, comm::ReduceOp::sum),
            {bytes_of(payload), ring_bytes(bytes_of(payload), comm_.size(), /*all_reduce=*/false)}};
  }

  Bytes finish(std::size_t b, at::Tensor&) override {
    if (wire_grads_[b].defined()) grads_[b].copy_(wire_grads_[b]);
    else if (comm_.size() > 1) grads_[b].div_(comm_.size());
    return {};
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
            {bytes_of(bucket.sent_indices) + bytes_of(bucket.sent_values),
             ring_bytes(gathered, comm_.size(), /*all_reduce=*/false)}};
  }

  Bytes finish(std::size_t b, at::Tensor& buffer) override {
    const Bucket& bucket = buckets_[b];
    buffer.zero_();
    // One rank's k entries at a time, in rank order: they are distinct indices, so no two
    // atomic adds of one call meet. All at once, CUDA's index_add_ would add the entries that
    // 3 or more ranks chose in a different order on each rank, and the replicas would drift.
    const std::int64_t k = bucket.sent_indices.numel();
    for (int r = 0; r < comm_.size(); ++r)
      buffer.index_add_(0, bucket.indices.narrow(0, r * k, k), bucket.values.narrow(0, r * k, k));
    if (comm_.size() > 1) buffer.div_(comm_.size());
    return {};
  }

  std::map<std::string, at::Tensor> state() const override {
    std::map<std::string, at::Tensor> state;
    for (std::size_t b = 0; b < buckets_.size(); ++b) state[name(b)] = buckets_[b].residual;
    return state;
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

// PowerSGD (Vogels, Karimireddy and Jaggi, 2019), as PyTorch's powerSGD_hook does it, per
// bucket: M = gradient + residual for each matrix (a parameter of 2 or more dimensions, seen as
// size(0) x the rest) that a rank-r factorisation makes smaller; P = M Q, all-reduced together
// with the bucket's other elements (sent whole); P orthonormalised; Q = M^T P, all-reduced and
// averaged; the result P Q^T (the average of the ranks' M projected on P's span), the residual
// M - P Q^T. Q persists between steps (warm start), identical on every rank: it starts from the
// same seeded random numbers and is an all-reduce's result after that. The first warmup_steps
// backwards are plain all-reduces, as the paper recommends.
class PowerSgd final : public Combiner {
 public:
  PowerSgd(comm::Communicator& comm, const std::vector<at::Tensor>& buffers, const std::vector<std::vector<Slot>>& layout,
           int rank, std::int64_t warmup_steps)
      : comm_(comm), rank_(rank), warmup_(warmup_steps), plain_(make_all_reduce(comm, buffers, std::nullopt)) {
    for (std::size_t b = 0; b < buffers.size(); ++b) {
      Bucket bucket;
      const at::Tensor& buffer = buffers[b];
      std::int64_t first = 0, second = 0;
      at::Tensor whole = at::ones({buffer.numel()}, buffer.options().dtype(at::kBool));  // sent uncompressed
      // QR needs float32 or float64; other dtypes are sent whole.
      const bool factorable = buffer.scalar_type() == at::kFloat || buffer.scalar_type() == at::kDouble;
      for (const Slot& slot : layout[b]) {
        if (slot.sizes.size() < 2 || !factorable) continue;
        const std::int64_t rows = slot.sizes[0];
        const std::int64_t cols = c10::multiply_integers(slot.sizes) / rows;
        if (rows * cols <= rank * (rows + cols)) continue;  // the factors would not be smaller
        bucket.matrices.push_back({slot.offset, rows, cols, first, second});
        first += rows * rank;
        second += cols * rank;
        whole.narrow(0, slot.offset, rows * cols).fill_(false);
      }
      bucket.whole = whole.nonzero().squeeze(1);
      bucket.first = at::zeros({first + bucket.whole.numel()}, buffer.options());
      // Q: the same seeded start on every rank.
      at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(1000 + b);
      bucket.q = at::randn({second}, generator, buffer.options().device(at::kCPU)).to(buffer.device());
      bucket.residual = at::zeros_like(buffer);
      buckets_.push_back(std::move(bucket));
    }
  }

  Launch start(std::size_t b, const at::Tensor& buffer) override {
    if (warming_up()) return plain_->start(b, buffer);
    at::NoGradGuard no_grad;
    Bucket& bucket = buckets_[b];
    bucket.residual.add_(buffer);  // M
    for (const Matrix& m : bucket.matrices) {
      at::Tensor p = p_of(bucket, m);
      at::mm_out(p, m_of(bucket, m), q_of(bucket, m));
    }
    bucket.first.narrow(0, bucket.first.numel() - bucket.whole.numel(), bucket.whole.numel())
        .copy_(bucket.residual.index_select(0, bucket.whole));
    const std::int64_t bytes = bytes_of(bucket.first);
    return {comm_.all_reduce_async(bucket.first, comm::ReduceOp::sum),
            {bytes, ring_bytes(bytes, comm_.size(), /*all_reduce=*/true)}};
  }

  Bytes finish(std::size_t b, at::Tensor& buffer) override {
    if (warming_up()) {
      plain_->finish(b, buffer);
      if (b + 1 == buckets_.size()) ++steps_;
      return {};
    }
    Bucket& bucket = buckets_[b];
    const int n = comm_.size();
    // Elements sent whole: averaged, nothing left over.
    const at::Tensor sent = bucket.first.narrow(0, bucket.first.numel() - bucket.whole.numel(), bucket.whole.numel());
    buffer.index_copy_(0, bucket.whole, sent / n);
    bucket.residual.index_fill_(0, bucket.whole, 0);
    for (const Matrix& m : bucket.matrices) {
      at::Tensor p = p_of(bucket, m);
      p.copy_(std::get<0>(at::linalg_qr(p)));
      at::Tensor q = q_of(bucket, m);
      at::mm_out(q, m_of(bucket, m).t(), p);
    }
    Bytes second;
    if (!bucket.matrices.empty()) {
      comm_.all_reduce(bucket.q, comm::ReduceOp::sum);
      bucket.q.div_(n);
      second = {bytes_of(bucket.q), ring_bytes(bytes_of(bucket.q), n, /*all_reduce=*/true)};
    }
    for (const Matrix& m : bucket.matrices) {
      at::Tensor approximation = buffer.narrow(0, m.offset, m.rows * m.cols).view({m.rows, m.cols});
      at::mm_out(approximation, p_of(bucket, m), q_of(bucket, m).t());
      m_of(bucket, m).sub_(approximation);
    }
    if (b + 1 == buckets_.size()) ++steps_;
    return second;
  }

  std::map<std::string, at::Tensor> state() const override {
    std::map<std::string, at::Tensor> state;
    state["powersgd_steps"] = at::full({1}, steps_, at::kLong);
    for (std::size_t b = 0; b < buckets_.size(); ++b) {
      state["powersgd_residual." + std::to_string(b)] = buckets_[b].residual;
      state["powersgd_q." + std::to_string(b)] = buckets_[b].q;
    }
    return state;
  }

  void load_state(const std::map<std::string, at::Tensor>& state) override {
    Combiner::load_state(state);  // residuals and Q; the step count is a copy, read it back
    steps_ = state.at("powersgd_steps").item<std::int64_t>();
  }

 private:
  struct Matrix {
    std::int64_t offset, rows, cols;  // in the bucket
    std::int64_t p, q;                // offsets of its factors in `first` and `q`
  };
  struct Bucket {
    std::vector<Matrix> matrices;
    at::Tensor whole;     // indices of the elements sent uncompressed
    at::Tensor first;     // the P factors, then the uncompressed elements: the first all-reduce
    at::Tensor q;         // the Q factors: the second all-reduce, kept as the next step's start
    at::Tensor residual;  // error feedback; holds M between start() and finish()
  };

  bool warming_up() const { return steps_ < warmup_; }
  at::Tensor m_of(Bucket& bucket, const Matrix& m) const {
    return bucket.residual.narrow(0, m.offset, m.rows * m.cols).view({m.rows, m.cols});
  }
  at::Tensor p_of(Bucket& bucket, const Matrix& m) const {
    return bucket.first.narrow(0, m.p, m.rows * rank_).view({m.rows, rank_});
  }
  at::Tensor q_of(Bucket& bucket, const Matrix& m) const {
    return bucket.q.narrow(0, m.q, m.cols * rank_).view({m.cols, rank_});
  }

  comm::Communicator& comm_;
  std::int64_t rank_;
  std::int64_t warmup_;
  std::int64_t steps_ = 0;  // synchronised backwards finished
  std::vector<Bucket> buckets_;
  std::unique_ptr<Combiner> plain_;  // the warm-up's all-reduce
};

}  // namespace

std::int64_t ring_bytes(std::int64_t bytes, int ranks, bool all_reduce) {
  return bytes * (all_reduce ? 2 : 1) * (ranks - 1) / ranks;
}

namespace {

void copy_checked(const std::map<std::string, at::Tensor>& state, const std::string& name, at::Tensor& target) {
  const auto it = state.find(name);
  if (it == state.end())
    throw runtime::Error("DDP state: no '" + name + "' (saved with other ddp.compression settings?)",
                         runtime::ExitCode::bad_input);
  if (!it->second.sizes().equals(target.sizes()) || it->second.scalar_type() != target.scalar_type())
    throw runtime::Error("DDP state: '" + name + "' has " + std::to_string(it->second.numel()) + " elements of " +
                             c10::toString(it->second.scalar_type()) + ", this model's " + std::to_string(target.numel()) +
                             " of " + c10::toString(target.scalar_type()) + " (saved with other ddp.bucket_mb settings?)",
                         runtime::ExitCode::bad_input);
  target.copy_(it->second);
}

}  // namespace

void Combiner::load_state(const std::map<std::string, at::Tensor>& state) {
  std::map<std::string, at::Tensor> mine = this->state();
  for (const auto& [name, tensor] : state)
    if (mine.count(name) == 0)
      throw runtime::Error("DDP state holds '" + name + "', which this run's gradient reduction does not keep "
                           "(saved with another ddp.compression?)",
                           runtime::ExitCode::bad_input);
  for (auto& [name, tensor] : mine) copy_checked(state, name, tensor);
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

std::unique_ptr<Combiner> make_powersgd(comm::Communicator& comm, const std::vector<at::Tensor>& buffers,
                                        const std::vector<std::vector<Slot>>& layout, int rank,
                                        std::int64_t warmup_steps) {
  return std::make_unique<PowerSgd>(comm, buffers, layout, rank, warmup_steps);
}

}  // namespace mpitrain::ddp::detail

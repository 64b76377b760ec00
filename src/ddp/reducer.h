#pragma once
// The gradient reducer: buckets, readiness, launches, wait and average.
//
// Protocol, one synchronised backward:
//  1. Layout (once, at construction). Parameters that require grad are taken in reverse
//     registration order — roughly the order backward produces their gradients — and packed
//     into buckets, one open bucket per (dtype, device); a bucket closes when the next gradient
//     would take it past its cap (first_bucket_bytes for the first bucket, bucket_bytes after).
//     Buckets are numbered in order of creation. Each bucket owns one flat buffer and every
//     parameter's `.grad` is set to a view into it.
//  2. Readiness. Autograd calls mark_ready(p) after accumulating p's gradient. If `.grad` is no
//     longer the bucket view (zero_grad to none, or a user assigned it), it is copied into the
//     view and the view put back. The bucket's pending count drops; a parameter ready twice in
//     one backward is an error.
//  3. Launch. Buckets launch strictly in index order: when bucket b becomes complete, every
//     complete bucket from `next_launch_` on is launched, stopping at the first incomplete one.
//     INVARIANT: every rank launches buckets 0, 1, 2, ... in that order, whatever order its
//     hooks fire in, so the all-reduces match across ranks. finish() checks that all of them
//     were launched, in order, exactly once.
//     A launch hands the bucket to the combiner (combiners.h: all-reduce, ZeRO's reduce-scatter,
//     top-k or PowerSGD), which starts its asynchronous collectives.
//  4. Finish (after backward returns). Unready parameters are an error, or, with
//     find_unused_parameters, count as zero gradients and complete their buckets (so every
//     rank still launches every bucket). Then each bucket is waited on in order and the
//     combiner finishes it (casts back from the wire dtype, divides by the world size) — after
//     the wait, so nothing races with the collective. State is reset for the next backward;
//     the buckets' Works are kept until the next finish(), for last_timings().
//  ZeRO stage 1: buffers are padded with zeros to a multiple of the world size; rank r's shard
//  of bucket b is elements [r s, (r + 1) s) of it, s = padded size / world size. Its slices
//  (ddp.h's ShardSlice) are the pieces of parameters inside that range. The parameters' data
//  moves into one flat buffer per bucket, laid out like the gradients, so the all-gather writes
//  straight into them: gather_parameters() copies the slices into the shard's gradient buffer
//  (the gradients are spent once the optimizer stepped) and all-gathers it into that buffer.
//  Memory per parameter element, fp32 with AdamW: 4 (parameter) + 4 (gradient) + 4/N (shard
//  gradient) + 8/N (moments), against 16 at stage 0.
//  no_sync: while set, mark_ready() does nothing and finish() is not called by the trainer;
//  gradients accumulate in `.grad`. The next synchronised backward's hooks see the accumulated
//  gradients and reduce them.
//
// Threading: hooks run on autograd's threads (one per device) while the caller waits in
// backward(); a mutex guards the state.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "mpitrain/comm/communicator.h"
#include "mpitrain/ddp/ddp.h"

namespace mpitrain::ddp {

namespace detail {
class Combiner;
}
using detail::Combiner;

class Reducer {
 public:
  /// parameters: (name, tensor) of every parameter that requires grad, in registration order.
  Reducer(std::vector<std::pair<std::string, at::Tensor>> parameters, comm::Communicator& comm,
          const Options& options);
  ~Reducer();
  Reducer(const Reducer&) = delete;
  Reducer& operator=(const Reducer&) = delete;

  void finish();
  void gather_parameters();
  const std::vector<ShardSlice>& shard() const { return shard_; }
  int zero_stage() const { return zero_stage_; }
  Combiner& combiner() { return *combiner_; }
  bool no_sync() const;
  /// Returns the previous value.
  bool set_no_sync(bool value);

  const Stats& stats() const { return stats_; }
  std::vector<std::vector<std::string>> layout() const;
  /// DistributedDataParallel::last_bucket_timings().
  std::vector<std::optional<comm::WorkTiming>> last_timings() const;

 private:
  struct Param {
    std::string name;
    at::Tensor tensor;
    std::size_t bucket = 0;
    std::int64_t offset = 0;  // elements into the bucket's buffer
    at::Tensor alias;         // the parameter's slice of the bucket, shaped like it
    bool ready = false;
  };
  struct Bucket {
    at::Tensor buffer;            // every gradient of the bucket, flat (padded at ZeRO stage 1)
    std::vector<std::size_t> params;
    std::size_t pending = 0;      // parameters not yet ready in this backward
    comm::WorkPtr work;
  };

  void build_buckets(const Options& options);
  void build_shard();
  /// Makes param's .grad the bucket view again; zero_if_missing: an undefined grad becomes zeros.
  void rebind_grad(Param& param, bool zero_if_missing);
  void mark_ready(std::size_t index);
  void mark_ready_locked(std::size_t index, bool during_backward);
  void launch_ready_buckets(bool during_backward);

  comm::Communicator& comm_;
  bool find_unused_;
  int zero_stage_;
  std::vector<Param> params_;
  std::vector<Bucket> buckets_;
  std::unique_ptr<Combiner> combiner_;
  // ZeRO stage 1, per bucket: the averaged gradient of this rank's shard (after the optimizer
  // step, the all-gather's input), and the parameters, flat like the gradients (its output).
  std::vector<at::Tensor> shard_grads_, flat_params_;
  std::vector<ShardSlice> shard_;
  std::vector<std::pair<std::size_t, std::int64_t>> slice_places_;  // per slice: bucket, offset in the shard
  std::size_t next_launch_ = 0;
  std::vector<std::size_t> launch_order_;  // this backward's launches, checked in finish()
  std::vector<comm::WorkPtr> last_works_;  // the last finished backward's, per bucket
  bool no_sync_ = false;
  Stats stats_;
  mutable std::mutex mutex_;
};

}  // namespace mpitrain::ddp

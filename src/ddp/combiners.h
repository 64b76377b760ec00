#pragma once
// How a bucket's gradients are combined across ranks: the reducer's pluggable part.
//
// Protocol, per synchronised backward: the reducer calls start(b, buffer) once for every bucket,
// in bucket order, when the bucket's gradients are complete (from autograd's thread, under the
// reducer's lock); after backward it waits on each returned work in bucket order and calls
// finish(b, buffer). `buffer` is the bucket's flat gradient buffer holding this rank's local
// gradients at start(); the combiner may not write it before its work completed. After
// finish(), the averaged result is in place: in `buffer` for the all-reduce and the compressors,
// in the shard gradient buffer for Shard (ZeRO stage 1), whose `buffer` keeps the local
// gradients.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "mpitrain/comm/communicator.h"
#include "mpitrain/ddp/ddp.h"

namespace mpitrain::ddp::detail {

struct Bytes {
  std::int64_t payload = 0;  // handed to the collectives (Stats::bytes_reduced)
  std::int64_t sent = 0;     // Stats::bytes_sent
};

struct Launch {
  comm::WorkPtr work;  // the last collective started; the ones before it complete first
  Bytes bytes;
};

/// Stats::bytes_sent of one collective over `ranks` ranks whose whole (all-reduce: payload;
/// reduce-scatter: input; all-gather: output) is `bytes`.
std::int64_t ring_bytes(std::int64_t bytes, int ranks, bool all_reduce);

class Combiner {
 public:
  virtual ~Combiner() = default;
  virtual Launch start(std::size_t bucket, const at::Tensor& buffer) = 0;
  /// Returns the bytes of collectives it ran itself (PowerSGD's second round), usually none.
  virtual Bytes finish(std::size_t bucket, at::Tensor& buffer) = 0;
  /// DistributedDataParallel::state() / load_state(). The tensors state() returns share storage
  /// with the combiner's own, so the default load_state() copies into them: it refuses
  /// (runtime::Error, bad_input) a name state() does not have, a missing one, or another shape
  /// or dtype.
  virtual std::map<std::string, at::Tensor> state() const { return {}; }
  virtual void load_state(const std::map<std::string, at::Tensor>& state);
};

/// All-reduce (sum), optionally in a narrower wire dtype, then divide by the world size.
std::unique_ptr<Combiner> make_all_reduce(comm::Communicator& comm, const std::vector<at::Tensor>& buffers,
                                          std::optional<c10::ScalarType> wire_dtype);

/// Reduce-scatter (sum) into shard_grads[b] (buffers[b].numel() / world size elements), then
/// divide by the world size.
std::unique_ptr<Combiner> make_shard(comm::Communicator& comm, const std::vector<at::Tensor>& buffers,
                                     std::vector<at::Tensor> shard_grads, std::optional<c10::ScalarType> wire_dtype);

/// Top-k with error feedback: each rank adds the bucket's gradient to its residual, sends the
/// k largest-magnitude elements (k = ceil(ratio x elements), indices and values, all-gathered)
/// and keeps the rest as the next residual; the result is the average of the ranks' sparse
/// contributions.
std::unique_ptr<Combiner> make_topk(comm::Communicator& comm, const std::vector<at::Tensor>& buffers, double ratio);

/// Where a parameter's gradient lies in its bucket's buffer.
struct Slot {
  std::int64_t offset = 0;
  std::vector<std::int64_t> sizes;
};

/// PowerSGD with error feedback; layout[b]: bucket b's parameters. Each matrix-shaped gradient
/// (size(0) x the rest) plus its residual, M, is sent as rank-r factors: P = M Q is all-reduced
/// and orthonormalised, Q = M^T P all-reduced and averaged, the result is P Q^T and the residual
/// M - P Q^T; other elements are averaged whole. Q starts from the same seeded random numbers on
/// every rank and carries over between steps. The first warm-up synchronised backwards are plain
/// all-reduces.
std::unique_ptr<Combiner> make_powersgd(comm::Communicator& comm, const std::vector<at::Tensor>& buffers,
                                        const std::vector<std::vector<Slot>>& layout, int rank,
                                        std::int64_t warmup_steps);

}  // namespace mpitrain::ddp::detail

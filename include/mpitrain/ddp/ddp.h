#pragma once
// DistributedDataParallel: data-parallel training of any torch::nn::Module, one replica per rank.
//
// Use:
//   ddp::DistributedDataParallel ddp(model, communicator, options);
//   for each optimizer step:
//     for each micro-step but the last: { auto guard = ddp.no_sync(); forward; loss.backward(); }
//     ddp.before_forward(); forward; loss.backward(); ddp.finish_backward();
//     ddp.clip_grad_norm(max), optimizer.step(), ddp.finish_step(), zero the gradients
//   where the optimizer steps ddp.gradients()' owners: the module's parameters at ZeRO stage 0,
//   the slices of ddp.shard() at stage 1.
//
// Contract:
// - Construction is collective. It compares a fingerprint of the model (every parameter's and
//   buffer's name, shape, dtype and requires_grad, in order) across ranks — a mismatch is an
//   error (ExitCode::bad_input) on every rank naming the first differing entry and both sides —
//   and then broadcasts parameters and buffers from rank 0.
// - Gradients of parameters that require grad live in per-bucket contiguous buffers; each
//   `.grad` is a view into its bucket. After finish_backward() each `.grad` holds the average
//   over ranks of the local gradients, ready for clipping and the optimizer. zero_grad() to
//   zero or to none both work; a gradient that is not a view when it becomes ready is copied
//   into its bucket and the view put back.
// - Outside no_sync(), a bucket's all-reduce starts while backward runs, as soon as every
//   gradient in it is ready and every earlier bucket has started: every rank starts buckets
//   in index order, so collectives match across ranks whatever order autograd runs in.
// - Inside no_sync() nothing is communicated: gradients accumulate locally. The backward that
//   follows outside no_sync reduces the accumulated gradients.
// - A parameter that gets no gradient in a synchronised backward is an error naming it, unless
//   Options::find_unused_parameters, in which case its local gradient counts as zero.
// - How a bucket is combined is pluggable (Options): an all-reduce (stage 0, the default), a
//   reduce-scatter (ZeRO stage 1), top-k or PowerSGD compression with error feedback. Each
//   mechanism is explained once, where it is implemented: the reducer's protocol and ZeRO's
//   layout in src/ddp/reducer.h, the combiners (top-k, PowerSGD) in src/ddp/combiners.h.
// - What a caller sees of ZeRO stage 1 (Options::zero_stage = 1): finish_backward() leaves this
//   rank with the averaged gradient of its shard only; shard() lists the shard's pieces
//   (parameter slices), each with a `value` sharing the parameter's storage and a `grad` (also
//   value.grad()) holding that average, so an optimizer built over the values keeps state for
//   1/N of the model; finish_step() (collective) then all-gathers the updated shards into every
//   replica's parameters and spends the slices' grads. A parameter's own `.grad` holds only this
//   rank's local gradient: use gradients() and clip_grad_norm(), which mean the averaged
//   gradients at every stage.
// - Compression state (residuals; PowerSGD's Q and step count) goes through checkpoints with
//   state() and load_state().
// - The module must outlive this object; parameters must not be added or replaced meanwhile.
// - validate() (run by the constructor first) refuses Options the engine cannot honour, with
//   runtime::Error(bad_input). Its rules are the config's ddp.* settings' (their ranges in the
//   settings table and config::ddp_settings_problem()), applied to the Options as to the keys
//   of the same names, so a rule is written once for both ways in.

#include <torch/nn/module.h>

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "mpitrain/comm/communicator.h"
#include "mpitrain/config/choices.h"

namespace mpitrain::ddp {

struct Options {
  /// Upper bound of a bucket's gradient bytes (a single larger parameter gets a bucket alone).
  std::int64_t bucket_bytes = std::int64_t{25} << 20;
  /// The first bucket (the last layers' gradients, ready first) is small so reduction starts early.
  std::int64_t first_bucket_bytes = std::int64_t{1} << 20;
  bool find_unused_parameters = false;
  /// Broadcast buffers (e.g. batch-norm statistics) from rank 0 in before_forward().
  bool broadcast_buffers = true;
  /// Reduce in this dtype (bf16 or fp16) instead of the gradients' own; unset: no cast.
  std::optional<c10::ScalarType> wire_dtype;
  /// 0: every rank holds every averaged gradient; 1: ZeRO stage 1 (see the contract).
  int zero_stage = 0;
  using Compression = config::Compression;  // none, topk, powersgd (ddp.compression)
  /// Compression needs zero_stage 0 and no wire_dtype (it sends the gradients' own dtype).
  Compression compression = Compression::none;
  /// Fraction of each bucket's elements top-k sends, in (0, 1].
  double topk_ratio = 0.1;
  /// PowerSGD: rank of the factors, and the synchronised backwards that all-reduce uncompressed first.
  std::int64_t powersgd_rank = 4;
  std::int64_t powersgd_warmup_steps = 10;
};

/// ZeRO stage 1: a contiguous piece of one parameter that this rank's shard holds.
struct ShardSlice {
  std::string name;        // the parameter's name in the module
  at::Tensor parameter;    // the whole parameter
  std::int64_t begin = 0;  // first element, counted in the flattened parameter
  /// parameter.flatten()[begin, begin + numel), sharing the parameter's storage (not an autograd
  /// view): what the optimizer steps.
  at::Tensor value;
  /// The averaged gradient of the same elements after finish_backward(); value.grad() is it.
  at::Tensor grad;
};

/// What the communication cost, for the trainer's metrics. Counters accumulate.
struct Stats {
  std::int64_t synchronised_backwards = 0;
  std::int64_t buckets_launched = 0;
  /// Of those, launched from a gradient hook while backward was still running.
  std::int64_t buckets_launched_during_backward = 0;
  std::int64_t bytes_reduced = 0;  // gradient payload handed to collectives, in the wire dtype
  /// What this rank puts on the network for gradients and, at ZeRO stage 1, parameters, counted
  /// as a bandwidth-optimal (ring) algorithm sends it: an all-reduce 2(N-1)/N of its payload, a
  /// reduce-scatter or an all-gather (N-1)/N of the whole; 0 at world size 1.
  std::int64_t bytes_sent = 0;
  /// Host time spent in finish_backward() waiting for the reductions (on CUDA the host does not
  /// block, so this is near zero there and the wait shows in the step time instead).
  double comm_wait_seconds = 0;
};

/// Throws runtime::Error(bad_input) naming what is wrong when `options` break a rule of the
/// ddp.* settings: zero_stage 0 or 1; with compression, zero_stage 0, no wire_dtype, topk_ratio
/// in (0, 1], powersgd_rank >= 1 and powersgd_warmup_steps >= 0.
void validate(const Options& options);

class Reducer;

/// Ranks holding different numbers of samples (data.rank_weights): the factor by which a rank
/// with `local` of the `global` samples of a micro-step, over `world` ranks, multiplies its
/// mean loss, so that the average finish_backward() computes is the mean over all `global`
/// samples (the sum of the per-rank sums divided by `global` once), as one process with the
/// whole batch would compute it: local x world / global, exactly 1 when the shares are equal.
double sample_weight(std::int64_t local, std::int64_t global, int world);

class DistributedDataParallel {
 public:
  DistributedDataParallel(std::shared_ptr<torch::nn::Module> module, comm::Communicator& comm,
                          Options options = {});
  ~DistributedDataParallel();
  DistributedDataParallel(const DistributedDataParallel&) = delete;
  DistributedDataParallel& operator=(const DistributedDataParallel&) = delete;

  torch::nn::Module& module() const { return *module_; }

  /// Call before each forward that precedes a synchronised backward: broadcasts buffers from
  /// rank 0 when Options::broadcast_buffers (does nothing inside no_sync()).
  void before_forward();

  /// Call after each synchronised backward: starts what has not started (unused parameters),
  /// waits for every bucket and divides by the world size. Inside no_sync() it does nothing.
  void finish_backward();

  /// The averaged gradients after finish_backward(), as the optimizer sees them: every
  /// parameter's `.grad` at stage 0, the shard slices' grads at stage 1.
  std::vector<at::Tensor> gradients() const;

  /// Scales gradients() so that the global norm over every rank's gradients (the norm of the
  /// whole averaged gradient, at every stage) is at most max_norm; returns that norm before
  /// clipping, a float64 one-element tensor left on the device (nothing waits for it).
  /// Collective at stage 1 (one all-reduce of a scalar).
  /// A module that is one part of a larger model (a pipeline stage) clips by the whole model's
  /// norm: `across` sums the squares over the other parts' ranks as well (collective on it), and
  /// `left_out` names parameters whose gradients another part counts (tied copies), which are
  /// scaled but not counted here (stage 0 only).
  at::Tensor clip_grad_norm(double max_norm, comm::Communicator* across = nullptr,
                            const std::vector<at::Tensor>& left_out = {});

  /// Call after optimizer.step(), collective at stage 1: all-gathers the updated shards into
  /// every replica's parameters. Does nothing at stage 0.
  void finish_step();

  /// Stage 1: this rank's slices, in parameter registration order. Empty at stage 0.
  const std::vector<ShardSlice>& shard() const;

  /// What must survive a checkpoint for an exact resume on the same world size (the
  /// compressor's state: top-k's or PowerSGD's residuals, PowerSGD's Q and step count), by
  /// name; empty without compression. load_state() takes what
  /// state() returned and refuses (runtime::Error, bad_input) names or shapes it does not know.
  std::map<std::string, at::Tensor> state() const;
  void load_state(const std::map<std::string, at::Tensor>& state);

  /// RAII scope of a micro-step whose gradients are only accumulated locally.
  class NoSync {
   public:
    ~NoSync();
    NoSync(NoSync&& other) noexcept;
    NoSync(const NoSync&) = delete;
    NoSync& operator=(const NoSync&) = delete;
    NoSync& operator=(NoSync&&) = delete;

   private:
    friend class DistributedDataParallel;
    explicit NoSync(DistributedDataParallel& owner);
    DistributedDataParallel* owner_;
    bool previous_;
  };
  [[nodiscard]] NoSync no_sync();

  const Stats& stats() const;
  /// Parameter names per bucket, in launch order (for tests and diagnostics).
  std::vector<std::vector<std::string>> bucket_layout() const;
  /// Per bucket, in launch order, when the last synchronised backward's all-reduce ran
  /// (comm::Work::timing(), for the trainer's step timeline). An entry is unset when the
  /// communicator's timing was off at the launch or the reduction has not completed yet: on
  /// CUDA finish_backward() does not wait on the host, so synchronise the device first. Empty
  /// before the first finish_backward().
  std::vector<std::optional<comm::WorkTiming>> last_bucket_timings() const;
  /// The communicator the gradients are reduced on (a pipeline stage's replicas, or the world).
  comm::Communicator& communicator() const { return comm_; }

 private:
  std::shared_ptr<torch::nn::Module> module_;
  comm::Communicator& comm_;
  Options options_;
  std::vector<at::Tensor> buffers_;
  std::unique_ptr<Reducer> reducer_;
};

}  // namespace mpitrain::ddp

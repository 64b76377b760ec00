#include "reducer.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <c10/util/strides.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <stdexcept>
#include <tuple>

#include "combiners.h"
#include "grad_hooks.h"
#include "mpitrain/runtime/error.h"

namespace mpitrain::ddp {
namespace {

// elements [offset, offset + numel(sizes)) of base's storage, contiguous, shaped `sizes`. Shares
// the storage without being an autograd view: optimizers call detach_() on gradients in
// zero_grad(), which autograd refuses on views.
at::Tensor storage_alias(const at::Tensor& base, std::int64_t offset, at::IntArrayRef sizes) {
  at::Tensor alias = at::empty({0}, base.options().requires_grad(false));
  alias.set_(base.storage(), base.storage_offset() + offset, sizes, c10::contiguous_strides(sizes));
  return alias;
}

}  // namespace

Reducer::Reducer(std::vector<std::pair<std::string, at::Tensor>> parameters, comm::Communicator& comm,
                 const Options& options)
    : comm_(comm), find_unused_(options.find_unused_parameters), zero_stage_(options.zero_stage) {
  for (auto& [name, tensor] : parameters) {
    params_.emplace_back();
    params_.back().name = name;
    params_.back().tensor = tensor;
  }
  build_buckets(options);
  std::vector<at::Tensor> buffers;
  for (const Bucket& bucket : buckets_) buffers.push_back(bucket.buffer);
  if (zero_stage_ == 1) {
    build_shard();
    combiner_ = detail::make_shard(comm_, buffers, shard_grads_, options.wire_dtype);
  } else if (options.compression == Options::Compression::topk) {
    combiner_ = detail::make_topk(comm_, buffers, options.topk_ratio);
  } else if (options.compression == Options::Compression::powersgd) {
    std::vector<std::vector<detail::Slot>> layout(buckets_.size());
    for (std::size_t b = 0; b < buckets_.size(); ++b)
      for (std::size_t k : buckets_[b].params)
        layout[b].push_back({params_[k].offset, params_[k].tensor.sizes().vec()});
    combiner_ = detail::make_powersgd(comm_, buffers, layout, static_cast<int>(options.powersgd_rank),
                                      options.powersgd_warmup_steps);
  } else {
    combiner_ = detail::make_all_reduce(comm_, buffers, options.wire_dtype);
  }
  for (std::size_t i = 0; i < params_.size(); ++i)
    detail::set_grad_ready_hook(params_[i].tensor, [this, i] { mark_ready(i); });
}

Reducer::~Reducer() {
  for (const Param& param : params_) detail::clear_grad_ready_hook(param.tensor);
}

void Reducer::build_buckets(const Options& options) {
  // One open bucket per (dtype, device); see the protocol in reducer.h.
  std::map<std::tuple<c10::ScalarType, c10::DeviceType, c10::DeviceIndex>, std::size_t> open;
  std::vector<std::int64_t> bytes;  // per bucket
  std::vector<std::int64_t> numel;
  for (std::size_t k = params_.size(); k-- > 0;) {
    Param& param = params_[k];
    const at::Tensor& t = param.tensor;
    const auto key = std::make_tuple(t.scalar_type(), t.device().type(), t.device().index());
    const std::int64_t size = t.numel() * static_cast<std::int64_t>(t.element_size());
    auto it = open.find(key);
    if (it != open.end()) {
      const std::size_t b = it->second;
      const std::int64_t cap = b == 0 ? options.first_bucket_bytes : options.bucket_bytes;
      if (bytes[b] + size > cap) open.erase(it), it = open.end();
    }
    if (it == open.end()) {
      buckets_.emplace_back();
      bytes.push_back(0);
      numel.push_back(0);
      it = open.emplace(key, buckets_.size() - 1).first;
    }
    const std::size_t b = it->second;
    param.bucket = b;
    param.offset = numel[b];
    numel[b] += t.numel();
    bytes[b] += size;
    buckets_[b].params.push_back(k);
  }

  at::NoGradGuard no_grad;
  for (std::size_t b = 0; b < buckets_.size(); ++b) {
    Bucket& bucket = buckets_[b];
    const at::Tensor& first = params_[bucket.params.front()].tensor;
    // ZeRO: padded so that it splits into world-size equal shards; the padding stays zero.
    const std::int64_t n = comm_.size();
    const std::int64_t size = zero_stage_ == 1 ? (numel[b] + n - 1) / n * n : numel[b];
    bucket.buffer = at::zeros({size}, first.options().requires_grad(false));
    bucket.pending = bucket.params.size();
  }
  // Gradients become views into the buckets; an existing gradient is kept (copied in).
  for (Param& param : params_) {
    param.alias = storage_alias(buckets_[param.bucket].buffer, param.offset, param.tensor.sizes());
    rebind_grad(param, /*zero_if_missing=*/true);
  }
}

void Reducer::build_shard() {
  const std::int64_t n = comm_.size(), r = comm_.rank();
  struct Found {
    std::size_t param;
    std::int64_t begin, numel;
    std::size_t bucket;
    std::int64_t place;
  };
  std::vector<Found> found;
  for (std::size_t b = 0; b < buckets_.size(); ++b) {
    const at::Tensor& buffer = buckets_[b].buffer;
    const std::int64_t size = buffer.numel() / n, first = r * size, end = first + size;
    shard_grads_.push_back(at::zeros({size}, buffer.options()));
    flat_params_.push_back(at::zeros_like(buffer));
    for (std::size_t k : buckets_[b].params) {
      Param& param = params_[k];
      // The parameter's data becomes its place in the flat buffer (what `p.data = ...` does).
      at::Tensor place = storage_alias(flat_params_[b], param.offset, param.tensor.sizes());
      place.copy_(param.tensor.detach());
      param.tensor.set_data(place);
      const std::int64_t lo = std::max(param.offset, first), hi = std::min(param.offset + param.tensor.numel(), end);
      if (lo < hi) found.push_back({k, lo - param.offset, hi - lo, b, lo - first});
    }
  }
  // Registration order, so that an optimizer over the slices is laid out like one over the model.
  std::sort(found.begin(), found.end(),
            [](const Found& a, const Found& b) { return std::tie(a.param, a.begin) < std::tie(b.param, b.begin); });
  for (const Found& f : found) {
    const Param& param = params_[f.param];
    ShardSlice slice;
    slice.name = param.name;
    slice.parameter = param.tensor;
    slice.begin = f.begin;
    slice.value = storage_alias(param.tensor, f.begin, {f.numel});
    slice.grad = storage_alias(shard_grads_[f.bucket], f.place, {f.numel});
    slice.value.mutable_grad() = slice.grad;
    shard_.push_back(std::move(slice));
    slice_places_.emplace_back(f.bucket, f.place);
  }
}

void Reducer::rebind_grad(Param& param, bool zero_if_missing) {
  at::Tensor& grad = param.tensor.mutable_grad();
  if (grad.defined() && grad.is_same(param.alias)) return;
  if (grad.defined()) {
    param.alias.copy_(grad);
  } else if (zero_if_missing) {
    param.alias.zero_();
  } else {
    return;  // nothing accumulated and nothing asked: leave .grad undefined
  }
  grad = param.alias;
}

bool Reducer::no_sync() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return no_sync_;
}

bool Reducer::set_no_sync(bool value) {
  std::lock_guard<std::mutex> lock(mutex_);
  const bool previous = no_sync_;
  no_sync_ = value;
  return previous;
}

void Reducer::mark_ready(std::size_t index) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (no_sync_) return;
  mark_ready_locked(index, /*during_backward=*/true);
}

void Reducer::mark_ready_locked(std::size_t index, bool during_backward) {
  Param& param = params_[index];
  if (param.ready)
    throw runtime::Error("DDP: parameter '" + param.name +
                         "' received a gradient twice before finish_backward(); call finish_backward() "
                         "after every synchronised backward, or run extra backwards inside no_sync()");
  rebind_grad(param, /*zero_if_missing=*/true);
  param.ready = true;
  if (--buckets_[param.bucket].pending == 0) launch_ready_buckets(during_backward);
}

void Reducer::launch_ready_buckets(bool during_backward) {
  while (next_launch_ < buckets_.size() && buckets_[next_launch_].pending == 0) {
    Bucket& bucket = buckets_[next_launch_];
    const detail::Launch launch = combiner_->start(next_launch_, bucket.buffer);
    bucket.work = launch.work;
    launch_order_.push_back(next_launch_);
    ++stats_.buckets_launched;
    if (during_backward) ++stats_.buckets_launched_during_backward;
    stats_.bytes_reduced += launch.bytes.payload;
    stats_.bytes_sent += launch.bytes.sent;
    ++next_launch_;
  }
}

void Reducer::finish() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (no_sync_) return;
  at::NoGradGuard no_grad;

  std::vector<std::size_t> unready;
  for (std::size_t i = 0; i < params_.size(); ++i)
    if (!params_[i].ready) unready.push_back(i);
  if (!unready.empty()) {
    if (!find_unused_) {
      std::string names;
      for (std::size_t k = 0; k < unready.size() && k < 5; ++k) names += (k ? ", '" : "'") + params_[unready[k]].name + "'";
      if (unready.size() > 5) names += " and " + std::to_string(unready.size() - 5) + " more";
      throw runtime::Error("DDP on rank " + std::to_string(comm_.rank()) + ": " + std::to_string(unready.size()) +
                               " parameter(s) got no gradient in this backward: " + names +
                               ". If the model leaves parameters unused on purpose, set "
                               "ddp.find_unused_parameters = true; otherwise make the loss depend on them",
                           runtime::ExitCode::bad_input);
    }
    // Unused here: the local gradient counts as zero (or what earlier no_sync steps accumulated).
    for (std::size_t i : unready) mark_ready_locked(i, /*during_backward=*/false);
  }

  // The invariant of reducer.h: every bucket launched once, in index order.
  bool in_order = launch_order_.size() == buckets_.size() && next_launch_ == buckets_.size();
  for (std::size_t b = 0; in_order && b < launch_order_.size(); ++b) in_order = launch_order_[b] == b;
  if (!in_order) throw std::logic_error("DDP reducer: buckets were not launched exactly once in index order");

  const auto start = std::chrono::steady_clock::now();
  for (Bucket& bucket : buckets_) bucket.work->wait();
  stats_.comm_wait_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  last_works_.clear();
  for (std::size_t b = 0; b < buckets_.size(); ++b) {
    Bucket& bucket = buckets_[b];
    const detail::Bytes more = combiner_->finish(b, bucket.buffer);
    stats_.bytes_reduced += more.payload;
    stats_.bytes_sent += more.sent;
    last_works_.push_back(std::move(bucket.work));
    bucket.pending = bucket.params.size();
  }
  for (Param& param : params_) param.ready = false;
  next_launch_ = 0;
  launch_order_.clear();
  ++stats_.synchronised_backwards;
}

void Reducer::gather_parameters() {
  if (zero_stage_ != 1) return;
  at::NoGradGuard no_grad;
  for (std::size_t i = 0; i < shard_.size(); ++i) {
    const auto [b, place] = slice_places_[i];
    shard_grads_[b].narrow(0, place, shard_[i].value.numel()).copy_(shard_[i].value);
  }
  std::vector<comm::WorkPtr> works;
  for (std::size_t b = 0; b < buckets_.size(); ++b) {
    works.push_back(comm_.all_gather_async(flat_params_[b], shard_grads_[b]));
    const std::int64_t bytes = flat_params_[b].numel() * static_cast<std::int64_t>(flat_params_[b].element_size());
    stats_.bytes_sent += detail::ring_bytes(bytes, comm_.size(), /*all_reduce=*/false);
  }
  for (comm::WorkPtr& work : works) work->wait();
}

std::vector<std::optional<comm::WorkTiming>> Reducer::last_timings() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<std::optional<comm::WorkTiming>> timings;
  for (const comm::WorkPtr& work : last_works_) timings.push_back(work->timing());
  return timings;
}

std::vector<std::vector<std::string>> Reducer::layout() const {
  std::vector<std::vector<std::string>> names;
  for (const Bucket& bucket : buckets_) {
    names.emplace_back();
    for (std::size_t p : bucket.params) names.back().push_back(params_[p].name);
  }
  return names;
}

}  // namespace mpitrain::ddp

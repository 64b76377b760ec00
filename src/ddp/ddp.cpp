#include "mpitrain/ddp/ddp.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <map>
#include <sstream>
#include <stdexcept>
#include <utility>

#include "combiners.h"
#include "fingerprint.h"
#include "mpitrain/config/config.h"
#include "mpitrain/runtime/error.h"
#include "reducer.h"

namespace mpitrain::ddp {
namespace {

std::string describe_entry(const std::string& kind, const std::string& name, const at::Tensor& t) {
  std::ostringstream out;
  out << kind << ' ' << name << ' ' << t.sizes() << ' ' << c10::toString(t.scalar_type())
      << (t.requires_grad() ? " requires_grad" : "");
  return out.str();
}

// Broadcasts every tensor from rank 0, all in flight at once.
void broadcast_from_root(comm::Communicator& comm, std::vector<at::Tensor>& tensors) {
  at::NoGradGuard no_grad;
  std::vector<comm::WorkPtr> works;
  for (at::Tensor& tensor : tensors) works.push_back(comm.broadcast_async(tensor, 0));
  for (auto& work : works) work->wait();
}

// The same from rank 0, coalesced: one flat tensor per dtype, so a step broadcasts once per
// dtype instead of once per buffer (a batch-norm network has three buffers per layer).
void broadcast_coalesced(comm::Communicator& comm, const std::vector<at::Tensor>& tensors) {
  at::NoGradGuard no_grad;
  std::map<c10::ScalarType, std::vector<at::Tensor>> groups;  // ordered: every rank launches alike
  for (const at::Tensor& tensor : tensors) groups[tensor.scalar_type()].push_back(tensor);
  std::vector<at::Tensor> flats;
  std::vector<comm::WorkPtr> works;
  for (auto& [dtype, group] : groups) {
    std::vector<at::Tensor> pieces;
    for (const at::Tensor& tensor : group) pieces.push_back(tensor.reshape({-1}));
    flats.push_back(at::cat(pieces));
    works.push_back(comm.broadcast_async(flats.back(), 0));
  }
  std::size_t g = 0;
  for (auto& [dtype, group] : groups) {
    works[g]->wait();
    std::int64_t offset = 0;
    for (at::Tensor& tensor : group) {
      tensor.copy_(flats[g].narrow(0, offset, tensor.numel()).view_as(tensor));
      offset += tensor.numel();
    }
    ++g;
  }
}

}  // namespace

// The rules are the config's (see the contract): each option is checked against the row of the
// ddp.* setting of its name, and the combinations by the config's own cross-setting rule.
void validate(const Options& options) {
  const std::string source = "DDP options";
  const auto check = [&](const std::string& key, const nlohmann::json& value) {
    const config::Setting* setting = config::settings().find(key);
    if (setting == nullptr) throw std::logic_error("ddp::validate(): no setting " + key);
    config::normalize(*setting, value, source, key);
  };
  check("ddp.zero_stage", options.zero_stage);
  if (options.compression != Options::Compression::none) {
    check("ddp.topk_ratio", options.topk_ratio);
    check("ddp.powersgd_rank", options.powersgd_rank);
    check("ddp.powersgd_warmup_steps", options.powersgd_warmup_steps);
  }
  if (const std::string problem =
          config::ddp_settings_problem(options.compression, options.zero_stage, options.wire_dtype.has_value());
      !problem.empty())
    throw runtime::Error(source + ": " + problem, runtime::ExitCode::bad_input);
}

DistributedDataParallel::DistributedDataParallel(std::shared_ptr<torch::nn::Module> module,
                                                 comm::Communicator& comm, Options options)
    : module_(std::move(module)), comm_(comm), options_(options) {
  validate(options_);
  std::vector<std::string> entries;
  std::vector<std::pair<std::string, at::Tensor>> trainable;
  std::vector<at::Tensor> state;  // everything rank 0 broadcasts
  for (const auto& item : module_->named_parameters(/*recurse=*/true)) {
    entries.push_back(describe_entry("parameter", item.key(), item.value()));
    state.push_back(item.value());
    if (item.value().requires_grad()) trainable.emplace_back(item.key(), item.value());
  }
  for (const auto& item : module_->named_buffers(/*recurse=*/true)) {
    entries.push_back(describe_entry("buffer", item.key(), item.value()));
    state.push_back(item.value());
    buffers_.push_back(item.value());
  }
  // The check comes first: broadcasting into tensors of different sizes would not be an
  // error MPI or NCCL can report, only a hang or garbage.
  detail::verify_same_model(entries, comm_);
  broadcast_from_root(comm_, state);
  reducer_ = std::make_unique<Reducer>(std::move(trainable), comm_, options_);
}

DistributedDataParallel::~DistributedDataParallel() = default;

void DistributedDataParallel::before_forward() {
  if (!options_.broadcast_buffers || buffers_.empty() || reducer_->no_sync()) return;
  broadcast_coalesced(comm_, buffers_);
}

void DistributedDataParallel::finish_backward() { reducer_->finish(); }

std::vector<at::Tensor> DistributedDataParallel::gradients() const {
  std::vector<at::Tensor> grads;
  if (reducer_->zero_stage() == 1) {
    for (const ShardSlice& slice : reducer_->shard()) grads.push_back(slice.grad);
  } else {
    for (const auto& parameter : module_->parameters(/*recurse=*/true))
      if (parameter.requires_grad() && parameter.grad().defined()) grads.push_back(parameter.grad());
  }
  return grads;
}

at::Tensor DistributedDataParallel::clip_grad_norm(double max_norm, comm::Communicator* across,
                                                  const std::vector<at::Tensor>& left_out) {
  at::NoGradGuard no_grad;
  const std::vector<at::Tensor> grads = gradients();
  if (!left_out.empty() && reducer_->zero_stage() == 1)
    throw std::logic_error("clip_grad_norm: left_out needs ddp.zero_stage 0");
  const auto counted = [&](const at::Tensor& grad) {
    for (const at::Tensor& parameter : left_out)
      if (parameter.grad().defined() && parameter.grad().is_same(grad)) return false;
    return true;
  };
  // Per-tensor norms in float64, squared and summed (across ranks at stage 1, where each holds
  // a shard): the norm then does not depend on how the gradient is cut, so both stages clip
  // by the same factor, as torch::nn::utils::clip_grad_norm_ would up to its float32 rounding.
  at::Tensor squares = at::zeros({1}, at::TensorOptions().device(comm_.device()).dtype(at::kDouble));
  for (const at::Tensor& grad : grads)
    if (counted(grad)) squares += at::linalg_vector_norm(grad, 2, {}, false, at::kDouble).square();
  if (reducer_->zero_stage() == 1) comm_.all_reduce(squares, comm::ReduceOp::sum);
  if (across != nullptr) across->all_reduce(squares, comm::ReduceOp::sum);
  const at::Tensor norm = squares.sqrt();
  const at::Tensor factor = (max_norm / (norm + 1e-6)).clamp_max(1.0);
  for (const at::Tensor& grad : grads) grad.mul_(factor.to(grad.scalar_type()));
  return norm;
}

void DistributedDataParallel::finish_step() { reducer_->gather_parameters(); }

const std::vector<ShardSlice>& DistributedDataParallel::shard() const { return reducer_->shard(); }

std::map<std::string, at::Tensor> DistributedDataParallel::state() const { return reducer_->combiner().state(); }

void DistributedDataParallel::load_state(const std::map<std::string, at::Tensor>& state) {
  at::NoGradGuard no_grad;
  reducer_->combiner().load_state(state);
}

DistributedDataParallel::NoSync::NoSync(DistributedDataParallel& owner)
    : owner_(&owner), previous_(owner.reducer_->set_no_sync(true)) {}

DistributedDataParallel::NoSync::~NoSync() {
  if (owner_ != nullptr) owner_->reducer_->set_no_sync(previous_);
}

DistributedDataParallel::NoSync::NoSync(NoSync&& other) noexcept
    : owner_(std::exchange(other.owner_, nullptr)), previous_(other.previous_) {}

DistributedDataParallel::NoSync DistributedDataParallel::no_sync() { return NoSync(*this); }

const Stats& DistributedDataParallel::stats() const { return reducer_->stats(); }

std::vector<std::vector<std::string>> DistributedDataParallel::bucket_layout() const { return reducer_->layout(); }

std::vector<std::optional<comm::WorkTiming>> DistributedDataParallel::last_bucket_timings() const {
  return reducer_->last_timings();
}

double sample_weight(std::int64_t local, std::int64_t global, int world) {
  if (local < 1 || global < 1 || world < 1) throw std::invalid_argument("sample_weight(): counts must be >= 1");
  return local * world == global ? 1.0 : static_cast<double>(local * world) / static_cast<double>(global);
}

}  // namespace mpitrain::ddp

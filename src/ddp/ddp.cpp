#include "mpitrain/ddp/ddp.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <sstream>
#include <stdexcept>
#include <utility>

#include "fingerprint.h"
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

}  // namespace

DistributedDataParallel::DistributedDataParallel(std::shared_ptr<torch::nn::Module> module,
                                                 comm::Communicator& comm, Options options)
    : module_(std::move(module)), comm_(comm), options_(options) {
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
  broadcast_from_root(comm_, buffers_);
}

void DistributedDataParallel::finish_backward() { reducer_->finish(); }

DistributedDataParallel::NoSync::NoSync(Reducer& reducer) : reducer_(&reducer), previous_(reducer.set_no_sync(true)) {}

DistributedDataParallel::NoSync::~NoSync() {
  if (reducer_ != nullptr) reducer_->set_no_sync(previous_);
}

DistributedDataParallel::NoSync::NoSync(NoSync&& other) noexcept
    : reducer_(std::exchange(other.reducer_, nullptr)), previous_(other.previous_) {}

DistributedDataParallel::NoSync DistributedDataParallel::no_sync() { return NoSync(*reducer_); }

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

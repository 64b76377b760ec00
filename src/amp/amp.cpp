#include "mpitrain/amp/amp.h"

#include <cmath>
#include <stdexcept>

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>

#ifdef MPITRAIN_HAVE_NCCL
#include <ATen/cuda/CUDAContext.h>
#endif

#include <map>

#include "mpitrain/runtime/error.h"
#include "mpitrain/runtime/host_read.h"

namespace mpitrain::amp {

Precision resolve_precision(const std::string& mode, c10::Device device) {
  if (mode == "fp32") return Precision::fp32;
  if (mode == "bf16") return Precision::bf16;
  if (mode == "fp16") return Precision::fp16;
  if (mode != "auto")
    throw runtime::Error("precision '" + mode + "': expected auto, fp32, bf16 or fp16", runtime::ExitCode::bad_input);
  return auto_precision(device);
}

Precision auto_precision(c10::Device device) {
  if (!device.is_cuda()) return Precision::fp32;
#ifdef MPITRAIN_HAVE_NCCL
  // bf16 tensor-core math needs compute capability 8.0 (Ampere) or later.
  return at::cuda::getDeviceProperties(device.index())->major >= 8 ? Precision::bf16 : Precision::fp16;
#else
  return Precision::fp32;
#endif
}

Precision agree_precision(const std::vector<Precision>& per_rank) {
  bool fp32 = false, bf16 = false, fp16 = false;
  for (const Precision p : per_rank) (p == Precision::fp32 ? fp32 : p == Precision::bf16 ? bf16 : fp16) = true;
  if (fp32 && (bf16 || fp16))
    throw runtime::Error("precision auto: some ranks chose fp32 (no GPU) and others a half precision: run every rank on "
                             "the same kind of device, or set precision.mode",
                         runtime::ExitCode::bad_input);
  // Mixed generations: fp16 runs on every GPU, bf16 needs compute capability 8.0.
  return fp16 ? Precision::fp16 : bf16 ? Precision::bf16 : Precision::fp32;
}

const char* to_string(Precision precision) {
  switch (precision) {
    case Precision::fp32: return "fp32";
    case Precision::bf16: return "bf16";
    case Precision::fp16: return "fp16";
  }
  return "?";
}

c10::ScalarType compute_dtype(Precision precision) {
  return precision == Precision::bf16 ? c10::kBFloat16 : precision == Precision::fp16 ? c10::kHalf : c10::kFloat;
}

AutocastScope::AutocastScope(c10::Device device, Precision precision)
    : active_(precision != Precision::fp32), device_type_(device.type()) {
  if (!active_) return;
  previous_enabled_ = at::autocast::is_autocast_enabled(device_type_);
  previous_dtype_ = at::autocast::get_autocast_dtype(device_type_);
  at::autocast::set_autocast_enabled(device_type_, true);
  at::autocast::set_autocast_dtype(device_type_, compute_dtype(precision));
  at::autocast::increment_nesting();
}

AutocastScope::~AutocastScope() {
  if (!active_) return;
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  at::autocast::set_autocast_enabled(device_type_, previous_enabled_);
  at::autocast::set_autocast_dtype(device_type_, previous_dtype_);
}

LossScaler::LossScaler(bool enabled, c10::Device device, ScalerOptions options)
    : enabled_(enabled), options_(options) {
  const auto on_device = at::TensorOptions().device(device);
  scale_ = at::full({1}, enabled ? options.init_scale : 1.0, on_device.dtype(at::kFloat));
  growth_tracker_ = at::zeros({1}, on_device.dtype(at::kInt));
}

at::Tensor LossScaler::scale(const at::Tensor& loss) const {
  return enabled_ ? loss * scale_.to(loss.scalar_type()) : loss;
}

at::Tensor LossScaler::unscale_and_check(const std::vector<at::Tensor>& grads, comm::Communicator& comm) {
  // Disabled, the scale is 1: the same kernel only checks, so bf16 and fp32 runs find
  // non-finite gradients the same way.
  at::Tensor found_inf = at::zeros({1}, scale_.options());
  const at::Tensor inv_scale = scale_.reciprocal();
  // The fused kernel takes gradients of one dtype per call.
  std::map<c10::ScalarType, std::vector<at::Tensor>> groups;
  for (const at::Tensor& grad : grads)
    if (grad.defined()) groups[grad.scalar_type()].push_back(grad);
  for (auto& [dtype, group] : groups) at::_amp_foreach_non_finite_check_and_unscale_(group, found_inf, inv_scale);
  comm.all_reduce(found_inf, comm::ReduceOp::max);
  return found_inf;
}

void LossScaler::update(const at::Tensor& found_inf) {
  if (!enabled_) return;
  at::_amp_update_scale_(scale_, growth_tracker_, found_inf, options_.growth_factor, options_.backoff_factor,
                         options_.growth_interval);
}

double LossScaler::current_scale() const { return runtime::read_scalar<double>(scale_); }

nlohmann::json LossScaler::state() const {
  return {{"enabled", enabled_},
          {"scale", current_scale()},
          {"growth_tracker", runtime::read_scalar<std::int64_t>(growth_tracker_)}};
}

bool LossScaler::load_state(const nlohmann::json& state) {
  if (state.value("enabled", enabled_) != enabled_) return false;
  const auto scale = state.at("scale").get<double>();
  const auto tracker = state.at("growth_tracker").get<std::int64_t>();
  if (!(std::isfinite(scale) && scale > 0) || tracker < 0)
    throw std::invalid_argument("loss scaler state has scale " + std::to_string(scale) + " and growth_tracker " +
                                std::to_string(tracker) + "; a scale must be finite and > 0, a tracker >= 0");
  scale_.fill_(scale);
  growth_tracker_.fill_(tracker);
  return true;
}

}  // namespace mpitrain::amp

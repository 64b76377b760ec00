#pragma once
// Mixed precision: which dtype, an autocast scope, and the fp16 loss scaler.
//
// Contract:
// - auto_precision(): bf16 on GPUs of compute capability >= 8.0, fp16 (with loss scaling)
//   below that, fp32 on CPU. resolve_precision(): "auto" is auto_precision(); "fp32" | "bf16" |
//   "fp16" are taken as given. agree_precision() is the one precision for ranks whose own
//   auto choices differ (GPUs of different generations): fp16 where some have bf16 and some
//   not, since every GPU runs fp16; an error for fp32 next to a half precision.
// - AutocastScope enables autocast for the device type with the precision's dtype on this thread
//   and restores the previous state when it ends; when the outermost scope ends it clears the
//   autocast cache, so a forward after optimizer.step() never reuses stale low-precision weight
//   copies. fp32: the scope does nothing.
// - LossScaler (dynamic for fp16; disabled otherwise, keeping scale 1): scale(loss) multiplies
//   by the current scale; unscale_and_check(grads) divides the gradients by it in place (by 1,
//   i.e. unchanged, when disabled) and returns the found-inf flag: a float32 one-element tensor
//   on the device, 1 when any rank's gradients were not finite, else 0. It is all-reduced (MAX)
//   so every rank skips the same steps, in every precision, and it stays on the device: the
//   optimizer skips on it there (train/optim.h) and nothing waits for the device.
//   update(found_inf) halves the scale (backoff) after an overflow and doubles it (growth) after
//   growth_interval clean steps in a row, on the device; it does nothing when disabled.
//   current_scale() and state() read the device (runtime/host_read.h): log and checkpoint time.
//   load_state() restores a state saved by a scaler of the same kind (both enabled or both
//   disabled) and returns true; a state of the other kind (a run resumed in another precision)
//   leaves this scaler as constructed and returns false, so a bf16 run never divides its
//   gradients by an fp16 run's scale, nor an fp16 run starts from a bf16 run's scale of 1.

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "mpitrain/comm/communicator.h"

namespace mpitrain::amp {

enum class Precision { fp32, bf16, fp16 };

Precision auto_precision(c10::Device device);
Precision resolve_precision(const std::string& mode, c10::Device device);
/// The precision every rank uses when each chose `per_rank` (one entry per rank) by itself.
Precision agree_precision(const std::vector<Precision>& per_rank);
const char* to_string(Precision precision);
c10::ScalarType compute_dtype(Precision precision);

class AutocastScope {
 public:
  AutocastScope(c10::Device device, Precision precision);
  ~AutocastScope();
  AutocastScope(const AutocastScope&) = delete;
  AutocastScope& operator=(const AutocastScope&) = delete;

 private:
  bool active_;
  c10::DeviceType device_type_;
  bool previous_enabled_ = false;
  c10::ScalarType previous_dtype_ = c10::kFloat;
};

struct ScalerOptions {
  double init_scale = 65536.0;
  double growth_factor = 2.0;
  double backoff_factor = 0.5;
  std::int64_t growth_interval = 2000;
};

class LossScaler {
 public:
  LossScaler(bool enabled, c10::Device device, ScalerOptions options = {});

  bool enabled() const { return enabled_; }
  at::Tensor scale(const at::Tensor& loss) const;
  /// Unscales in place; returns the agreed found-inf flag (device, float32, 1 element).
  at::Tensor unscale_and_check(const std::vector<at::Tensor>& grads, comm::Communicator& comm);
  void update(const at::Tensor& found_inf);
  double current_scale() const;

  /// For checkpoints: {"enabled": ..., "scale": ..., "growth_tracker": ...}. load_state()
  /// throws std::invalid_argument for a scale that is not finite and > 0 or a negative tracker;
  /// it returns false, changing nothing, for the state of a scaler of the other kind.
  nlohmann::json state() const;
  bool load_state(const nlohmann::json& state);

 private:
  bool enabled_;
  ScalerOptions options_;
  at::Tensor scale_;           // float32, 1 element, on the device
  at::Tensor growth_tracker_;  // int32, 1 element, on the device
};

}  // namespace mpitrain::amp

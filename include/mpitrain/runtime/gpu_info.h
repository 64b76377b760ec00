#pragma once
// What the metrics say about a rank's GPU: its name, the datasheet peak that model FLOPs
// utilisation divides by, and NVML's utilisation and temperature.
//
// Contract:
// - GpuInfo(device) for a CUDA device reads its name; for the CPU, name() is "cpu" and the
//   rest is empty. Nothing here ever fails a run: what cannot be known is absent.
// - peak_tflops_16bit() is the dense bf16/fp16 tensor-core datasheet peak of known data-centre
//   GPUs (H100 SXM/NVL/PCIe, H200 SXM/NVL, GH200, B200, A100, L40S, L40, L4, A10, V100). The
//   device name is reduced to model and form factor ("NVIDIA H100 80GB HBM3" -> H100,
//   "NVIDIA A100-SXM4-80GB" -> A100, "NVIDIA H100 NVL" -> H100 NVL) and matched exactly, so
//   an L40 never takes the L4's figure; 0 when unknown (the config's device.peak_tflops then
//   gives it).
// - read() asks NVML (libnvidia-ml.so.1 from the NVIDIA driver, loaded at run time, so a build
//   and a CPU machine need no driver) for the GPU's utilisation over the driver's last sample
//   period and its temperature; empty on the CPU, or when NVML is missing or answers an error.

#include <c10/core/Device.h>

#include <memory>
#include <optional>
#include <string>

namespace mpitrain::runtime {

struct GpuReading {
  unsigned utilization_percent = 0;
  unsigned temperature_c = 0;
};

class GpuInfo {
 public:
  explicit GpuInfo(c10::Device device);
  ~GpuInfo();
  GpuInfo(const GpuInfo&) = delete;
  GpuInfo& operator=(const GpuInfo&) = delete;

  const std::string& name() const { return name_; }
  double peak_tflops_16bit() const;
  std::optional<GpuReading> read() const;

 private:
  struct Nvml;
  std::string name_;
  std::unique_ptr<Nvml> nvml_;
};

/// The datasheet table behind peak_tflops_16bit(), by device name (exposed for its test).
double datasheet_peak_tflops_16bit(const std::string& device_name);

}  // namespace mpitrain::runtime

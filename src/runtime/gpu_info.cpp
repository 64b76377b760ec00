#include "mpitrain/runtime/gpu_info.h"

#include <dlfcn.h>

#include <utility>
#include <vector>

#ifdef MPITRAIN_HAVE_NCCL
#include <ATen/cuda/CUDAContext.h>
#include <cuda_runtime_api.h>
#endif

namespace mpitrain::runtime {

double datasheet_peak_tflops_16bit(const std::string& device_name) {
  // Dense (no sparsity) bf16/fp16 tensor-core TFLOP/s, SXM parts unless named. More specific
  // names first: "H100 PCIe" before "H100", "A100" before "A10", "L40S" before "L4".
  static const std::vector<std::pair<const char*, double>> table = {
      {"H100 PCIe", 756.0}, {"H100", 989.4}, {"H200", 989.4}, {"B200", 2250.0}, {"A100", 312.0},
      {"L40S", 362.1},      {"L4", 121.0},   {"A10", 125.0},  {"V100", 125.0}};
  for (const auto& [name, tflops] : table)
    if (device_name.find(name) != std::string::npos) return tflops;
  return 0.0;
}

// The five NVML entry points used, declared by their C ABI (nvml.h is not part of the CUDA
// toolkit packages; these signatures have been stable since NVML's v2 functions).
struct GpuInfo::Nvml {
  using Handle = void*;
  struct Utilization {
    unsigned gpu, memory;
  };
  void* library = nullptr;
  int (*shutdown)() = nullptr;
  int (*utilization)(Handle, Utilization*) = nullptr;
  int (*temperature)(Handle, int sensor, unsigned*) = nullptr;
  Handle device = nullptr;

  ~Nvml() {
    if (shutdown != nullptr) shutdown();
    if (library != nullptr) dlclose(library);
  }
};

GpuInfo::GpuInfo(c10::Device device) : name_("cpu") {
#ifdef MPITRAIN_HAVE_NCCL
  if (!device.is_cuda()) return;
  name_ = at::cuda::getDeviceProperties(device.index())->name;
  char bus_id[32] = {};
  if (cudaDeviceGetPCIBusId(bus_id, sizeof bus_id, device.index()) != cudaSuccess) return;
  auto nvml = std::make_unique<Nvml>();
  nvml->library = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
  if (nvml->library == nullptr) return;
  const auto init = reinterpret_cast<int (*)()>(dlsym(nvml->library, "nvmlInit_v2"));
  const auto by_bus_id = reinterpret_cast<int (*)(const char*, Nvml::Handle*)>(
      dlsym(nvml->library, "nvmlDeviceGetHandleByPciBusId_v2"));
  nvml->utilization = reinterpret_cast<int (*)(Nvml::Handle, Nvml::Utilization*)>(
      dlsym(nvml->library, "nvmlDeviceGetUtilizationRates"));
  nvml->temperature = reinterpret_cast<int (*)(Nvml::Handle, int, unsigned*)>(
      dlsym(nvml->library, "nvmlDeviceGetTemperature"));
  const auto shutdown = reinterpret_cast<int (*)()>(dlsym(nvml->library, "nvmlShutdown"));
  if (init == nullptr || by_bus_id == nullptr || nvml->utilization == nullptr || nvml->temperature == nullptr ||
      shutdown == nullptr || init() != 0)
    return;
  nvml->shutdown = shutdown;
  if (by_bus_id(bus_id, &nvml->device) != 0) return;
  nvml_ = std::move(nvml);
#else
  (void)device;
#endif
}

GpuInfo::~GpuInfo() = default;

double GpuInfo::peak_tflops_16bit() const { return datasheet_peak_tflops_16bit(name_); }

std::optional<GpuReading> GpuInfo::read() const {
  if (!nvml_) return std::nullopt;
  Nvml::Utilization utilization{};
  unsigned temperature = 0;
  constexpr int gpu_sensor = 0;  // NVML_TEMPERATURE_GPU
  if (nvml_->utilization(nvml_->device, &utilization) != 0 ||
      nvml_->temperature(nvml_->device, gpu_sensor, &temperature) != 0)
    return std::nullopt;
  return GpuReading{utilization.gpu, temperature};
}

}  // namespace mpitrain::runtime

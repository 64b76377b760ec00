#include "mpitrain/runtime/gpu_info.h"

#include <dlfcn.h>

#include <algorithm>
#include <cctype>
#include <map>
#include <utility>
#include <vector>

#ifdef MPITRAIN_HAVE_NCCL
#include <ATen/cuda/CUDAContext.h>
#include <cuda_runtime_api.h>
#endif

namespace mpitrain::runtime {

namespace {

bool is_memory_size(std::string upper) {  // "80GB", "144G"
  if (!upper.empty() && upper.back() == 'B') upper.pop_back();
  if (upper.size() < 2 || upper.back() != 'G') return false;
  upper.pop_back();
  return std::all_of(upper.begin(), upper.end(), [](unsigned char c) { return std::isdigit(c) != 0; });
}

// "NVIDIA H100 80GB HBM3" -> "H100", "NVIDIA H100 PCIe" -> "H100 PCIe", "NVIDIA A100-SXM4-80GB" ->
// "A100", "Tesla V100-PCIE-32GB" -> "V100 PCIe": the model, then the form factor unless it is
// SXM (the table's default). Memory sizes and types say nothing about the peak and are dropped;
// any other word (MIG, a new variant) is kept, so such a name matches nothing rather than a
// near relative's figure.
std::string normalise_gpu_name(const std::string& device_name) {
  std::vector<std::string> words;
  std::string word;
  for (const char c : device_name + " ") {
    if (c == ' ' || c == '-') {
      if (!word.empty()) words.push_back(word);
      word.clear();
    } else {
      word += c;
    }
  }
  std::string key;
  for (std::size_t i = 0; i < words.size(); ++i) {
    std::string upper = words[i];
    for (char& c : upper) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
    const bool vendor = i == 0 && (upper == "NVIDIA" || upper == "TESLA");
    const bool memory_size = is_memory_size(upper);
    const bool memory_type = upper.rfind("HBM", 0) == 0;
    const bool sxm = upper.rfind("SXM", 0) == 0;
    if (vendor || memory_size || memory_type || sxm) continue;
    key += (key.empty() ? "" : " ") + (upper == "PCIE" ? std::string("PCIe") : words[i]);
  }
  return key;
}

}  // namespace

double datasheet_peak_tflops_16bit(const std::string& device_name) {
  // Dense (no sparsity) bf16 tensor-core TFLOP/s (fp16 for V100, which has no bf16): NVIDIA's
  // datasheets give the figure with sparsity, the dense one is half of it. Sources: H100
  // datasheet (SXM 1,979, NVL 1,671, PCIe 1,513 with sparsity; the H100 whitepaper gives SXM
  // dense as 989.4), H200 datasheet (SXM as H100 SXM, NVL 1,671), GH200 datasheet (as H100
  // SXM), HGX B200 datasheet (4.5 PFLOPS with sparsity), A100 datasheet (312 dense, SXM and
  // PCIe alike), L40S (733 with sparsity: 362.05 dense per its datasheet), L40 (362.1 with
  // sparsity), L4 (242 with sparsity), A10 (250 with sparsity), V100 datasheet (fp16 tensor:
  // SXM2 125, PCIe 112, V100S PCIe 130).
  static const std::map<std::string, double> table = {
      {"H100", 989.4},   {"H100 NVL", 835.5}, {"H100 PCIe", 756.5}, {"H200", 989.4},
      {"H200 NVL", 835.5}, {"GH200", 989.4},  {"B200", 2250.0},     {"A100", 312.0},
      {"A100 PCIe", 312.0}, {"L40S", 362.05}, {"L40", 181.05},      {"L4", 121.0},
      {"A10", 125.0},     {"V100", 125.0},    {"V100 PCIe", 112.0}, {"V100S PCIe", 130.0}};
  const auto it = table.find(normalise_gpu_name(device_name));
  return it == table.end() ? 0.0 : it->second;
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

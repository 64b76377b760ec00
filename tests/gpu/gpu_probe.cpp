// gpu_probe: exit 0 and the device names when a CUDA device is usable, else the reason and exit
// 77 (kSkipped), so that a script test skips on a machine without a GPU.
#include <cstdio>

#include "cuda_probe.h"

int main() {
  const std::string why = mpitrain::testing::cuda_unusable();
  if (!why.empty()) {
    std::printf("SKIPPED: %s\n", why.c_str());
    return mpitrain::testing::kSkipped;
  }
  int count = 0;
  cudaGetDeviceCount(&count);
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp properties{};
    if (cudaGetDeviceProperties(&properties, i) == cudaSuccess)
      std::printf("cuda:%d %s (compute capability %d.%d)\n", i, properties.name, properties.major, properties.minor);
  }
  return 0;
}

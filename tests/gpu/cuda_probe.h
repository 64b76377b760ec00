#pragma once
// Whether this process can use a CUDA device, for tests that need one: empty when it can,
// otherwise why not. A test without a device exits kSkipped, which CTest reports as "Skipped"
// (SKIP_RETURN_CODE in tests/gpu/CMakeLists.txt).

#include <cuda_runtime_api.h>

#include <cstdlib>
#include <string>

namespace mpitrain::testing {

constexpr int kSkipped = 77;

inline std::string cuda_unusable() {
  int count = 0;
  const cudaError_t rc = cudaGetDeviceCount(&count);
  const char* visible = std::getenv("CUDA_VISIBLE_DEVICES");
  const std::string env = visible ? std::string(", CUDA_VISIBLE_DEVICES=\"") + visible + "\"" : "";
  if (rc != cudaSuccess) return std::string("no GPU: no usable CUDA device (") + cudaGetErrorString(rc) + env + ")";
  if (count == 0) return "no GPU: the CUDA runtime sees no device" + env;
  return "";
}

}  // namespace mpitrain::testing

#include "mpitrain/runtime/device.h"

#include <ATen/Context.h>

#include "mpitrain/runtime/error.h"
#include "mpitrain/runtime/world.h"

namespace mpitrain::runtime {

DeviceKind parse_device_kind(const std::string& text) {
  if (text == "auto") return DeviceKind::automatic;
  if (text == "cpu") return DeviceKind::cpu;
  if (text == "cuda") return DeviceKind::cuda;
  throw Error("unknown device '" + text + "': expected auto, cpu or cuda", ExitCode::bad_input);
}

int cuda_device_count() { return at::hasCUDA() ? static_cast<int>(at::getNumGPUs()) : 0; }

c10::Device choose_device(const World& world, const DeviceOptions& options) {
  if (options.kind == DeviceKind::cpu) return c10::Device(c10::kCPU);
  const int gpus = cuda_device_count();
  if (gpus == 0) {
    if (options.kind == DeviceKind::cuda)
      throw Error("device 'cuda' was asked for but no CUDA device is usable on " + world.host() +
                      " (driver missing, CUDA_VISIBLE_DEVICES empty, or a CPU-only build); "
                      "use device 'auto' or 'cpu'",
                  ExitCode::bad_input);
    return c10::Device(c10::kCPU);
  }
  if (world.local_size() > gpus && !options.allow_shared_gpu) {
    throw Error(std::to_string(world.local_size()) + " ranks run on " + world.host() +
                    " but it has " + std::to_string(gpus) +
                    " usable GPU(s): start at most one rank per GPU (mpirun -np / "
                    "--ntasks-per-node), or allow shared GPUs explicitly",
                ExitCode::bad_input);
  }
  return c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(world.local_rank() % gpus));
}

}  // namespace mpitrain::runtime

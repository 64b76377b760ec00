#include "mpitrain/runtime/device.h"

#include <ATen/Context.h>

#include <array>
#include <chrono>
#include <map>

#ifdef MPITRAIN_HAVE_NCCL
#include <cuda_runtime_api.h>
#endif

#include "mpitrain/runtime/check.h"
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

void check_gpu_binding(const std::vector<GpuBinding>& node, bool allow_shared_gpu, const std::string& host) {
  if (allow_shared_gpu) return;
  std::map<std::string, std::vector<int>> ranks_by_gpu;
  for (const GpuBinding& binding : node)
    if (!binding.bus_id.empty()) ranks_by_gpu[binding.bus_id].push_back(binding.rank);
  for (const auto& [bus_id, ranks] : ranks_by_gpu) {
    if (ranks.size() < 2) continue;
    std::string names;
    for (std::size_t i = 0; i < ranks.size(); ++i)
      names += (i == 0 ? "" : i + 1 == ranks.size() ? " and " : ", ") + std::to_string(ranks[i]);
    throw Error("ranks " + names + " on " + host + " would share the GPU at PCI bus id " + bus_id +
                    " (NCCL refuses two ranks of one communicator on one GPU): start at most one rank per GPU "
                    "(mpirun -np / --ntasks-per-node, or Slurm --gpus-per-task=1), give each rank its own "
                    "CUDA_VISIBLE_DEVICES, or set device.allow_shared_gpu with the MPI backend",
                ExitCode::bad_input);
  }
}

namespace {

// The PCI bus id of a CUDA device, "" when it has none to give.
using BusId = std::array<char, 32>;

BusId bus_id_of(int index) {
  BusId id{};
#ifdef MPITRAIN_HAVE_NCCL
  if (index >= 0 && cudaDeviceGetPCIBusId(id.data(), static_cast<int>(id.size()), index) != cudaSuccess) id = {};
#else
  (void)index;
#endif
  id.back() = '\0';
  return id;
}

// Every rank of the node learns which GPU every other would use. Bounded, so a rank that never
// gets here ends the job instead of hanging it.
std::vector<GpuBinding> node_bindings(const World& world, int index) {
  struct Entry {
    int rank;
    BusId bus_id;
  };
  const Entry mine{world.rank(), bus_id_of(index)};
  std::vector<Entry> all(static_cast<std::size_t>(world.local_size()));
  MPI_Request request = MPI_REQUEST_NULL;
  MPITRAIN_CHECK_MPI(MPI_Iallgather(&mine, sizeof mine, MPI_BYTE, all.data(), sizeof mine, MPI_BYTE,
                                    world.node_comm(), &request));
  wait_or_die(&request, std::chrono::minutes(5), "the exchange of GPU bus ids between the ranks of " + world.host());
  std::vector<GpuBinding> bindings;
  for (const Entry& entry : all) bindings.push_back({entry.rank, entry.bus_id.data()});
  return bindings;
}

}  // namespace

c10::Device choose_device(const World& world, const DeviceOptions& options) {
  if (options.kind == DeviceKind::cpu) return c10::Device(c10::kCPU);
  const int gpus = cuda_device_count();
  const int index = gpus == 0 ? -1 : world.local_rank() % gpus;
  // Before any refusal, so that no rank of the node is left waiting in the exchange.
  const std::vector<GpuBinding> node = node_bindings(world, index);
  if (gpus == 0) {
    if (options.kind == DeviceKind::cuda)
      throw Error("device 'cuda' was asked for but no CUDA device is usable on " + world.host() +
                      " (driver missing, CUDA_VISIBLE_DEVICES empty, or a CPU-only build); "
                      "use device 'auto' or 'cpu'",
                  ExitCode::bad_input);
    return c10::Device(c10::kCPU);
  }
  check_gpu_binding(node, options.allow_shared_gpu, world.host());
  return c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(index));
}

}  // namespace mpitrain::runtime

#pragma once
// Device choice: one rank per GPU.
//
// Contract:
// - choose_device() returns CPU when CPU is asked for, or when no GPU is usable and the kind is
//   auto; asking for cuda where no GPU is usable is an error (bad_input).
// - Otherwise it returns cuda:<local_rank mod visible GPUs>: cuda:<local_rank> when the node's
//   ranks share the node's GPUs, cuda:0 when each rank sees its own GPU (Slurm
//   --gpus-per-task, or a CUDA_VISIBLE_DEVICES per rank), so more ranks than visible GPUs is
//   normal. Unless kind is cpu, the call is collective over the node's ranks
//   (World::node_comm()): they exchange the PCI bus id of the GPU each would use, and
//   check_gpu_binding() refuses two ranks on one physical GPU unless allow_shared_gpu.
// - check_gpu_binding() is that decision alone, a pure function of the node's bus ids.

#include <c10/core/Device.h>

#include <string>
#include <vector>

namespace mpitrain::runtime {

class World;

enum class DeviceKind { automatic, cpu, cuda };

struct DeviceOptions {
  DeviceKind kind = DeviceKind::automatic;
  /// Lets several local ranks share a GPU. NCCL refuses two ranks of one communicator on one
  /// GPU, so this is only useful with the MPI backend or for debugging.
  bool allow_shared_gpu = false;
};

DeviceKind parse_device_kind(const std::string& text);  // "auto" | "cpu" | "cuda"

/// Number of usable CUDA devices this process sees (0 on a CPU-only build or machine).
int cuda_device_count();

c10::Device choose_device(const World& world, const DeviceOptions& options);

/// The GPU one rank of a node would use: its world rank and the GPU's PCI bus id
/// ("0000:3B:00.0"; empty when the rank uses no GPU).
struct GpuBinding {
  int rank = 0;
  std::string bus_id;
};

/// Throws Error(bad_input) naming the ranks, the host and the bus id when two bindings of one
/// node have the same non-empty bus id, unless allow_shared_gpu.
void check_gpu_binding(const std::vector<GpuBinding>& node, bool allow_shared_gpu, const std::string& host);

}  // namespace mpitrain::runtime

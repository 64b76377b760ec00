#pragma once
// Device choice: one rank per GPU, the GPU being cuda:<local_rank>.
//
// Contract: choose_device() returns cuda:<local_rank> when CUDA is usable and wanted; it is an
// error (bad_input) when a node runs more ranks than it has GPUs, unless allow_shared_gpu; and it
// returns CPU when no GPU is usable (kind auto) or when CPU is asked for.

#include <c10/core/Device.h>

#include <string>

namespace mpitrain::runtime {

class World;

enum class DeviceKind { automatic, cpu, cuda };

struct DeviceOptions {
  DeviceKind kind = DeviceKind::automatic;
  /// Lets several local ranks share GPUs (round-robin). NCCL refuses two ranks of one
  /// communicator on one GPU, so this is only useful with the MPI backend or for debugging.
  bool allow_shared_gpu = false;
};

DeviceKind parse_device_kind(const std::string& text);  // "auto" | "cpu" | "cuda"

/// Number of usable CUDA devices on this node (0 on a CPU-only build or machine).
int cuda_device_count();

c10::Device choose_device(const World& world, const DeviceOptions& options);

}  // namespace mpitrain::runtime

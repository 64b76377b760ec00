#include "mpitrain/comm/communicator.h"
#include "mpitrain/comm/mpi_communicator.h"
#ifdef MPITRAIN_HAVE_NCCL
#include "mpitrain/comm/nccl_communicator.h"
#endif

#include "mpitrain/runtime/error.h"
#include "mpitrain/runtime/fatal.h"
#include "mpitrain/runtime/fault.h"
#include "mpitrain/runtime/world.h"

namespace mpitrain::comm {

std::unique_ptr<Communicator> make_communicator(const runtime::World& world, c10::Device device,
                                                const CommOptions& options, Backend backend) {
  // Start-up, after MPI's initialisation and before any collective of the run: the fault
  // matrix stops or kills a rank here (docs/reliability.md).
  runtime::fault_point("comm.starting", world.rank());
  if (backend == Backend::automatic) backend = device.is_cuda() ? Backend::nccl : Backend::mpi;
  if (backend == Backend::mpi) {
    if (!device.is_cpu())
      throw runtime::Error("device.backend \"mpi\" works on CPU tensors, but the device is " +
                               device.str() + " on " + runtime::where() +
                               ": set device.backend to nccl (or auto) for CUDA devices",
                           runtime::ExitCode::bad_input);
    return std::make_unique<MpiCommunicator>(world, options);
  }
#ifdef MPITRAIN_HAVE_NCCL
  if (!device.is_cuda())
    throw runtime::Error("device.backend \"nccl\" works on CUDA tensors, but the device is " +
                             device.str() + " on " + runtime::where() +
                             ": set device.backend to mpi (or auto) on CPU",
                         runtime::ExitCode::bad_input);
  return std::make_unique<NcclCommunicator>(world, device, options);
#else
  throw runtime::Error("device.backend \"nccl\" was asked for, but this build of mpitrain has no CUDA "
                       "path (configured with MPITRAIN_WITH_CUDA=OFF or without a CUDA "
                       "LibTorch): rebuild with CUDA or set device.backend to mpi",
                       runtime::ExitCode::bad_input);
#endif
}

}  // namespace mpitrain::comm

#pragma once
// CUDA and NCCL check macros; only for translation units built with the CUDA path.
// Same contract as check.h: report and end the job.

#include <cuda_runtime_api.h>
#include <nccl.h>

#include "mpitrain/runtime/check.h"

#define MPITRAIN_CHECK_CUDA(call)                                                         \
  do {                                                                                    \
    const cudaError_t mpitrain_rc_ = (call);                                              \
    if (mpitrain_rc_ != cudaSuccess)                                                      \
      ::mpitrain::runtime::detail::library_failed("CUDA", cudaGetErrorString(mpitrain_rc_), \
                                                  #call, __FILE__, __LINE__);             \
  } while (0)

// ncclInProgress is not a failure: non-blocking communicators return it while work is queued.
#define MPITRAIN_CHECK_NCCL(call)                                                         \
  do {                                                                                    \
    const ncclResult_t mpitrain_rc_ = (call);                                             \
    if (mpitrain_rc_ != ncclSuccess && mpitrain_rc_ != ncclInProgress)                    \
      ::mpitrain::runtime::detail::library_failed("NCCL", ncclGetErrorString(mpitrain_rc_), \
                                                  #call, __FILE__, __LINE__);             \
  } while (0)

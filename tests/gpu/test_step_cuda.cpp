// A steady-state training step on a GPU makes no call that waits for the device: CUDA's sync
// debug mode (error) turns any synchronising call of LibTorch (an .item(), a blocking copy to
// the host, a stream synchronize) into an exception during steps 2-5, and no read of a step
// value goes through runtime/host_read.h. bf16 autocast, fused AdamW (optimizer.fused auto),
// clipping, accumulation, and the NCCL communicator at world size 1.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAFunctions.h>
// After ATen: c10 defines a CHECK macro of its own that Catch must override.
#include <catch2/catch.hpp>

#include "gpu_support.h"
#include "mpitrain/runtime/host_read.h"
#include "mpitrain/runtime/signals.h"
#include "mpitrain/train/trainer.h"
#include "step_support.h"

using namespace mpitrain;
using namespace mpitrain::testing;

namespace {

// Sync debug mode for the scope; off again however it ends.
struct SyncsAreErrors {
  SyncsAreErrors() { c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_ERROR); }
  ~SyncsAreErrors() { c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_DISABLED); }
};

}  // namespace

TEST_CASE("a steady-state step on CUDA waits for nothing on the device", "[step]") {
  const config::Config config = run_config({{"device", {{"kind", "cuda"}}},
                                            {"precision", {{"mode", "bf16"}}},
                                            {"optimizer", {{"fused", "auto"}}}});
  runtime::StopSignals signals;
  train::Trainer trainer(world(), config, train::run_directory(config), signals);
  trainer.step();  // warm-up: allocations, cuBLAS handles, NCCL buffers
  const std::int64_t before = runtime::host_reads();
  {
    const SyncsAreErrors strict;
    for (int step = 2; step <= 5; ++step) CHECK_NOTHROW(trainer.step());
  }
  CHECK(runtime::host_reads() == before);
  const train::StepResult result = trainer.step();
  CHECK(result.step == 6);
  CHECK(result.loss.is_cuda());
  CHECK(result.skipped.item<float>() == 0.0f);
}

// A steady-state training step reads nothing from the device: on a GPU every read stalls the
// host until the device catches up, so the loss, the gradient norm and the non-finite flag stay
// on the device until a log step. Counted through runtime/host_read.h, the one way the train,
// ddp and amp layers read device values, on the CPU where the same code runs.
#include <ATen/ATen.h>
// After ATen: c10 defines a CHECK macro of its own that Catch must override.
#include <catch2/catch.hpp>

#include <cmath>

#include "mpitrain/runtime/host_read.h"
#include "mpitrain/runtime/signals.h"
#include "mpitrain/train/trainer.h"
#include "step_support.h"

using namespace mpitrain;
using testing::run_config;
using testing::world;

namespace {

// The host reads of steps 2..5 (step 1 warms up).
std::int64_t steady_state_reads(const config::Config& config) {
  runtime::StopSignals signals;
  train::Trainer trainer(world(), config, train::run_directory(config), signals);
  trainer.step();
  const std::int64_t before = runtime::host_reads();
  for (int step = 2; step <= 5; ++step) {
    const train::StepResult result = trainer.step();
    CHECK(result.step == step);
  }
  return runtime::host_reads() - before;
}

}  // namespace

TEST_CASE("a steady-state step reads nothing from the device", "[train]") {
  SECTION("fp32, accumulation, clipping") { CHECK(steady_state_reads(run_config({})) == 0); }
  SECTION("fp16 with the loss scaler") {
    CHECK(steady_state_reads(run_config({{"precision", {{"mode", "fp16"}}}})) == 0);
  }
  SECTION("bf16 autocast") { CHECK(steady_state_reads(run_config({{"precision", {{"mode", "bf16"}}}})) == 0); }
  SECTION("ZeRO stage 1") { CHECK(steady_state_reads(run_config({{"ddp", {{"zero_stage", 1}}}})) == 0); }
  SECTION("LibTorch's own AdamW reads the skip flag, once a step") {
    CHECK(steady_state_reads(run_config({{"optimizer", {{"fused", "off"}}}})) == 4);
  }
  if (world().size() == 2) {
    // Each activation and gradient a channel carries comes with a header whose sizes the
    // receiver must know on the host; it travels there, so reading it is no device read.
    SECTION("two pipeline stages") {
      CHECK(steady_state_reads(run_config({{"parallel", {{"pipeline_stages", 2}}}})) == 0);
    }
  }
}

TEST_CASE("the step's figures stay on the device and say what happened", "[train]") {
  const config::Config config = run_config({});
  runtime::StopSignals signals;
  train::Trainer trainer(world(), config, train::run_directory(config), signals);
  const train::StepResult result = trainer.step();
  CHECK(result.step == 1);
  CHECK(result.skipped.item<float>() == 0.0f);
  CHECK(result.grad_norm.item<double>() > 0.0);
  CHECK(std::isfinite(result.loss.item<float>()));
}

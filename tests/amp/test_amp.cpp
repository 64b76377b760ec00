// Mixed precision: precision choice, the autocast scope, and the dynamic loss scaler, whose
// found-inf flag must be agreed so every rank skips the same steps.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
// After ATen: c10 defines a CHECK macro of its own that Catch must override.
#include <catch2/catch.hpp>

#include "mpitrain/amp/amp.h"
#include "mpitrain/comm/communicator.h"
#include "mpitrain/runtime/error.h"
#include "test_world.h"

using namespace mpitrain;

namespace {

comm::Communicator& communicator() {
  static auto comm = comm::make_communicator(testing::world(), c10::Device(c10::kCPU));
  return *comm;
}

}  // namespace

TEST_CASE("precision: auto is fp32 on CPU; names are checked", "[amp]") {
  const c10::Device cpu(c10::kCPU);
  CHECK(amp::resolve_precision("auto", cpu) == amp::Precision::fp32);
  CHECK(amp::resolve_precision("bf16", cpu) == amp::Precision::bf16);
  CHECK(amp::resolve_precision("fp16", cpu) == amp::Precision::fp16);
  CHECK_THROWS_WITH(amp::resolve_precision("fp8", cpu), Catch::Contains("expected auto, fp32, bf16 or fp16"));
}

TEST_CASE("autocast scope: matmuls run in bf16 inside, state restored after", "[amp]") {
  const c10::Device cpu(c10::kCPU);
  const auto a = at::randn({4, 4}), b = at::randn({4, 4});
  {
    amp::AutocastScope outer(cpu, amp::Precision::bf16);
    CHECK(at::mm(a, b).scalar_type() == at::kBFloat16);
    {
      amp::AutocastScope inner(cpu, amp::Precision::fp32);  // fp32: leaves autocast as it is
      CHECK(at::mm(a, b).scalar_type() == at::kBFloat16);
    }
    CHECK(at::autocast::is_autocast_enabled(c10::kCPU));
  }
  CHECK_FALSE(at::autocast::is_autocast_enabled(c10::kCPU));
  CHECK(at::mm(a, b).scalar_type() == at::kFloat);
}

TEST_CASE("loss scaler: unscale divides by the scale", "[amp]") {
  amp::LossScaler scaler(true, c10::Device(c10::kCPU));
  CHECK(scaler.current_scale() == 65536.0);
  CHECK(scaler.scale(at::full({}, 3.0f)).item<float>() == 3.0f * 65536.0f);
  at::Tensor grad = at::full({3}, 2.0f * 65536.0f);
  CHECK(scaler.unscale_and_check({grad}, communicator()).item<float>() == 0.0f);
  CHECK(at::equal(grad, at::full({3}, 2.0f)));
}

TEST_CASE("loss scaler: an inf on one rank skips the step on every rank and halves the scale", "[amp]") {
  amp::ScalerOptions options;
  options.growth_interval = 3;
  amp::LossScaler scaler(true, c10::Device(c10::kCPU), options);
  at::Tensor grad = at::ones({5});
  if (communicator().rank() == communicator().size() - 1) grad[2] = std::numeric_limits<float>::infinity();
  const at::Tensor found_inf = scaler.unscale_and_check({grad}, communicator());
  CHECK(found_inf.item<float>() == 1.0f);
  scaler.update(found_inf);
  CHECK(scaler.current_scale() == 32768.0);

  // Growth: after growth_interval clean steps in a row, the scale doubles.
  for (int step = 0; step < 3; ++step) {
    at::Tensor clean = at::ones({5});
    const at::Tensor clean_flag = scaler.unscale_and_check({clean}, communicator());
    CHECK(clean_flag.item<float>() == 0.0f);
    scaler.update(clean_flag);
    CHECK(scaler.current_scale() == (step < 2 ? 32768.0 : 65536.0));
  }

  const auto state = scaler.state();
  amp::LossScaler restored(true, c10::Device(c10::kCPU), options);
  restored.load_state(state);
  CHECK(restored.current_scale() == 65536.0);
  CHECK(restored.state() == state);
}

TEST_CASE("a loss scaler state of the other kind is not restored", "[amp]") {
  // An fp16 run's state resumed in bf16 or fp32 (another GPU type, or the CPU).
  amp::LossScaler disabled(false, c10::Device(c10::kCPU));
  CHECK_FALSE(disabled.load_state({{"enabled", true}, {"scale", 65536.0}, {"growth_tracker", 7}}));
  CHECK(disabled.current_scale() == 1.0);
  at::Tensor grad = at::full({3}, 3.0f);
  disabled.unscale_and_check({grad}, communicator());
  CHECK(at::equal(grad, at::full({3}, 3.0f)));
  // A bf16 run's state (scale 1) resumed in fp16 keeps the configured initial scale.
  amp::ScalerOptions options;
  options.init_scale = 1024.0;
  amp::LossScaler enabled(true, c10::Device(c10::kCPU), options);
  CHECK_FALSE(enabled.load_state({{"enabled", false}, {"scale", 1.0}, {"growth_tracker", 0}}));
  CHECK(enabled.state() == nlohmann::json{{"enabled", true}, {"scale", 1024.0}, {"growth_tracker", 0}});
  // The same kind is restored.
  CHECK(enabled.load_state({{"enabled", true}, {"scale", 512.0}, {"growth_tracker", 3}}));
  CHECK(enabled.state() == nlohmann::json{{"enabled", true}, {"scale", 512.0}, {"growth_tracker", 3}});
}

TEST_CASE("ranks whose auto precisions differ agree on one", "[amp]") {
  using amp::Precision;
  CHECK(amp::agree_precision({Precision::bf16, Precision::bf16}) == Precision::bf16);
  CHECK(amp::agree_precision({Precision::fp16, Precision::fp16}) == Precision::fp16);
  CHECK(amp::agree_precision({Precision::fp32}) == Precision::fp32);
  // An A100 next to a V100: fp16 everywhere, never bf16 gradients summed with scaled fp16 ones.
  CHECK(amp::agree_precision({Precision::bf16, Precision::fp16, Precision::bf16}) == Precision::fp16);
  CHECK_THROWS_WITH(amp::agree_precision({Precision::fp32, Precision::bf16}),
                    Catch::Contains("some ranks chose fp32") && Catch::Contains("precision.mode"));
}

TEST_CASE("loss scaler disabled: scale 1, gradients untouched, non-finite ones still found on every rank", "[amp]") {
  amp::LossScaler scaler(false, c10::Device(c10::kCPU));
  at::Tensor grad = at::full({2}, 7.0f);
  CHECK(scaler.unscale_and_check({grad}, communicator()).item<float>() == 0.0f);
  CHECK(at::equal(grad, at::full({2}, 7.0f)));
  if (communicator().rank() == 0) grad[1] = std::numeric_limits<float>::quiet_NaN();
  const at::Tensor found_inf = scaler.unscale_and_check({grad}, communicator());
  CHECK(found_inf.item<float>() == 1.0f);
  scaler.update(found_inf);
  CHECK(scaler.current_scale() == 1.0);
}

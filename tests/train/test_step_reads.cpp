// A steady-state training step reads nothing from the device: on a GPU every read stalls the
// host until the device catches up, so the loss, the gradient norm and the non-finite flag stay
// on the device until a log step. Counted through runtime/host_read.h, the one way the train,
// ddp and amp layers read device values, on the CPU where the same code runs.
#include <ATen/ATen.h>
// After ATen: c10 defines a CHECK macro of its own that Catch must override.
#include <catch2/catch.hpp>

#include <ftw.h>
#include <mpi.h>
#include <stdlib.h>

#include <cmath>
#include <cstdio>
#include <stdexcept>

#include <string>

#include "mpitrain/config/config.h"
#include "mpitrain/data/shards.h"
#include "mpitrain/models/registry.h"
#include "mpitrain/runtime/host_read.h"
#include "mpitrain/runtime/signals.h"
#include "mpitrain/train/trainer.h"
#include "test_world.h"

using namespace mpitrain;
using testing::world;

namespace {

// A folder every rank sees, made by rank 0 (which removes it at exit) and named to the others.
struct SharedFolder {
  SharedFolder() : root(world().is_root()) {
    char name[64] = "/tmp/mpitrain-step-reads-XXXXXX";
    if (root && mkdtemp(name) == nullptr) throw std::runtime_error("mkdtemp failed");
    MPI_Bcast(name, sizeof name, MPI_CHAR, 0, world().comm());
    path = name;
  }
  ~SharedFolder() {
    if (root)
      nftw(path.c_str(), [](const char* p, const struct stat*, int, struct FTW*) { return std::remove(p); }, 8,
           FTW_DEPTH | FTW_PHYS);
  }
  bool root;
  std::string path;
};

const std::string& shared_folder() {
  static const SharedFolder folder;
  return folder.path;
}

// 256 samples of 12 features in 3 classes, written once per process.
const std::string& data_manifest() {
  static const std::string manifest = [] {
    const std::string dir = shared_folder();
    if (world().is_root()) {
      at::manual_seed(11);
      const at::Tensor inputs = at::randn({256, 12});
      const at::Tensor targets = inputs.narrow(1, 0, 3).argmax(1);
      data::ShardOptions options;
      options.shards = 2;
      data::write_shards(dir, "train", {{"inputs", inputs}, {"targets", targets}}, options);
    }
    world().barrier();
    return dir + "/train.json";
  }();
  return manifest;
}

config::Config run_config(const nlohmann::json& changes) {
  nlohmann::json tree = {
      {"run", {{"dir", shared_folder()}, {"seed", 3}}},
      {"model", {{"name", "mlp"}, {"mlp", {{"input_dim", 12}, {"hidden", 16}, {"layers", 1}, {"num_classes", 3}}}}},
      {"data", {{"train", {{"manifest", data_manifest()}}}}},
      {"batch", {{"micro_batch", 8}, {"accumulation", 2}}},
      {"optimizer", {{"name", "adamw"}, {"lr", 0.01}, {"fused", "on"}, {"grad_clip", 1.0}}},
      {"precision", {{"mode", "fp32"}}},
      {"train", {{"steps", 6}}},
      {"log", {{"every_steps", 100}, {"console", false}}}};
  if (changes.is_object()) tree.merge_patch(changes);  // {} is null in nlohmann::json
  return config::resolve(config::validate(tree, "test config", models::option_schemas()), world().size());
}

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

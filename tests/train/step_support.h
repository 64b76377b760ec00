#pragma once
// A tiny training run for the tests of one step: an MLP on 256 random samples in a folder every
// rank sees (removed at exit), and its config with changes merged in. Collective.

#include <ATen/ATen.h>

#include <ftw.h>
#include <mpi.h>
#include <stdlib.h>

#include <cstdio>
#include <stdexcept>
#include <string>

#include <nlohmann/json.hpp>

#include "mpitrain/config/config.h"
#include "mpitrain/data/shards.h"
#include "mpitrain/models/registry.h"
#include "test_world.h"

namespace mpitrain::testing {


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

inline const std::string& shared_folder() {
  static const SharedFolder folder;
  return folder.path;
}

// 256 samples of 12 features in 3 classes, written once per process.
inline const std::string& data_manifest() {
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

inline config::Config run_config(const nlohmann::json& changes) {
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

}  // namespace mpitrain::testing

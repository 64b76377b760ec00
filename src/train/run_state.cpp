#include "run_state.h"

#include <ATen/ATen.h>
#include <torch/serialize.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#ifdef MPITRAIN_HAVE_NCCL
#include <ATen/cuda/CUDAGeneratorImpl.h>
#endif

#include "mpitrain/amp/amp.h"
#include "mpitrain/checkpoint/checkpoint.h"
#include "mpitrain/checkpoint/safetensors.h"
#include "mpitrain/checkpoint/weights.h"
#include "mpitrain/comm/agreement.h"
#include "mpitrain/data/loader.h"
#include "mpitrain/ddp/ddp.h"
#include "mpitrain/models/model.h"
#include "mpitrain/runtime/error.h"
#include "mpitrain/runtime/host_read.h"
#include "mpitrain/runtime/memory_budget.h"
#include "mpitrain/runtime/world.h"
#include "mpitrain/train/optim.h"
#include "shard_state.h"

namespace mpitrain::train {
namespace {

namespace fs = std::filesystem;

// A checkpoint file of one rank: rank-00003.json, optimizer-rank-00003.safetensors, ...
std::string rank_file(int rank, const char* prefix = "", const char* extension = ".json") {
  char name[64];
  std::snprintf(name, sizeof name, "%srank-%05d%s", prefix, rank, extension);
  return name;
}
constexpr const char* kShardFile = "optimizer-";  // ZeRO stage 1: each rank's optimizer state
constexpr const char* kDdpFile = "ddp-";          // the DDP engine's state (compression residuals)

// ZeRO stage 0's optimizer: rank 0's for the whole model, or each pipeline stage's.
std::string optimizer_file(const StagePlace& place) {
  if (place.stages == 1) return "optimizer.pt";
  char name[64];
  std::snprintf(name, sizeof name, "optimizer-stage-%05d.pt", place.stage);
  return name;
}

nlohmann::json generator_state(at::Generator generator) {
  const at::Tensor state = generator.get_state();
  const auto* bytes = state.data_ptr<std::uint8_t>();
  return std::vector<int>(bytes, bytes + state.numel());
}

void set_generator_state(at::Generator generator, const nlohmann::json& json) {
  const auto bytes = json.get<std::vector<int>>();
  at::Tensor state = at::empty({static_cast<std::int64_t>(bytes.size())}, at::kByte);
  std::copy(bytes.begin(), bytes.end(), state.data_ptr<std::uint8_t>());
  generator.set_state(state);
}

std::string write_run(const RunParts& run, const std::string& root) {
  const config::Config& config = run.config;
  const Progress& progress = run.progress;
  checkpoint::Writer writer(run.world, root, progress.steps_done,
                            std::chrono::milliseconds(static_cast<std::int64_t>(config.checkpoint.save_timeout_s * 1000)),
                            std::chrono::milliseconds(static_cast<std::int64_t>(config.ddp.comm_timeout_s * 1000)));
  const fs::path dir = writer.path();
  const auto write_tensors = [&](const std::string& name, const std::map<std::string, at::Tensor>& tensors) {
    checkpoint::write_safetensors((dir / name).string(), tensors);
    checkpoint::fsync_path((dir / name).string());
  };
  sync_optimizer_state(run.optimizer);
  const StagePlace& place = run.place;
  if (place.gather_model) place.gather_model();
  if (config.ddp.zero_stage == 0 && place.replica == 0) {
    // Serialised in memory: LibTorch's file writer aborts the process (an exception from a
    // destructor) when the disk fills, where write_file reports it.
    std::ostringstream optimizer_bytes;
    torch::save(run.optimizer, optimizer_bytes);
    checkpoint::write_file((dir / optimizer_file(place)).string(), optimizer_bytes.str());
  }
  if (run.world.is_root()) {
    write_tensors("model.safetensors", checkpoint::state_dict_of(run.model));
    nlohmann::json state = {{"step", progress.steps_done},     {"epoch", progress.epoch},
                            {"world_size", run.world.size()}, {"zero_stage", config.ddp.zero_stage},
                            {"scaler", run.scaler.state()},   {"config", config::to_json(config)},
                            // The same on every rank (skips are agreed); a resumed run counts on from it.
                            {"nonfinite_run", static_cast<std::int64_t>(runtime::read_scalar<float>(progress.nonfinite_run))}};
    if (place.stages > 1) state["pipeline"] = {{"stages", place.stages}, {"bounds", place.bounds}};
    checkpoint::write_file((dir / "trainer.json").string(), state.dump(2));
  }
  if (config.ddp.zero_stage == 1)
    write_tensors(rank_file(run.world.rank(), kShardFile, ".safetensors"), shard_state(run.optimizer, run.ddp.shard()));
  if (const auto ddp_state = run.ddp.state(); !ddp_state.empty())
    write_tensors(rank_file(run.world.rank(), kDdpFile, ".safetensors"), ddp_state);
  nlohmann::json mine = {{"loader", run.loader.state()},
                         {"window_loss", runtime::read_scalar<double>(progress.window_loss)},
                         {"window_steps", progress.window_steps},
                         {"window_skipped", static_cast<std::int64_t>(runtime::read_scalar<float>(progress.window_skipped))},
                         {"rng_cpu", generator_state(at::detail::getDefaultCPUGenerator())}};
#ifdef MPITRAIN_HAVE_NCCL
  if (run.device.is_cuda()) mine["rng_cuda"] = generator_state(at::cuda::detail::getDefaultCUDAGenerator(run.device.index()));
#endif
  checkpoint::write_file((dir / rank_file(run.world.rank())).string(), mine.dump());
  return writer.commit({config.checkpoint.keep_last, config.checkpoint.keep_every});
}

void check_config_change(const RunParts& run, const std::string& dir, const nlohmann::json& saved, bool allow) {
  const nlohmann::json now = config::to_json(run.config);
  std::string changed;
  // The keys that may differ (they do not change what the run computes) are marked in the
  // settings table (config::Setting::resume).
  for (const auto& op : nlohmann::json::diff(saved, now)) {
    std::string key = op.at("path").get<std::string>().substr(1);
    std::replace(key.begin(), key.end(), '/', '.');
    if (!config::may_change_on_resume(key)) changed += (changed.empty() ? "" : ", ") + key;
  }
  if (changed.empty()) return;
  if (allow) {
    run.world.log().warn("resuming with changed settings: " + changed);
    return;
  }
  throw runtime::Error("checkpoint " + dir + " was written with different settings (its trainer.json) for: " + changed +
                           ". Resuming would silently change the run; restore those settings, or pass "
                           "--allow-config-change to resume anyway",
                       runtime::ExitCode::bad_input);
}

}  // namespace

// A failed save (disk full, no permission) ends the run with what to do; the checkpoints
// already there are untouched (docs/checkpoints.md).
std::string save_run(const RunParts& run, const std::string& root) {
  const auto failed = [&](const std::string& why) {
    return "saving the checkpoint of step " + std::to_string(run.progress.steps_done) + " under " + root + " failed: " +
           why + ". The checkpoints already there are untouched; free space or fix the folder, then resume with "
           "--resume auto";
  };
  try {
    return write_run(run, root);
  } catch (const runtime::Error& e) {
    throw runtime::Error(failed(e.what()), e.code());
  } catch (const c10::Error& e) {
    throw runtime::Error(failed(e.what_without_backtrace()));
  } catch (const std::exception& e) {
    throw runtime::Error(failed(e.what()));
  }
}

void restore_run(const RunParts& run, const std::string& dir, bool allow_config_change) {
  const config::Config& config = run.config;
  const runtime::World& world = run.world;
  Progress& progress = run.progress;
  const c10::Device device = run.device;
  const std::string problem = checkpoint::verify(dir);
  const std::string what_to_do = ". Pick another one, or use --resume auto to take the newest complete one";
  if (!problem.empty())
    throw runtime::Error("checkpoint " + dir + " cannot be used: " + problem + what_to_do, runtime::ExitCode::bad_input);
  // The manifest proves the files are as saved; this catches what it cannot: a checkpoint
  // from another program or edited and resealed by hand.
  const auto reading = [&](const std::string& name, const auto& read) {
    try {
      return read((fs::path(dir) / name).string());
    } catch (const runtime::Error&) {
      throw;
    } catch (const std::exception& e) {
      const std::string why = e.what();
      // No room for the saved state is not a bad checkpoint: it is fine, and may be resumed
      // once there is memory.
      if (runtime::out_of_memory(e))
        throw runtime::Error("out of memory on " + device.str() + " loading " + name + " of checkpoint " + dir +
                             " (the checkpoint itself is fine): free memory on the device (is another process "
                             "using it?) and resume again. " + why.substr(0, why.find('\n')));
      throw runtime::Error("checkpoint " + dir + " cannot be used: " + name + ": " + why.substr(0, why.find('\n')) +
                               what_to_do,
                           runtime::ExitCode::bad_input);
    }
  };
  const auto read_json = [](const std::string& path) {
    std::ifstream in(path);
    if (!in) throw std::runtime_error("cannot be read");
    return nlohmann::json::parse(in);
  };
  const auto count = [](const nlohmann::json& state, const char* key, std::int64_t min) {
    const auto v = state.at(key).get<std::int64_t>();
    if (v < min) throw std::out_of_range(std::string(key) + " is " + std::to_string(v));
    return v;
  };

  std::int64_t step = 0, saved_epoch = 0, saved_world = 0, saved_zero = 0;
  const StagePlace& place = run.place;
  reading("trainer.json", [&](const std::string& path) {
    const nlohmann::json state = read_json(path);
    if (!state.at("config").is_object()) throw std::invalid_argument("\"config\" is not an object");
    const std::int64_t saved_stages = state.contains("pipeline") ? count(state.at("pipeline"), "stages", 1) : 1;
    const std::vector<std::int64_t> saved_bounds =
        state.contains("pipeline") ? state.at("pipeline").at("bounds").get<std::vector<std::int64_t>>() : std::vector<std::int64_t>{};
    if (saved_stages != place.stages || saved_bounds != place.bounds)
      throw runtime::Error("checkpoint " + dir + " was written by a run of " + std::to_string(saved_stages) +
                               " pipeline stage(s)" + (saved_bounds.empty() ? "" : " with pieces split at " + comm::list_text(saved_bounds)) +
                               "; this run has " + std::to_string(place.stages) +
                               (place.bounds.empty() ? "" : " split at " + comm::list_text(place.bounds)) +
                               ", and its optimizer state is per stage. Resume with the same parallel.pipeline_stages and "
                               "parallel.stage_pieces (any number of replicas), or start a new run from its weights: --set "
                               "model.init_from=" + (fs::path(dir) / "model.safetensors").string() +
                               " (the optimizer state starts afresh)",
                           runtime::ExitCode::bad_input);
    check_config_change(run, dir, state.at("config"), allow_config_change);
    step = count(state, "step", 0);
    saved_epoch = count(state, "epoch", 0);
    saved_world = count(state, "world_size", 1);
    saved_zero = state.contains("zero_stage") ? count(state, "zero_stage", 0) : 0;
    progress.nonfinite_run.fill_(static_cast<double>(state.contains("nonfinite_run") ? count(state, "nonfinite_run", 0) : 0));
    if (!run.scaler.load_state(state.at("scaler")))
      run.world.log().warn("checkpoint " + dir + " was written by a run " +
                           (run.scaler.enabled() ? "without" : "with") +
                           " fp16 loss scaling and this one resolves precision.mode to " +
                           (run.scaler.enabled() ? "fp16" : "a precision without it") +
                           " (another GPU type, or resumed on CPU): the loss scale starts afresh");
    return 0;
  });
  if (saved_zero != config.ddp.zero_stage)
    throw runtime::Error("checkpoint " + dir + " holds the optimizer state of ddp.zero_stage " + std::to_string(saved_zero) +
                             "; this run has ddp.zero_stage " + std::to_string(config.ddp.zero_stage) +
                             ". Resume with ddp.zero_stage " + std::to_string(saved_zero),
                         runtime::ExitCode::bad_input);
  reading("model.safetensors", [&](const std::string& path) {
    checkpoint::load_weights(run.model, checkpoint::read_safetensors(path), "checkpoint " + dir);
    return 0;
  });
  if (config.ddp.zero_stage == 1) {
    // The shards of this stage's saved replicas (all ranks without stages), this rank's own
    // file first: at the same world size it holds exactly this shard.
    const std::int64_t saved_replicas = saved_world / place.stages;
    const std::int64_t first = static_cast<std::int64_t>(place.stage) * saved_replicas;
    std::vector<std::string> files;
    for (std::int64_t k = 0; k < saved_replicas; ++k)
      files.push_back((fs::path(dir) / rank_file(static_cast<int>(first + (place.replica + k) % saved_replicas), kShardFile,
                                                 ".safetensors"))
                          .string());
    reading(fs::path(files.front()).filename().string(), [&](const std::string&) {
      load_shard_state(run.optimizer, run.ddp.shard(), files);
      return 0;
    });
  } else {
    // Onto this rank's device: the file holds replica 0's (cuda:0 on a GPU machine).
    reading(optimizer_file(place), [&](const std::string& path) {
      torch::load(run.optimizer, path, device);
      return 0;
    });
  }
  progress.steps_done = step;
  progress.epoch = saved_epoch;

  // The loader's position is global, so any rank's file gives it; the rest is per rank and
  // only carries over at the same world size.
  const bool same_world = saved_world == world.size();
  reading(rank_file(same_world ? world.rank() : 0), [&](const std::string& path) {
    const nlohmann::json mine = read_json(path);
    run.loader.restore(mine.at("loader").get<data::LoaderState>());
    if (!same_world) return 0;
    progress.window_loss.fill_(mine.at("window_loss").get<double>());
    progress.window_steps = count(mine, "window_steps", 0);
    progress.window_skipped.fill_(static_cast<double>(count(mine, "window_skipped", 0)));
    set_generator_state(at::detail::getDefaultCPUGenerator(), mine.at("rng_cpu"));
#ifdef MPITRAIN_HAVE_NCCL
    if (device.is_cuda() && mine.contains("rng_cuda"))
      set_generator_state(at::cuda::detail::getDefaultCUDAGenerator(device.index()), mine.at("rng_cuda"));
    else if (device.is_cuda() && world.is_root())
      world.log().warn("checkpoint " + dir + " holds no CUDA random state (it was written without a GPU): "
                       "random streams on the GPU (dropout) start afresh");
#endif
    return 0;
  });
  const std::string ddp_file = rank_file(world.rank(), kDdpFile, ".safetensors");
  const bool ddp_saved = fs::exists(fs::path(dir) / ddp_file);
  if (same_world && ddp_saved) {
    reading(ddp_file, [&](const std::string& path) {
      run.ddp.load_state(checkpoint::read_safetensors(path));
      return 0;
    });
  } else if (!run.ddp.state().empty()) {
    world.log().warn("checkpoint " + dir + " holds no gradient compression state for " + std::to_string(world.size()) +
                     " ranks: error feedback starts from zero");
  }
  if (!same_world)
    world.log().warn("resuming " + std::to_string(saved_world) + " ranks' checkpoint on " + std::to_string(world.size()) +
                     " ranks: the data order continues exactly; random streams (dropout) start afresh" +
                     (config.ddp.zero_stage == 1 ? "; the optimizer state is re-sharded exactly" : ""));
  world.log().info("resumed from " + dir + " at step " + std::to_string(progress.steps_done));
}

}  // namespace mpitrain::train

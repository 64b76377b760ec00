// train: mpitrain's training program, one process per GPU (or per CPU rank).
//
//   mpirun -np 4 build/bin/train --config run.json [--set key.path=value ...] [--resume auto|DIR]
//                                [--allow-config-change] [--dry-run]
// Exit codes: 0 done, 2 bad input, 3 communication timeout, 99 stopped by a signal after
// saving a checkpoint (requeue with --resume auto), 1 anything else.

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "mpitrain/apps/cli.h"
#include "mpitrain/checkpoint/checkpoint.h"
#include "mpitrain/config/config.h"
#include "mpitrain/models/model.h"
#include "mpitrain/models/registry.h"
#include "mpitrain/runtime/check.h"
#include "mpitrain/runtime/error.h"
#include "mpitrain/runtime/signals.h"
#include "mpitrain/runtime/world.h"
#include "mpitrain/train/trainer.h"

using namespace mpitrain;

namespace {

struct Arguments {
  std::string config;
  std::vector<std::string> overrides;
  bool dry_run = false;
  std::string resume;  // "", "auto" or a checkpoint directory
  bool allow_config_change = false;
};

// Drops metrics lines of steps after the checkpoint a run resumes from: a run killed after its
// last checkpoint logged steps that the resumed run will log again.
void truncate_metrics(const std::string& path, std::int64_t step) {
  std::ifstream in(path);
  if (!in) return;
  std::string kept, line;
  while (std::getline(in, line)) {
    const auto record = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (!record.is_discarded() && record.value("step", std::int64_t{0}) <= step) kept += line + '\n';
  }
  in.close();
  const std::string temporary = path + ".tmp";
  std::ofstream(temporary) << kept;
  std::filesystem::rename(temporary, path);
}

// Bounded by `timeout`: rank 0 may be stopped while it looks for the checkpoint.
std::string broadcast_from_root(const runtime::World& world, std::string text, std::chrono::milliseconds timeout) {
  unsigned long long size = text.size();
  MPI_Request request = MPI_REQUEST_NULL;
  MPITRAIN_CHECK_MPI(MPI_Ibcast(&size, 1, MPI_UNSIGNED_LONG_LONG, 0, world.comm(), &request));
  runtime::wait_or_die(&request, timeout, "--resume auto: waiting for rank 0 to name the checkpoint");
  text.resize(size);
  MPITRAIN_CHECK_MPI(MPI_Ibcast(text.data(), static_cast<int>(size), MPI_CHAR, 0, world.comm(), &request));
  runtime::wait_or_die(&request, timeout, "--resume auto: waiting for rank 0 to name the checkpoint");
  return text;
}

void save_resolved_config(const std::string& run_dir, const config::Config& config) {
  std::filesystem::create_directories(run_dir);
  const std::filesystem::path target = std::filesystem::path(run_dir) / "config.json";
  const std::filesystem::path temporary = target.string() + ".tmp";
  {
    std::ofstream out(temporary);
    out << config::to_json(config).dump(2) << '\n';
    if (!out) throw runtime::Error("cannot write " + temporary.string() + ": check that run.dir is writable");
  }
  std::filesystem::rename(temporary, target);
}

int run_training(const runtime::World& world, const runtime::StopSignals& signals, const Arguments& args) {
  const config::Config config =
      config::resolve(config::load(args.config, args.overrides, models::option_schemas()), world.size());
  const std::string run_dir = train::run_directory(config);

  if (args.dry_run) {
    // Builds everything (model, DDP, loaders) to prove the config and data, and writes nothing.
    train::Trainer trainer(world, config, run_dir, signals);
    if (world.is_root()) {
      std::cout << "config " << args.config << " is valid; model " << config.model.name << " has "
                << trainer.parameter_count() << " parameters; " << trainer.total_steps() << " optimizer steps of "
                << config.batch.global << " samples on " << world.size() << " rank(s)\n"
                << "resolved config:\n" << config::to_json(trainer.config()).dump(2) << '\n';
    }
    return 0;
  }

  // Rank 0 picks the checkpoint and tells the others, so all ranks load the same one even if a
  // save finishes (or a file system shows it) while they look.
  std::string checkpoint;
  if (args.resume == "auto") {
    if (world.is_root()) {
      const auto latest = checkpoint::find_latest((std::filesystem::path(run_dir) / config.checkpoint.dir).string(), world.log());
      if (latest) checkpoint = *latest;
      else world.log().info("--resume auto: no complete checkpoint in " + run_dir + ", starting from step 0");
    }
    checkpoint = broadcast_from_root(world, checkpoint,
                                     std::chrono::milliseconds(static_cast<std::int64_t>(config.ddp.comm_timeout_s * 1000)));
  } else if (!args.resume.empty()) {
    if (!std::filesystem::is_directory(args.resume))
      throw runtime::Error("--resume " + args.resume + ": no such checkpoint directory", runtime::ExitCode::bad_input);
    checkpoint = args.resume;
  }

  // A resumed run takes its weights from the checkpoint, so model.init_from is not read (the
  // file may be gone by the time a requeued job resumes).
  config::Config start = config;
  if (!checkpoint.empty()) start.model.init_from.clear();
  train::Trainer trainer(world, start, run_dir, signals);
  if (!checkpoint.empty()) trainer.restore(checkpoint, args.allow_config_change);
  if (world.is_root()) {
    save_resolved_config(run_dir, trainer.config());  // with batch.micro_batch auto's value
    if (!config.log.metrics_file.empty())
      truncate_metrics((std::filesystem::path(run_dir) / config.log.metrics_file).string(), trainer.steps_done());
  }
  world.barrier(std::chrono::milliseconds(static_cast<std::int64_t>(config.ddp.comm_timeout_s * 1000)),
                "start-up: waiting for rank 0 to save the resolved config");
  world.log().info("training " + config.model.name + " (" + std::to_string(trainer.parameter_count()) +
                   " parameters) for " + std::to_string(trainer.total_steps()) + " steps on " +
                   std::to_string(world.size()) + " rank(s); run directory " + run_dir);
  const train::Outcome outcome = trainer.run();
  if (outcome == train::Outcome::stopped) {
    world.log().info("stopped by a signal after step " + std::to_string(trainer.steps_done()));
    return runtime::to_int(runtime::ExitCode::stopped);
  }
  world.log().info("done: " + std::to_string(trainer.steps_done()) + " steps; metrics in " +
                   (std::filesystem::path(run_dir) / config.log.metrics_file).string());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  runtime::World world(&argc, &argv);
  runtime::StopSignals signals;
  CLI::App app{"mpitrain: data-parallel training of LibTorch models; start one process per GPU with mpirun"};
  Arguments args;
  app.add_option("--config", args.config, "the run's JSON config (docs/config.md)")->required()->check(CLI::ExistingFile);
  app.add_option("--set", args.overrides, "override a config key: --set optimizer.lr=3e-4 (repeatable)");
  app.add_option("--resume", args.resume,
                 "auto: continue from the newest complete checkpoint of the run (if any); or a checkpoint directory");
  app.add_flag("--allow-config-change", args.allow_config_change,
               "resume even though settings that change the run (model, data, batch, optimizer...) differ");
  app.add_flag("--dry-run", args.dry_run,
               "validate the config and data, build the model, print the parameter count and resolved config, exit");
  return apps::parse_and_run(world, app, argc, argv, [&] { return run_training(world, signals, args); });
}

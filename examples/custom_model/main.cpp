// custom_model: a training program of its own, built against the installed mpitrain package.
// It links resmlp.cpp, which registers the "resmlp" model, and trains whatever model the
// config names with mpitrain's Trainer: MPI, DDP, data loading, checkpoints and metrics are
// mpitrain's; the program is only the command line and the loop's outcome.
//
//   mpirun -np 2 custom_model --config config.json [--set key.path=value ...]
//
// Exit codes are mpitrain's (include/mpitrain/runtime/exit_code.h): 0 done, 2 bad input,
// 3 communication timeout, 99 stopped by a signal after saving a checkpoint, 1 anything else.
#include <filesystem>
#include <string>
#include <vector>

#include "mpitrain/apps/cli.h"
#include "mpitrain/config/config.h"
#include "mpitrain/models/registry.h"
#include "mpitrain/runtime/signals.h"
#include "mpitrain/runtime/world.h"
#include "mpitrain/train/trainer.h"

using namespace mpitrain;

int main(int argc, char** argv) {
  runtime::World world(&argc, &argv);  // MPI: one process per GPU or CPU rank
  runtime::StopSignals signals;        // SIGTERM/SIGUSR1/SIGINT: checkpoint and exit 99
  CLI::App app{"Train a model registered by this program (resmlp) or a built-in one with mpitrain"};
  std::string path;
  std::vector<std::string> overrides;
  app.add_option("--config", path, "the run's JSON config")->required()->check(CLI::ExistingFile);
  app.add_option("--set", overrides, "override a config key: --set model.resmlp.depth=4 (repeatable)");

  return apps::parse_and_run(world, app, argc, argv, [&] {
    // option_schemas() includes resmlp: its registration ran before main(), so the config's
    // model.resmlp section is validated and defaulted like a built-in model's.
    const config::Config cfg =
        config::resolve(config::load(path, overrides, models::option_schemas()), world.size());
    // The trainer writes metrics and checkpoints into the run directory; the program makes it.
    const std::string run_dir = train::run_directory(cfg);
    if (world.is_root()) std::filesystem::create_directories(run_dir);
    world.barrier();
    train::Trainer trainer(world, cfg, run_dir, signals);
    world.log().info("custom_model: training " + cfg.model.name + " (" +
                     std::to_string(trainer.parameter_count()) + " parameters) for " +
                     std::to_string(trainer.total_steps()) + " steps on " +
                     std::to_string(world.size()) + " rank(s)");
    if (trainer.run() == train::Outcome::stopped) {
      world.log().info("custom_model: stopped after step " + std::to_string(trainer.steps_done()));
      return runtime::to_int(runtime::ExitCode::stopped);
    }
    world.log().info("custom_model: done, " + std::to_string(trainer.steps_done()) +
                     " steps; run directory " + run_dir);
    return 0;
  });
}

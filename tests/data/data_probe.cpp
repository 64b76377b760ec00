// Stands in for the trainer in the data tests: runs the Loader under mpirun as a training job
// would (World, communicator, run_guarded) and prints, from rank 0, one line per step with the
// global batch's targets in rank order. It can save the loader state after its last step and
// restore one before its first, for the resume test across world sizes.
//
//   mpirun -np 4 data_probe --source ids.h5 --batch 2 --steps 7 --save state.json
//   mpirun -np 2 data_probe --source ids.h5 --batch 4 --steps 13 --restore state.json
#include <CLI/CLI.hpp>
#include <ATen/ATen.h>

#include <cstdio>
#include <fstream>
#include <iostream>

#include "mpitrain/comm/communicator.h"
#include "mpitrain/data/loader.h"
#include "mpitrain/runtime/error.h"
#include "mpitrain/runtime/world.h"

using namespace mpitrain;

int main(int argc, char** argv) {
  runtime::World world(&argc, &argv);
  CLI::App app{"data loader probe"};
  std::string source, save, restore;
  data::LoaderOptions options;
  std::int64_t steps = 1;
  app.add_option("--source", source, "manifest or glob")->required();
  app.add_option("--batch", options.batch_size, "batch size per rank");
  app.add_option("--seed", options.seed, "shuffle seed");
  app.add_option("--steps", steps, "steps to run");
  app.add_option("--save", save, "write the loader state here after the last step (rank 0)");
  app.add_option("--restore", restore, "restore this loader state first");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return world.is_root() ? app.exit(e) : runtime::to_int(runtime::ExitCode::bad_input);
  }
  return runtime::run_guarded(world, [&] {
    auto comm = comm::make_communicator(world, c10::Device(c10::kCPU));
    data::Loader loader(data::DatasetSpec::classification(source), options, world.rank(), world.size(), *comm);
    if (!restore.empty()) {
      std::ifstream in(restore);
      loader.restore(nlohmann::json::parse(in).get<data::LoaderState>());
    }
    for (std::int64_t s = 0; s < steps; ++s) {
      const data::Batch batch = loader.next();
      at::Tensor global = at::empty({batch.targets.numel() * world.size()}, at::kLong);
      comm->all_gather(global, batch.targets.contiguous());
      if (!world.is_root()) continue;
      std::cout << "epoch " << batch.epoch << " step " << batch.step << ":";
      for (std::int64_t k = 0; k < global.numel(); ++k) std::cout << ' ' << global.data_ptr<std::int64_t>()[k];
      std::cout << '\n';
    }
    if (!save.empty() && world.is_root()) std::ofstream(save) << nlohmann::json(loader.state()).dump() << '\n';
    return 0;
  });
}

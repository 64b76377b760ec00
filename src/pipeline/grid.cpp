#include "mpitrain/pipeline/grid.h"

#include "mpitrain/runtime/error.h"

namespace mpitrain::pipeline {

Grid::Grid(const runtime::World& world, int stages) : stages_(stages) {
  if (stages < 1 || world.size() % stages != 0)
    throw runtime::Error("parallel.pipeline_stages (" + std::to_string(stages) + ") must divide the number of ranks (" +
                             std::to_string(world.size()) + ")",
                         runtime::ExitCode::bad_input);
  replicas_ = world.size() / stages;
  stage_ = world.rank() / replicas_;
  replica_ = world.rank() % replicas_;
  stage_group_ = world.split(stage_, replica_);
  pipeline_group_ = world.split(replica_, stage_);
}

}  // namespace mpitrain::pipeline

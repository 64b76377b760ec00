#pragma once
// The P x D grid of a pipeline-parallel run: P stages, D data-parallel replicas of the pipeline.
//
// Contract:
// - World rank = stage * D + replica: a stage's replicas are consecutive ranks, so the stage's
//   gradient all-reduce (the heavy traffic, every step) stays inside a node when D divides the
//   GPUs per node, and the pipeline's point-to-point traffic (one activation per micro-batch)
//   is what crosses nodes (docs/pipeline.md).
// - Construction is collective over the world. It splits the world into groups, each a
//   runtime::World of its own: stage_group() (this stage's D replicas, ranked by replica: its
//   DDP and ZeRO group) and pipeline_group() (this replica's P stages, ranked by stage).
// - stages must divide the world size; anything else is runtime::Error(bad_input) naming
//   parallel.pipeline_stages (config::resolve refuses it before).

#include <memory>

#include "mpitrain/runtime/world.h"

namespace mpitrain::pipeline {

class Grid {
 public:
  Grid(const runtime::World& world, int stages);

  int stages() const { return stages_; }
  int replicas() const { return replicas_; }
  int stage() const { return stage_; }
  int replica() const { return replica_; }
  bool first() const { return stage_ == 0; }
  bool last() const { return stage_ == stages_ - 1; }
  int world_rank(int stage, int replica) const { return stage * replicas_ + replica; }

  const runtime::World& stage_group() const { return *stage_group_; }
  const runtime::World& pipeline_group() const { return *pipeline_group_; }

 private:
  int stages_, replicas_, stage_, replica_;
  std::unique_ptr<runtime::World> stage_group_, pipeline_group_;
};

}  // namespace mpitrain::pipeline

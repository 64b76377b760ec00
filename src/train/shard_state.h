#pragma once
// ZeRO stage 1 checkpoints: the optimizer state of one rank's shard as named tensors, and its
// reassembly for any other cut of the same model (another world size or bucket size).
//
// Contract:
// - shard_state() names every state tensor of every slice of `shard` (ddp::ShardSlice)
//   "<parameter>[<begin>:<end>].<field>", begin and end counted in the flattened parameter.
//   Fields: exp_avg, exp_avg_sq and step (a 1-element int64 tensor) for AdamW; momentum_buffer
//   for SGD. Slices without state (no step taken yet) have no entries.
// - load_shard_state() gives every slice of `shard` the state held in `files` (safetensors
//   written from shard_state(), one per rank of the saving run), reading them in the given order
//   and stopping as soon as every element of every slice is covered — so a resume on the same
//   world size reads its own rank's file only. Saved pieces may be cut anywhere: each element is
//   copied from the piece holding it, so the result equals the saving run's state exactly.
//   Files holding no state at all (saved before any step) leave the optimizer without state.
//   Anything else — an element of a slice in no file, a name that is not of this form, pieces
//   disagreeing on the step, a field the optimizer does not have — is runtime::Error(bad_input)
//   naming the parameter and the files.

#include <torch/optim/optimizer.h>

#include <map>
#include <string>
#include <vector>

#include "mpitrain/ddp/ddp.h"

namespace mpitrain::train {

std::map<std::string, at::Tensor> shard_state(torch::optim::Optimizer& optimizer,
                                              const std::vector<ddp::ShardSlice>& shard);

void load_shard_state(torch::optim::Optimizer& optimizer, const std::vector<ddp::ShardSlice>& shard,
                      const std::vector<std::string>& files);

}  // namespace mpitrain::train

#include "mpitrain/pipeline/stage.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <limits>
#include <set>

#include "mpitrain/comm/communicator.h"
#include "mpitrain/runtime/error.h"

namespace mpitrain::pipeline {
namespace {

std::int64_t parameters_of(const std::vector<std::shared_ptr<torch::nn::Module>>& modules) {
  std::int64_t count = 0;
  for (const auto& module : modules)
    for (const auto& parameter : module->parameters()) count += parameter.numel();
  return count;
}

// Modules owned by pieces [begin, end).
std::set<const torch::nn::Module*> owned(const std::vector<models::Piece>& pieces, std::int64_t begin, std::int64_t end) {
  std::set<const torch::nn::Module*> result;
  for (std::int64_t i = begin; i < end; ++i)
    for (const auto& module : pieces[static_cast<std::size_t>(i)].owns) result.insert(module.get());
  return result;
}

}  // namespace

std::vector<std::int64_t> split(const std::vector<models::Piece>& pieces, int stages,
                                const std::vector<std::int64_t>& counts) {
  const auto n = static_cast<std::int64_t>(pieces.size());
  if (n == 0)
    throw runtime::Error("parallel.pipeline_stages " + std::to_string(stages) +
                             ": the model cannot be cut into stages (models::Model::pieces() is empty); set "
                             "parallel.pipeline_stages to 1, or give the model pieces (docs/pipeline.md)",
                         runtime::ExitCode::bad_input);
  if (stages > n)
    throw runtime::Error("parallel.pipeline_stages " + std::to_string(stages) + " is more stages than the model has pieces (" +
                             std::to_string(n) + ": its blocks, layers or stages); use at most " + std::to_string(n),
                         runtime::ExitCode::bad_input);
  std::vector<std::int64_t> bounds{0};
  if (!counts.empty()) {
    for (const std::int64_t c : counts) bounds.push_back(bounds.back() + c);
    if (bounds.back() != n)
      throw runtime::Error("parallel.stage_pieces adds up to " + std::to_string(bounds.back()) + " pieces but the model has " +
                               std::to_string(n) + "; give counts that add up to " + std::to_string(n) + ", or [] to balance",
                           runtime::ExitCode::bad_input);
    return bounds;
  }
  // cost[i]: piece i's parameters, borrowed ones included. best[s][j]: the smallest largest
  // stage over splits of pieces [0, j) into s stages.
  std::vector<std::int64_t> prefix{0};
  for (const auto& piece : pieces) prefix.push_back(prefix.back() + parameters_of(piece.owns) + parameters_of(piece.borrows));
  constexpr std::int64_t kNone = std::numeric_limits<std::int64_t>::max();
  std::vector<std::vector<std::int64_t>> best(static_cast<std::size_t>(stages + 1), std::vector<std::int64_t>(static_cast<std::size_t>(n + 1), kNone));
  std::vector<std::vector<std::int64_t>> cut(best.size(), std::vector<std::int64_t>(static_cast<std::size_t>(n + 1), 0));
  best[0][0] = 0;
  for (int s = 1; s <= stages; ++s)
    for (std::int64_t j = s; j <= n; ++j)
      for (std::int64_t i = s - 1; i < j; ++i) {
        const std::int64_t before = best[static_cast<std::size_t>(s - 1)][static_cast<std::size_t>(i)];
        if (before == kNone) continue;
        const std::int64_t cost = std::max(before, prefix[static_cast<std::size_t>(j)] - prefix[static_cast<std::size_t>(i)]);
        // Strictly better only: of equal splits the first found (the shortest early stages) wins.
        if (cost < best[static_cast<std::size_t>(s)][static_cast<std::size_t>(j)]) {
          best[static_cast<std::size_t>(s)][static_cast<std::size_t>(j)] = cost;
          cut[static_cast<std::size_t>(s)][static_cast<std::size_t>(j)] = i;
        }
      }
  std::vector<std::int64_t> reversed{n};
  for (int s = stages; s > 0; --s) reversed.push_back(cut[static_cast<std::size_t>(s)][static_cast<std::size_t>(reversed.back())]);
  return {reversed.rbegin(), reversed.rend()};
}

Stage::Stage(const std::vector<models::Piece>& pieces, std::int64_t begin, std::int64_t end)
    : pieces_(pieces.begin() + begin, pieces.begin() + end), begin_(begin), end_(end) {
  const auto mine = owned(pieces, begin, end);
  std::set<const torch::nn::Module*> registered;
  int k = 0;
  for (const auto& piece : pieces_) {
    for (const auto& module : piece.owns) {
      register_module("owns_" + std::to_string(k++), module);
      registered.insert(module.get());
    }
  }
  for (const auto& piece : pieces_)
    for (const auto& module : piece.borrows)
      if (!mine.count(module.get()) && registered.insert(module.get()).second)
        register_module("borrows_" + std::to_string(k++), module);
}

at::Tensor Stage::forward(const at::Tensor& input) {
  at::Tensor x = input;
  for (const auto& piece : pieces_) x = piece.forward(x);
  return x;
}

std::string describe(const std::vector<models::Piece>& pieces, std::int64_t begin, std::int64_t end) {
  std::set<const torch::nn::Module*> counted;
  std::int64_t count = 0;
  for (std::int64_t i = begin; i < end; ++i) {
    const auto& piece = pieces[static_cast<std::size_t>(i)];
    for (const auto* modules : {&piece.owns, &piece.borrows})
      for (const auto& module : *modules)
        if (counted.insert(module.get()).second) count += parameters_of({module});
  }
  std::string names = pieces[static_cast<std::size_t>(begin)].name;
  if (end - begin > 1) names += " .. " + pieces[static_cast<std::size_t>(end - 1)].name;
  return names + ": " + std::to_string(end - begin) + " piece(s), " + std::to_string(count) + " parameters";
}

Ties::Ties(const std::vector<models::Piece>& pieces, const std::vector<std::int64_t>& bounds, int stage) {
  auto stage_of = [&](std::size_t piece) {
    int s = 0;
    while (bounds[static_cast<std::size_t>(s + 1)] <= static_cast<std::int64_t>(piece)) ++s;
    return s;
  };
  std::set<int> holders;
  std::set<const torch::nn::Module*> seen;
  for (std::size_t p = 0; p < pieces.size(); ++p) {
    for (const auto& module : pieces[p].borrows) {
      if (!seen.insert(module.get()).second) continue;
      // The stages that use this module: its owner and every borrower.
      std::set<int> users;
      int owner = -1;
      for (std::size_t q = 0; q < pieces.size(); ++q) {
        for (const auto& m : pieces[q].owns)
          if (m.get() == module.get()) owner = stage_of(q);
        for (const auto& m : pieces[q].borrows)
          if (m.get() == module.get()) users.insert(stage_of(q));
      }
      users.insert(owner);
      if (users.size() < 2) continue;  // owner and borrowers on one stage: an ordinary parameter
      holders.insert(users.begin(), users.end());
      for (const auto& parameter : module->parameters())
        tensors_.push_back({parameter, users.count(stage) > 0, owner == stage});
    }
  }
  stages_.assign(holders.begin(), holders.end());
  member_ = holders.count(stage) > 0;
}

void Ties::sum_gradients(comm::Communicator& comm) const {
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> parts;
  for (const Tied& tied : tensors_) {
    const at::Tensor grad = tied.held ? tied.parameter.grad() : at::Tensor();
    parts.push_back(grad.defined() ? grad.reshape({-1})
                                   : at::zeros({tied.parameter.numel()}, tied.parameter.options().device(comm.device())));
  }
  at::Tensor flat = at::cat(parts);
  comm.all_reduce(flat, comm::ReduceOp::sum);
  std::int64_t offset = 0;
  for (const Tied& tied : tensors_) {
    const std::int64_t numel = tied.parameter.numel();
    if (tied.held && tied.parameter.grad().defined())
      tied.parameter.mutable_grad().copy_(flat.narrow(0, offset, numel).view_as(tied.parameter));
    offset += numel;
  }
}

std::vector<at::Tensor> Ties::counted_elsewhere() const {
  std::vector<at::Tensor> result;
  for (const Tied& tied : tensors_)
    if (tied.held && !tied.owner) result.push_back(tied.parameter);
  return result;
}

}  // namespace mpitrain::pipeline

#pragma once
// A model cut into pipeline stages: which pieces (models::Piece) each stage runs, and the
// stage as one module.
//
// Contract:
// - split(pieces, P, counts) returns P + 1 boundaries: stage s runs pieces [b[s], b[s+1]). With
//   counts (parallel.stage_pieces) they are its running sums; otherwise the contiguous split
//   that minimises the largest stage's parameter count (borrowed parameters counted where they
//   are used: a tied head costs what an untied one does), ties broken towards earlier stages
//   holding fewer. Each stage gets at least one piece. A model without pieces, more stages than
//   pieces, or counts that do not add up to the pieces are runtime::Error(bad_input) naming the
//   setting and the number of pieces.
// - Stage registers the modules of its pieces, plus the modules they borrow that it does not
//   own, so parameters() is exactly what this stage computes with: what DDP buckets, the
//   optimizer steps and to(device) moves. forward() composes the pieces' forwards.
// - Tied parameters (Ties): a parameter of a module some piece borrows, present on more than one
//   stage. sum_gradients() adds their gradients across those stages (collective over the
//   stages that hold any, on the communicator given), after which each holder has the whole
//   gradient and steps it identically. counted_elsewhere() lists the copies a global gradient
//   norm must leave out (all but the owner's).

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "mpitrain/models/model.h"

namespace mpitrain::comm {
class Communicator;
}

namespace mpitrain::pipeline {

std::vector<std::int64_t> split(const std::vector<models::Piece>& pieces, int stages,
                                const std::vector<std::int64_t>& counts);

/// "h.0 (with wte, wpe) .. h.1: 2 piece(s), 1234 parameters" for pieces [begin, end).
std::string describe(const std::vector<models::Piece>& pieces, std::int64_t begin, std::int64_t end);

class Stage : public torch::nn::Module {
 public:
  Stage(const std::vector<models::Piece>& pieces, std::int64_t begin, std::int64_t end);
  at::Tensor forward(const at::Tensor& input);
  std::int64_t begin() const { return begin_; }
  std::int64_t end() const { return end_; }

 private:
  std::vector<models::Piece> pieces_;
  std::int64_t begin_, end_;
};

/// The tied parameters of a split model, as seen from one stage.
class Ties {
 public:
  Ties(const std::vector<models::Piece>& pieces, const std::vector<std::int64_t>& bounds, int stage);
  /// Whether any tied parameter is held by more than one stage.
  bool any() const { return !tensors_.empty(); }
  /// Whether this stage holds a tied parameter (and so joins sum_gradients()).
  bool member() const { return member_; }
  /// The stages that hold tied parameters, in order.
  const std::vector<int>& stages() const { return stages_; }
  void sum_gradients(comm::Communicator& comm) const;
  /// This stage's copies whose gradient another stage counts in the global norm.
  std::vector<at::Tensor> counted_elsewhere() const;

 private:
  struct Tied {
    at::Tensor parameter;
    bool held = false;   // on this stage
    bool owner = false;  // this stage owns it
  };
  std::vector<Tied> tensors_;
  std::vector<int> stages_;
  bool member_ = false;
};

}  // namespace mpitrain::pipeline

#pragma once
// The one interface the trainer sees of any model, built-in or user-registered.
//
// Contract:
// - forward(inputs) returns logits.
//   classification: inputs are floating-point [N, ...] (one sample per row of the first
//   dimension), logits are [N, num_classes], trained with cross-entropy against class ids [N].
//   language_modeling: inputs are token ids [N, T] (int64 or int32) with T <= context_length(),
//   logits are [N, T, vocab]; the logits at position t predict token t+1 and depend on tokens
//   0..t only (causal), trained with cross-entropy against the inputs shifted by one.
// - Inputs that do not fit the model's configured sizes are runtime::Error(bad_input) naming
//   the option they contradict, never a crash deep inside a kernel.
// - A model is built on the CPU in float32, initialised from the current torch RNG (seed it
//   with torch::manual_seed for a reproducible model); the trainer moves it to its device.
// - Each parameter is registered once: weights are tied by using one module's tensor in two
//   places in forward(), not by registering it twice, so that parameters() lists every tensor
//   exactly once (DDP buckets, optimizers and checkpoints rely on it).
// - pieces() cuts the model for pipeline parallelism (docs/pipeline.md): an ordered list whose
//   forwards, composed, compute exactly forward() (the first takes the model's inputs, the last
//   gives the logits). Every module with parameters or buffers is owned by exactly one piece; a
//   piece that also uses another piece's parameters (a tied output head) lists that module
//   under `borrows`, and pipeline stages that hold both sum its gradient. Empty (the default):
//   the model cannot be split into stages.

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace mpitrain::models {

enum class Task { classification, language_modeling };
const char* to_string(Task task);  // "classification" | "language_modeling"

/// One piece of a model in pipeline order (see the contract).
struct Piece {
  std::string name;  // for messages and the split's log line, e.g. "h.0 (with wte, wpe)"
  std::vector<std::shared_ptr<torch::nn::Module>> owns;
  std::vector<std::shared_ptr<torch::nn::Module>> borrows;
  std::function<at::Tensor(const at::Tensor&)> forward;
};

class Model : public torch::nn::Module {
 public:
  virtual at::Tensor forward(const at::Tensor& inputs) = 0;
  virtual Task task() const = 0;
  /// The longest token sequence forward() accepts; 0 for models that do not take sequences.
  virtual std::int64_t context_length() const { return 0; }
  /// Floating-point operations of one training step (forward and backward) per token at
  /// sequence length seq_len, for the model FLOPs utilisation metric; 0 = not known.
  virtual double training_flops_per_token(std::int64_t /*seq_len*/) const { return 0; }
  /// Classes of the output (the vocabulary size for language models), so the data can be
  /// checked against it; 0 = not known, not checked.
  virtual std::int64_t output_classes() const { return 0; }
  /// The model as pipeline pieces (see the contract); empty = no pipeline stages.
  virtual std::vector<Piece> pieces() { return {}; }
};

/// Number of scalars in the module's parameters, each distinct tensor counted once.
std::int64_t count_parameters(const torch::nn::Module& module);

}  // namespace mpitrain::models

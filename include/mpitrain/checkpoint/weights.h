#pragma once
// Model weights in and out of files the Python ecosystem reads and writes.
//
// Contract:
// - read_weights() reads a safetensors file or a file written by Python's
//   torch.save(model.state_dict(), path) (the zip format of torch >= 1.6; also a dict holding
//   the state dict under "model" or "state_dict", as training scripts often save), or the
//   model.safetensors inside a directory (Hugging Face's save_pretrained). Tensors come
//   back on the CPU by name. Anything else is runtime::Error(bad_input) naming the file and
//   what it holds instead.
// - load_weights() copies them into the module's parameters and buffers by name (dtype
//   converted, device kept). Every name must match in both directions and every shape must
//   agree; otherwise nothing is half-loaded: the error lists each missing, unexpected and
//   mis-shaped tensor (bad_input), and the module is left as it was. A module with the built-in
//   gpt's names also takes GPT-2 weights in Hugging Face's or nanoGPT's layout (gpt2.h), and a
//   file that does not fit it is described first by the sizes that differ (n_layer: 4 in the
//   file, 2 in the model).
// - state_dict_of() is the module's parameters and buffers by name, as write_safetensors takes.

#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>
#include <torch/nn/module.h>

#include <map>
#include <string>

namespace mpitrain::checkpoint {

std::map<std::string, at::Tensor> read_weights(const std::string& path);

/// What a torch.save file (zip format) holds, its tensors on the CPU whatever device they were
/// saved from; runtime::Error(bad_input) naming the file when it is not one.
c10::IValue read_torch_save(const std::string& path);

void load_weights(torch::nn::Module& module, const std::map<std::string, at::Tensor>& weights,
                  const std::string& source);

std::map<std::string, at::Tensor> state_dict_of(const torch::nn::Module& module);

}  // namespace mpitrain::checkpoint

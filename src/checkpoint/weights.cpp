#include "mpitrain/checkpoint/weights.h"

#include <ATen/core/ivalue.h>
#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/jit/serialization/import_read.h>

#include <filesystem>
#include <fstream>

#include "mpitrain/checkpoint/gpt2.h"
#include "mpitrain/checkpoint/safetensors.h"
#include "mpitrain/runtime/error.h"

namespace mpitrain::checkpoint {
namespace {

[[noreturn]] void bad(const std::string& path, const std::string& why) {
  throw runtime::Error("weights file '" + path + "': " + why, runtime::ExitCode::bad_input);
}

// A dict of name -> tensor; for a dict without tensors, the one under "model" or "state_dict".
std::map<std::string, at::Tensor> tensors_of(const c10::IValue& value, const std::string& path, int depth = 0) {
  if (!value.isGenericDict()) bad(path, std::string("holds a ") + value.tagKind() + ", not a dict of tensors (save model.state_dict())");
  std::map<std::string, at::Tensor> tensors;
  const auto dict = value.toGenericDict();
  for (const auto& item : dict) {
    if (!item.key().isString()) bad(path, "a key is not a string: save model.state_dict()");
    if (item.value().isTensor()) tensors.emplace(item.key().toStringRef(), item.value().toTensor());
  }
  if (!tensors.empty() || depth > 0) return tensors;
  for (const char* key : {"model", "state_dict"})
    if (dict.contains(key)) return tensors_of(dict.at(key), path, depth + 1);
  bad(path, "no tensors at its top level nor under \"model\" or \"state_dict\"");
}

}  // namespace

std::map<std::string, at::Tensor> read_weights(const std::string& path) {
  // A Hugging Face model directory (save_pretrained) holds its weights in model.safetensors.
  if (std::filesystem::is_directory(path)) {
    const std::string inside = (std::filesystem::path(path) / "model.safetensors").string();
    if (!std::filesystem::exists(inside)) bad(path, "is a directory without model.safetensors: name the weights file");
    return read_safetensors(inside);
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) bad(path, "cannot be opened: check the path (model.init_from)");
  char magic[4] = {};
  in.read(magic, 4);
  if (in.gcount() == 4 && magic[0] == 'P' && magic[1] == 'K' && magic[2] == 3 && magic[3] == 4) {
    return tensors_of(read_torch_save(path), path);
  }
  return read_safetensors(path);
}

c10::IValue read_torch_save(const std::string& path) {
  if (!std::ifstream(path, std::ios::binary)) bad(path, "cannot be opened: check the path");
  try {
    // Onto the CPU: left to itself (torch::pickle_load) the reader puts each tensor back on the
    // device it was saved from, cuda:0 for a GPU run, which fails on a host without a GPU and
    // fills GPU 0 from every rank on one with.
    caffe2::serialize::PyTorchStreamReader reader(path);
    return torch::jit::readArchiveAndTensors("data", "", "", std::nullopt, std::nullopt, c10::Device(c10::kCPU),
                                             reader);
  } catch (const c10::Error& e) {
    bad(path, std::string("is a zip file but not one torch.save wrote (") + e.what_without_backtrace() + ")");
  }
}

void load_weights(torch::nn::Module& module, const std::map<std::string, at::Tensor>& file_weights,
                  const std::string& source) {
  std::map<std::string, at::Tensor> targets = state_dict_of(module);
  // The built-in gpt also loads GPT-2 weights in Hugging Face's and nanoGPT's layouts.
  const bool gpt = targets.count("wte.weight") > 0 && targets.count("h.0.attn.c_attn.weight") > 0;
  const std::map<std::string, at::Tensor> weights = gpt ? to_mpitrain_names(file_weights, source) : file_weights;
  std::string problems;
  for (const auto& [name, target] : targets) {
    const auto it = weights.find(name);
    if (it == weights.end())
      problems += "\n  missing: " + name + " " + c10::str(target.sizes());
    else if (it->second.sizes() != target.sizes())
      problems += "\n  mis-shaped: " + name + " is " + c10::str(it->second.sizes()) + " in the file, " +
                  c10::str(target.sizes()) + " in the model";
  }
  for (const auto& [name, tensor] : weights)
    if (targets.count(name) == 0) problems += "\n  unexpected: " + name + " " + c10::str(tensor.sizes());
  if (!problems.empty() && gpt) {
    // Say it in the model's options first: one wrong size mis-shapes dozens of tensors.
    const nlohmann::json file = gpt_sizes(weights), model = gpt_sizes(targets);
    std::string sizes;
    for (const auto& [key, value] : model.items())
      if (file.contains(key) && file.at(key) != value)
        sizes += "\n  " + key + ": " + file.at(key).dump() + " in the file, " + value.dump() + " in the model (model.gpt." + key + ")";
    if (!sizes.empty()) problems = sizes + problems;
  }
  if (!problems.empty())
    throw runtime::Error(source + " does not fit the model (names as in its state dict):" + problems +
                             "\nCheck model.name and the model's options against the ones the file was saved with",
                         runtime::ExitCode::bad_input);
  at::NoGradGuard no_grad;
  for (auto& [name, target] : targets) target.copy_(weights.at(name));
}

std::map<std::string, at::Tensor> state_dict_of(const torch::nn::Module& module) {
  std::map<std::string, at::Tensor> tensors;
  for (const auto& item : module.named_parameters()) tensors.emplace(item.key(), item.value());
  for (const auto& item : module.named_buffers()) tensors.emplace(item.key(), item.value());
  return tensors;
}

}  // namespace mpitrain::checkpoint

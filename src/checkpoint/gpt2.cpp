#include "mpitrain/checkpoint/gpt2.h"

#include <ATen/ATen.h>
#include <ATen/core/Dict.h>
#include <ATen/core/ivalue.h>
#include <ATen/core/jit_type.h>
#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/jit/serialization/export.h>
#include <torch/csrc/jit/serialization/pickler.h>
#include <torch/serialize.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <regex>
#include <vector>

#include "mpitrain/checkpoint/safetensors.h"
#include "mpitrain/checkpoint/weights.h"
#include "mpitrain/runtime/error.h"

namespace mpitrain::checkpoint {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

[[noreturn]] void bad(const std::string& what) { throw runtime::Error(what, runtime::ExitCode::bad_input); }

bool starts_with(const std::string& text, const std::string& prefix) { return text.rfind(prefix, 0) == 0; }

// The projections that Hugging Face stores as Conv1D ([in, out]) and everyone else as Linear.
bool is_projection_weight(const std::string& name) {
  static const std::regex projection(R"(h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight)");
  return std::regex_match(name, projection);
}

// The causal-mask buffers older transformers versions and nanoGPT without flash attention save.
bool is_mask_buffer(const std::string& name) {
  static const std::regex mask(R"(h\.\d+\.attn\.(bias|masked_bias))");
  return std::regex_match(name, mask);
}

Tensors transpose_projections(const Tensors& weights) {
  Tensors out;
  for (const auto& [name, tensor] : weights)
    out.emplace(name, is_projection_weight(name) ? tensor.t().contiguous() : tensor);
  return out;
}

json read_json_file(const fs::path& path) {
  std::ifstream in(path);
  if (!in) bad("cannot open " + path.string());
  try {
    return json::parse(in);
  } catch (const json::exception& e) {
    bad(path.string() + " is not valid JSON: " + e.what());
  }
}

json json_of(const c10::IValue& value) {
  if (value.isBool()) return value.toBool();
  if (value.isInt()) return value.toInt();
  if (value.isDouble()) return value.toDouble();
  if (value.isString()) return value.toStringRef();
  if (value.isNone()) return nullptr;
  return "<" + std::string(value.tagKind()) + ">";
}

// torch::pickle_save() as torch.load(weights_only=True) reads it: pickle_save tags every dict
// with torch.jit._pickle.restore_type_tag, a global the weights-only unpickler refuses (and
// PyTorch >= 2.6 loads weights-only by default, as nanoGPT's sample.py does).
std::vector<char> pickle_for_python(const c10::IValue& value) {
  std::vector<char> pickled;
  torch::jit::Pickler pickler([&](const char* bytes, size_t size) { pickled.insert(pickled.end(), bytes, bytes + size); },
                              nullptr, nullptr, nullptr, nullptr, /*tag_aggregates=*/false);
  pickler.protocol();
  pickler.pushIValue(value);
  pickler.stop();
  std::vector<char> archive;
  {
    caffe2::serialize::PyTorchStreamWriter writer([&](const void* bytes, size_t size) {
      archive.insert(archive.end(), static_cast<const char*>(bytes), static_cast<const char*>(bytes) + size);
      return size;
    });
    torch::jit::writeArchiveAndTensors("data", pickled.data(), pickled.size(), pickler.tensorData(), writer);
    writer.writeEndOfFile();
  }
  return archive;
}

bool is_zip(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  char magic[4] = {};
  in.read(magic, 4);
  return in.gcount() == 4 && magic[0] == 'P' && magic[1] == 'K' && magic[2] == 3 && magic[3] == 4;
}

}  // namespace

Tensors to_mpitrain_names(Tensors weights, const std::string& source) {
  bool foreign = false;
  Tensors renamed;
  for (auto& [key, tensor] : weights) {
    std::string name = key;
    for (const char* prefix : {"_orig_mod.", "transformer."})
      if (starts_with(name, prefix)) name = name.substr(std::string(prefix).size()), foreign = true;
    if (is_mask_buffer(name)) continue;
    renamed[name] = tensor;
  }
  if (const auto head = renamed.find("lm_head.weight"); head != renamed.end()) {
    const auto wte = renamed.find("wte.weight");
    if (wte == renamed.end() || !wte->second.sizes().equals(head->second.sizes()) ||
        !at::equal(wte->second.to(head->second.scalar_type()), head->second))
      bad(source + ": lm_head.weight is not tied to transformer.wte.weight (they differ); the built-in gpt's "
                   "output head is its token embedding, so an untied head cannot be loaded");
    renamed.erase(head);
    foreign = true;
  }
  const auto c_attn = renamed.find("h.0.attn.c_attn.weight");
  const bool conv1d = c_attn != renamed.end() && c_attn->second.dim() == 2 &&
                      c_attn->second.size(1) == 3 * c_attn->second.size(0);
  if (!foreign && !conv1d) return weights;
  return conv1d ? transpose_projections(renamed) : renamed;
}

Tensors from_mpitrain_names(const Tensors& weights, Gpt2Layout layout) {
  Tensors out;
  const std::string prefix = "transformer.";
  for (const auto& [name, tensor] : weights) out[prefix + name] = tensor;
  if (layout == Gpt2Layout::nanogpt) {
    out["lm_head.weight"] = weights.at("wte.weight");
    return out;
  }
  // GPT2LMHeadModel always has biases; zeros compute what a bias-free model computes.
  for (const auto& [name, tensor] : weights) {
    static const std::regex with_bias(R"((h\.\d+\.(ln_1|ln_2|attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)|ln_f)\.weight)");
    if (!std::regex_match(name, with_bias)) continue;
    const std::string bias = name.substr(0, name.size() - std::string("weight").size()) + "bias";
    if (weights.count(bias) == 0) out[prefix + bias] = at::zeros({tensor.size(0)}, tensor.options());
  }
  Tensors hf;
  for (const auto& [name, tensor] : out)
    hf.emplace(name, is_projection_weight(name.substr(prefix.size())) ? tensor.t().contiguous() : tensor);
  return hf;
}

json gpt_sizes(const Tensors& w) {
  json sizes = json::object();
  const auto wte = w.find("wte.weight");
  if (wte != w.end() && wte->second.dim() == 2) {
    sizes["vocab_size"] = wte->second.size(0);
    sizes["n_embd"] = wte->second.size(1);
  }
  const auto wpe = w.find("wpe.weight");
  if (wpe != w.end() && wpe->second.dim() == 2) sizes["seq_len"] = wpe->second.size(0);
  std::int64_t layers = 0;
  while (w.count("h." + std::to_string(layers) + ".attn.c_attn.weight")) ++layers;
  sizes["n_layer"] = layers;
  sizes["bias"] = w.count("ln_f.bias") > 0;
  return sizes;
}

json hf_config(const json& o) {
  return {{"architectures", {"GPT2LMHeadModel"}},
          {"model_type", "gpt2"},
          {"vocab_size", o.at("vocab_size")},
          {"n_positions", o.at("seq_len")},
          {"n_embd", o.at("n_embd")},
          {"n_layer", o.at("n_layer")},
          {"n_head", o.at("n_head")},
          {"n_inner", nullptr},
          {"activation_function", o.value("activation", "gelu") == "gelu_tanh" ? "gelu_new" : "gelu"},
          {"layer_norm_epsilon", 1e-5},
          {"resid_pdrop", o.at("dropout")},
          {"embd_pdrop", o.at("dropout")},
          {"attn_pdrop", o.at("dropout")},
          {"scale_attn_weights", true},
          {"scale_attn_by_inverse_layer_idx", false},
          {"reorder_and_upcast_attn", false},
          {"tie_word_embeddings", true},
          {"bos_token_id", nullptr},
          {"eos_token_id", nullptr},
          {"dtype", "float32"}};
}

json gpt_options_from_hf(const json& c, const std::string& source) {
  std::string problems;
  const auto differs = [&](const char* key, const json& expected, const std::string& why) {
    if (c.contains(key) && !c.at(key).is_null() && c.at(key) != expected)
      problems += "\n  " + std::string(key) + " is " + c.at(key).dump() + ": " + why;
  };
  if (c.value("model_type", "") != "gpt2")
    problems += "\n  model_type is " + c.value("model_type", json("missing")).dump() + ", not \"gpt2\"";
  const std::string activation = c.value("activation_function", "gelu_new");
  const bool tanh = activation == "gelu_new" || activation == "gelu_pytorch_tanh" || activation == "gelu_fast";
  if (!tanh && activation != "gelu")
    problems += "\n  activation_function is \"" + activation + "\": the built-in gpt computes gelu or gelu_new";
  const std::int64_t n_embd = c.value("n_embd", 768);
  differs("n_inner", 4 * n_embd, "the built-in gpt's MLP is 4 x n_embd wide");
  if (c.contains("layer_norm_epsilon") && std::abs(c.at("layer_norm_epsilon").get<double>() - 1e-5) > 1e-12)
    problems += "\n  layer_norm_epsilon is " + c.at("layer_norm_epsilon").dump() + ": the built-in gpt uses 1e-5";
  differs("scale_attn_weights", true, "the built-in gpt scales attention by 1/sqrt(head size)");
  differs("scale_attn_by_inverse_layer_idx", false, "the built-in gpt does not scale attention per layer");
  differs("tie_word_embeddings", true, "the built-in gpt's output head is its token embedding");
  differs("add_cross_attention", false, "the built-in gpt has no cross-attention");
  if (!problems.empty()) bad(source + " describes a model the built-in gpt cannot compute:" + problems);
  const double dropout = c.value("resid_pdrop", 0.0);
  return {{"vocab_size", c.value("vocab_size", 50257)},
          {"seq_len", c.value("n_positions", 1024)},
          {"n_layer", c.value("n_layer", 12)},
          {"n_head", c.value("n_head", 12)},
          {"n_embd", n_embd},
          {"dropout", dropout},
          {"bias", true},
          {"activation", tanh ? "gelu_tanh" : "gelu"}};
}

json nanogpt_args(const json& o) {
  if (o.value("activation", "gelu") != "gelu")
    bad("nanoGPT's GPT computes exact GELU; this model uses model.gpt.activation \"" +
        o.value("activation", "gelu") + "\", which nanoGPT cannot compute (export it as Hugging Face instead)");
  return {{"n_layer", o.at("n_layer")},       {"n_head", o.at("n_head")}, {"n_embd", o.at("n_embd")},
          {"block_size", o.at("seq_len")},    {"bias", o.at("bias")},     {"vocab_size", o.at("vocab_size")},
          {"dropout", o.at("dropout")}};
}

json gpt_options_from_nanogpt(const json& a, const std::string& source) {
  std::string missing;
  for (const char* key : {"n_layer", "n_head", "n_embd", "block_size", "vocab_size"})
    if (!a.contains(key) || !a.at(key).is_number_integer()) missing += std::string(missing.empty() ? "" : ", ") + key;
  if (!missing.empty()) bad(source + ": model_args lacks integer " + missing + " (a nanoGPT ckpt.pt has them)");
  return {{"vocab_size", a.at("vocab_size")},
          {"seq_len", a.at("block_size")},
          {"n_layer", a.at("n_layer")},
          {"n_head", a.at("n_head")},
          {"n_embd", a.at("n_embd")},
          {"dropout", a.value("dropout", 0.0)},
          {"bias", a.value("bias", true)},
          {"activation", "gelu"}};
}

Pretrained read_pretrained(const std::string& path) {
  const fs::path p(path);
  if (!fs::exists(p)) bad("'" + path + "' does not exist: name a checkpoint directory, a Hugging Face model "
                      "directory or model.safetensors, or a nanoGPT ckpt.pt");
  Pretrained model;
  if (fs::is_directory(p) && fs::exists(p / "trainer.json")) {
    const json state = read_json_file(p / "trainer.json");
    const json& config = state.at("config").at("model");
    model.model = config.at("name").get<std::string>();
    model.options = config.value(model.model, json::object());
    model.weights = read_safetensors((p / "model.safetensors").string());
    model.step = state.value("step", std::int64_t{0});
    model.format = "mpitrain";
    return model;
  }
  const fs::path hf_dir = fs::is_directory(p) ? p : p.parent_path();
  const fs::path weights_file = fs::is_directory(p) ? p / "model.safetensors" : p;
  if (fs::exists(hf_dir / "config.json") && !is_zip(weights_file.string())) {
    model.model = "gpt";
    model.options = gpt_options_from_hf(read_json_file(hf_dir / "config.json"), (hf_dir / "config.json").string());
    model.weights = to_mpitrain_names(read_safetensors(weights_file.string()), weights_file.string());
    model.format = "huggingface";
    return model;
  }
  if (fs::is_regular_file(p) && is_zip(path)) {
    const c10::IValue value = read_torch_save(path);
    if (value.isGenericDict() && value.toGenericDict().contains("model_args") &&
        value.toGenericDict().contains("model")) {
      const auto dict = value.toGenericDict();
      json args = json::object();
      for (const auto& item : dict.at("model_args").toGenericDict())
        if (item.key().isString()) args[item.key().toStringRef()] = json_of(item.value());
      model.model = "gpt";
      model.options = gpt_options_from_nanogpt(args, path);
      model.weights = to_mpitrain_names(read_weights(path), path);
      if (dict.contains("iter_num") && dict.at("iter_num").isInt()) model.step = dict.at("iter_num").toInt();
      model.format = "nanogpt";
      return model;
    }
  }
  bad("'" + path + "': cannot tell which model it holds. Name an mpitrain checkpoint directory (with trainer.json), "
      "a Hugging Face model directory or model.safetensors (with config.json beside it), or a nanoGPT ckpt.pt "
      "(with model_args)");
}

void write_huggingface(const std::string& dir, const Tensors& weights, const json& gpt_options) {
  const json config = hf_config(gpt_options);
  fs::create_directories(dir);
  write_safetensors((fs::path(dir) / "model.safetensors").string(),
                    from_mpitrain_names(weights, Gpt2Layout::huggingface));
  std::ofstream out(fs::path(dir) / "config.json");
  out << config.dump(2) << '\n';
  out.close();
  if (!out) throw runtime::Error("cannot write " + (fs::path(dir) / "config.json").string() + ": check free space and permissions");
}

void write_nanogpt(const std::string& path, const Tensors& weights, const json& gpt_options, std::int64_t step) {
  const json args = nanogpt_args(gpt_options);
  c10::Dict<std::string, at::Tensor> model;
  for (const auto& [name, tensor] : from_mpitrain_names(weights, Gpt2Layout::nanogpt))
    model.insert(name, tensor.detach().to(at::kCPU).contiguous());
  c10::impl::GenericDict model_args(c10::StringType::get(), c10::AnyType::get());
  for (const auto& [key, value] : args.items()) {
    if (value.is_boolean()) model_args.insert(key, value.get<bool>());
    else if (value.is_number_integer()) model_args.insert(key, value.get<std::int64_t>());
    else model_args.insert(key, value.get<double>());
  }
  c10::impl::GenericDict checkpoint(c10::StringType::get(), c10::AnyType::get());
  checkpoint.insert("model", model);
  checkpoint.insert("model_args", model_args);
  checkpoint.insert("iter_num", step);
  const std::vector<char> bytes = pickle_for_python(checkpoint);
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  out.close();
  if (!out) throw runtime::Error("cannot write " + path + ": check free space and permissions");
}

}  // namespace mpitrain::checkpoint

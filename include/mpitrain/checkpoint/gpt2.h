#pragma once
// GPT-2 weights as other tools write and read them, mapped to and from the built-in gpt model.
//
// Layouts (the names after an optional "_orig_mod." (torch.compile) and "transformer." prefix):
//   mpitrain     wte.weight, wpe.weight, h.N.{ln_1,attn.c_attn,attn.c_proj,ln_2,mlp.c_fc,mlp.c_proj}.*,
//                ln_f.*; linear weights [out, in]; the output head is wte (no separate tensor).
//   Hugging Face GPT2LMHeadModel (model.safetensors of save_pretrained): "transformer." + the same
//                names; the four projections are Conv1D, weights stored [in, out]; lm_head.weight
//                tied to wte (often left out of the file); older files hold attn.bias /
//                attn.masked_bias (the causal mask, not a parameter).
//   nanoGPT      (torch.save({"model": state_dict, "model_args": {...}}) of its train.py):
//                "transformer." + the same names, Linear weights [out, in], lm_head.weight.
//
// Contract:
// - to_mpitrain_names() returns `weights` in mpitrain's layout: a file in either other layout
//   is recognised by its "transformer."/"lm_head." names or by c_attn.weight being [C, 3C]
//   (Conv1D; never square, so it tells the layouts apart); mask buffers are dropped; a
//   lm_head.weight that differs from wte is bad_input (an untied head has no place in the
//   model). Weights already in mpitrain's layout come back unchanged.
// - from_mpitrain_names() writes the other layouts: for Hugging Face also with zero biases when
//   the model has none (bias: false; a zero bias adds nothing), for nanoGPT with lm_head.weight.
// - gpt_sizes() describes a gpt state dict in GPT-2 terms (vocab_size, seq_len, n_embd, n_layer,
//   bias) for messages that say what differs between a file and a model.
// - Configs: hf_config() is the config.json of GPT2LMHeadModel for model.gpt options;
//   gpt_options_from_hf() is the reverse, refusing (bad_input, each reason listed) settings the
//   built-in gpt cannot compute (another activation, layer-norm epsilon, inner width, attention
//   scaling, untied head). nanogpt_args()/gpt_options_from_nanogpt() do the same for nanoGPT's
//   model_args (nanoGPT's GELU is exact, so a gelu_tanh model cannot be written for it).
// - read_pretrained() reads a model to generate from or convert, with the options to build it:
//     a checkpoint directory of mpitrain (trainer.json + model.safetensors),
//     a Hugging Face directory (config.json + model.safetensors) or its model.safetensors,
//     a nanoGPT ckpt.pt (model_args + model).
//   Anything else is bad_input saying what each of these needs.
// - write_huggingface() writes config.json and model.safetensors into a directory that
//   transformers' from_pretrained loads; write_nanogpt() writes a ckpt.pt that nanoGPT's
//   sample.py loads (model, model_args, iter_num).

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <string>

#include <nlohmann/json.hpp>

namespace mpitrain::checkpoint {

using Tensors = std::map<std::string, at::Tensor>;

enum class Gpt2Layout { huggingface, nanogpt };

Tensors to_mpitrain_names(Tensors weights, const std::string& source);
Tensors from_mpitrain_names(const Tensors& weights, Gpt2Layout layout);

nlohmann::json gpt_sizes(const Tensors& mpitrain_weights);

nlohmann::json hf_config(const nlohmann::json& gpt_options);
nlohmann::json gpt_options_from_hf(const nlohmann::json& config, const std::string& source);
nlohmann::json nanogpt_args(const nlohmann::json& gpt_options);
nlohmann::json gpt_options_from_nanogpt(const nlohmann::json& model_args, const std::string& source);

struct Pretrained {
  std::string model;        // model.name, e.g. "gpt"
  nlohmann::json options;   // model.<name> options
  Tensors weights;          // mpitrain's names
  std::int64_t step = 0;    // the training step it was saved at, where the file says
  std::string format;       // "mpitrain", "huggingface" or "nanogpt"
};

Pretrained read_pretrained(const std::string& path);

void write_huggingface(const std::string& dir, const Tensors& weights, const nlohmann::json& gpt_options);
void write_nanogpt(const std::string& path, const Tensors& weights, const nlohmann::json& gpt_options,
                   std::int64_t step);

}  // namespace mpitrain::checkpoint

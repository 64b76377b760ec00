// gpt2_probe MODEL TOKENS OUT: the logits of the model generate would load (a checkpoint
// directory, a Hugging Face GPT-2 directory or a nanoGPT ckpt.pt) on the token ids [N, T] stored
// as "tokens" in the safetensors file TOKENS, written as "logits" to OUT, for gpt2_formats.sh to
// compare with transformers'. Float32 on the CPU.
#include <ATen/ATen.h>

#include <iostream>

#include "mpitrain/checkpoint/gpt2.h"
#include "mpitrain/checkpoint/safetensors.h"
#include "mpitrain/checkpoint/weights.h"
#include "mpitrain/models/registry.h"
#include "mpitrain/runtime/error.h"

using namespace mpitrain;

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: gpt2_probe MODEL TOKENS OUT\n";
    return 2;
  }
  try {
    const checkpoint::Pretrained pretrained = checkpoint::read_pretrained(argv[1]);
    const auto model = models::create(pretrained.model, pretrained.options);
    checkpoint::load_weights(*model, pretrained.weights, argv[1]);
    model->eval();
    at::NoGradGuard no_grad;
    const at::Tensor tokens = checkpoint::read_safetensors(argv[2]).at("tokens");
    checkpoint::write_safetensors(argv[3], {{"logits", model->forward(tokens)}});
    std::cout << "gpt2_probe: " << pretrained.format << " model " << argv[1] << " -> " << argv[3] << '\n';
  } catch (const runtime::Error& e) {
    std::cerr << "gpt2_probe: " << e.what() << '\n';
    return runtime::to_int(e.code());
  }
  return 0;
}

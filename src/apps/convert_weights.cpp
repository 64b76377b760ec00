// convert_weights: writes a GPT model's weights in the layout another tool loads
// (docs/checkpoints.md).
//
//   convert_weights runs/gpt/checkpoints/step-00001000 --to huggingface --out hf-model/
//   convert_weights runs/gpt/checkpoints/step-00001000 --to nanogpt --out out/ckpt.pt
//
// The input is what generate reads: an mpitrain checkpoint directory, a Hugging Face GPT-2
// directory (or its model.safetensors) or a nanoGPT ckpt.pt, of the built-in gpt model.
// huggingface: a directory with config.json and model.safetensors for
// GPT2LMHeadModel.from_pretrained; nanogpt: a ckpt.pt for nanoGPT's sample.py.
// Exit codes: 0 done, 2 bad input (one line on stderr saying what), 1 anything else.
#include <CLI/CLI.hpp>

#include <iostream>

#include "mpitrain/apps/cli.h"
#include "mpitrain/checkpoint/gpt2.h"
#include "mpitrain/checkpoint/weights.h"
#include "mpitrain/config/schema.h"
#include "mpitrain/models/registry.h"
#include "mpitrain/runtime/error.h"

using namespace mpitrain;

int main(int argc, char** argv) {
  CLI::App app{"convert_weights: a GPT model's weights in Hugging Face's or nanoGPT's layout"};
  std::string input, layout, out;
  app.add_option("model", input,
                 "a checkpoint directory, a Hugging Face model directory or model.safetensors, or a nanoGPT ckpt.pt")
      ->required();
  app.add_option("--to", layout, "huggingface (config.json + model.safetensors) or nanogpt (ckpt.pt)")
      ->required()
      ->check(CLI::IsMember({"huggingface", "nanogpt"}));
  app.add_option("--out", out, "huggingface: the directory to write; nanogpt: the ckpt.pt file")->required();
  return apps::run_tool("convert_weights", app, argc, argv, [&] {
    const checkpoint::Pretrained model = checkpoint::read_pretrained(input);
    if (model.model != "gpt")
      throw runtime::Error(input + " holds model \"" + model.model + "\"; only the built-in gpt has a GPT-2 layout",
                           runtime::ExitCode::bad_input);
    // Resolve the options (defaults of keys the file does not name) and prove the weights fit.
    const auto built = models::create(model.model, model.options);
    checkpoint::load_weights(*built, model.weights, input);
    const nlohmann::json options = config::resolve(models::option_schemas().at("gpt"), model.options, input, "model.gpt");
    if (layout == "huggingface") checkpoint::write_huggingface(out, checkpoint::state_dict_of(*built), options);
    else checkpoint::write_nanogpt(out, checkpoint::state_dict_of(*built), options, model.step);
    std::cout << "wrote " << out << " (" << layout << ", from the " << model.format << " model " << input << ")\n";
    return 0;
  });
}

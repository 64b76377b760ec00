// generate: samples text from a trained language model (docs/models.md).
//
//   generate runs/charlm_gpt/checkpoints/step-00000300 --prompt "The " --tokens 200 --top-k 20
//   generate hf-gpt2/ --prompt-ids 464,2068 --temperature 0.8 --seed 3 --device cuda
//
// The model: an mpitrain checkpoint directory, a Hugging Face GPT-2 directory (or its
// model.safetensors) or a nanoGPT ckpt.pt. Text in and out through the character- or byte-level
// vocabulary of a shard manifest (--vocab; for a checkpoint, data.train.manifest of its config
// when that file is there); token ids otherwise. A KV cache makes each new token cost one
// position's work; when the context is full the cache restarts from the last half of it.
// Exit codes: 0 done, 2 bad input (one line on stderr saying what), 1 anything else.
#include <CLI/CLI.hpp>
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <limits>
#include <sstream>

#include "mpitrain/apps/cli.h"
#include "mpitrain/checkpoint/gpt2.h"
#include "mpitrain/checkpoint/weights.h"
#include "mpitrain/data/spec.h"
#include "mpitrain/models/decoder.h"
#include "mpitrain/models/registry.h"
#include "mpitrain/runtime/error.h"

using namespace mpitrain;

namespace {

struct Options {
  std::string model;
  std::string prompt;
  std::vector<std::int64_t> prompt_ids;
  std::string vocab;
  std::int64_t tokens = 200;
  std::int64_t samples = 1;
  double temperature = 1.0;
  std::int64_t top_k = 0;
  std::uint64_t seed = 0;
  std::string device = "cpu";
  bool no_cache = false;
};

[[noreturn]] void bad(const std::string& what) { throw runtime::Error(what, runtime::ExitCode::bad_input); }

// Token id <-> text. Empty symbols: token ids are printed as numbers.
struct Vocabulary {
  std::string tokenizer;             // "char", "byte" or "" (ids)
  std::vector<std::string> symbols;  // char level: token id -> one UTF-8 character

  std::vector<std::int64_t> encode(const std::string& text) const {
    std::vector<std::int64_t> ids;
    if (tokenizer == "byte") {
      for (const unsigned char c : text) ids.push_back(c);
      return ids;
    }
    for (std::size_t i = 0; i < text.size();) {
      std::size_t next = i + 1;
      while (next < text.size() && (static_cast<unsigned char>(text[next]) & 0xC0) == 0x80) ++next;
      const std::string character = text.substr(i, next - i);
      const auto found = std::find(symbols.begin(), symbols.end(), character);
      if (found == symbols.end()) bad("--prompt: the character '" + character + "' is not in the vocabulary");
      ids.push_back(found - symbols.begin());
      i = next;
    }
    return ids;
  }

  std::string decode(const std::vector<std::int64_t>& ids) const {
    std::string text;
    for (const std::int64_t id : ids) {
      if (tokenizer == "byte") text += static_cast<char>(id);
      else if (tokenizer == "char") text += id < static_cast<std::int64_t>(symbols.size()) ? symbols[id] : "\xEF\xBF\xBD";
      else text += (text.empty() ? "" : " ") + std::to_string(id);
    }
    return text;
  }
};

Vocabulary read_vocabulary(const std::string& manifest) {
  const nlohmann::json metadata = data::read_manifest(manifest).metadata;
  Vocabulary vocabulary;
  vocabulary.tokenizer = metadata.value("tokenizer", "");
  if (vocabulary.tokenizer == "char") {
    const std::string all = metadata.value("vocab", "");
    for (std::size_t i = 0; i < all.size();) {
      std::size_t next = i + 1;
      while (next < all.size() && (static_cast<unsigned char>(all[next]) & 0xC0) == 0x80) ++next;
      vocabulary.symbols.push_back(all.substr(i, next - i));
      i = next;
    }
  } else if (vocabulary.tokenizer != "byte") {
    vocabulary.tokenizer.clear();  // GPT-2 BPE and others: ids in, ids out
  }
  return vocabulary;
}

// The checkpoint's own training data names its vocabulary.
std::string default_vocabulary(const std::string& model) {
  const std::filesystem::path trainer = std::filesystem::path(model) / "trainer.json";
  if (!std::filesystem::exists(trainer)) return "";
  std::ifstream in(trainer);
  const auto state = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (state.is_discarded()) return "";
  const std::string manifest = state.value(nlohmann::json::json_pointer("/config/data/train/manifest"), std::string());
  return std::filesystem::exists(manifest) ? manifest : "";
}

// Next token per row of last-position logits [N, vocab]: argmax at temperature 0, else a draw
// from softmax(logits / temperature) over the top k (all when k = 0). Drawn on the CPU, so a
// seed gives the same text on any device.
at::Tensor next_tokens(const at::Tensor& logits, const Options& o, at::Generator& generator) {
  at::Tensor scores = logits.to(at::kCPU, at::kFloat);
  if (o.temperature == 0) return scores.argmax(-1);
  scores = scores / o.temperature;
  if (o.top_k > 0 && o.top_k < scores.size(-1)) {
    const at::Tensor kth = std::get<0>(scores.topk(o.top_k, -1)).narrow(-1, o.top_k - 1, 1);
    scores = scores.masked_fill(scores < kth, -std::numeric_limits<float>::infinity());
  }
  return at::multinomial(scores.softmax(-1), 1, /*replacement=*/false, generator).squeeze(-1);
}

int run(const Options& o) {
  const checkpoint::Pretrained pretrained = checkpoint::read_pretrained(o.model);
  const std::shared_ptr<models::Model> model = models::create(pretrained.model, pretrained.options);
  if (model->task() != models::Task::language_modeling) bad(o.model + ": model " + pretrained.model + " is not a language model");
  checkpoint::load_weights(*model, pretrained.weights, o.model);
  const c10::Device device(o.device);
  model->to(device);
  model->eval();
  auto* decoder = dynamic_cast<models::Decoder*>(model.get());
  if (decoder == nullptr && !o.no_cache) bad("model " + pretrained.model + " has no KV cache: add --no-cache");

  const std::string vocab_file = o.vocab.empty() ? default_vocabulary(o.model) : o.vocab;
  const Vocabulary vocabulary = vocab_file.empty() ? Vocabulary{} : read_vocabulary(vocab_file);
  std::vector<std::int64_t> prompt = o.prompt_ids;
  if (!o.prompt.empty()) {
    if (vocabulary.tokenizer.empty()) bad("--prompt needs a char or byte vocabulary (--vocab MANIFEST); give --prompt-ids instead");
    prompt = vocabulary.encode(o.prompt);
  }
  if (prompt.empty()) {
    // Start where documents start: after a newline, when the vocabulary has one.
    const auto newline = std::find(vocabulary.symbols.begin(), vocabulary.symbols.end(), "\n");
    prompt.push_back(vocabulary.tokenizer == "byte"         ? '\n'
                     : newline != vocabulary.symbols.end() ? newline - vocabulary.symbols.begin()
                                                             : 0);
  }
  const std::int64_t vocab_size = model->output_classes();
  for (const std::int64_t id : prompt)
    if (id < 0 || id >= vocab_size) bad("prompt token " + std::to_string(id) + " is outside the vocabulary [0, " + std::to_string(vocab_size) + ")");

  const std::int64_t window = model->context_length();
  at::Tensor sequence = at::tensor(prompt, at::kLong).unsqueeze(0).repeat({o.samples, 1}).to(device);
  at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(o.seed);
  at::NoGradGuard no_grad;
  const auto start = std::chrono::steady_clock::now();
  models::KvCache cache;
  at::Tensor logits;
  // The cached path feeds only what the cache has not seen; a full cache restarts from the
  // last half of the context (so that it fills again only every window/2 tokens).
  const auto prefill = [&](std::int64_t keep) {
    cache = decoder->new_cache(o.samples);
    logits = decoder->decode(sequence.narrow(1, sequence.size(1) - keep, keep), cache);
  };
  if (!o.no_cache) prefill(std::min(sequence.size(1), window));
  for (std::int64_t i = 0; i < o.tokens; ++i) {
    if (o.no_cache) {
      const std::int64_t keep = std::min(sequence.size(1), window);
      logits = model->forward(sequence.narrow(1, sequence.size(1) - keep, keep));
    }
    const at::Tensor next = next_tokens(logits.select(1, logits.size(1) - 1), o, generator).to(device);
    sequence = at::cat({sequence, next.unsqueeze(1)}, 1);
    if (o.no_cache || i + 1 == o.tokens) continue;
    if (cache.length == cache.room()) prefill(std::max<std::int64_t>(window / 2, 1));
    else logits = decoder->decode(next.unsqueeze(1), cache);
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

  const at::Tensor out = sequence.to(at::kCPU);
  for (std::int64_t s = 0; s < o.samples; ++s) {
    if (s > 0) std::cout << "\n---\n";
    const at::Tensor row = out[s];
    std::cout << vocabulary.decode(std::vector<std::int64_t>(row.data_ptr<std::int64_t>(), row.data_ptr<std::int64_t>() + row.numel()));
  }
  std::cout << std::endl;
  std::cerr << "generate: " << o.samples * o.tokens << " tokens in " << std::fixed << std::setprecision(3) << seconds << " s ("
            << std::setprecision(1) << static_cast<double>(o.samples * o.tokens) / seconds << " tokens/s) on " << device
            << (o.no_cache ? " without" : " with") << " KV cache; " << pretrained.format << " model, "
            << models::count_parameters(*model) << " parameters\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"generate: sample text from a language model (mpitrain checkpoint, Hugging Face GPT-2 or nanoGPT)"};
  Options o;
  app.add_option("model", o.model,
                 "a checkpoint directory, a Hugging Face model directory or model.safetensors, or a nanoGPT ckpt.pt")
      ->required();
  auto* text = app.add_option("--prompt", o.prompt, "text to continue (needs a char or byte vocabulary)");
  app.add_option("--prompt-ids", o.prompt_ids, "token ids to continue, e.g. 464,2068")->delimiter(',')->excludes(text);
  app.add_option("--vocab", o.vocab,
                 "shard manifest whose char/byte vocabulary maps text to ids (default: the checkpoint's "
                 "data.train.manifest)");
  app.add_option("--tokens", o.tokens, "tokens to generate per sample")->check(CLI::NonNegativeNumber)->capture_default_str();
  app.add_option("--samples", o.samples, "samples, generated as one batch")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--temperature", o.temperature, "softmax temperature; 0 = greedy (argmax)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--top-k", o.top_k, "draw from the k most likely tokens only (0 = all)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--seed", o.seed, "seed of the draws")->capture_default_str();
  app.add_option("--device", o.device, "cpu, cuda or cuda:N")->capture_default_str();
  app.add_flag("--no-cache", o.no_cache, "recompute the whole context for every token (slow; for comparison)");
  return apps::run_tool("generate", app, argc, argv, [&] { return run(o); });
}

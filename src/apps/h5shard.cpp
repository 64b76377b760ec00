// h5shard: makes HDF5 dataset shards from local data and inspects them (docs/data.md).
//
//   h5shard idx --images train-images-idx3-ubyte.gz --labels train-labels-idx1-ubyte.gz --out data/fmnist
//   h5shard text /usr/share/games/fortunes/fortunes --separator % --level char --out data/fortunes
//   h5shard csv table.csv --label species --out data/table
//   h5shard tokens fineweb_train_*.bin --vocab-size 50257 --out data/fineweb
//   h5shard inspect data/fmnist/train.json
//   h5shard verify data/fmnist/train.json
//   h5shard plan data/fmnist/train.json --ranks 4 --batch 256
//
// Exit codes: 0 done, 2 bad input (one line on stderr saying what and where); nothing is left
// half-written.
#include <CLI/CLI.hpp>
#include <ATen/ATen.h>

#include <chrono>
#include <cstring>
#include <cstdio>
#include <iomanip>
#include <iostream>
#include <sstream>

#include "mpitrain/apps/cli.h"
#include "mpitrain/comm/communicator.h"
#include "mpitrain/data/shards.h"
#include "mpitrain/data/sources.h"
#include "mpitrain/data/spec.h"
#include "mpitrain/data/token_files.h"
#include "mpitrain/runtime/error.h"

using namespace mpitrain;

namespace {

struct Output {
  std::string out;
  std::string name = "train";
  std::string val_name = "val";
  double val = 0.0;
  std::uint64_t seed = 0;
  data::ShardOptions shards;
};

void add_output_options(CLI::App& command, Output& o) {
  command.add_option("--out", o.out, "output folder (created if missing)")->required();
  command.add_option("--name", o.name, "name of the training set: <out>/<name>.json and <name>-NNNNN-of-MMMMM.h5")
      ->capture_default_str();
  command.add_option("--val", o.val, "fraction of rows (documents for text) held out as the validation set")
      ->check(CLI::Range(0.0, 0.99))
      ->capture_default_str();
  command.add_option("--val-name", o.val_name, "name of the validation set")->capture_default_str();
  command.add_option("--seed", o.seed, "seed of the train/validation split")->capture_default_str();
  command.add_option("--shards", o.shards.shards, "number of shards (0: from --shard-size)")->capture_default_str();
  command.add_option("--shard-size", o.shards.shard_bytes, "target shard size, e.g. 256M")
      ->transform(CLI::AsSizeValue(false))
      ->capture_default_str();
  command.add_option("--chunk-size", o.shards.chunk_bytes, "target HDF5 chunk size, e.g. 1M")
      ->transform(CLI::AsSizeValue(false))
      ->capture_default_str();
  command.add_option("--gzip", o.shards.gzip, "gzip level, 0 for none (shuffle filter added for multi-byte types)")
      ->check(CLI::Range(0, 9))
      ->capture_default_str();
}

at::Tensor take(const at::Tensor& t, const std::vector<std::int64_t>& rows) {
  return t.index_select(0, at::tensor(rows, at::kLong));
}

void report(const data::ShardSet& set) {
  std::cout << "wrote " << set.manifest << ": " << set.files.size() << " shard(s), " << set.rows << " rows\n";
}

// Writes the training set and, with --val, the validation set, rows chosen by a seeded split.
void write_table(const data::Table& table, const Output& o) {
  const auto [train, validation] = data::split_rows(table.inputs.size(0), o.val, o.seed);
  if (!validation.empty() && o.val_name == o.name)
    throw runtime::Error("--name and --val-name are both '" + o.name + "'", runtime::ExitCode::bad_input);
  nlohmann::json metadata = table.metadata;
  metadata["split"] = {{"validation", o.val}, {"seed", o.seed}};
  report(data::write_shards(o.out, o.name, {{"inputs", take(table.inputs, train)}, {"targets", take(table.targets, train)}},
                            o.shards, metadata));
  if (!validation.empty())
    report(data::write_shards(o.out, o.val_name,
                              {{"inputs", take(table.inputs, validation)}, {"targets", take(table.targets, validation)}},
                              o.shards, metadata));
}

void write_text(const std::vector<std::string>& files, const std::string& separator, const std::string& level,
                const Output& o) {
  const std::vector<data::Document> documents = data::read_documents(files, separator);
  // One vocabulary for both parts, so token ids mean the same in each.
  const data::Vocabulary vocabulary = data::make_vocabulary(documents, data::parse_token_level(level));
  const auto [train, validation] = data::split_rows(static_cast<std::int64_t>(documents.size()), o.val, o.seed);
  if (!validation.empty() && o.val_name == o.name)
    throw runtime::Error("--name and --val-name are both '" + o.name + "'", runtime::ExitCode::bad_input);
  if (train.empty())
    throw runtime::Error("only " + std::to_string(documents.size()) + " document(s): nothing left for training after --val",
                         runtime::ExitCode::bad_input);
  nlohmann::json metadata = data::describe(vocabulary);
  metadata["source"] = "text";
  metadata["files"] = files;
  metadata["split"] = {{"validation", o.val}, {"seed", o.seed}, {"unit", separator.empty() ? "file" : "document"}};
  const auto part = [&](const std::vector<std::int64_t>& rows) {
    std::vector<data::Document> selected;
    for (const std::int64_t r : rows) selected.push_back(documents[static_cast<std::size_t>(r)]);
    return data::encode(selected, vocabulary);
  };
  report(data::write_shards(o.out, o.name, {{"tokens", part(train)}}, o.shards, metadata));
  if (!validation.empty()) report(data::write_shards(o.out, o.val_name, {{"tokens", part(validation)}}, o.shards, metadata));
}

// Token files of llm.c, nanoGPT or numpy, concatenated in the order given, into one stream.
void write_tokens(const std::vector<std::string>& files, const std::string& format, std::int64_t vocab_size,
                  const std::string& tokenizer, const Output& o) {
  if (o.val > 0)
    throw runtime::Error("--val splits documents, which token files do not mark: convert the validation file "
                         "separately (--name val)",
                         runtime::ExitCode::bad_input);
  std::vector<at::Tensor> parts;
  nlohmann::json sources = nlohmann::json::array();
  std::int64_t total = 0;
  bool narrow = true;
  for (const std::string& file : files) {
    const data::TokenFile read = data::read_token_file(file, data::parse_token_file_format(format), vocab_size);
    sources.push_back({{"file", file}, {"format", data::to_string(read.format)}, {"tokens", read.tokens.numel()}});
    total += read.tokens.numel();
    narrow = narrow && read.tokens.scalar_type() == at::kUInt16;
    parts.push_back(read.tokens);
  }
  // GPT-2's ids fit in uint16: keep 2 bytes per token (FineWeb's 100M-token files are 200 MB).
  at::Tensor all = at::empty({total}, at::TensorOptions().dtype(narrow ? at::kUInt16 : at::kInt));
  std::int64_t offset = 0;
  for (const at::Tensor& part : parts) {
    const at::Tensor same = narrow ? part : part.to(at::kInt);
    std::memcpy(static_cast<char*>(all.data_ptr()) + offset * all.element_size(), same.data_ptr(), same.nbytes());
    offset += part.numel();
  }
  nlohmann::json metadata = {{"source", "tokens"}, {"files", sources}};
  if (!tokenizer.empty()) metadata["tokenizer"] = tokenizer;
  if (vocab_size > 0) metadata["vocab_size"] = vocab_size;
  report(data::write_shards(o.out, o.name, {{"tokens", all}}, o.shards, metadata));
}

std::string join(const std::vector<std::int64_t>& values) {
  std::string out = "[";
  for (std::size_t i = 0; i < values.size(); ++i) out += (i ? "," : "") + std::to_string(values[i]);
  return out + "]";
}

void inspect(const std::string& source, bool locking) {
  if (data::is_manifest(source)) {
    const data::Manifest manifest = data::read_manifest(source);
    std::int64_t rows = 0;
    for (const auto& f : manifest.files) rows += f.rows;
    std::cout << "manifest " << source << ": " << manifest.files.size() << " file(s), " << rows << " rows\n";
    for (const auto& d : manifest.datasets) std::cout << "  " << d.name << ": " << d.dtype << " " << join(d.shape) << " per row\n";
    if (!manifest.metadata.empty()) {
      std::string text = manifest.metadata.dump();
      if (text.size() > 300) text = text.substr(0, 300) + "...";
      std::cout << "  metadata: " << text << '\n';
    }
  }
  for (const auto& path : data::resolve_files(source)) {
    const data::FileInfo info = data::inspect_file(path, locking);
    std::cout << info.path << " (" << comm::format_bytes(info.file_bytes) << ")\n";
    for (const auto& d : info.datasets) {
      std::ostringstream line;
      line << "  " << std::left << std::setw(10) << d.name << " " << d.dtype << (d.supported ? "" : " (unsupported)") << " "
           << join(d.shape) << ", rows " << (d.shape.empty() ? 0 : d.shape[0]) << ", chunks "
           << (d.chunks.empty() ? "none (contiguous)" : join(d.chunks)) << ", filters ";
      std::string filters;
      for (const auto& f : d.filters) filters += (filters.empty() ? "" : "+") + f;
      line << (filters.empty() ? "none" : filters) << ", " << comm::format_bytes(d.bytes) << " -> "
           << comm::format_bytes(d.stored_bytes);
      if (d.stored_bytes > 0) line << " (" << std::fixed << std::setprecision(2) << double(d.bytes) / double(d.stored_bytes) << "x)";
      std::cout << line.str() << '\n';
    }
  }
}

void verify(const std::string& source, bool locking) {
  const auto start = std::chrono::steady_clock::now();
  const data::VerifyReport r = data::verify(source, locking);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::cout << "ok: " << r.files << " file(s), " << r.rows << " rows, " << r.chunks << " chunk reads, "
            << comm::format_bytes(r.bytes_read) << " read in " << std::fixed << std::setprecision(2) << seconds << " s\n";
}

struct PlanOptions {
  int ranks = 1;
  int stages = 1;
  std::int64_t seq_len = 0;
  std::int64_t epoch = 0;
  data::SamplerOptions sampling;
  std::string remainder = "drop";
};

// What each rank reads in one epoch, as a table; the figures of data::plan_reads.
void plan(const std::string& source, PlanOptions o, bool locking) {
  data::DatasetSpec spec = o.seq_len > 0 ? data::DatasetSpec::token_stream(source, o.seq_len)
                                         : data::DatasetSpec::classification(source);
  spec.file_locking = locking;
  o.sampling.remainder = data::parse_remainder(o.remainder);
  const data::ReadPlan p = data::plan_reads(spec, o.sampling, o.ranks, o.epoch, o.stages);
  const int replicas = o.ranks / o.stages;
  const std::int64_t used = p.steps_per_epoch * o.sampling.global_batch;
  std::cout << source << ": " << p.samples << " samples in " << p.blocks << " blocks, " << comm::format_bytes(p.bytes)
            << " decompressed\nglobal batch " << o.sampling.global_batch << " = " << p.partitions << " partitions x "
            << o.sampling.global_batch / p.partitions << (o.sampling.global_batch % p.partitions ? "-" + std::to_string(o.sampling.global_batch / p.partitions + 1) : "")
            << " samples; " << p.steps_per_epoch << " steps per epoch ("
            << (used <= p.samples ? std::to_string(p.samples - used) + " samples unused" : std::to_string(used - p.samples) + " seen twice")
            << ", " << o.remainder << "); epoch " << o.epoch << ", " << o.ranks << " rank(s)"
            << (o.stages > 1 ? " as " + std::to_string(o.stages) + " pipeline stages x " + std::to_string(replicas) +
                                   " replicas (the first stage reads the inputs, the last the targets, those between "
                                   "nothing)"
                             : "")
            << ":\n";
  // x 1/N: the rank's reads against 1/N of the data, N the data-parallel ranks.
  std::cout << "  rank  " << (o.stages > 1 ? "stage  " : "")
            << "partitions  samples/batch  blocks  chunks  read      share of the data  x 1/N\n";
  for (std::size_t r = 0; r < p.ranks.size(); ++r) {
    const data::RankReads& reads = p.ranks[r];
    const double share = p.bytes > 0 ? double(reads.bytes) / double(p.bytes) : 0.0;
    char stage[16] = "";
    if (o.stages > 1) std::snprintf(stage, sizeof stage, "%-6d ", reads.stage);
    char line[180];
    std::snprintf(line, sizeof line, "  %-5zu %s%-11s %-14lld %-7lld %-7lld %-9s %5.1f %%             %.2f", r, stage,
                  (std::to_string(reads.first_partition) + "-" + std::to_string(reads.last_partition)).c_str(),
                  static_cast<long long>(reads.samples_per_batch), static_cast<long long>(reads.blocks),
                  static_cast<long long>(reads.chunks), comm::format_bytes(reads.bytes).c_str(), share * 100,
                  share * replicas);
    std::cout << line << '\n';
  }
  const std::string who = o.stages > 1 ? " data-parallel ranks" : " ranks";
  if (p.partitions % replicas != 0)
    std::cout << "note: " << replicas << who << " do not divide " << p.partitions
              << " partitions, so ranks share partitions and each reads more than 1/N; choose data.partitions as a "
                 "multiple of the"
              << (o.stages > 1 ? who : " world size") << "\n";
  std::cout << std::fixed << std::setprecision(1) << "shuffle: a global batch draws from " << p.blocks_per_batch
            << " blocks on average (one partition with a window of 16 blocks, the order before partitions: "
            << p.blocks_per_batch_before << ")\n";
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"h5shard: make HDF5 dataset shards from local data, and inspect or verify them"};
  app.require_subcommand(1);
  Output output;

  std::vector<std::string> text_files;
  std::string separator, level = "byte";
  CLI::App* text = app.add_subcommand("text", "text files -> a byte- or character-level token stream ('tokens')");
  text->add_option("files", text_files, "text files")->required();
  text->add_option("--level", level, "byte or char (characters numbered in code point order)")
      ->check(CLI::IsMember({"byte", "char"}))
      ->capture_default_str();
  text->add_option("--separator", separator, "a line that separates documents (fortune files: %); default: one per file");
  add_output_options(*text, output);

  std::string images, labels;
  CLI::App* idx = app.add_subcommand("idx", "IDX image/label files (MNIST format, .gz or not) -> 'inputs'/'targets'");
  idx->add_option("--images", images, "images file, e.g. train-images-idx3-ubyte.gz")->required();
  idx->add_option("--labels", labels, "labels file, e.g. train-labels-idx1-ubyte.gz")->required();
  add_output_options(*idx, output);

  std::string csv_file;
  data::CsvOptions csv_options;
  CLI::App* csv = app.add_subcommand("csv", "a CSV table -> float32 'inputs' (features) and 'targets' (label column)");
  csv->add_option("file", csv_file, "CSV file")->required();
  csv->add_option("--label", csv_options.label, "label column: header name or 0-based index (default: the last)");
  csv->add_option("--delimiter", csv_options.delimiter, "field delimiter")->capture_default_str();
  add_output_options(*csv, output);

  std::vector<std::string> token_files;
  std::string token_format = "auto", tokenizer;
  std::int64_t vocab_size = 0;
  CLI::App* tokens = app.add_subcommand(
      "tokens", "token files of llm.c (.bin with header), nanoGPT (raw uint16 .bin) or numpy (.npy) -> 'tokens'");
  tokens->add_option("files", token_files, "token files, concatenated in this order")->required();
  tokens->add_option("--format", token_format, "auto (from the file's first bytes), llmc, nanogpt or npy")
      ->check(CLI::IsMember({"auto", "llmc", "nanogpt", "npy"}))
      ->capture_default_str();
  tokens->add_option("--vocab-size", vocab_size, "every token id must be below this, e.g. 50257 for GPT-2 (0: not checked)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  tokens->add_option("--tokenizer", tokenizer, "name recorded in the manifest, e.g. gpt2");
  add_output_options(*tokens, output);

  std::string source;
  bool no_locking = false;
  CLI::App* inspect_cmd = app.add_subcommand("inspect", "datasets, shapes, dtypes, chunking, filters and row counts");
  inspect_cmd->add_option("source", source, "a manifest (.json) or a glob of .h5 files")->required();
  inspect_cmd->add_flag("--no-file-locking", no_locking, "open without HDF5 file locking (shared file systems)");
  CLI::App* verify_cmd = app.add_subcommand("verify", "read every chunk; check counts, dtypes and shapes");
  verify_cmd->add_option("source", source, "a manifest (.json) or a glob of .h5 files")->required();
  verify_cmd->add_flag("--no-file-locking", no_locking, "open without HDF5 file locking (shared file systems)");
  PlanOptions plan_options;
  plan_options.sampling.seed = 0;
  CLI::App* plan_cmd = app.add_subcommand("plan", "what each of N ranks reads in one epoch of the loader's order");
  plan_cmd->add_option("source", source, "a manifest (.json) or a glob of .h5 files")->required();
  plan_cmd->add_option("--ranks", plan_options.ranks, "world size")->check(CLI::PositiveNumber)->capture_default_str();
  plan_cmd->add_option("--stages", plan_options.stages, "parallel.pipeline_stages")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  plan_cmd->add_option("--batch", plan_options.sampling.global_batch, "batch.global: samples per optimizer step")
      ->check(CLI::PositiveNumber)
      ->required();
  plan_cmd->add_option("--partitions", plan_options.sampling.partitions, "data.partitions")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  plan_cmd->add_option("--window", plan_options.sampling.window, "data.shuffle_window (blocks)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  plan_cmd->add_option("--seed", plan_options.sampling.seed, "run.seed")->capture_default_str();
  plan_cmd->add_option("--epoch", plan_options.epoch, "which epoch's order")->check(CLI::NonNegativeNumber)->capture_default_str();
  plan_cmd->add_option("--remainder", plan_options.remainder, "data.train.remainder")
      ->check(CLI::IsMember({"drop", "wrap"}))
      ->capture_default_str();
  plan_cmd->add_option("--seq-len", plan_options.seq_len, "token streams: tokens per sample (data.seq_len); 0: inputs/targets")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  plan_cmd->add_flag("--no-file-locking", no_locking, "open without HDF5 file locking (shared file systems)");

  return apps::run_tool("h5shard", app, argc, argv, [&] {
    if (text->parsed()) write_text(text_files, separator, level, output);
    if (idx->parsed()) write_table(data::read_idx(images, labels), output);
    if (csv->parsed()) write_table(data::read_csv(csv_file, csv_options), output);
    if (tokens->parsed()) write_tokens(token_files, token_format, vocab_size, tokenizer, output);
    if (inspect_cmd->parsed()) inspect(source, !no_locking);
    if (verify_cmd->parsed()) verify(source, !no_locking);
    if (plan_cmd->parsed()) plan(source, plan_options, !no_locking);
    return 0;
  });
}

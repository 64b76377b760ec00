#include "mpitrain/config/config.h"

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>
#include <stdexcept>
#include <utility>

#include "mpitrain/runtime/error.h"

namespace mpitrain::config {

using nlohmann::json;

// Field lists for the JSON conversions. A field missing here, or a key missing from the table,
// breaks the round-trip test, so the table and the structs cannot drift apart.
NLOHMANN_DEFINE_TYPE_NON_INTRUSIVE(RunConfig, name, dir, seed)
NLOHMANN_DEFINE_TYPE_NON_INTRUSIVE(DataSplit, files, manifest, shuffle, remainder)
void to_json(json& j, const RankWeights& w) {
  if (w.mode == RankWeights::Mode::list) j = w.weights;
  else j = w.mode == RankWeights::Mode::auto_ ? "auto" : "equal";
}
void from_json(const json& j, RankWeights& w) {
  w.weights.clear();
  if (j.is_array()) {
    w.mode = RankWeights::Mode::list;
    w.weights = j.get<std::vector<double>>();
  } else {
    w.mode = j.get<std::string>() == "auto" ? RankWeights::Mode::auto_ : RankWeights::Mode::equal;
  }
}
NLOHMANN_DEFINE_TYPE_NON_INTRUSIVE(DataConfig, kind, seq_len, prefetch, workers, file_locking, partitions, shuffle_window,
                                   cache_mb, rank_weights, rebalance_every, train, eval)
// batch.micro_batch "auto" is 0 in the struct until the trainer has found the value.
void to_json(json& j, const BatchConfig& b) {
  j = json{{"micro_batch", b.micro_batch == 0 ? json("auto") : json(b.micro_batch)},
           {"accumulation", b.accumulation},
           {"global", b.global}};
}
void from_json(const json& j, BatchConfig& b) {
  const json& micro = j.at("micro_batch");
  b.micro_batch = micro.is_string() ? 0 : micro.get<std::int64_t>();
  b.accumulation = j.at("accumulation").get<std::int64_t>();
  b.global = j.at("global").get<std::int64_t>();
}
NLOHMANN_DEFINE_TYPE_NON_INTRUSIVE(OptimizerConfig, name, lr, momentum, nesterov, betas, eps,
                                   weight_decay, grad_clip, fused, decay)
NLOHMANN_DEFINE_TYPE_NON_INTRUSIVE(ScheduleConfig, name, warmup_steps, min_lr_ratio)
NLOHMANN_DEFINE_TYPE_NON_INTRUSIVE(TrainConfig, steps, max_nonfinite_steps, epochs)
NLOHMANN_DEFINE_TYPE_NON_INTRUSIVE(LossScaleConfig, init, growth_factor, backoff_factor,
                                   growth_interval)
NLOHMANN_DEFINE_TYPE_NON_INTRUSIVE(PrecisionConfig, mode, tf32, loss_scale)
NLOHMANN_DEFINE_TYPE_NON_INTRUSIVE(DdpConfig, bucket_mb, first_bucket_mb, find_unused_parameters,
                                   broadcast_buffers, wire_dtype, zero_stage, compression, topk_ratio,
                                   powersgd_rank, powersgd_warmup_steps, comm_timeout_s)
NLOHMANN_DEFINE_TYPE_NON_INTRUSIVE(ParallelConfig, pipeline_stages, schedule, stage_pieces)
NLOHMANN_DEFINE_TYPE_NON_INTRUSIVE(DeviceConfig, kind, allow_shared_gpu, memory_fraction, backend,
                                   peak_tflops)
NLOHMANN_DEFINE_TYPE_NON_INTRUSIVE(CheckpointConfig, every_steps, keep_last, keep_every, dir,
                                   save_timeout_s, save_on_stop)
NLOHMANN_DEFINE_TYPE_NON_INTRUSIVE(LogConfig, every_steps, console, metrics_file, trace_steps,
                                   trace_start_step)
NLOHMANN_DEFINE_TYPE_NON_INTRUSIVE(EvalConfig, every_steps, max_batches)

// The model section holds every model's options while validating; the Config keeps only the
// selected model's, so the saved config and the fingerprint do not depend on unused models.
void to_json(json& j, const ModelConfig& m) {
  j = json{{"name", m.name}, {"init_from", m.init_from}, {m.name, m.options}};
}
void from_json(const json& j, ModelConfig& m) {
  m.name = j.at("name").get<std::string>();
  m.init_from = j.at("init_from").get<std::string>();
  m.options = j.at(m.name);
}

NLOHMANN_DEFINE_TYPE_NON_INTRUSIVE(Config, run, model, data, batch, optimizer, schedule, train,
                                   precision, ddp, parallel, device, checkpoint, log, eval)

namespace {

[[noreturn]] void fail(const std::string& source, const std::string& message) {
  throw runtime::Error(source + ": " + message, runtime::ExitCode::bad_input);
}

std::string in_quotes(const std::string& s) { return "\"" + s + "\""; }

// A name that becomes one folder or file inside the run directory.
std::function<std::string(const json&)> plain_name(bool allow_empty) {
  return [allow_empty](const json& v) -> std::string {
    const auto s = v.get<std::string>();
    if (s.empty()) return allow_empty ? "" : "it is empty";
    if (s == "." || s == ".." || s.find('/') != std::string::npos)
      return "it must name one entry, without '/'";
    return "";
  };
}

std::string no_empty_entry(const json& v) {
  for (const json& item : v)
    if (item.get<std::string>().empty()) return "an entry is empty";
  return "";
}

// A choice setting of a resolved tree as its enum (resolve() has checked the word).
template <typename E>
E chosen(const Section& s, const std::string& key) {
  return *parse_word<E>(s.text(key));
}

// A choice setting of the table: its words and default come from the enum's table.
template <typename E>
Setting choice(std::string path, E default_value, std::string doc) {
  return text(std::move(path), word(default_value), std::move(doc), words<E>());
}

std::string check_run(const Section& s) {
  if (s.integer("train.steps") == 0 && s.integer("train.epochs") == 0)
    return "set train.steps or train.epochs (both are 0, so the run would have no end)";
  for (const std::string split : {"train", "eval"}) {
    const bool files = !s.texts("data." + split + ".files").empty();
    const bool manifest = !s.text("data." + split + ".manifest").empty();
    if (files && manifest)
      return "data." + split + ".files and data." + split + ".manifest are both set; keep one";
    if (split == "train" && !files && !manifest)
      return "name the training shards with data.train.files (a glob or a list of files) or "
             "data.train.manifest";
  }
  if (s.json().at("batch").at("micro_batch").is_string()) {
    if (s.integer("batch.global") == 0)
      return "batch.micro_batch auto needs batch.global: the global batch it keeps while it derives "
             "batch.accumulation";
    if (s.integer("batch.accumulation") != 1)
      return "batch.micro_batch auto derives batch.accumulation; leave batch.accumulation at 1";
  }
  const bool sgd = chosen<OptimizerName>(s, "optimizer.name") == OptimizerName::sgd;
  if (sgd && s.boolean("optimizer.nesterov") && s.number("optimizer.momentum") == 0.0)
    return "optimizer.nesterov needs optimizer.momentum > 0";
  if (sgd && chosen<Fused>(s, "optimizer.fused") == Fused::on)
    return "optimizer.fused = \"on\" is for adamw; set it to \"auto\" or \"off\" with sgd";
  return ddp_settings_problem(chosen<Compression>(s, "ddp.compression"), s.integer("ddp.zero_stage"),
                              chosen<WireDtype>(s, "ddp.wire_dtype") != WireDtype::fp32);
}

Schema make_settings() {
  // Timeouts become deadlines in milliseconds; a million seconds (11.6 days) is no limit in
  // practice and keeps the arithmetic far from overflow.
  constexpr double max_timeout_s = 1e6;
  const Range positive = Range::above(0);
  const Range non_negative = Range::at_least(0);
  const Range unit = Range::half_open(0, 1);
  std::vector<Setting> s = {
      text("run.name", "run", "name of the run; its outputs go to the folder run.dir/run.name")
          .with_rule("a file name without '/'", plain_name(false))
          .on_resume(Resume::may_change),
      text("run.dir", "runs", "folder holding the run directories")
          .on_resume(Resume::may_change),
      integer("run.seed", 0, "seed of initialisation, shuffling and dropout", non_negative),

      text("model.name", "mlp",
           "model to train: mlp, cnn, gpt or a name registered with models::register_model")
          .with_rule("the name of a registered model", {}),
      text("model.init_from", "",
           "weights to start from: a safetensors file, or a file of torch.save(model.state_dict()) "
           "(empty = the model's own initialisation; a resumed run takes the checkpoint's weights)")
          .on_resume(Resume::may_change),

      choice("data.kind", DataKind::automatic,
             "what the shards hold: inputs and class targets, or token ids; auto = from the model"),
      integer("data.seq_len", 0,
              "tokens per sample for token data (0 = the model's context length)", non_negative),
      integer("data.prefetch", 0,
              "micro-batches read ahead in the background (refilled when half have been taken; "
              "0 = as many as hold 1 MiB, at least 8 and at most 64; the eval loader reads at most 2 ahead)",
              Range::closed(0, 1024))
          .on_resume(Resume::may_change),
      integer("data.workers", 1,
              "threads per rank reading batches at once (copying rows of uncompressed shards in parallel; "
              "give them cores the training thread does not use)",
              Range::closed(1, 64))
          .on_resume(Resume::may_change),
      flag("data.file_locking", false,
           "use HDF5 file locking when opening shards (network file systems often lack it)")
          .on_resume(Resume::may_change),
      integer("data.partitions", 16,
              "canonical partitions of every global batch (docs/data.md): the order depends on it, "
              "not on the world size; a world size that divides it has each rank read only 1/N of "
              "the data",
              Range::at_least(1)),
      integer("data.shuffle_window", 4,
              "blocks (~1 MiB of HDF5 chunks each) whose samples are shuffled together in each "
              "partition (0 = all of a partition's)",
              non_negative),
      number("data.cache_mb", 0,
             "decompressed blocks each rank keeps, in MiB (0 = a shuffle window and the next for "
             "each partition the rank reads)",
             Range::at_least(0))
          .on_resume(Resume::may_change),
      numbers("data.rank_weights", {},
              "each rank's share of every global batch: equal, proportional to a weight per rank, "
              "or auto (measured so that ranks finish backward together); docs/heterogeneous.md",
              Range::above(0))
          .items(1, std::numeric_limits<std::size_t>::max())
          .or_one_of({"equal", "auto"}, "equal")
          .on_resume(Resume::may_change),
      integer("data.rebalance_every", 100,
              "with data.rank_weights auto: optimizer steps between re-measurements of the ranks' "
              "speeds (0 = measure once, after the first steps)",
              non_negative)
          .on_resume(Resume::may_change),
      texts("data.train.files", {}, "training shards: a glob or a list of HDF5 files and globs")
          .with_rule("a string or a list of strings, none empty", no_empty_entry),
      text("data.train.manifest", "",
           "a JSON shard manifest written by h5shard (docs/data.md) naming the training shards (instead of files)"),
      flag("data.train.shuffle", true,
           "shuffle the training samples each epoch (seeded by run.seed and the epoch)"),
      choice("data.train.remainder", Remainder::drop,
             "samples left after the last full global batch of an epoch: drop, or wrap to the "
             "epoch's start"),
      texts("data.eval.files", {},
            "evaluation shards: a glob or a list of HDF5 files and globs (none = no evaluation)")
          .with_rule("a string or a list of strings, none empty", no_empty_entry),
      text("data.eval.manifest", "",
           "a JSON shard manifest written by h5shard (docs/data.md) naming the evaluation shards (instead of files)"),
      flag("data.eval.shuffle", false, "shuffle the evaluation samples"),
      choice("data.eval.remainder", Remainder::drop,
             "samples left after the last full global batch of the evaluation set: drop or wrap"),

      integer("batch.micro_batch", 32,
              "samples per rank in one forward and backward pass; auto = the largest that fits in "
              "memory (with batch.global set; docs/heterogeneous.md)",
              Range::at_least(1))
          .or_one_of({"auto"})
          .on_resume(Resume::may_change),
      integer("batch.accumulation", 1,
              "micro-batches accumulated per optimizer step (derived when batch.global is set)",
              Range::at_least(1))
          .on_resume(Resume::may_change),
      integer("batch.global", 0,
              "samples per optimizer step over all ranks (0 = micro_batch x accumulation x "
              "ranks)",
              non_negative),

      choice("optimizer.name", OptimizerName::adamw, "update rule: SGD (with momentum) or AdamW"),
      number("optimizer.lr", 1e-3, "peak learning rate", positive),
      number("optimizer.momentum", 0.9, "SGD momentum", unit),
      flag("optimizer.nesterov", false, "SGD with Nesterov momentum"),
      numbers("optimizer.betas", {0.9, 0.999}, "AdamW's beta1 and beta2", unit).items(2, 2),
      number("optimizer.eps", 1e-8, "AdamW's epsilon", positive),
      number("optimizer.weight_decay", 0.01, "decoupled weight decay (AdamW) or L2 penalty (SGD)",
             non_negative),
      choice("optimizer.decay", Decay::matrices,
             "which parameters weight_decay applies to: matrices = tensors of 2 or more dimensions "
             "(weights, embeddings; not biases and norm weights), as nanoGPT; all = every parameter, "
             "as torch.optim with one parameter group"),
      number("optimizer.grad_clip", 0.0,
             "clip the global gradient norm to this value (0 = no clipping)", non_negative),
      choice("optimizer.fused", Fused::automatic,
             "AdamW through LibTorch's fused multi-tensor kernel; auto = on GPUs, off on CPU"),

      choice("schedule.name", ScheduleName::constant,
             "learning rate after warm-up: constant, or cosine or linear decay to min_lr_ratio x "
             "lr at the last step"),
      integer("schedule.warmup_steps", 0,
              "optimizer steps of linear warm-up from 0 to optimizer.lr", non_negative),
      number("schedule.min_lr_ratio", 0.1,
             "final learning rate of the decaying schedules, as a fraction of optimizer.lr",
             Range::closed(0, 1)),

      integer("train.steps", 0, "optimizer steps to train (0 = as many as train.epochs take)",
              non_negative)
          .on_resume(Resume::may_change),
      integer("train.max_nonfinite_steps", 3,
              "bf16/fp32: steps in a row with a non-finite loss or gradient that are skipped before "
              "the run stops with a checkpoint (fp16 has its loss scaler)",
              non_negative)
          .on_resume(Resume::may_change),
      integer("train.epochs", 0,
              "passes over the training data (0 = no limit); with both set, the first reached "
              "ends the run",
              non_negative)
          .on_resume(Resume::may_change),

      choice("precision.mode", PrecisionMode::automatic,
             "compute precision; auto = bf16 on GPUs that have it, else fp16; fp32 on CPU"),
      flag("precision.tf32", true, "allow TF32 tensor cores for fp32 matmuls and convolutions"),
      number("precision.loss_scale.init", 65536.0, "initial fp16 loss scale", positive),
      number("precision.loss_scale.growth_factor", 2.0,
             "loss scale multiplier after growth_interval steps without overflow", Range::above(1)),
      number("precision.loss_scale.backoff_factor", 0.5,
             "loss scale multiplier after a step that overflowed", Range::open(0, 1)),
      integer("precision.loss_scale.growth_interval", 2000,
              "overflow-free steps before the loss scale grows", Range::at_least(1)),

      number("ddp.bucket_mb", 25.0, "gradient bucket size in MiB", positive),
      number("ddp.first_bucket_mb", 1.0,
             "size of the first gradient bucket in MiB (small, so communication starts early)",
             positive),
      flag("ddp.find_unused_parameters", false,
           "allow parameters that get no gradient in a step (their buckets are reduced after backward, with less overlap)"),
      flag("ddp.broadcast_buffers", true,
           "copy rank 0's buffers (such as batch-norm statistics) to every rank before each "
           "forward"),
      choice("ddp.wire_dtype", WireDtype::fp32,
             "dtype of gradients on the wire; bf16 and fp16 halve the traffic"),
      integer("ddp.zero_stage", 0,
              "1 = ZeRO stage 1: gradients reduce-scattered, each rank keeps and steps the optimizer "
              "state of its 1/N shard, parameters all-gathered after the step",
              Range::closed(0, 1)),
      choice("ddp.compression", Compression::none,
             "topk = send each bucket's largest gradient elements; powersgd = send matrices as rank-r "
             "factors; both keep what they did not send as error feedback for the next step"),
      number("ddp.topk_ratio", 0.1, "fraction of each bucket's elements ddp.compression topk sends",
             Range::open_closed(0, 1)),
      integer("ddp.powersgd_rank", 4, "rank of the factors ddp.compression powersgd sends",
              Range::at_least(1)),
      integer("ddp.powersgd_warmup_steps", 10,
              "optimizer steps that ddp.compression powersgd all-reduces uncompressed first",
              Range::at_least(0)),
      number("ddp.comm_timeout_s", 600.0, "seconds a collective may take before the job is ended",
             Range::open_closed(0, max_timeout_s))
          .on_resume(Resume::may_change),

      integer("parallel.pipeline_stages", 1,
              "P: the model is cut into P pipeline stages on P ranks; the world is P x D ranks, D "
              "data-parallel replicas of the pipeline (docs/pipeline.md)",
              Range::at_least(1)),
      choice("parallel.schedule", PipelineSchedule::one_f_one_b,
             "the pipeline's order of micro-batches: 1f1b keeps at most P in flight per stage, "
             "gpipe runs all forwards, then all backwards")
          .on_resume(Resume::may_change),
      integers("parallel.stage_pieces", {},
               "pieces of the model (blocks, layers, stages) per pipeline stage, first to last "
               "(empty = balanced by parameters)",
               Range::at_least(1)),

      choice("device.kind", DeviceKind::automatic,
             "auto = the GPU of the rank's node-local index when one is usable, else the CPU")
          .on_resume(Resume::may_change),
      flag("device.allow_shared_gpu", false,
           "let ranks of one node share GPUs (MPI backend or debugging only)")
          .on_resume(Resume::may_change),
      number("device.memory_fraction", 1.0,
             "fraction of each GPU's memory the caching allocator may use",
             Range::open_closed(0, 1))
          .on_resume(Resume::may_change),
      choice("device.backend", Backend::automatic, "collective backend; auto = nccl on GPUs, mpi on CPU")
          .on_resume(Resume::may_change),
      number("device.peak_tflops", 0.0,
             "the device's peak dense TFLOP/s at the training precision, for the mfu metric "
             "(0 = the datasheet value of known GPUs; no mfu on CPU)",
             non_negative)
          .on_resume(Resume::may_change),

      integer("checkpoint.every_steps", 1000,
              "save a checkpoint every N optimizer steps (0 = only at the end and on stop)",
              non_negative)
          .on_resume(Resume::may_change),
      integer("checkpoint.keep_last", 3, "newest checkpoints kept (0 = keep all)", non_negative)
          .on_resume(Resume::may_change),
      integer("checkpoint.keep_every", 0,
              "also keep every checkpoint whose step is a multiple of N (0 = none)", non_negative)
          .on_resume(Resume::may_change),
      text("checkpoint.dir", "checkpoints", "checkpoint folder, relative to the run directory")
          .with_rule("a non-empty path",
                     [](const json& v) -> std::string {
                       return v.get<std::string>().empty() ? "it is empty" : "";
                     })
          .on_resume(Resume::may_change),
      number("checkpoint.save_timeout_s", 1800.0,
             "seconds the ranks wait for each other during a save (rank 0 writes and checksums "
             "the replicated state) before the job is ended",
             Range::open_closed(0, max_timeout_s))
          .on_resume(Resume::may_change),
      flag("checkpoint.save_on_stop", true,
           "save a checkpoint when a signal (SIGTERM, SIGUSR1, SIGINT) stops the run")
          .on_resume(Resume::may_change),

      integer("log.every_steps", 10, "log metrics every N optimizer steps", Range::at_least(1))
          .on_resume(Resume::may_change),
      flag("log.console", true, "print a progress line (rank 0)")
          .on_resume(Resume::may_change),
      text("log.metrics_file", "metrics.jsonl",
           "JSON Lines metrics file in the run directory (empty = none)")
          .with_rule("a file name without '/', or empty", plain_name(true))
          .on_resume(Resume::may_change),
      integer("log.trace_steps", 0,
              "optimizer steps whose timeline is written to trace.json in the run directory "
              "(0 = none)",
              non_negative)
          .on_resume(Resume::may_change),
      integer("log.trace_start_step", 5, "first optimizer step of the trace (1 = the first step)",
              Range::at_least(1))
          .on_resume(Resume::may_change),

      integer("eval.every_steps", 1000,
              "evaluate every N optimizer steps and at the end (0 = only at the end)",
              non_negative)
          .on_resume(Resume::may_change),
      integer("eval.max_batches", 0, "micro-batches per rank per evaluation (0 = all)",
              non_negative)
          .on_resume(Resume::may_change),
  };
  return Schema{std::move(s), check_run};
}

// nlohmann's what() starts with "[json.exception.parse_error.101] "; the rest says where and why.
std::string exception_text(const json::exception& e) {
  std::string why = e.what();
  if (const auto end = why.find("] "); end != std::string::npos) why = why.substr(end + 2);
  return why;
}

// Numbers as people type them on a command line: 3, 1e-3, .5 (JSON would refuse the last).
std::optional<json> parse_number(const std::string& text) {
  if (text.empty()) return {};
  errno = 0;
  char* end = nullptr;
  const long long i = std::strtoll(text.c_str(), &end, 10);
  if (*end == '\0' && errno == 0) return json(static_cast<std::int64_t>(i));
  errno = 0;
  const double d = std::strtod(text.c_str(), &end);
  if (*end == '\0' && errno == 0 && std::isfinite(d)) return json(d);
  return {};
}

bool is_utf8(const std::string& text) {
  try {
    (void)json(text).dump();
    return true;
  } catch (const json::type_error&) {
    return false;
  }
}

json override_value(const Setting& s, const std::string& text, const std::string& source,
                    const std::string& key) {
  // A number when it reads as one, else the text, which normalize() then reports.
  const auto number_or_text = [](const std::string& t) {
    auto v = parse_number(t);
    return v ? *v : json(t);
  };
  // A word in place of a number or list ("auto"); a misspelt one is reported by normalize().
  const bool word = !text.empty() && text.front() != '[' && text.find(',') == std::string::npos && !parse_number(text);
  if (s.type != Type::string && !s.choices.empty() && word) return text;
  switch (s.type) {
    case Type::string:
      return text;
    case Type::boolean:
      return text == "true" ? json(true) : text == "false" ? json(false) : json(text);
    case Type::integer:
    case Type::number:
      return number_or_text(text);
    case Type::integer_list:
    case Type::number_list:
    case Type::string_list:
      break;
  }
  if (!text.empty() && text.front() == '[') {
    try {
      return json::parse(text);
    } catch (const json::exception& e) {
      fail(source, in_quotes(key) + " must be " + describe(s) + "; the value is not a JSON list (" +
                       exception_text(e) + ")");
    }
  }
  if (s.type == Type::string_list) return text;
  json items = json::array();
  std::stringstream in(text);
  for (std::string item; std::getline(in, item, ',');) items.push_back(number_or_text(item));
  return items;
}

}  // namespace

const Schema& settings() {
  static const Schema table = make_settings();
  return table;
}

Schema full_schema(const ModelSchemas& models) {
  Schema full = settings();
  for (Setting& s : full.settings) {
    if (s.path != "model.name") continue;
    s.form.clear();
    for (const auto& entry : models) s.choices.push_back(entry.first);
  }
  for (const auto& [name, schema] : models)
    for (Setting s : schema.settings) {
      s.path = "model." + name + "." + s.path;
      full.settings.push_back(std::move(s));
    }
  full.check = [models](const Section& s) -> std::string {
    if (std::string problem = settings().check(s); !problem.empty()) return problem;
    const std::string name = s.text("model.name");
    const Schema& model = models.at(name);
    if (!model.check) return "";
    const std::string path = "model." + name;
    if (std::string problem = model.check(Section(s.json().at("model").at(name), path));
        !problem.empty())
      return "in " + in_quotes(path) + ": " + problem;
    return "";
  };
  return full;
}

json read_file(const std::string& path) {
  const std::string source = "config file " + in_quotes(path);
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec))
    fail(source, "is a directory; pass the JSON file to --config");
  std::ifstream in(path);
  if (!in)
    fail(source,
         std::string("cannot be read (") + std::strerror(errno) + "); check the --config path");
  std::stringstream content;
  content << in.rdbuf();

  // nlohmann keeps the last of two equal keys silently; a duplicated key is almost always an
  // edit gone wrong, so say so. Each open object remembers its path and the keys seen.
  struct Open {
    std::string path;
    bool object;
    std::set<std::string> keys;
  };
  std::vector<Open> open;
  std::string last_key;
  // A config is four levels deep; past this the file is not a config, and nlohmann's
  // recursive parser and dump() would exhaust memory or the stack on a pathological file.
  constexpr std::size_t max_depth = 64;
  const json::parser_callback_t on_event = [&](int, json::parse_event_t event, json& parsed) {
    switch (event) {
      case json::parse_event_t::object_start:
      case json::parse_event_t::array_start: {
        std::string p;
        if (!open.empty())
          p = open.back().object
                  ? (open.back().path.empty() ? last_key : open.back().path + "." + last_key)
                  : open.back().path + "[]";
        if (open.size() == max_depth) {
          // Name where the nesting starts: the keys before the first list, at most five.
          std::string where = p.substr(0, p.find("[]"));
          std::size_t dot = 0;
          for (int i = 0; i < 5 && dot != std::string::npos; ++i) dot = where.find('.', dot + 1);
          if (dot != std::string::npos) where = where.substr(0, dot) + "...";
          fail(source, "nests objects and lists more than " + std::to_string(max_depth) +
                           " levels deep, under " + in_quotes(where) +
                           " (a config has at most four); check the file");
        }
        open.push_back({p, event == json::parse_event_t::object_start, {}});
        break;
      }
      case json::parse_event_t::key:
        last_key = parsed.get<std::string>();
        if (!open.back().keys.insert(last_key).second)
          fail(source, "key " +
                           in_quotes(open.back().path.empty() ? last_key
                                                              : open.back().path + "." + last_key) +
                           " appears twice in one object; keep one");
        break;
      case json::parse_event_t::object_end:
      case json::parse_event_t::array_end:
        open.pop_back();
        break;
      case json::parse_event_t::value:
        break;
    }
    return true;
  };
  try {
    return json::parse(content.str(), on_event);
  } catch (const json::parse_error& e) {
    fail(source, "is not valid JSON: " + exception_text(e) +
                     " (JSON allows no comments and no trailing commas)");
  } catch (const json::out_of_range& e) {
    // A number beyond double's range, e.g. 1e400.
    fail(source, "holds a number JSON cannot represent: " + exception_text(e));
  }
}

void apply_override(json& tree, const std::string& assignment, const ModelSchemas& models) {
  const std::string source = "--set " + in_quotes(assignment);
  const std::size_t eq = assignment.find('=');
  if (eq == std::string::npos || eq == 0)
    fail(source, "expected key.path=value, e.g. --set optimizer.lr=3e-4");
  const std::string key = assignment.substr(0, eq);
  const Schema full = full_schema(models);
  const Setting& setting = lookup(full, key, source);
  if (!is_utf8(assignment.substr(eq + 1)))
    fail(source, in_quotes(key) + " must be " + describe(setting) +
                     "; the value holds bytes that are not UTF-8 text");
  const json value = normalize(
      setting, override_value(setting, assignment.substr(eq + 1), source, key), source, key);

  if (!tree.is_object()) fail(source, "the configuration is not a JSON object");
  json* node = &tree;
  std::size_t start = 0;
  for (std::size_t dot; (dot = key.find('.', start)) != std::string::npos; start = dot + 1) {
    json& child = (*node)[key.substr(start, dot - start)];
    if (child.is_null()) child = json::object();
    if (!child.is_object())
      fail(source, in_quotes(key.substr(0, dot)) + " in the config file is not a JSON object, so " +
                       in_quotes(key) + " cannot be set in it");
    node = &child;
  }
  (*node)[key.substr(start)] = value;
}

Config validate(const json& tree, const std::string& source, const ModelSchemas& models) {
  return resolve(full_schema(models), tree, source).get<Config>();
}

Config load(const std::string& path, const std::vector<std::string>& overrides,
            const ModelSchemas& models) {
  json tree = read_file(path);
  for (const std::string& assignment : overrides) apply_override(tree, assignment, models);
  std::string source = "config file " + in_quotes(path);
  if (!overrides.empty()) source += " with --set";
  return validate(tree, source, models);
}

Config resolve(Config config, int world_size) {
  if (world_size < 1) throw std::invalid_argument("resolve(): world_size must be >= 1");
  const std::int64_t stages = config.parallel.pipeline_stages;
  if (world_size % stages != 0)
    fail("parallel settings for " + std::to_string(world_size) + " rank(s)",
         "parallel.pipeline_stages (" + std::to_string(stages) + ") must divide the number of ranks (" +
             std::to_string(world_size) + "): start a multiple of " + std::to_string(stages) +
             " ranks, or change parallel.pipeline_stages");
  const std::size_t listed = config.parallel.stage_pieces.size();
  if (listed != 0 && listed != static_cast<std::size_t>(stages))
    fail("parallel settings", "parallel.stage_pieces lists " + std::to_string(listed) + " stage(s) but "
         "parallel.pipeline_stages is " + std::to_string(stages) + "; give one count per stage, or [] to balance");
  BatchConfig& b = config.batch;
  const std::int64_t ranks = world_size / stages;  // data-parallel replicas
  const std::string source = "batch settings for " + std::to_string(ranks) +
                             (stages > 1 ? " data-parallel replica(s)" : " rank(s)");
  const RankWeights& weights = config.data.rank_weights;
  if (weights.mode == RankWeights::Mode::list && weights.weights.size() != static_cast<std::size_t>(ranks))
    fail(source, "data.rank_weights has " + std::to_string(weights.weights.size()) + " weight(s), one per rank is " +
                     std::to_string(ranks) + "; give one weight per rank, or \"equal\" or \"auto\"");
  if (b.micro_batch == 0) return config;  // auto: the trainer finds it, then resolves again
  std::int64_t per_micro_step = 0;
  if (__builtin_mul_overflow(b.micro_batch, ranks, &per_micro_step))
    fail(source, "batch.micro_batch (" + std::to_string(b.micro_batch) + ") x ranks (" +
                     std::to_string(ranks) + ") overflows a 64-bit count; lower batch.micro_batch");
  if (b.global == 0) {
    if (__builtin_mul_overflow(per_micro_step, b.accumulation, &b.global))
      fail(source, "batch.micro_batch x batch.accumulation x ranks = " + std::to_string(b.micro_batch) +
                       " x " + std::to_string(b.accumulation) + " x " + std::to_string(ranks) +
                       " overflows a 64-bit count; lower batch.accumulation or batch.micro_batch");
    return config;
  }
  if (b.global % per_micro_step != 0)
    fail(source, "batch.global (" + std::to_string(b.global) +
                     ") must be a multiple of batch.micro_batch x ranks = " +
                     std::to_string(b.micro_batch) + " x " + std::to_string(ranks) + " = " +
                     std::to_string(per_micro_step) + "; change batch.global or batch.micro_batch");
  const std::int64_t accumulation = b.global / per_micro_step;
  if (b.accumulation != 1 && b.accumulation != accumulation)
    fail(source, "batch.accumulation (" + std::to_string(b.accumulation) +
                     ") disagrees with batch.global (" + std::to_string(b.global) + " = " +
                     std::to_string(b.micro_batch) + " x " + std::to_string(ranks) + " x " +
                     std::to_string(accumulation) + "); set only one of them");
  b.accumulation = accumulation;
  return config;
}

json to_json(const Config& config) {
  json j;
  to_json(j, config);
  return j;
}

std::string ddp_settings_problem(Compression compression, std::int64_t zero_stage, bool wire_cast) {
  if (compression == Compression::none) return "";
  if (zero_stage != 0)
    return std::string("ddp.compression ") + word(compression) + " works with ddp.zero_stage 0 only (ZeRO "
           "reduce-scatters full gradients); turn one of them off";
  if (wire_cast)
    return std::string("ddp.compression ") + word(compression) +
           " sends the gradients' own dtype; leave ddp.wire_dtype at fp32";
  return "";
}

bool may_change_on_resume(const std::string& key) {
  // Setting paths are leaves, so at most one holds `key`: itself, or the list it is an item of.
  for (const Setting& s : settings().settings)
    if (key == s.path || key.compare(0, s.path.size() + 1, s.path + ".") == 0)
      return s.resume == Resume::may_change;
  return false;
}

}  // namespace mpitrain::config

#pragma once
// The training run's configuration: one JSON file, `--set key.path=value` overrides, and the
// typed Config the rest of mpitrain reads.
//
// Contract:
// - settings() is the one definition of every run setting (key, type, default, range, doc);
//   docs/config.md mirrors it and a test fails when they disagree. Model options live under
//   model.<model name> and come from each model's own schema (models::option_schemas()), so a
//   user-registered model's options are validated like the built-in ones.
// - load() = read_file(), then apply_override() for each --set in order, then validate(). Any
//   problem with the input (missing or unreadable file, malformed JSON, unknown key, wrong type,
//   value out of range, inconsistent settings) is runtime::Error with ExitCode::bad_input whose
//   message names the file or --set argument, the key path and the expected form.
// - A validated Config holds every setting (defaults filled in). Choice settings are enums
//   (choices.h), converted once when the config is read; consumers switch on them.
// - resolve(config, world_size) is the one step that depends on the world size: it derives
//   batch.accumulation from batch.global (or batch.global from the others). Call it once per
//   run, before the resolved config is saved or fingerprinted.
// - Each setting says whether it may change on resume (Setting::resume); the trainer compares a
//   checkpoint's config with the resumed run's through may_change_on_resume(), so that list is
//   the table's, not kept by hand elsewhere.
// - to_json() is canonical and round-trips: validate(to_json(c)) equals c, and a resolved
//   config re-resolves to itself at the same world size, so ranks with equal configs (and equal
//   model schemas) have equal dumps: the trainer compares their hash across ranks.

#include <array>
#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "mpitrain/config/choices.h"
#include "mpitrain/config/schema.h"

namespace mpitrain::config {

// The sections of Config mirror the table: one struct per section, one field per key, named as
// in the file. Field initialisers only avoid indeterminate values; the defaults are settings().

struct RunConfig {
  std::string name;
  std::string dir;
  std::int64_t seed = 0;
};

struct ModelConfig {
  std::string name;
  std::string init_from;  // "" = the model's own initialisation
  /// The selected model's resolved options (the model.<name> section, defaults filled in).
  nlohmann::json options;
};

struct DataSplit {
  std::vector<std::string> files;  // globs or paths, as written
  std::string manifest;
  bool shuffle = false;
  Remainder remainder = Remainder::drop;

  /// True when neither files nor a manifest are given (an eval split may be absent).
  bool empty() const { return files.empty() && manifest.empty(); }
};

/// data.rank_weights: "equal", "auto" or a list of positive weights (one per rank).
struct RankWeights {
  enum class Mode { equal, list, auto_ };
  Mode mode = Mode::equal;
  std::vector<double> weights;  // Mode::list only
};

struct DataConfig {
  DataKind kind = DataKind::automatic;
  std::int64_t seq_len = 0;
  std::int64_t prefetch = 0;
  std::int64_t workers = 0;
  bool file_locking = false;
  std::int64_t partitions = 0;
  std::int64_t shuffle_window = 0;
  double cache_mb = 0;  // 0: sized by the loader
  RankWeights rank_weights;
  std::int64_t rebalance_every = 0;
  DataSplit train;
  DataSplit eval;
};

struct BatchConfig {
  std::int64_t micro_batch = 0;  // 0 = "auto", until the trainer sets it
  std::int64_t accumulation = 0;
  std::int64_t global = 0;  // 0 until resolve() when not given
};

struct OptimizerConfig {
  OptimizerName name = OptimizerName::adamw;
  double lr = 0;
  double momentum = 0;
  bool nesterov = false;
  std::array<double, 2> betas{};
  double eps = 0;
  double weight_decay = 0;
  double grad_clip = 0;  // 0: off
  Fused fused = Fused::automatic;
  Decay decay = Decay::matrices;  // matrices: tensors of >= 2 dimensions
};

struct ScheduleConfig {
  ScheduleName name = ScheduleName::constant;
  std::int64_t warmup_steps = 0;
  double min_lr_ratio = 0;
};

struct TrainConfig {
  std::int64_t steps = 0;   // 0: bounded by epochs
  std::int64_t max_nonfinite_steps = 0;
  std::int64_t epochs = 0;  // 0: bounded by steps
};

struct LossScaleConfig {
  double init = 0;
  double growth_factor = 0;
  double backoff_factor = 0;
  std::int64_t growth_interval = 0;
};

struct PrecisionConfig {
  PrecisionMode mode = PrecisionMode::automatic;
  bool tf32 = false;
  LossScaleConfig loss_scale;
};

struct DdpConfig {
  double bucket_mb = 0;
  double first_bucket_mb = 0;
  bool find_unused_parameters = false;
  bool broadcast_buffers = false;
  WireDtype wire_dtype = WireDtype::fp32;
  std::int64_t zero_stage = 0;  // 0 | 1
  Compression compression = Compression::none;
  double topk_ratio = 0;
  std::int64_t powersgd_rank = 0;
  std::int64_t powersgd_warmup_steps = 0;
  double comm_timeout_s = 0;
};

struct ParallelConfig {
  std::int64_t pipeline_stages = 1;  // P; the world is P x D ranks
  PipelineSchedule schedule = PipelineSchedule::one_f_one_b;
  std::vector<std::int64_t> stage_pieces;  // pieces per stage; empty = balanced by parameters
};

struct DeviceConfig {
  DeviceKind kind = DeviceKind::automatic;
  bool allow_shared_gpu = false;
  double memory_fraction = 0;
  Backend backend = Backend::automatic;
  double peak_tflops = 0;  // 0: from the GPU's name
};

struct CheckpointConfig {
  std::int64_t every_steps = 0;
  std::int64_t keep_last = 0;
  std::int64_t keep_every = 0;
  std::string dir;  // relative to the run directory
  double save_timeout_s = 0;
  bool save_on_stop = false;
};

struct LogConfig {
  std::int64_t every_steps = 0;
  bool console = false;
  std::string metrics_file;  // in the run directory; "" = none
  std::int64_t trace_steps = 0;  // 0: no step timeline
  std::int64_t trace_start_step = 0;
};

struct EvalConfig {
  std::int64_t every_steps = 0;
  std::int64_t max_batches = 0;
};

struct Config {
  RunConfig run;
  ModelConfig model;
  DataConfig data;
  BatchConfig batch;
  OptimizerConfig optimizer;
  ScheduleConfig schedule;
  TrainConfig train;
  PrecisionConfig precision;
  DdpConfig ddp;
  ParallelConfig parallel;
  DeviceConfig device;
  CheckpointConfig checkpoint;
  LogConfig log;
  EvalConfig eval;
};

/// A choice enum as JSON: its word (choices.h), so a Config dumps as the file is written.
template <typename E, typename = decltype(Words<E>::table)>
void to_json(nlohmann::json& j, E value) {
  j = word(value);
}
/// The enum of a word; the tree must be resolved (an unknown word is a programming error here:
/// the schema refuses it with the key's path).
template <typename E, typename = decltype(Words<E>::table)>
void from_json(const nlohmann::json& j, E& value) {
  const std::optional<E> parsed = parse_word<E>(j.get<std::string>());
  if (!parsed) throw std::logic_error("config: \"" + j.get<std::string>() + "\" is not a word of its choice");
  value = *parsed;
}

/// Option schemas of the models a config may name, by model name (models::option_schemas()).
using ModelSchemas = std::map<std::string, Schema>;

/// The run settings (everything except model options), with the cross-setting checks.
const Schema& settings();

/// settings() plus each model's options mounted at model.<name>, and model.name restricted to
/// the given model names. This is what files and --set are checked against.
Schema full_schema(const ModelSchemas& models);

/// Reads and parses a JSON file; errors: missing/unreadable file, malformed JSON, a key given
/// twice in one object.
nlohmann::json read_file(const std::string& path);

/// Applies one "key.path=value" to `tree`. The value is parsed for the key's type: booleans
/// true/false; numbers as written (1e-3, .5); strings verbatim; lists as JSON ([0.9, 0.95],
/// ["a.h5", "b.h5"]) or, for numbers, comma-separated (0.9,0.95); a string list also takes one
/// string. Unknown keys and bad values are errors naming the --set argument.
void apply_override(nlohmann::json& tree, const std::string& assignment,
                    const ModelSchemas& models);

/// Checks a whole config tree and returns the typed Config; `source` opens error messages.
Config validate(const nlohmann::json& tree, const std::string& source, const ModelSchemas& models);

/// read_file(path), the overrides in order, validate().
Config load(const std::string& path, const std::vector<std::string>& overrides,
            const ModelSchemas& models);

/// Derives the batch sizes for `world_size` ranks, of which world_size / parallel.pipeline_stages
/// are data-parallel replicas (a pipeline_stages that does not divide world_size is an error
/// naming both); below, "ranks" means those replicas. With batch.global set, accumulation =
/// global / (micro_batch * ranks), which must divide exactly and agree with an explicit
/// accumulation other than 1; otherwise global = micro_batch * accumulation * world_size.
/// micro_batch is the mean per rank when data.rank_weights is not equal, and a list of
/// data.rank_weights must hold one weight per replica. With batch.micro_batch auto (0) it checks
/// nothing: the trainer resolves again once it has found the micro-batch.
Config resolve(Config config, int world_size);

/// The canonical tree (only the selected model's options under model); see the contract.
nlohmann::json to_json(const Config& config);

/// The rule across the ddp settings: compression (other than none) needs ddp.zero_stage 0 and
/// no wire cast (ddp.wire_dtype fp32). "" or what is wrong, naming the keys. The config's check
/// and ddp::validate() (for engines built without a config) both apply it.
std::string ddp_settings_problem(Compression compression, std::int64_t zero_stage, bool wire_cast);

/// Whether the value at `key` (a dotted path into to_json()'s tree: a setting, or an item of a
/// list setting such as "data.rank_weights.0") may differ between a checkpoint and the run that
/// resumes from it: the Resume flag of the setting that holds it in settings(). Anything else
/// (model options, keys this version does not know) must match.
bool may_change_on_resume(const std::string& key);

}  // namespace mpitrain::config

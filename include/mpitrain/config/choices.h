#pragma once
// The words of the config's choice settings and the enums they become: one table per enum,
// the one place each word is written. The schema's choices, error messages, docs/config.md,
// reading a config (word -> enum) and to_json() (enum -> word) all read these tables.
//
// Contract:
// - Words<E>::table lists every value of E once, with its word, in the order the schema shows
//   them; word() of a value not in the table, or parse_word() of a word not in it, does not
//   happen for a validated Config (the schema refuses unknown words with a bad_input error
//   naming the key), so word() treats it as a programming error (std::logic_error) and
//   parse_word() returns nullopt.
// - These enums are the config's, and config knows nothing of the layers that act on a choice.
//   Those layers may read config: ddp::Options::Compression is Compression itself. The others
//   (data, comm, runtime, amp) keep their own types, which their own callers use without a
//   config, and the train layer maps the config's to them in one place (src/train/step_parts.h).
//   Nothing here needs LibTorch or JSON.

#include <array>
#include <cstddef>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace mpitrain::config {

template <typename E>
struct Word {
  E value;
  const char* text;
};

/// Specialised for each choice enum below with `static constexpr std::array<Word<E>, N> table`.
template <typename E>
struct Words {};

// data.kind: what the shards hold; auto = from the model's task.
enum class DataKind { automatic, classification, tokens };
template <>
struct Words<DataKind> {
  static constexpr std::array<Word<DataKind>, 3> table{
      {{DataKind::automatic, "auto"}, {DataKind::classification, "classification"}, {DataKind::tokens, "tokens"}}};
};

// data.train.remainder, data.eval.remainder: the samples after the last full global batch.
enum class Remainder { drop, wrap };
template <>
struct Words<Remainder> {
  static constexpr std::array<Word<Remainder>, 2> table{{{Remainder::drop, "drop"}, {Remainder::wrap, "wrap"}}};
};

// optimizer.name
enum class OptimizerName { sgd, adamw };
template <>
struct Words<OptimizerName> {
  static constexpr std::array<Word<OptimizerName>, 2> table{
      {{OptimizerName::sgd, "sgd"}, {OptimizerName::adamw, "adamw"}}};
};

// optimizer.decay: which parameters weight decay applies to.
enum class Decay { matrices, all };
template <>
struct Words<Decay> {
  static constexpr std::array<Word<Decay>, 2> table{{{Decay::matrices, "matrices"}, {Decay::all, "all"}}};
};

// optimizer.fused: AdamW's fused kernel; auto = on CUDA devices.
enum class Fused { automatic, on, off };
template <>
struct Words<Fused> {
  static constexpr std::array<Word<Fused>, 3> table{{{Fused::automatic, "auto"}, {Fused::on, "on"}, {Fused::off, "off"}}};
};

// schedule.name: the learning rate after warm-up.
enum class ScheduleName { constant, cosine, linear };
template <>
struct Words<ScheduleName> {
  static constexpr std::array<Word<ScheduleName>, 3> table{
      {{ScheduleName::constant, "constant"}, {ScheduleName::cosine, "cosine"}, {ScheduleName::linear, "linear"}}};
};

// parallel.schedule: the pipeline's order of micro-batch forwards and backwards.
enum class PipelineSchedule { one_f_one_b, gpipe };
template <>
struct Words<PipelineSchedule> {
  static constexpr std::array<Word<PipelineSchedule>, 2> table{
      {{PipelineSchedule::one_f_one_b, "1f1b"}, {PipelineSchedule::gpipe, "gpipe"}}};
};

// precision.mode; auto = from the device (amp::auto_precision).
enum class PrecisionMode { automatic, fp32, bf16, fp16 };
template <>
struct Words<PrecisionMode> {
  static constexpr std::array<Word<PrecisionMode>, 4> table{{{PrecisionMode::automatic, "auto"},
                                                             {PrecisionMode::fp32, "fp32"},
                                                             {PrecisionMode::bf16, "bf16"},
                                                             {PrecisionMode::fp16, "fp16"}}};
};

// ddp.wire_dtype: fp32 = the gradients' own dtype, no cast.
enum class WireDtype { fp32, bf16, fp16 };
template <>
struct Words<WireDtype> {
  static constexpr std::array<Word<WireDtype>, 3> table{
      {{WireDtype::fp32, "fp32"}, {WireDtype::bf16, "bf16"}, {WireDtype::fp16, "fp16"}}};
};

// ddp.compression
enum class Compression { none, topk, powersgd };
template <>
struct Words<Compression> {
  static constexpr std::array<Word<Compression>, 3> table{
      {{Compression::none, "none"}, {Compression::topk, "topk"}, {Compression::powersgd, "powersgd"}}};
};

// device.kind
enum class DeviceKind { automatic, cpu, cuda };
template <>
struct Words<DeviceKind> {
  static constexpr std::array<Word<DeviceKind>, 3> table{
      {{DeviceKind::automatic, "auto"}, {DeviceKind::cpu, "cpu"}, {DeviceKind::cuda, "cuda"}}};
};

// device.backend: the collective backend; auto = from the device.
enum class Backend { automatic, mpi, nccl };
template <>
struct Words<Backend> {
  static constexpr std::array<Word<Backend>, 3> table{
      {{Backend::automatic, "auto"}, {Backend::mpi, "mpi"}, {Backend::nccl, "nccl"}}};
};

/// The word of `value`.
template <typename E>
const char* word(E value) {
  for (const Word<E>& w : Words<E>::table)
    if (w.value == value) return w.text;
  throw std::logic_error("config::word(): a value outside its table");
}

/// The value whose word is `text`, or nullopt.
template <typename E>
std::optional<E> parse_word(const std::string& text) {
  for (const Word<E>& w : Words<E>::table)
    if (text == w.text) return w.value;
  return std::nullopt;
}

/// Every word of E, in table order (the schema's choices).
template <typename E>
std::vector<std::string> words() {
  std::vector<std::string> all;
  for (const Word<E>& w : Words<E>::table) all.emplace_back(w.text);
  return all;
}

}  // namespace mpitrain::config

#pragma once
// Settings schemas: the one place where a setting's key, type, default, allowed values and
// documentation are written down, and the validation every configuration goes through. The run
// configuration (config.h) and each model's options (models/registry.h) are schemas.
//
// Contract:
// - A Schema is a list of Settings whose dotted paths are relative to where the schema is
//   mounted: "n_layer" of the gpt model's schema is "model.gpt.n_layer" in a config file.
// - resolve() takes a JSON object and returns the complete, canonical tree: unknown keys are
//   rejected (naming the full path and the closest known key), every value is checked against
//   its type, range and choices, missing settings get their defaults, numbers are stored as
//   doubles and integers as int64 (so equal configs dump to equal text), and a string list given
//   as one string becomes a list of one. Then the schema's cross-setting check runs.
// - Every failure is runtime::Error with ExitCode::bad_input. Its message starts with the
//   source (a file name or a --set argument), names the key path and the expected form (the
//   text describe() returns, also shown in docs/config.md), and says what was found.
// - Section is a typed, read-only view of a resolved tree. Asking it for a key its schema does
//   not define, or with another type, is a programming error (std::logic_error).

#include <cstddef>
#include <cstdint>
#include <functional>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

namespace mpitrain::config {

enum class Type { boolean, integer, number, string, integer_list, number_list, string_list };

/// Bounds of a numeric setting (or of each item of a numeric list); unset means unbounded.
struct Range {
  std::optional<double> min, max;
  bool min_exclusive = false, max_exclusive = false;

  static Range at_least(double min);                 // [min, inf)
  static Range above(double min);                    // (min, inf)
  static Range closed(double min, double max);       // [min, max]
  static Range half_open(double min, double max);    // [min, max)
  static Range open(double min, double max);         // (min, max)
  static Range open_closed(double min, double max);  // (min, max]
};

class Section;

/// Whether a setting may differ between a checkpoint and the run that resumes from it. Only
/// settings that do not change what the run computes (where files go, cadences, timeouts, the
/// device, how the global batch is cut into micro-batches) may change.
enum class Resume { must_match, may_change };

struct Setting {
  std::string path;
  Type type = Type::string;
  nlohmann::json default_value;
  std::string doc;
  Range range;                       // numbers, integers and the items of numeric lists
  /// Strings: the allowed values (empty: any string). Other types: words accepted in place of
  /// the number or list, e.g. "auto" for a list of weights (see or_one_of()).
  std::vector<std::string> choices;
  std::size_t min_items = 0;         // lists only
  std::size_t max_items = std::numeric_limits<std::size_t>::max();
  /// An extra rule on a well-typed value: returns "" or what is wrong. `form` then replaces
  /// the generated expected form, so messages and docs say what the rule wants.
  std::function<std::string(const nlohmann::json&)> rule;
  std::string form;
  Resume resume = Resume::must_match;

  /// Fluent adjustments for the table: numbers("betas", ...).items(2, 2).
  Setting items(std::size_t min, std::size_t max) &&;
  Setting with_rule(std::string form, std::function<std::string(const nlohmann::json&)> rule) &&;
  /// A numeric setting or list that also takes one of these words; the word is stored as given
  /// and the rule is not run on it. A non-empty `default_word` becomes the default.
  Setting or_one_of(std::vector<std::string> words, std::string default_word = "") &&;
  Setting on_resume(Resume rule) &&;
};

// Table builders: path, default, one-line doc, then the constraint.
Setting flag(std::string path, bool default_value, std::string doc);
Setting integer(std::string path, std::int64_t default_value, std::string doc, Range range = {});
Setting number(std::string path, double default_value, std::string doc, Range range = {});
Setting text(std::string path, std::string default_value, std::string doc,
             std::vector<std::string> choices = {});
Setting integers(std::string path, std::vector<std::int64_t> default_value, std::string doc,
                 Range range = {});
Setting numbers(std::string path, std::vector<double> default_value, std::string doc,
                Range range = {});
Setting texts(std::string path, std::vector<std::string> default_value, std::string doc);

struct Schema {
  std::vector<Setting> settings;
  /// A rule across settings, run on the resolved tree: returns "" or what is wrong, naming the
  /// keys involved by their paths relative to the schema.
  std::function<std::string(const Section&)> check;

  /// The setting at this relative path, or nullptr.
  const Setting* find(const std::string& path) const;
};

/// The expected form of a setting's value, e.g. "an integer >= 1" or `one of "sgd", "adamw"`.
std::string describe(const Setting& setting);

/// Validates `given` (a JSON object) against `schema` mounted at `prefix` ("" or e.g.
/// "model.gpt") and returns the resolved tree; see the contract above. `source` opens every
/// error message (e.g. `config file "run.json"`).
nlohmann::json resolve(const Schema& schema, const nlohmann::json& given, const std::string& source,
                       const std::string& prefix = "");

/// Checks one value for `setting` and returns its canonical form; errors name `full_path`.
nlohmann::json normalize(const Setting& setting, const nlohmann::json& value,
                         const std::string& source, const std::string& full_path);

/// The setting at `path` (relative to the schema, mounted at `prefix`), or the same error
/// resolve() gives for an unknown key (with its "did you mean"); a section is an error too.
const Setting& lookup(const Schema& schema, const std::string& path, const std::string& source,
                      const std::string& prefix = "");

/// The candidate closest to `word` (case-insensitive edit distance with transpositions, or a
/// prefix of at least 3 characters), or "" when none is close enough to be a likely typo.
std::string closest(const std::string& word, const std::vector<std::string>& candidates);

class Section {
 public:
  /// `tree` is a resolved tree (or a part of one); `path` is where it sits, for messages.
  Section(nlohmann::json tree, std::string path);

  bool boolean(const std::string& key) const;
  std::int64_t integer(const std::string& key) const;
  double number(const std::string& key) const;
  std::string text(const std::string& key) const;
  std::vector<std::int64_t> integers(const std::string& key) const;
  std::vector<double> numbers(const std::string& key) const;
  std::vector<std::string> texts(const std::string& key) const;

  const std::string& path() const { return path_; }
  const nlohmann::json& json() const { return tree_; }

 private:
  const nlohmann::json& at(const std::string& key,
                           bool (nlohmann::json::*is_type)() const noexcept) const;

  nlohmann::json tree_;
  std::string path_;
};

}  // namespace mpitrain::config

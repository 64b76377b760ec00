#include "mpitrain/config/schema.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <stdexcept>
#include <utility>

#include "mpitrain/runtime/error.h"

namespace mpitrain::config {

using nlohmann::json;

namespace {

[[noreturn]] void fail(const std::string& source, const std::string& message) {
  throw runtime::Error(source + ": " + message, runtime::ExitCode::bad_input);
}

std::string in_quotes(const std::string& s) { return "\"" + s + "\""; }

std::string join_path(const std::string& prefix, const std::string& path) {
  return prefix.empty() ? path : path.empty() ? prefix : prefix + "." + path;
}

json::json_pointer pointer(const std::string& dotted) {
  std::string p = "/" + dotted;
  std::replace(p.begin(), p.end(), '.', '/');
  return json::json_pointer(p);
}

// A value as the user wrote it, shortened so one bad entry cannot flood the message.
std::string shown(const json& value) {
  // replace: a --set value may hold bytes that are not UTF-8, which dump() would throw on.
  std::string s = value.dump(-1, ' ', false, json::error_handler_t::replace);
  return s.size() > 80 ? s.substr(0, 77) + "..." : s;
}

// Bounds print as written in the table: 1 rather than 1.0, 1e-08 rather than 0.00000001.
std::string bound(double v) {
  if (std::abs(v) < 1e15 && v == std::floor(v)) return std::to_string(static_cast<long long>(v));
  return json(v).dump();
}

std::string range_text(const Range& r) {
  if (r.min && r.max)
    return " in " + std::string(r.min_exclusive ? "(" : "[") + bound(*r.min) + ", " +
           bound(*r.max) + (r.max_exclusive ? ")" : "]");
  if (r.min) return std::string(r.min_exclusive ? " > " : " >= ") + bound(*r.min);
  if (r.max) return std::string(r.max_exclusive ? " < " : " <= ") + bound(*r.max);
  return "";
}

std::string items_text(const Setting& s) {
  const bool unbounded = s.max_items == std::numeric_limits<std::size_t>::max();
  if (s.min_items == s.max_items) return ", exactly " + std::to_string(s.min_items) + " items";
  if (unbounded && s.min_items == 0) return "";
  if (unbounded)
    return ", at least " + std::to_string(s.min_items) + (s.min_items == 1 ? " item" : " items");
  return ", " + std::to_string(s.min_items) + " to " + std::to_string(s.max_items) + " items";
}

bool in_range(double v, const Range& r) {
  if (std::isnan(v)) return false;  // only reachable from code (ddp::validate()): JSON has no NaN
  if (r.min && (r.min_exclusive ? v <= *r.min : v < *r.min)) return false;
  if (r.max && (r.max_exclusive ? v >= *r.max : v > *r.max)) return false;
  return true;
}

// Integers may be written as 1e5 or 3.0 in JSON; anything with a fraction is not one.
std::optional<std::int64_t> as_integer(const json& v) {
  if (v.is_number_integer() && !v.is_number_unsigned()) return v.get<std::int64_t>();
  if (v.is_number_unsigned()) {
    const auto u = v.get<std::uint64_t>();
    if (u > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) return {};
    return static_cast<std::int64_t>(u);
  }
  if (v.is_number_float()) {
    const double d = v.get<double>();
    if (d == std::floor(d) && std::abs(d) < 9.0e18) return static_cast<std::int64_t>(d);
  }
  return {};
}

// The canonical item, or nullopt when the item has the wrong type or is out of range.
std::optional<json> scalar(Type type, const json& v, const Setting& s) {
  switch (type) {
    case Type::boolean:
      if (v.is_boolean()) return v;
      return {};
    case Type::integer:
      if (auto i = as_integer(v); i && in_range(static_cast<double>(*i), s.range)) return json(*i);
      return {};
    case Type::number:
      if (v.is_number() && in_range(v.get<double>(), s.range)) return json(v.get<double>());
      return {};
    case Type::string:
      if (v.is_string() &&
          (s.choices.empty() ||
           std::find(s.choices.begin(), s.choices.end(), v.get<std::string>()) != s.choices.end()))
        return v;
      return {};
    default:
      throw std::logic_error("scalar(): not a scalar type");
  }
}

Type item_type(Type list) {
  switch (list) {
    case Type::integer_list:
      return Type::integer;
    case Type::number_list:
      return Type::number;
    case Type::string_list:
      return Type::string;
    default:
      return list;
  }
}

bool is_list(Type t) {
  return t == Type::integer_list || t == Type::number_list || t == Type::string_list;
}

// The names one level below `section` ("" = top): setting leaves and sub-sections alike.
std::vector<std::string> children(const Schema& schema, const std::string& section) {
  std::vector<std::string> names;
  const std::string head = section.empty() ? "" : section + ".";
  for (const Setting& s : schema.settings) {
    if (s.path.compare(0, head.size(), head) != 0) continue;
    const std::string rest = s.path.substr(head.size());
    std::string name = rest.substr(0, rest.find('.'));
    if (std::find(names.begin(), names.end(), name) == names.end()) names.push_back(name);
  }
  return names;
}

bool is_section(const Schema& schema, const std::string& path) {
  const std::string head = path + ".";
  return std::any_of(schema.settings.begin(), schema.settings.end(),
                     [&](const Setting& s) { return s.path.compare(0, head.size(), head) == 0; });
}

[[noreturn]] void unknown_key(const Schema& schema, const std::string& source,
                              const std::string& prefix, const std::string& section,
                              const std::string& key) {
  const std::string path = join_path(prefix, join_path(section, key));
  const std::vector<std::string> siblings = children(schema, section);
  if (std::string near = closest(key, siblings); !near.empty())
    fail(source, "unknown key " + in_quotes(path) + "; did you mean " +
                     in_quotes(join_path(prefix, join_path(section, near))) + "?");
  // A known key in the wrong place: "lr" at the top level is probably optimizer.lr (only
  // said when one setting has that name; "every_steps" would be a guess).
  std::vector<std::string> elsewhere;
  for (const Setting& s : schema.settings)
    if (s.path.substr(s.path.rfind('.') + 1) == key) elsewhere.push_back(s.path);
  if (elsewhere.size() == 1)
    fail(source, "unknown key " + in_quotes(path) + "; did you mean " +
                     in_quotes(join_path(prefix, elsewhere.front())) + "?");
  std::string known;
  for (const std::string& name : siblings) known += (known.empty() ? "" : ", ") + name;
  fail(source,
       "unknown key " + in_quotes(path) + "; the keys " +
           (join_path(prefix, section).empty() ? std::string("at the top level")
                                               : "of " + in_quotes(join_path(prefix, section))) +
           " are: " + known);
}

void walk(const Schema& schema, const json& given, const std::string& source,
          const std::string& prefix, const std::string& section, json& out) {
  for (const auto& [key, value] : given.items()) {
    const std::string rel = join_path(section, key);
    if (const Setting* s = schema.find(rel)) {
      out[pointer(rel)] = normalize(*s, value, source, join_path(prefix, rel));
    } else if (is_section(schema, rel)) {
      if (!value.is_object())
        fail(source, in_quotes(join_path(prefix, rel)) +
                         " must be a JSON object holding its settings, got " + shown(value));
      walk(schema, value, source, prefix, rel, out);
    } else {
      unknown_key(schema, source, prefix, section, key);
    }
  }
}

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s;
}

// Optimal string alignment distance: Levenshtein plus adjacent transpositions ("gtp" -> "gpt").
std::size_t distance(const std::string& a, const std::string& b) {
  std::vector<std::vector<std::size_t>> d(a.size() + 1, std::vector<std::size_t>(b.size() + 1));
  for (std::size_t i = 0; i <= a.size(); ++i) d[i][0] = i;
  for (std::size_t j = 0; j <= b.size(); ++j) d[0][j] = j;
  for (std::size_t i = 1; i <= a.size(); ++i) {
    for (std::size_t j = 1; j <= b.size(); ++j) {
      const std::size_t cost = a[i - 1] == b[j - 1] ? 0 : 1;
      d[i][j] = std::min({d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost});
      if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1])
        d[i][j] = std::min(d[i][j], d[i - 2][j - 2] + 1);
    }
  }
  return d[a.size()][b.size()];
}

}  // namespace

Range Range::at_least(double min) { return Range{min, {}, false, false}; }
Range Range::above(double min) { return Range{min, {}, true, false}; }
Range Range::closed(double min, double max) { return Range{min, max, false, false}; }
Range Range::half_open(double min, double max) { return Range{min, max, false, true}; }
Range Range::open(double min, double max) { return Range{min, max, true, true}; }
Range Range::open_closed(double min, double max) { return Range{min, max, true, false}; }

Setting Setting::items(std::size_t min, std::size_t max) && {
  min_items = min;
  max_items = max;
  return std::move(*this);
}

Setting Setting::with_rule(std::string form_text,
                           std::function<std::string(const nlohmann::json&)> check) && {
  form = std::move(form_text);
  rule = std::move(check);
  return std::move(*this);
}

Setting Setting::or_one_of(std::vector<std::string> words, std::string default_word) && {
  choices = std::move(words);
  if (!default_word.empty()) default_value = std::move(default_word);
  return std::move(*this);
}

Setting Setting::on_resume(Resume rule) && {
  resume = rule;
  return std::move(*this);
}

namespace {

Setting make(std::string path, Type type, json default_value, std::string doc, Range range = {}) {
  Setting s;
  s.path = std::move(path);
  s.type = type;
  s.default_value = std::move(default_value);
  s.doc = std::move(doc);
  s.range = range;
  return s;
}

}  // namespace

Setting flag(std::string path, bool default_value, std::string doc) {
  return make(std::move(path), Type::boolean, default_value, std::move(doc));
}

Setting integer(std::string path, std::int64_t default_value, std::string doc, Range range) {
  return make(std::move(path), Type::integer, default_value, std::move(doc), range);
}

Setting number(std::string path, double default_value, std::string doc, Range range) {
  return make(std::move(path), Type::number, default_value, std::move(doc), range);
}

Setting text(std::string path, std::string default_value, std::string doc,
             std::vector<std::string> choices) {
  Setting s = make(std::move(path), Type::string, std::move(default_value), std::move(doc));
  s.choices = std::move(choices);
  return s;
}

Setting integers(std::string path, std::vector<std::int64_t> default_value, std::string doc,
                 Range range) {
  return make(std::move(path), Type::integer_list, default_value, std::move(doc), range);
}

Setting numbers(std::string path, std::vector<double> default_value, std::string doc, Range range) {
  return make(std::move(path), Type::number_list, default_value, std::move(doc), range);
}

Setting texts(std::string path, std::vector<std::string> default_value, std::string doc) {
  return make(std::move(path), Type::string_list, default_value, std::move(doc));
}

const Setting* Schema::find(const std::string& path) const {
  for (const Setting& s : settings)
    if (s.path == path) return &s;
  return nullptr;
}

namespace {

std::string words_text(const std::vector<std::string>& words) {
  std::string text;
  for (std::size_t i = 0; i < words.size(); ++i) text += (i ? ", " : "") + in_quotes(words[i]);
  return text;
}

}  // namespace

std::string describe(const Setting& s) {
  if (!s.form.empty()) return s.form;
  if (s.type != Type::string && !s.choices.empty()) {
    Setting plain = s;
    plain.choices.clear();
    return describe(plain) + ", or " + (s.choices.size() == 1 ? "" : "one of ") + words_text(s.choices);
  }
  switch (s.type) {
    case Type::boolean:
      return "true or false";
    case Type::integer:
      return "an integer" + range_text(s.range);
    case Type::number:
      return "a number" + range_text(s.range);
    case Type::string: {
      if (s.choices.empty()) return "a string";
      return "one of " + words_text(s.choices);
    }
    case Type::integer_list:
      return "a list of integers" + range_text(s.range) + items_text(s);
    case Type::number_list:
      return "a list of numbers" + range_text(s.range) + items_text(s);
    case Type::string_list:
      return "a string or a list of strings" + items_text(s);
  }
  throw std::logic_error("describe(): unknown setting type");
}

json normalize(const Setting& s, const json& value, const std::string& source,
               const std::string& full_path) {
  const auto wrong = [&](const std::string& why) {
    fail(source, in_quotes(full_path) + " must be " + describe(s) + ", got " + shown(value) + why);
  };
  // A word in place of a number or list (e.g. "auto").
  if (s.type != Type::string && !s.choices.empty() && value.is_string()) {
    const auto word = value.get<std::string>();
    if (std::find(s.choices.begin(), s.choices.end(), word) != s.choices.end()) return value;
    const std::string near = closest(word, s.choices);
    wrong(near.empty() ? "" : "; did you mean " + in_quotes(near) + "?");
  }
  json canonical;
  if (is_list(s.type)) {
    // One string is a list of one: "files": "train-*.h5".
    const json items =
        value.is_string() && s.type == Type::string_list ? json::array({value}) : value;
    if (!items.is_array() || items.size() < s.min_items || items.size() > s.max_items) wrong("");
    canonical = json::array();
    for (const json& item : items) {
      auto c = scalar(item_type(s.type), item, s);
      if (!c) wrong("");
      canonical.push_back(*c);
    }
  } else {
    auto c = scalar(s.type, value, s);
    if (!c) {
      std::string hint;
      if (s.type == Type::string && value.is_string())
        if (std::string near = closest(value.get<std::string>(), s.choices); !near.empty())
          hint = "; did you mean " + in_quotes(near) + "?";
      wrong(hint);
    }
    canonical = *c;
  }
  if (s.rule)
    if (std::string problem = s.rule(canonical); !problem.empty()) wrong(" (" + problem + ")");
  return canonical;
}

json resolve(const Schema& schema, const json& given, const std::string& source,
             const std::string& prefix) {
  if (!given.is_object())
    fail(source, (prefix.empty() ? std::string("the configuration") : in_quotes(prefix)) +
                     " must be a JSON object ({\"key\": value, ...}), got " + shown(given));
  json out = json::object();
  walk(schema, given, source, prefix, "", out);
  for (const Setting& s : schema.settings) {
    const auto at = pointer(s.path);
    if (!out.contains(at)) out[at] = normalize(s, s.default_value, "schema default", s.path);
  }
  if (schema.check) {
    if (std::string problem = schema.check(Section(out, prefix)); !problem.empty())
      fail(source, prefix.empty() ? problem : "in " + in_quotes(prefix) + ": " + problem);
  }
  return out;
}

const Setting& lookup(const Schema& schema, const std::string& path, const std::string& source,
                      const std::string& prefix) {
  std::string section;
  std::size_t start = 0;
  while (true) {
    const std::size_t dot = path.find('.', start);
    const std::string key = path.substr(start, dot == std::string::npos ? dot : dot - start);
    const std::string rel = join_path(section, key);
    if (const Setting* s = schema.find(rel)) {
      if (dot == std::string::npos) return *s;
      fail(source, in_quotes(join_path(prefix, rel)) + " is a setting, not a section: " +
                       in_quotes(join_path(prefix, path)) + " does not exist");
    }
    if (key.empty() || !is_section(schema, rel)) unknown_key(schema, source, prefix, section, key);
    if (dot == std::string::npos)
      fail(source, in_quotes(join_path(prefix, rel)) + " is a section; set one of its keys, e.g. " +
                       in_quotes(join_path(prefix, join_path(rel, children(schema, rel).front()))));
    section = rel;
    start = dot + 1;
  }
}

std::string closest(const std::string& word, const std::vector<std::string>& candidates) {
  const std::string w = lower(word);
  const std::size_t limit = std::max<std::size_t>(1, w.size() / 3);
  std::string best;
  std::size_t best_distance = std::numeric_limits<std::size_t>::max();
  for (const std::string& candidate : candidates) {
    const std::string c = lower(candidate);
    const std::size_t d = distance(w, c);
    const std::size_t shorter = std::min(w.size(), c.size());
    const bool prefix = shorter >= 3 && w.compare(0, shorter, c, 0, shorter) == 0;
    if ((d <= limit || prefix) && d < best_distance) {
      best = candidate;
      best_distance = d;
    }
  }
  return best;
}

Section::Section(nlohmann::json tree, std::string path)
    : tree_(std::move(tree)), path_(std::move(path)) {}

const nlohmann::json& Section::at(const std::string& key,
                                  bool (nlohmann::json::*is_type)() const noexcept) const {
  const auto p = pointer(key);
  if (!tree_.contains(p))
    throw std::logic_error("setting " + in_quotes(join_path(path_, key)) + " is not in the schema");
  const nlohmann::json& v = tree_.at(p);
  if (!(v.*is_type)())
    throw std::logic_error("setting " + in_quotes(join_path(path_, key)) + " holds " +
                           v.type_name() + ", not the type asked for");
  return v;
}

bool Section::boolean(const std::string& key) const {
  return at(key, &nlohmann::json::is_boolean).get<bool>();
}
std::int64_t Section::integer(const std::string& key) const {
  return at(key, &nlohmann::json::is_number_integer).get<std::int64_t>();
}
// Canonical trees hold numbers as doubles; an integer here means an integer setting.
double Section::number(const std::string& key) const {
  return at(key, &nlohmann::json::is_number_float).get<double>();
}
std::string Section::text(const std::string& key) const {
  return at(key, &nlohmann::json::is_string).get<std::string>();
}
std::vector<std::int64_t> Section::integers(const std::string& key) const {
  return at(key, &nlohmann::json::is_array).get<std::vector<std::int64_t>>();
}
std::vector<double> Section::numbers(const std::string& key) const {
  return at(key, &nlohmann::json::is_array).get<std::vector<double>>();
}
std::vector<std::string> Section::texts(const std::string& key) const {
  return at(key, &nlohmann::json::is_array).get<std::vector<std::string>>();
}

}  // namespace mpitrain::config

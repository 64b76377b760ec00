// The config layer: the errors table, --set parsing, docs/config.md against the code, the
// canonical form and fingerprint, and the world-size resolution of the batch settings.
#include <ATen/ATen.h>  // before Catch: c10 defines its own CHECK

#include <catch2/catch.hpp>

#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "mpitrain/config/config.h"
#include "mpitrain/models/registry.h"
#include "expect_error.h"
#include "mpitrain/runtime/error.h"

using namespace mpitrain;
using mpitrain::testing::error_of;
using nlohmann::json;

namespace {

// A folder of this process's own, so parallel test runs do not share files.
std::filesystem::path temp_dir() {
  static const std::filesystem::path dir = [] {
    auto d = std::filesystem::temp_directory_path() /
             ("mpitrain_test_config_" + std::to_string(::getpid()));
    std::filesystem::create_directories(d);
    return d;
  }();
  return dir;
}

std::string write(const std::string& name, const std::string& content) {
  const auto path = (temp_dir() / name).string();
  std::ofstream(path) << content;
  return path;
}

const json kBase = json::parse(R"({"data": {"train": {"files": "train-*.h5"}},
                                   "train": {"steps": 100}})");

// What the trainer hashes and compares across ranks: the canonical compact dump.
std::string dump(const config::Config& config) { return config::to_json(config).dump(); }

json patched(const json& patch) {
  json j = kBase;
  j.merge_patch(patch);
  return j;
}

config::Config load(const json& tree, const std::vector<std::string>& sets = {}) {
  return config::load(write("config.json", tree.dump()), sets, models::option_schemas());
}


}  // namespace

TEST_CASE("a minimal config gets every default", "[config]") {
  const config::Config c = load(kBase);
  CHECK(c.run.name == "run");
  CHECK(c.run.dir == "runs");
  CHECK(c.model.name == "mlp");
  CHECK(c.model.options == json::parse(R"({"input_dim": 784, "hidden": 256, "layers": 2,
                                           "num_classes": 10, "dropout": 0.0})"));
  CHECK(c.data.train.files == std::vector<std::string>{"train-*.h5"});  // one string, a list
  CHECK(c.data.train.shuffle);
  CHECK(c.data.eval.empty());
  CHECK(c.batch.micro_batch == 32);
  CHECK(c.batch.accumulation == 1);
  CHECK(c.batch.global == 0);
  CHECK(c.optimizer.name == config::OptimizerName::adamw);
  CHECK(c.optimizer.lr == 1e-3);
  CHECK(c.optimizer.betas == std::array<double, 2>{0.9, 0.999});
  CHECK(c.train.steps == 100);
  CHECK(c.precision.loss_scale.init == 65536.0);
  CHECK(c.precision.loss_scale.growth_interval == 2000);
  CHECK(c.ddp.bucket_mb == 25.0);
  CHECK(c.ddp.first_bucket_mb == 1.0);
  CHECK(c.ddp.broadcast_buffers);
  CHECK_FALSE(c.ddp.find_unused_parameters);
  CHECK(c.checkpoint.save_on_stop);
  CHECK(c.log.metrics_file == "metrics.jsonl");
}

TEST_CASE("config errors name the file, the key path and the expected form", "[config]") {
  struct Case {
    const char* patch;
    const char* message;  // after 'config file "<path>": '
  };
  const std::vector<Case> cases = {
      {R"({"optimizer": {"lrr": 0.1}})",
       R"(unknown key "optimizer.lrr"; did you mean "optimizer.lr"?)"},
      {R"({"optimiser": {"lr": 0.1}})", R"(unknown key "optimiser"; did you mean "optimizer"?)"},
      {R"({"lr": 0.1})", R"(unknown key "lr"; did you mean "optimizer.lr"?)"},
      {R"({"optimizer": {"zzz": 1}})",
       R"(unknown key "optimizer.zzz"; the keys of "optimizer" are: name, lr, momentum, )"
       R"(nesterov, betas, eps, weight_decay, decay, grad_clip, fused)"},
      {R"({"model": {"name": "gpt", "gpt": {"n_layr": 2}}})",
       R"(unknown key "model.gpt.n_layr"; did you mean "model.gpt.n_layer"?)"},
      {R"({"model": {"gtp": {}}})", R"(unknown key "model.gtp"; did you mean "model.gpt"?)"},
      {R"({"model": {"name": "gtp"}})",
       R"("model.name" must be one of "cnn", "gpt", "mlp", got "gtp"; did you mean "gpt"?)"},
      {R"({"batch": {"micro_batch": "32"}})",
       R"("batch.micro_batch" must be an integer >= 1, or "auto", got "32")"},
      {R"({"data": {"train": {"shuffle": 1}}})",
       R"("data.train.shuffle" must be true or false, got 1)"},
      {R"({"optimizer": {"lr": -0.1}})", R"("optimizer.lr" must be a number > 0, got -0.1)"},
      {R"({"batch": {"micro_batch": 0}})",
       R"("batch.micro_batch" must be an integer >= 1, or "auto", got 0)"},
      {R"({"train": {"steps": 10.5}})", R"("train.steps" must be an integer >= 0, got 10.5)"},
      {R"({"optimizer": {"name": "adam"}})",
       R"("optimizer.name" must be one of "sgd", "adamw", got "adam"; did you mean "adamw"?)"},
      {R"({"optimizer": {"betas": [0.9]}})",
       R"("optimizer.betas" must be a list of numbers in [0, 1), exactly 2 items, got [0.9])"},
      {R"({"optimizer": {"betas": [0.9, 1.0]}})",
       R"("optimizer.betas" must be a list of numbers in [0, 1), exactly 2 items, got [0.9,1.0])"},
      {R"({"precision": {"loss_scale": {"backoff_factor": 1}}})",
       R"("precision.loss_scale.backoff_factor" must be a number in (0, 1), got 1)"},
      {R"({"device": {"memory_fraction": 0}})",
       R"("device.memory_fraction" must be a number in (0, 1], got 0)"},
      {R"({"model": {"cnn": {"channels": []}}})",
       R"("model.cnn.channels" must be a list of integers >= 1, 1 to 8 items, got [])"},
      {R"({"optimizer": 3})", R"("optimizer" must be a JSON object holding its settings, got 3)"},
      {R"({"run": {"name": "a/b"}})",
       R"("run.name" must be a file name without '/', got "a/b" (it must name one entry, )"
       R"(without '/'))"},
      {R"({"train": {"steps": 0}})",
       "set train.steps or train.epochs (both are 0, so the run would have no end)"},
      {R"({"data": {"train": {"files": null}}})",
       "name the training shards with data.train.files (a glob or a list of files) or "
       "data.train.manifest"},
      {R"({"data": {"eval": {"files": ["a.h5"], "manifest": "eval.txt"}}})",
       "data.eval.files and data.eval.manifest are both set; keep one"},
      {R"({"optimizer": {"name": "sgd", "nesterov": true, "momentum": 0}})",
       "optimizer.nesterov needs optimizer.momentum > 0"},
      {R"({"model": {"name": "gpt", "gpt": {"n_embd": 30, "n_head": 4}}})",
       R"(in "model.gpt": n_embd (30) must be a multiple of n_head (4))"},
      {R"({"model": {"name": "cnn", "cnn": {"image_size": 3}}})",
       R"(in "model.cnn": image_size (3) must be at least 4: each of the 2 stages halves it)"},
  };
  const std::string path = (temp_dir() / "config.json").string();
  for (const Case& c : cases) {
    INFO("patch: " << c.patch);
    CHECK(error_of([&] { load(patched(json::parse(c.patch))); }) ==
          "config file \"" + path + "\": " + c.message);
  }
}

TEST_CASE("unreadable and malformed files are errors", "[config]") {
  const auto schemas = models::option_schemas();
  const auto load_file = [&](const std::string& path) { config::load(path, {}, schemas); };

  const std::string missing = (temp_dir() / "missing.json").string();
  CHECK(error_of([&] { load_file(missing); }) ==
        "config file \"" + missing +
            "\": cannot be read (No such file or directory); check the --config path");

  const std::string dir = temp_dir().string();
  CHECK(error_of([&] { load_file(dir); }) ==
        "config file \"" + dir + "\": is a directory; pass the JSON file to --config");

  const std::string comma = write("comma.json", "{\n  \"train\": {\"steps\": 1},\n}\n");
  const std::string message = error_of([&] { load_file(comma); });
  CHECK_THAT(message,
             Catch::StartsWith("config file \"" + comma +
                               "\": is not valid JSON: parse error at line 3, column 1: "));
  CHECK_THAT(message, Catch::EndsWith("(JSON allows no comments and no trailing commas)"));

  const std::string twice = write("twice.json", R"({"train": {"steps": 1, "steps": 2}})");
  CHECK(error_of([&] { load_file(twice); }) ==
        "config file \"" + twice + "\": key \"train.steps\" appears twice in one object; keep one");

  const std::string list = write("list.json", "[1, 2]");
  CHECK(error_of([&] { load_file(list); }) ==
        "config file \"" + list +
            "\": the configuration must be a JSON object ({\"key\": value, ...}), got [1,2]");
}

TEST_CASE("--set parses values by the key's type", "[config]") {
  const config::Config c = load(kBase, {
                                           "optimizer.lr=3e-4",
                                           "optimizer.eps=.5",
                                           "batch.micro_batch=64",
                                           "train.steps=1e3",
                                           "data.train.shuffle=false",
                                           "run.name=123",
                                           "optimizer.betas=[0.8, 0.95]",
                                           "data.train.files=[\"a.h5\", \"b.h5\"]",
                                           "data.eval.files=eval/*.h5",
                                           "model.name=cnn",
                                           "model.cnn.channels=8,16,32",
                                           "schedule.name=cosine",
                                           "schedule.name=linear",  // the last one wins
                                       });
  CHECK(c.optimizer.lr == 3e-4);
  CHECK(c.optimizer.eps == 0.5);
  CHECK(c.batch.micro_batch == 64);
  CHECK(c.train.steps == 1000);
  CHECK_FALSE(c.data.train.shuffle);
  CHECK(c.run.name == "123");  // a string setting takes the text verbatim
  CHECK(c.optimizer.betas == std::array<double, 2>{0.8, 0.95});
  CHECK(c.data.train.files == std::vector<std::string>{"a.h5", "b.h5"});
  CHECK(c.data.eval.files == std::vector<std::string>{"eval/*.h5"});
  CHECK(c.model.name == "cnn");
  CHECK(c.model.options.at("channels") == json::array({8, 16, 32}));
  CHECK(c.schedule.name == config::ScheduleName::linear);

  // Over a value from the file.
  CHECK(load(patched(json::parse(R"({"optimizer": {"lr": 0.5}})")), {"optimizer.lr=0.25"})
            .optimizer.lr == 0.25);
  CHECK(load(kBase, {"optimizer.betas=0.5,0.75"}).optimizer.betas ==
        std::array<double, 2>{0.5, 0.75});
}

TEST_CASE("bad --set arguments are errors naming the argument", "[config]") {
  const std::map<std::string, std::string> cases = {
      {"optimizer.lrr=1", R"(unknown key "optimizer.lrr"; did you mean "optimizer.lr"?)"},
      {"optimiser.lr=1", R"(unknown key "optimiser"; did you mean "optimizer"?)"},
      {"optimizer=1", R"("optimizer" is a section; set one of its keys, e.g. "optimizer.name")"},
      {"optimizer.lr", "expected key.path=value, e.g. --set optimizer.lr=3e-4"},
      {"=1", "expected key.path=value, e.g. --set optimizer.lr=3e-4"},
      {"optimizer.lr.x=1",
       R"("optimizer.lr" is a setting, not a section: "optimizer.lr.x" does not exist)"},
      {"batch.micro_batch=abc", R"("batch.micro_batch" must be an integer >= 1, or "auto", got "abc")"},
      {"batch.micro_batch=0", R"("batch.micro_batch" must be an integer >= 1, or "auto", got 0)"},
      {"data.train.shuffle=yes", R"("data.train.shuffle" must be true or false, got "yes")"},
      {"optimizer.betas=0.9,x",
       R"("optimizer.betas" must be a list of numbers in [0, 1), exactly 2 items, got [0.9,"x"])"},
      {"model.gpt.n_layr=2",
       R"(unknown key "model.gpt.n_layr"; did you mean "model.gpt.n_layer"?)"},
  };
  for (const auto& [assignment, message] : cases) {
    INFO("--set " << assignment);
    CHECK(error_of([&] { load(kBase, {assignment}); }) ==
          "--set \"" + assignment + "\": " + message);
  }
  CHECK_THAT(error_of([&] { load(kBase, {"optimizer.betas=[0.9,"}); }),
             Catch::StartsWith("--set \"optimizer.betas=[0.9,\": \"optimizer.betas\" must be a "
                               "list of numbers in [0, 1), exactly 2 items; the value is not a "
                               "JSON list (parse error at line 1, column 6: "));
}

TEST_CASE("docs/config.md lists every setting with its form, default and doc", "[config]") {
  // The expected rows, from the code: the run settings and each built-in model's options.
  std::vector<config::Setting> settings = config::settings().settings;
  for (const auto& [name, schema] : models::option_schemas()) {
    for (config::Setting s : schema.settings) {
      s.path = "model." + name + "." + s.path;
      settings.push_back(s);
    }
  }
  std::map<std::string, std::vector<std::string>> expected;
  for (const config::Setting& s : settings) {
    const std::string value = config::normalize(s, s.default_value, "test", s.path).dump();
    expected[s.path] = {config::describe(s), value, s.doc,
                        s.resume == config::Resume::may_change ? "may change" : "must match"};
  }

  std::ifstream in(std::string(MPITRAIN_SOURCE_DIR) + "/docs/config.md");
  REQUIRE(in);
  std::map<std::string, std::vector<std::string>> documented;
  const auto trim = [](std::string s) {
    s.erase(0, s.find_first_not_of(' '));
    s.erase(s.find_last_not_of(' ') + 1);
    return s;
  };
  const auto unquote = [](const std::string& s) {  // `code` -> code
    return s.size() >= 2 && s.front() == '`' && s.back() == '`' ? s.substr(1, s.size() - 2) : s;
  };
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("| `", 0) != 0) continue;  // table rows of settings start with a `key`
    std::vector<std::string> cells;
    std::stringstream row(line.substr(1, line.size() - 2));
    for (std::string cell; std::getline(row, cell, '|');) cells.push_back(trim(cell));
    INFO("docs row: " << line);
    REQUIRE(cells.size() == 5);
    CHECK(documented.count(unquote(cells[0])) == 0);
    documented[unquote(cells[0])] = {cells[1], unquote(cells[2]), cells[3], cells[4]};
  }

  for (const auto& [key, row] : expected) {
    // On a mismatch this is the row to paste into docs/config.md.
    INFO("expected: | `" << key << "` | " << row[0] << " | `" << row[1] << "` | " << row[2]
                         << " | " << row[3] << " |");
    CHECK(documented.count(key) == 1);
    if (documented.count(key) == 1) CHECK(documented.at(key) == row);
  }
  for (const auto& entry : documented) {
    INFO("docs/config.md lists a key the code does not have: " << entry.first);
    CHECK(expected.count(entry.first) == 1);
  }
}

TEST_CASE("the example config in docs/config.md is valid", "[config]") {
  std::ifstream in(std::string(MPITRAIN_SOURCE_DIR) + "/docs/config.md");
  std::stringstream text;
  text << in.rdbuf();
  const std::string doc = text.str();
  const std::size_t begin = doc.find("```json\n");
  REQUIRE(begin != std::string::npos);
  const std::size_t end = doc.find("```", begin + 8);
  const config::Config c = config::resolve(
      config::validate(json::parse(doc.substr(begin + 8, end - begin - 8)), "docs/config.md",
                       models::option_schemas()),
      4);
  CHECK(c.model.name == "gpt");
  CHECK(c.batch.accumulation == 8);  // 512 = 16 x 4 ranks x 8
}

TEST_CASE("every default is a valid value of its setting", "[config]") {
  const config::Schema full = config::full_schema(models::option_schemas());
  std::map<std::string, int> seen;
  for (const config::Setting& s : full.settings) {
    INFO(s.path);
    CHECK(++seen[s.path] == 1);
    CHECK_FALSE(s.doc.empty());
    CHECK(config::normalize(s, s.default_value, "test", s.path) == s.default_value);
  }
  // Without the cross-setting rules (which want train.steps and data), {} is complete.
  CHECK_NOTHROW(config::resolve(config::Schema{full.settings, {}}, json::object(), "test"));
}

TEST_CASE("the canonical form round-trips and fingerprints", "[config]") {
  const config::Config c = load(kBase);
  const json j = config::to_json(c);

  // Every setting is in the struct and back: the leaves of to_json are exactly the table's.
  std::vector<std::string> leaves;
  const std::function<void(const json&, const std::string&)> walk = [&](const json& node,
                                                                         const std::string& at) {
    for (const auto& [key, value] : node.items()) {
      const std::string path = at.empty() ? key : at + "." + key;
      if (value.is_object())
        walk(value, path);
      else
        leaves.push_back(path);
    }
  };
  walk(j, "");
  std::vector<std::string> table;
  for (const config::Setting& s : config::settings().settings) table.push_back(s.path);
  for (const auto& entry : c.model.options.items()) table.push_back("model.mlp." + entry.key());
  std::sort(leaves.begin(), leaves.end());
  std::sort(table.begin(), table.end());
  CHECK(leaves == table);
  CHECK(j.at("model").size() == 3);  // name, init_from and the selected model's options only

  const config::Config again = config::validate(j, "round trip", models::option_schemas());
  CHECK(config::to_json(again) == j);
  CHECK(dump(again) == dump(c));
  CHECK(dump(load(kBase, {"optimizer.lr=0.002"})) != dump(c));
  // Writing 1 or 1.0 makes no difference: numbers are canonical doubles.
  CHECK(dump(load(kBase, {"optimizer.lr=1"})) ==
        dump(load(kBase, {"optimizer.lr=1.0"})));
}

TEST_CASE("resolve derives the batch sizes from the world size", "[config]") {
  const auto batch = [](const char* patch) { return load(patched(json::parse(patch))); };

  SECTION("global from micro-batch, accumulation and ranks") {
    const config::Config c =
        config::resolve(batch(R"({"batch": {"micro_batch": 8, "accumulation": 2}})"), 4);
    CHECK(c.batch.accumulation == 2);
    CHECK(c.batch.global == 64);
  }
  SECTION("accumulation from global; resolving again changes nothing") {
    const config::Config c =
        config::resolve(batch(R"({"batch": {"micro_batch": 8, "global": 64}})"), 2);
    CHECK(c.batch.accumulation == 4);
    CHECK(c.batch.global == 64);
    const config::Config again = config::resolve(
        config::validate(config::to_json(c), "saved", models::option_schemas()), 2);
    CHECK(dump(again) == dump(c));
  }
  SECTION("global must divide into micro-batches over the ranks") {
    const config::Config c = batch(R"({"batch": {"micro_batch": 8, "global": 60}})");
    CHECK(error_of([&] { config::resolve(c, 2); }) ==
          "batch settings for 2 rank(s): batch.global (60) must be a multiple of "
          "batch.micro_batch x ranks = 8 x 2 = 16; change batch.global or batch.micro_batch");
  }
  SECTION("an explicit accumulation must agree with global") {
    const config::Config c =
        batch(R"({"batch": {"micro_batch": 8, "accumulation": 2, "global": 64}})");
    CHECK(error_of([&] { config::resolve(c, 2); }) ==
          "batch settings for 2 rank(s): batch.accumulation (2) disagrees with batch.global "
          "(64 = 8 x 2 x 4); set only one of them");
    CHECK(config::resolve(c, 4).batch.accumulation == 2);  // 64 = 8 x 4 x 2 agrees
  }
}

TEST_CASE("did-you-mean and typed sections", "[config]") {
  CHECK(config::closest("lrr", {"lr", "eps"}) == "lr");
  CHECK(config::closest("gtp", {"mlp", "cnn", "gpt"}) == "gpt");  // a transposition is one edit
  CHECK(config::closest("LR", {"lr"}) == "lr");
  CHECK(config::closest("warmup", {"warmup_steps", "name"}) == "warmup_steps");  // a prefix
  CHECK(config::closest("x", {"lr", "eps"}).empty());
  CHECK(config::closest("learning_rate", {"lr", "momentum"}).empty());

  const config::Section s(json::parse(R"({"a": 1, "b": {"c": true}})"), "top");
  CHECK(s.integer("a") == 1);
  CHECK(s.boolean("b.c"));
  CHECK_THROWS_AS(s.number("a"), std::logic_error);  // an integer setting is not read as number
  CHECK_THROWS_AS(s.integer("z"), std::logic_error);
}

TEST_CASE("data.rank_weights: equal, auto, or one positive weight per rank", "[config]") {
  using Mode = config::RankWeights::Mode;
  CHECK(load(kBase).data.rank_weights.mode == Mode::equal);
  CHECK(load(kBase, {"data.rank_weights=auto"}).data.rank_weights.mode == Mode::auto_);
  const config::Config listed = load(kBase, {"data.rank_weights=[3, 5]"});
  CHECK(listed.data.rank_weights.mode == Mode::list);
  CHECK(listed.data.rank_weights.weights == std::vector<double>{3, 5});
  CHECK(config::to_json(listed)["data"]["rank_weights"] == json::array({3.0, 5.0}));
  CHECK(config::to_json(load(kBase, {"data.rank_weights=auto"}))["data"]["rank_weights"] == "auto");
  CHECK(config::resolve(listed, 2).data.rank_weights.weights.size() == 2);

  const std::string form = "must be a list of numbers > 0, at least 1 item, or one of \"equal\", \"auto\"";
  CHECK(error_of([] { load(kBase, {"data.rank_weights=[1, 0]"}); }) ==
        "--set \"data.rank_weights=[1, 0]\": \"data.rank_weights\" " + form + ", got [1,0]");
  CHECK_THAT(error_of([] { load(kBase, {"data.rank_weights=[-1, 2]"}); }), Catch::Contains(form));
  CHECK_THAT(error_of([] { load(kBase, {"data.rank_weights=[]"}); }), Catch::Contains(form));
  CHECK_THAT(error_of([] { load(kBase, {"data.rank_weights=autp"}); }), Catch::Contains("did you mean \"auto\"?"));
  CHECK(error_of([&] { config::resolve(listed, 4); }) ==
        "batch settings for 4 rank(s): data.rank_weights has 2 weight(s), one per rank is 4; give one weight per "
        "rank, or \"equal\" or \"auto\"");
}

TEST_CASE("batch.micro_batch auto needs batch.global and leaves batch.accumulation to the trainer", "[config]") {
  const config::Config c = load(kBase, {"batch.micro_batch=auto", "batch.global=512"});
  CHECK(c.batch.micro_batch == 0);
  CHECK(config::to_json(c)["batch"]["micro_batch"] == "auto");
  const config::Config resolved = config::resolve(c, 4);  // nothing to derive yet
  CHECK(resolved.batch.micro_batch == 0);
  CHECK(resolved.batch.global == 512);
  CHECK_THAT(error_of([] { load(kBase, {"batch.micro_batch=auto"}); }),
             Catch::Contains("batch.micro_batch auto needs batch.global"));
  CHECK_THAT(error_of([] { load(kBase, {"batch.micro_batch=auto", "batch.global=512", "batch.accumulation=2"}); }),
             Catch::Contains("leave batch.accumulation at 1"));
  CHECK_THAT(error_of([] { load(kBase, {"batch.micro_batch=atuo"}); }), Catch::Contains("did you mean \"auto\"?"));
}

namespace {

// Every word of E's table, read through the file and --set, becomes the enum the table pairs it
// with in `field`, and to_json writes the word back at `key`.
template <typename E, typename Get>
void check_words(const std::string& key, Get field) {
  std::string pointer = "/" + key;
  std::replace(pointer.begin(), pointer.end(), '.', '/');
  const json::json_pointer at(pointer);
  for (const config::Word<E>& w : config::Words<E>::table) {
    INFO(key << " = " << w.text);
    json tree = kBase;
    tree[at] = w.text;
    const config::Config from_file = load(tree);
    CHECK(field(from_file) == w.value);
    CHECK(config::to_json(from_file).at(at) == w.text);
    CHECK(field(load(kBase, {key + "=" + w.text})) == w.value);
    CHECK(config::parse_word<E>(w.text) == w.value);
    CHECK(std::string(config::word(w.value)) == w.text);
  }
  const config::Setting* setting = config::settings().find(key);
  REQUIRE(setting != nullptr);
  CHECK(setting->choices == config::words<E>());  // the schema's choices are the table's words
  // An unknown word: bad input naming the key (and the file or the --set argument).
  CHECK_THAT(error_of([&] { load(kBase, {key + "=bogus"}); }),
             Catch::StartsWith("--set \"" + key + "=bogus\": \"" + key + "\" must be one of "));
  CHECK_FALSE(config::parse_word<E>("bogus").has_value());
}

}  // namespace

TEST_CASE("choice settings become enums through one table of words each", "[config]") {
  using config::Config;
  check_words<config::DataKind>("data.kind", [](const Config& c) { return c.data.kind; });
  check_words<config::OptimizerName>("optimizer.name", [](const Config& c) { return c.optimizer.name; });
  check_words<config::Fused>("optimizer.fused", [](const Config& c) { return c.optimizer.fused; });
  check_words<config::Decay>("optimizer.decay", [](const Config& c) { return c.optimizer.decay; });
  check_words<config::ScheduleName>("schedule.name", [](const Config& c) { return c.schedule.name; });
  check_words<config::PrecisionMode>("precision.mode", [](const Config& c) { return c.precision.mode; });
  check_words<config::WireDtype>("ddp.wire_dtype", [](const Config& c) { return c.ddp.wire_dtype; });
  check_words<config::Compression>("ddp.compression", [](const Config& c) { return c.ddp.compression; });
  check_words<config::DeviceKind>("device.kind", [](const Config& c) { return c.device.kind; });
  check_words<config::Backend>("device.backend", [](const Config& c) { return c.device.backend; });
  check_words<config::Remainder>("data.train.remainder", [](const Config& c) { return c.data.train.remainder; });
  check_words<config::Remainder>("data.eval.remainder", [](const Config& c) { return c.data.eval.remainder; });

  // In a file, an unknown word names the file and the key.
  const std::string path = (temp_dir() / "config.json").string();
  CHECK(error_of([&] { load(patched(json::parse(R"({"ddp": {"wire_dtype": "fp8"}})"))); }) ==
        "config file \"" + path + "\": \"ddp.wire_dtype\" must be one of \"fp32\", \"bf16\", \"fp16\", got \"fp8\"");
}

TEST_CASE("each setting says whether it may change on resume", "[config]") {
  CHECK(config::may_change_on_resume("log.every_steps"));
  CHECK(config::may_change_on_resume("batch.micro_batch"));
  CHECK(config::may_change_on_resume("batch.accumulation"));
  CHECK(config::may_change_on_resume("device.backend"));
  CHECK(config::may_change_on_resume("model.init_from"));
  CHECK(config::may_change_on_resume("data.rank_weights"));
  CHECK(config::may_change_on_resume("data.rank_weights.1"));  // an item of a list setting
  CHECK_FALSE(config::may_change_on_resume("optimizer.lr"));
  CHECK_FALSE(config::may_change_on_resume("optimizer.betas.0"));
  CHECK_FALSE(config::may_change_on_resume("batch.global"));
  CHECK_FALSE(config::may_change_on_resume("ddp.wire_dtype"));
  CHECK_FALSE(config::may_change_on_resume("data.train.files"));
  CHECK_FALSE(config::may_change_on_resume("model.name"));
  CHECK_FALSE(config::may_change_on_resume("model.gpt.n_layer"));  // model options must match
  CHECK_FALSE(config::may_change_on_resume("log"));                // a section is no setting
  CHECK_FALSE(config::may_change_on_resume("log.every_steps_old"));  // nor an unknown key
  const config::Setting* lr = config::settings().find("optimizer.lr");
  REQUIRE(lr != nullptr);
  CHECK(lr->resume == config::Resume::must_match);
}

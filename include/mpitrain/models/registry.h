#pragma once
// Models by name: the built-in mlp, cnn and gpt, and the API that registers users' own models.
//
// Contract:
// - register_model() adds a model under a name made of lowercase letters, digits and '_'
//   (not "name" or "init_from", which model.name and model.init_from use). Its options schema declares the model's options,
//   found in a config at model.<name>.<option>: they are validated (unknown keys with "did you
//   mean", types, ranges, the schema's check) and given defaults before the factory runs, and
//   they appear in the saved config. A second registration of a name, an invalid name or an
//   empty factory is std::invalid_argument.
// - The registry may be used from static initialisers in any translation unit (it is created on
//   first use, with the built-in models already in it) and from several threads.
//   A registration in a static library is only linked in when something else in its object
//   file is used; register in a file of the executable, or call a registering function from
//   main().
// - create() validates the options and builds the model; an unknown name is
//   runtime::Error(bad_input) with a "did you mean" and the list of registered names. A
//   factory that throws (e.g. the sizes do not fit in memory) becomes runtime::Error(bad_input)
//   naming the model's options and their values.
//
// Registering a model (see examples/custom_model and docs/models.md):
//   static const bool registered = mpitrain::models::register_model({
//       "tiny",
//       {{config::integer("width", 64, "hidden width", config::Range::at_least(1))}, {}},
//       [](const config::Section& o) -> std::shared_ptr<Model> {
//         return std::make_shared<Tiny>(o.integer("width"));
//       }});

#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "mpitrain/config/config.h"
#include "mpitrain/config/schema.h"
#include "mpitrain/models/model.h"

namespace mpitrain::models {

/// Builds a model from its resolved options (every option of its schema is present).
using Factory = std::function<std::shared_ptr<Model>(const config::Section& options)>;

struct ModelSpec {
  std::string name;
  config::Schema options;  // setting paths relative to model.<name>
  Factory factory;
};

/// Adds a model; returns true so that it can initialise a static (see the contract).
bool register_model(ModelSpec spec);

/// Registered names, sorted.
std::vector<std::string> model_names();

/// Every registered model's options schema, for config::load() and config::validate().
config::ModelSchemas option_schemas();

/// Validates `options` (the model.<name> section; missing options take their defaults) and
/// builds the model.
std::shared_ptr<Model> create(const std::string& name,
                              const nlohmann::json& options = nlohmann::json::object());

}  // namespace mpitrain::models

// Builds the model a config names (here, typically the "resmlp" registered in resmlp.cpp) and
// runs one forward pass on random inputs: the path a training program takes from config to
// model, without the training.
//
//   custom_model --config examples/custom_model/config.json [--set model.resmlp.depth=4 ...]
#include <ATen/ATen.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <string>
#include <vector>

#include "mpitrain/config/config.h"
#include "mpitrain/models/registry.h"
#include "mpitrain/runtime/error.h"

int main(int argc, char** argv) {
  CLI::App app("Build a registered model from a config and run one forward pass");
  std::string path;
  std::vector<std::string> overrides;
  app.add_option("--config", path, "JSON config file")->required();
  app.add_option("--set", overrides, "override a setting: key.path=value");
  CLI11_PARSE(app, argc, argv);

  namespace config = mpitrain::config;
  namespace models = mpitrain::models;
  try {
    // option_schemas() includes resmlp: its registration ran before main().
    const config::Config cfg =
        config::resolve(config::load(path, overrides, models::option_schemas()), 1);
    const auto model = models::create(cfg.model.name, cfg.model.options);
    model->eval();
    // Classification models in this example take input_dim features per sample.
    const std::int64_t features = cfg.model.options.value("input_dim", 1);
    const at::Tensor logits = model->forward(at::randn({cfg.batch.micro_batch, features}));
    std::printf("model %s (%s): %lld parameters; logits [%lld, %lld]\n", cfg.model.name.c_str(),
                models::to_string(model->task()),
                static_cast<long long>(models::count_parameters(*model)),
                static_cast<long long>(logits.size(0)), static_cast<long long>(logits.size(1)));
    return 0;
  } catch (const mpitrain::runtime::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return mpitrain::runtime::to_int(e.code());
  }
}

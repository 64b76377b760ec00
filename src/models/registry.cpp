#include "mpitrain/models/registry.h"

#include <map>
#include <mutex>
#include <stdexcept>
#include <utility>

#include "builtin.h"
#include "mpitrain/runtime/error.h"

namespace mpitrain::models {

namespace {

bool valid_name(const std::string& name) {
  if (name.empty() || name == "name" || name == "init_from" || !(name[0] >= 'a' && name[0] <= 'z')) return false;
  for (const char c : name)
    if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_')) return false;
  return true;
}

// The one global of the layer: created on first use (so static registrations in any order
// work), with the built-in models already in it.
class Registry {
 public:
  static Registry& instance() {
    static Registry registry;
    return registry;
  }

  void add(ModelSpec spec) {
    if (!valid_name(spec.name))
      throw std::invalid_argument("cannot register model \"" + spec.name +
                                  "\": use lowercase letters, digits and '_', starting with a "
                                  "letter (and not \"name\")");
    if (!spec.factory)
      throw std::invalid_argument("cannot register model \"" + spec.name + "\": no factory");
    std::lock_guard<std::mutex> lock(mutex_);
    const std::string name = spec.name;
    if (!specs_.emplace(name, std::move(spec)).second)
      throw std::invalid_argument("model \"" + name + "\" is registered twice");
  }

  std::map<std::string, ModelSpec> specs() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return specs_;
  }

 private:
  Registry() {
    for (ModelSpec spec : {builtin::mlp(), builtin::cnn(), builtin::gpt()})
      specs_.emplace(spec.name, std::move(spec));
  }

  mutable std::mutex mutex_;
  std::map<std::string, ModelSpec> specs_;
};

// LibTorch's messages carry a C++ backtrace after the first line.
std::string first_line(const std::string& text) { return text.substr(0, text.find('\n')); }

}  // namespace

bool register_model(ModelSpec spec) {
  Registry::instance().add(std::move(spec));
  return true;
}

std::vector<std::string> model_names() {
  std::vector<std::string> names;
  for (const auto& entry : Registry::instance().specs()) names.push_back(entry.first);
  return names;
}

config::ModelSchemas option_schemas() {
  config::ModelSchemas schemas;
  for (const auto& [name, spec] : Registry::instance().specs()) schemas.emplace(name, spec.options);
  return schemas;
}

std::shared_ptr<Model> create(const std::string& name, const nlohmann::json& options) {
  const auto specs = Registry::instance().specs();
  const auto found = specs.find(name);
  if (found == specs.end()) {
    const std::vector<std::string> names = model_names();
    std::string message = "unknown model \"" + name + "\"";
    if (std::string near = config::closest(name, names); !near.empty())
      message += "; did you mean \"" + near + "\"?";
    message += " Registered models:";
    for (const std::string& n : names) message += " " + n;
    throw runtime::Error(message, runtime::ExitCode::bad_input);
  }
  const std::string path = "model." + name;
  const nlohmann::json resolved =
      config::resolve(found->second.options, options, "options of model \"" + name + "\"", path);
  try {
    return found->second.factory(config::Section(resolved, path));
  } catch (const runtime::Error&) {
    throw;
  } catch (const std::exception& e) {
    // Sizes that pass their ranges can still multiply into more memory than there is, or
    // overflow LibTorch's element counts; say which options built it.
    std::string given;
    for (const auto& [key, value] : resolved.items())
      given += (given.empty() ? "" : ", ") + key + " " + value.dump();
    throw runtime::Error("in \"" + path + "\": the model cannot be built with " + given + ": " +
                             first_line(e.what()) + ". Lower the sizes in " + path,
                         runtime::ExitCode::bad_input);
  }
}

}  // namespace mpitrain::models

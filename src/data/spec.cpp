#include "mpitrain/data/spec.h"

#include <glob.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>

#include "mpitrain/runtime/error.h"
#include "paths.h"

namespace mpitrain::data {
namespace {

using runtime::Error;
using runtime::ExitCode;
constexpr const char* kFormat = "mpitrain-shards";
constexpr int kVersion = 1;

[[noreturn]] void bad_manifest(const std::string& path, const std::string& what) {
  throw Error("manifest '" + path + "': " + what + " (docs/data.md describes the format)", ExitCode::bad_input);
}

template <class T>
T field(const nlohmann::json& object, const char* key, const std::string& path, const std::string& where) {
  if (!object.is_object() || !object.contains(key)) bad_manifest(path, where + " has no '" + key + "'");
  try {
    return object.at(key).get<T>();
  } catch (const nlohmann::json::exception&) {
    bad_manifest(path, where + "." + key + " has the wrong type");
  }
}

}  // namespace

Kind parse_kind(const std::string& text) {
  if (text == "classification") return Kind::classification;
  if (text == "tokens") return Kind::tokens;
  throw Error("unknown dataset kind '" + text + "': expected classification or tokens", ExitCode::bad_input);
}

const char* to_string(Kind kind) { return kind == Kind::tokens ? "tokens" : "classification"; }

DatasetSpec DatasetSpec::classification(std::string source) {
  DatasetSpec spec;
  spec.source = std::move(source);
  spec.kind = Kind::classification;
  return spec;
}

DatasetSpec DatasetSpec::token_stream(std::string source, std::int64_t seq_len) {
  DatasetSpec spec;
  spec.source = std::move(source);
  spec.kind = Kind::tokens;
  spec.seq_len = seq_len;
  return spec;
}

bool is_manifest(const std::string& source) {
  return source.size() >= 5 && source.compare(source.size() - 5, 5, ".json") == 0;
}

Manifest read_manifest(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw Error("manifest '" + path + "' cannot be read: check the path", ExitCode::bad_input);
  nlohmann::json json;
  try {
    in >> json;
  } catch (const nlohmann::json::parse_error& e) {
    bad_manifest(path, std::string("not valid JSON: ") + e.what());
  }
  if (field<std::string>(json, "format", path, "the top level") != kFormat)
    bad_manifest(path, std::string("format is not '") + kFormat + "'");
  if (field<int>(json, "version", path, "the top level") != kVersion)
    bad_manifest(path, "version " + json["version"].dump() + " is not supported (this build reads " +
                           std::to_string(kVersion) + ")");
  Manifest manifest;
  const auto files = field<nlohmann::json>(json, "files", path, "the top level");
  if (!files.is_array() || files.empty()) bad_manifest(path, "'files' must be a non-empty array");
  for (std::size_t i = 0; i < files.size(); ++i) {
    const std::string where = "files[" + std::to_string(i) + "]";
    Manifest::File file{field<std::string>(files[i], "path", path, where),
                        field<std::int64_t>(files[i], "rows", path, where)};
    if (file.rows < 0) bad_manifest(path, where + ".rows is negative");
    manifest.files.push_back(file);
  }
  const auto datasets = field<nlohmann::json>(json, "datasets", path, "the top level");
  if (!datasets.is_array() || datasets.empty()) bad_manifest(path, "'datasets' must be a non-empty array");
  for (std::size_t i = 0; i < datasets.size(); ++i) {
    const std::string where = "datasets[" + std::to_string(i) + "]";
    manifest.datasets.push_back({field<std::string>(datasets[i], "name", path, where),
                                 field<std::string>(datasets[i], "dtype", path, where),
                                 field<std::vector<std::int64_t>>(datasets[i], "shape", path, where)});
  }
  if (json.contains("metadata")) manifest.metadata = json["metadata"];
  return manifest;
}

void write_manifest(const std::string& path, const Manifest& manifest) {
  nlohmann::json files = nlohmann::json::array(), datasets = nlohmann::json::array();
  for (const auto& file : manifest.files) files.push_back({{"path", file.path}, {"rows", file.rows}});
  for (const auto& d : manifest.datasets)
    datasets.push_back({{"name", d.name}, {"dtype", d.dtype}, {"shape", d.shape}});
  const nlohmann::json json = {{"format", kFormat},  {"version", kVersion},
                               {"files", files},     {"datasets", datasets},
                               {"metadata", manifest.metadata}};
  const std::string temporary = path + ".tmp" + std::to_string(getpid());
  {
    std::ofstream out(temporary);
    out << json.dump(2) << '\n';
    out.flush();
    if (!out) {
      std::remove(temporary.c_str());
      throw Error("cannot write manifest '" + path + "': check the folder exists and is writable",
                  ExitCode::bad_input);
    }
  }
  paths::move(temporary, path);
}

std::vector<std::string> resolve_files(const std::string& source) {
  if (source.empty()) throw Error("no dataset source given: name a manifest (.json) or a glob of .h5 shards", ExitCode::bad_input);
  std::vector<std::string> files;
  if (is_manifest(source)) {
    const std::string folder = paths::parent(source);
    for (const auto& file : read_manifest(source).files) files.push_back(paths::join(folder, file.path));
    return files;
  }
  glob_t matches{};
  const int rc = ::glob(source.c_str(), 0, nullptr, &matches);
  for (std::size_t i = 0; rc == 0 && i < matches.gl_pathc; ++i) files.emplace_back(matches.gl_pathv[i]);
  globfree(&matches);
  if (files.empty()) {
    const bool pattern = source.find_first_of("*?[") != std::string::npos;
    throw Error(pattern ? "no file matches '" + source + "': check the pattern and the folder"
                        : "file '" + source + "' does not exist: check the path",
                ExitCode::bad_input);
  }
  return files;  // glob() sorts
}

}  // namespace mpitrain::data

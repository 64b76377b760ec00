#include "mpitrain/checkpoint/checkpoint.h"

#include <fcntl.h>
#include <stdio.h>  // renameat2
#include <ftw.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>

#include <nlohmann/json.hpp>

#include "mpitrain/runtime/error.h"
#include "mpitrain/runtime/fault.h"
#include "mpitrain/runtime/log.h"
#include "mpitrain/runtime/world.h"

namespace fs = std::filesystem;

namespace mpitrain::checkpoint {
namespace {

std::string step_name(std::int64_t step) {
  char name[32];
  std::snprintf(name, sizeof name, "step-%08lld", static_cast<long long>(step));
  return name;
}

std::uint32_t crc_of(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::vector<char> buffer(1 << 20);
  uLong crc = crc32(0L, Z_NULL, 0);
  while (in) {
    in.read(buffer.data(), static_cast<std::streamsize>(buffer.size()));
    crc = crc32(crc, reinterpret_cast<const Bytef*>(buffer.data()), static_cast<uInt>(in.gcount()));
  }
  return static_cast<std::uint32_t>(crc);
}

// std::filesystem::remove_all would resolve to the copy that libtorch.so exports, which
// crashes when it has something to remove; POSIX nftw does the same job.
void remove_tree(const std::string& path) {
  if (!fs::exists(path)) return;
  const auto remove_entry = [](const char* entry, const struct stat*, int, struct FTW*) { return ::remove(entry); };
  if (::nftw(path.c_str(), remove_entry, 16, FTW_DEPTH | FTW_PHYS) != 0)
    throw runtime::Error("cannot remove '" + path + "': check permissions on the checkpoint folder");
}

void rotate(const std::string& root, std::int64_t newest, const Rotation& rotation) {
  if (rotation.keep_last <= 0) return;
  std::vector<std::int64_t> steps;
  for (const auto& entry : fs::directory_iterator(root)) {
    const std::int64_t step = step_of(entry.path().string());
    if (step >= 0 && step <= newest) steps.push_back(step);
  }
  std::sort(steps.rbegin(), steps.rend());
  for (std::size_t i = static_cast<std::size_t>(rotation.keep_last); i < steps.size(); ++i) {
    if (steps[i] == newest) continue;
    if (rotation.keep_every > 0 && steps[i] % rotation.keep_every == 0) continue;
    remove_tree((fs::path(root) / step_name(steps[i])).string());
  }
}

// Moves the finished directory into place. When the step exists already (a resumed run saving
// a step it had saved), the two are exchanged atomically, so the old one is never gone before
// the new one is there; the old one is left under a temporary name. File systems without
// renameat2's flags (EINVAL) get a plain rename, with the old directory moved aside first.
void publish(const std::string& temporary, const std::string& final) {
  if (::renameat2(AT_FDCWD, temporary.c_str(), AT_FDCWD, final.c_str(), RENAME_NOREPLACE) == 0) return;
  if (errno == EEXIST && ::renameat2(AT_FDCWD, temporary.c_str(), AT_FDCWD, final.c_str(), RENAME_EXCHANGE) == 0)
    return;
  if (errno == EINVAL) {
    const std::string aside = temporary + ".old";
    if ((!fs::exists(final) || ::rename(final.c_str(), aside.c_str()) == 0) &&
        ::rename(temporary.c_str(), final.c_str()) == 0)
      return;
  }
  throw runtime::Error("cannot rename '" + temporary + "' to '" + final + "': " + std::strerror(errno) +
                       ". The previous checkpoints are untouched; check the checkpoint folder's file system");
}

// Temporary directories left by saves that were killed, or by publish(): none is a checkpoint.
void remove_temporaries(const std::string& root) {
  for (const auto& entry : fs::directory_iterator(root)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind(".step-", 0) == 0 && name.find(".tmp") != std::string::npos) remove_tree(entry.path().string());
  }
}

}  // namespace

void fsync_path(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) throw runtime::Error("cannot open '" + path + "' to sync it to disk");
  const int rc = ::fsync(fd);
  ::close(fd);
  if (rc != 0) throw runtime::Error("fsync of '" + path + "' failed: the file system may be full or read-only");
}

void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  out.close();  // the last buffered bytes are written here: a full disk shows up now, not never
  if (!out) throw runtime::Error("cannot write '" + path + "': check free space and permissions");
  fsync_path(path);
}

std::int64_t step_of(const std::string& directory) {
  const std::string name = fs::path(directory).filename().string();
  if (name.size() != 13 || name.rfind("step-", 0) != 0) return -1;
  for (std::size_t i = 5; i < name.size(); ++i)
    if (name[i] < '0' || name[i] > '9') return -1;
  return std::stoll(name.substr(5));
}

Writer::Writer(const runtime::World& world, std::string root, std::int64_t step, std::chrono::milliseconds timeout)
    : world_(world), root_(std::move(root)), step_(step), timeout_(timeout) {
  temporary_ = (fs::path(root_) / ("." + step_name(step) + ".tmp")).string();
  final_ = (fs::path(root_) / step_name(step)).string();
  if (world_.is_root()) {
    fs::create_directories(root_);
    remove_tree(temporary_);  // a save that was killed half-way
    fs::create_directories(temporary_);
  }
  world_.barrier(timeout_, "checkpoint " + final_ + ": waiting for rank 0 to create the folder");
}

std::string Writer::commit(const Rotation& rotation) {
  runtime::fault_point("checkpoint.files_written", world_.rank());
  world_.barrier(timeout_, "checkpoint " + final_ + ": waiting for every rank's files");
  if (world_.is_root()) {
    nlohmann::json files = nlohmann::json::object();
    for (const auto& entry : fs::directory_iterator(temporary_)) {
      const std::string path = entry.path().string();
      files[entry.path().filename().string()] = {{"bytes", fs::file_size(path)}, {"crc32", crc_of(path)}};
    }
    write_file((fs::path(temporary_) / "manifest.json").string(),
               nlohmann::json{{"step", step_}, {"world_size", world_.size()}, {"files", files}}.dump(2));
    fsync_path(temporary_);
    runtime::fault_point("checkpoint.manifest_written", world_.rank());
    publish(temporary_, final_);
    fsync_path(root_);
    runtime::fault_point("checkpoint.renamed", world_.rank());
    remove_temporaries(root_);
    rotate(root_, step_, rotation);
  }
  world_.barrier(timeout_, "checkpoint " + final_ + ": waiting for rank 0 to finish it");
  return final_;
}

std::string verify(const std::string& directory) {
  const fs::path manifest_path = fs::path(directory) / "manifest.json";
  if (!fs::exists(manifest_path)) return "no manifest.json (the save did not finish)";
  nlohmann::json manifest;
  try {
    std::ifstream in(manifest_path);
    manifest = nlohmann::json::parse(in);
    for (const auto& [name, entry] : manifest.at("files").items()) {
      // Only plain names: a manifest must not point the checks at files outside its folder.
      if (name.empty() || name == "." || name == ".." || name.find('/') != std::string::npos)
        return "the manifest names the file \"" + name + "\", which is not a file in the checkpoint";
      const fs::path file = fs::path(directory) / name;
      if (!fs::exists(file)) return "file " + name + " is missing";
      if (fs::file_size(file) != entry.at("bytes").get<std::uintmax_t>())
        return "file " + name + " has " + std::to_string(fs::file_size(file)) + " bytes, the manifest says " +
               std::to_string(entry.at("bytes").get<std::uintmax_t>());
      if (crc_of(file.string()) != entry.at("crc32").get<std::uint32_t>()) return "file " + name + " fails its CRC-32 check";
    }
  } catch (const std::exception& e) {
    return std::string("unreadable manifest.json (") + e.what() + ")";
  }
  return "";
}

std::optional<std::string> find_latest(const std::string& root, const runtime::Logger& log) {
  if (!fs::exists(root)) return std::nullopt;
  std::vector<std::pair<std::int64_t, std::string>> candidates;
  for (const auto& entry : fs::directory_iterator(root)) {
    const std::int64_t step = step_of(entry.path().string());
    if (step >= 0) candidates.emplace_back(step, entry.path().string());
  }
  std::sort(candidates.rbegin(), candidates.rend());
  for (const auto& [step, path] : candidates) {
    const std::string problem = verify(path);
    if (problem.empty()) return path;
    log.warn("skipping checkpoint " + path + ": " + problem);
  }
  return std::nullopt;
}

}  // namespace mpitrain::checkpoint

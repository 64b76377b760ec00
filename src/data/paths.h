#pragma once
// Path and file helpers of the data layer, on POSIX calls rather than std::filesystem: the
// LibTorch wheel's libtorch.so exports its own build of std::filesystem, which the dynamic
// linker binds in place of the system one, and some of its functions (remove_all) crash when
// called from code built against the system headers.

#include <sys/stat.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>

#include "mpitrain/runtime/error.h"

namespace mpitrain::data::paths {

inline std::string join(const std::string& folder, const std::string& name) {
  if (folder.empty() || (!name.empty() && name[0] == '/')) return name;
  return folder.back() == '/' ? folder + name : folder + "/" + name;
}

/// The folder part of a path ("" for a bare file name).
inline std::string parent(const std::string& path) {
  const auto slash = path.find_last_of('/');
  return slash == std::string::npos ? "" : path.substr(0, slash == 0 ? 1 : slash);
}

/// mkdir -p; throws runtime::Error(bad_input) saying why it cannot.
inline void make_directories(const std::string& path) {
  for (std::size_t at = 1; at <= path.size(); ++at) {
    if (at < path.size() && path[at] != '/') continue;
    const std::string prefix = path.substr(0, at);
    struct stat info {};
    if (stat(prefix.c_str(), &info) == 0 && S_ISDIR(info.st_mode)) continue;
    if (mkdir(prefix.c_str(), 0777) != 0 && errno != EEXIST)
      throw runtime::Error("cannot create the folder '" + prefix + "': " + std::strerror(errno),
                           runtime::ExitCode::bad_input);
  }
}

/// rename(2): atomic within a file system; throws runtime::Error(bad_input) on failure.
inline void move(const std::string& from, const std::string& to) {
  if (std::rename(from.c_str(), to.c_str()) != 0)
    throw runtime::Error("cannot move '" + from + "' to '" + to + "': " + std::strerror(errno),
                         runtime::ExitCode::bad_input);
}

}  // namespace mpitrain::data::paths

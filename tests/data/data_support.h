#pragma once
// Helpers shared by the data tests: the fixture folder (written by make_fixtures.sh before the
// tests run), the CPU communicator, scratch folders shared by the ranks, and a writer for
// "id" datasets whose targets are the sample index, so every delivered sample names itself.

#include <ATen/ATen.h>

#include <ftw.h>
#include <sys/stat.h>

#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "mpitrain/comm/communicator.h"
#include "mpitrain/data/shards.h"
#include "test_world.h"

namespace mpitrain::testing {

inline std::string fixture(const std::string& name) { return std::string(MPITRAIN_DATA_FIXTURES) + "/" + name; }

inline comm::Communicator& communicator() {
  static std::unique_ptr<comm::Communicator> comm = [] {
    comm::CommOptions options;
    options.timeout = std::chrono::seconds(120);
    return comm::make_communicator(world(), c10::Device(c10::kCPU), options);
  }();
  return *comm;
}

/// An empty folder that every rank sees, distinct per world size (the np1/np2/np4 runs of a
/// test may run at the same time). Collective.
/// (POSIX calls: libtorch.so's exported std::filesystem::remove_all crashes when called from here.)
inline std::string scratch(const std::string& name) {
  const std::string path = fixture("scratch-" + name + "-np" + std::to_string(world().size()));
  if (world().is_root()) {
    nftw(path.c_str(), [](const char* p, const struct stat*, int, struct FTW*) { return std::remove(p); }, 8,
         FTW_DEPTH | FTW_PHYS);
    mkdir(path.c_str(), 0777);
  }
  world().barrier();
  return path;
}

/// Rank 0 writes <dir>/ids.json: n samples, inputs[i] = (i, -i) float32, targets[i] = i int64,
/// `shards` shards, chunks of chunk_rows rows. Collective.
inline std::string write_ids(const std::string& dir, std::int64_t n, std::int64_t shards, std::int64_t chunk_rows) {
  if (world().is_root()) {
    const at::Tensor ids = at::arange(n, at::kLong);
    data::ShardOptions options;
    options.shards = shards;
    options.chunk_bytes = chunk_rows * 8;  // 8 bytes per row in both columns
    options.gzip = 1;
    data::write_shards(dir, "ids", {{"inputs", at::stack({ids, -ids}, 1).to(at::kFloat)}, {"targets", ids}}, options);
  }
  world().barrier();
  return dir + "/ids.json";
}

/// The global batch a rank's batch is a slice of (all ranks call it).
inline std::vector<std::int64_t> gather(const at::Tensor& targets) {
  const at::Tensor mine = targets.contiguous();
  at::Tensor all = at::empty({mine.numel() * communicator().size()}, mine.options());
  communicator().all_gather(all, mine);
  return std::vector<std::int64_t>(all.data_ptr<std::int64_t>(), all.data_ptr<std::int64_t>() + all.numel());
}

}  // namespace mpitrain::testing

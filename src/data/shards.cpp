#include "mpitrain/data/shards.h"

#include <ATen/ATen.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <memory>
#include <numeric>
#include <tuple>

#include "hdf5.h"
#include "mpitrain/data/dataset.h"
#include "mpitrain/runtime/error.h"
#include "paths.h"

namespace mpitrain::data {
namespace {

using runtime::Error;
using runtime::ExitCode;

std::string shard_name(const std::string& name, std::int64_t index, std::int64_t count) {
  char buffer[64];
  std::snprintf(buffer, sizeof buffer, "-%05lld-of-%05lld.h5", static_cast<long long>(index),
                static_cast<long long>(count));
  return name + buffer;
}

std::int64_t row_bytes(const at::Tensor& rows) {
  return rows.numel() / std::max<std::int64_t>(1, rows.size(0)) * static_cast<std::int64_t>(rows.element_size());
}

void write_file(const std::string& path, const std::string& shown, const std::vector<Column>& columns,
                std::int64_t first, std::int64_t count, const ShardOptions& options) {
  const std::string where = h5::place(shown);
  h5::Handle file(H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT), H5Fclose);
  if (!file) h5::fail(where, "cannot create it");
  for (const auto& column : columns) {
    const std::string at = h5::place(shown, column.name);
    const at::Tensor rows = column.rows.narrow(0, first, count).contiguous();
    const h5::Element element = h5::from_torch(rows.scalar_type());
    std::vector<hsize_t> dims(rows.sizes().begin(), rows.sizes().end());
    std::vector<hsize_t> chunk = dims;
    chunk[0] = static_cast<hsize_t>(std::clamp<std::int64_t>(options.chunk_bytes / std::max<std::int64_t>(1, row_bytes(rows)), 1,
                                                             std::max<std::int64_t>(1, count)));
    h5::Handle space(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr), H5Sclose);
    h5::Handle create(H5Pcreate(H5P_DATASET_CREATE), H5Pclose);
    if (!space || !create || H5Pset_chunk(create.get(), static_cast<int>(chunk.size()), chunk.data()) < 0)
      h5::fail(at, "cannot set up the dataset");
    if (options.gzip > 0) {
      // Shuffle groups the bytes of multi-byte elements so gzip finds longer runs; for bytes it
      // would be a no-op.
      if (h5::element_bytes(element) > 1 && H5Pset_shuffle(create.get()) < 0) h5::fail(at, "cannot add the shuffle filter");
      if (H5Pset_deflate(create.get(), static_cast<unsigned>(options.gzip)) < 0) h5::fail(at, "cannot add the gzip filter");
    }
    const h5::Handle stored = h5::file_type_for(element);
    h5::Handle dataset(H5Dcreate2(file.get(), column.name.c_str(), stored.get(), space.get(), H5P_DEFAULT, create.get(),
                                  H5P_DEFAULT),
                       H5Dclose);
    if (!dataset) h5::fail(at, "cannot create the dataset");
    const h5::Handle memory = h5::memory_type(element);
    if (H5Dwrite(dataset.get(), memory.get(), H5S_ALL, H5S_ALL, H5P_DEFAULT, rows.data_ptr()) < 0)
      h5::fail(at, "cannot write it (disk full?)");
  }
  // Closing flushes: its failure is a failed write.
  if (H5Fclose(file.release()) < 0) h5::fail(where, "cannot finish writing it (disk full?)");
}

herr_t collect_dataset(hid_t group, const char* name, const H5L_info_t*, void* data) {
  const hid_t object = H5Oopen(group, name, H5P_DEFAULT);
  if (object < 0) {
    H5Eclear2(H5E_DEFAULT);
    return 0;  // a dangling link: not a dataset
  }
  if (H5Iget_type(object) == H5I_DATASET) static_cast<std::vector<std::string>*>(data)->emplace_back(name);
  H5Oclose(object);
  return 0;
}

std::string filter_text(const h5::Filter& filter) {
  std::string text = filter.name;
  if (filter.id == H5Z_FILTER_DEFLATE && !filter.params.empty()) text = "gzip(" + std::to_string(filter.params[0]) + ")";
  if (!filter.available) text += " (not available in this HDF5 build)";
  return text;
}

std::string shape_text(const std::vector<std::int64_t>& shape) {
  std::string out = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) out += (i ? "," : "") + std::to_string(shape[i]);
  return out + "]";
}

}  // namespace

ShardSet write_shards(const std::string& out_dir, const std::string& name, const std::vector<Column>& columns,
                      const ShardOptions& options, const nlohmann::json& metadata) {
  h5::quiet();
  if (columns.empty()) throw Error("nothing to write: no columns", ExitCode::bad_input);
  const std::int64_t rows = columns.front().rows.dim() > 0 ? columns.front().rows.size(0) : 0;
  std::int64_t bytes_per_row = 0;
  for (const auto& column : columns) {
    if (column.rows.dim() == 0 || column.rows.size(0) != rows)
      throw Error("column '" + column.name + "' has " + (column.rows.dim() ? std::to_string(column.rows.size(0)) : "no") +
                      " rows but '" + columns.front().name + "' has " + std::to_string(rows) +
                      ": the first dimensions must agree",
                  ExitCode::bad_input);
    h5::from_torch(column.rows.scalar_type());
    bytes_per_row += row_bytes(column.rows);
  }
  if (rows == 0) throw Error("nothing to write for '" + name + "': the input has no rows", ExitCode::bad_input);
  if (options.gzip < 0 || options.gzip > 9 || options.chunk_bytes < 1 || options.shards < 0 || options.shard_bytes < 1)
    throw Error("shard options: gzip must be 0..9, chunk and shard sizes positive, shards >= 0", ExitCode::bad_input);
  std::int64_t count = options.shards > 0 ? options.shards
                                          : std::max<std::int64_t>(1, (rows * bytes_per_row + options.shard_bytes - 1) / options.shard_bytes);
  count = std::min(count, rows);

  paths::make_directories(out_dir);

  ShardSet set;
  set.rows = rows;
  set.manifest = paths::join(out_dir, name + ".json");
  Manifest manifest;
  manifest.metadata = metadata;
  for (const auto& column : columns) {
    const auto sizes = column.rows.sizes();
    manifest.datasets.push_back({column.name, h5::element_name(h5::from_torch(column.rows.scalar_type())),
                                 std::vector<std::int64_t>(sizes.begin() + 1, sizes.end())});
  }
  std::vector<std::string> temporaries;
  std::size_t renamed = 0;
  try {
    for (std::int64_t i = 0; i < count; ++i) {
      const std::int64_t first = i * rows / count, last = (i + 1) * rows / count;
      const std::string file_name = shard_name(name, i, count);
      const std::string final_path = paths::join(out_dir, file_name);
      const std::string temporary = paths::join(out_dir, "." + file_name + ".tmp" + std::to_string(getpid()));
      temporaries.push_back(temporary);
      set.files.push_back(final_path);
      write_file(temporary, final_path, columns, first, last - first, options);
      manifest.files.push_back({file_name, last - first});
    }
    for (; renamed < temporaries.size(); ++renamed) paths::move(temporaries[renamed], set.files[renamed]);
    write_manifest(set.manifest, manifest);
  } catch (...) {
    for (std::size_t i = 0; i < temporaries.size(); ++i) std::remove((i < renamed ? set.files[i] : temporaries[i]).c_str());
    throw;
  }
  return set;
}

FileInfo inspect_file(const std::string& path, bool file_locking) {
  FileInfo info;
  info.path = path;
  const h5::Handle file = h5::open_file(path, file_locking);
  struct stat st {};
  if (stat(path.c_str(), &st) == 0) info.file_bytes = static_cast<std::int64_t>(st.st_size);
  std::vector<std::string> names;
  if (H5Lvisit(file.get(), H5_INDEX_NAME, H5_ITER_INC, collect_dataset, &names) < 0)
    h5::fail(h5::place(path), "cannot list its datasets");
  for (const auto& name : names) {
    DatasetInfo d;
    d.name = name;
    const std::string where = h5::place(path, name);
    const h5::Handle dataset = h5::open_dataset(file, path, name);
    d.shape = h5::dims(dataset, where);
    d.chunks = h5::chunk_dims(dataset, where);
    for (const auto& filter : h5::filters(dataset, where)) d.filters.push_back(filter_text(filter));
    const h5::Handle type = h5::file_type(dataset, where);
    try {
      d.dtype = h5::element_name(h5::classify(type.get(), where));
      d.supported = true;
    } catch (const Error&) {
      d.dtype = h5::describe_type(type.get());
    }
    d.stored_bytes = static_cast<std::int64_t>(H5Dget_storage_size(dataset.get()));
    d.bytes = std::accumulate(d.shape.begin(), d.shape.end(), std::int64_t{1}, std::multiplies<>()) *
              static_cast<std::int64_t>(H5Tget_size(type.get()));
    info.datasets.push_back(std::move(d));
  }
  return info;
}

VerifyReport verify(const std::string& source, bool file_locking) {
  h5::quiet();
  VerifyReport report;
  const std::vector<std::string> files = resolve_files(source);
  const bool with_manifest = is_manifest(source);
  const Manifest manifest = with_manifest ? read_manifest(source) : Manifest{};
  std::vector<DatasetInfo> first_file;
  for (std::size_t i = 0; i < files.size(); ++i) {
    const std::string& path = files[i];
    const FileInfo info = inspect_file(path, file_locking);
    std::vector<const DatasetInfo*> checked;
    if (with_manifest) {
      for (const auto& expected : manifest.datasets) {
        const auto found = std::find_if(info.datasets.begin(), info.datasets.end(),
                                        [&](const DatasetInfo& d) { return d.name == expected.name; });
        if (found == info.datasets.end())
          throw Error(h5::place(path) + " has no dataset '" + expected.name + "', which manifest '" + source + "' lists",
                      ExitCode::bad_input);
        const std::vector<std::int64_t> shape(found->shape.begin() + (found->shape.empty() ? 0 : 1), found->shape.end());
        if (found->dtype != expected.dtype || shape != expected.shape || found->shape.empty() ||
            found->shape[0] != manifest.files[i].rows)
          throw Error(h5::place(path, expected.name) + " is " + found->dtype + shape_text(found->shape) + " but manifest '" +
                          source + "' says " + expected.dtype + shape_text(expected.shape) + " with " +
                          std::to_string(manifest.files[i].rows) + " rows: regenerate the manifest or the file",
                      ExitCode::bad_input);
        checked.push_back(&*found);
      }
    } else {
      for (const auto& d : info.datasets) checked.push_back(&d);
    }
    if (checked.empty()) throw Error(h5::place(path) + " holds no datasets", ExitCode::bad_input);
    for (const DatasetInfo* d : checked) {
      const std::string where = h5::place(path, d->name);
      if (!d->supported) throw Error(where + ": unsupported dtype " + d->dtype, ExitCode::bad_input);
      if (d->shape.empty()) throw Error(where + " is a scalar: the first dimension must be the sample index", ExitCode::bad_input);
      if (d->shape[0] != checked.front()->shape[0])
        throw Error(h5::place(path) + ": '" + d->name + "' has " + std::to_string(d->shape[0]) + " rows but '" +
                        checked.front()->name + "' has " + std::to_string(checked.front()->shape[0]) +
                        ": the first dimensions must agree",
                    ExitCode::bad_input);
    }
    if (i == 0) {
      for (const DatasetInfo* d : checked) first_file.push_back(*d);
    } else {
      for (std::size_t k = 0; k < checked.size() && k < first_file.size(); ++k) {
        const auto& a = *checked[k];
        const auto& b = first_file[k];
        if (a.name != b.name || a.dtype != b.dtype ||
            !std::equal(a.shape.begin() + 1, a.shape.end(), b.shape.begin() + 1, b.shape.end()))
          throw Error(h5::place(path, a.name) + " is " + a.dtype + shape_text(a.shape) + " but " +
                          h5::place(files.front(), b.name) + " is " + b.dtype + shape_text(b.shape) +
                          ": every shard must store the same datasets, dtypes and row shapes",
                      ExitCode::bad_input);
      }
    }
    // Read every chunk: a damaged one fails here, not in the middle of a training run.
    const h5::Handle file = h5::open_file(path, file_locking);
    for (const DatasetInfo* d : checked) {
      const std::string where = h5::place(path, d->name);
      const h5::Handle dataset = h5::open_dataset(file, path, d->name);
      h5::require_filters(dataset, where);
      const h5::Handle type = h5::file_type(dataset, where);
      const h5::Element element = h5::classify(type.get(), where);
      const std::int64_t rows = d->shape[0];
      const std::int64_t bytes_per_row =
          std::accumulate(d->shape.begin() + 1, d->shape.end(), std::int64_t{1}, std::multiplies<>()) *
          static_cast<std::int64_t>(h5::element_bytes(element));
      const std::int64_t chunk_rows = d->chunks.empty() ? std::max<std::int64_t>(1, (1 << 20) / std::max<std::int64_t>(1, bytes_per_row))
                                                        : d->chunks[0];
      std::unique_ptr<char[]> buffer(new char[static_cast<std::size_t>(std::max<std::int64_t>(1, chunk_rows * bytes_per_row))]);
      for (std::int64_t first = 0; first < rows; first += chunk_rows) {
        const std::int64_t n = std::min(chunk_rows, rows - first);
        h5::read_rows(dataset, element, first, n, buffer.get(), where);
        ++report.chunks;
        report.bytes_read += n * bytes_per_row;
      }
    }
    report.rows += checked.front()->shape[0];
    ++report.files;
  }
  return report;
}

ReadPlan plan_reads(const DatasetSpec& spec, const SamplerOptions& options, int ranks, std::int64_t epoch,
                    int stages) {
  if (stages < 1 || ranks < 1 || ranks % stages != 0)
    throw runtime::Error(std::to_string(stages) + " pipeline stages do not divide " + std::to_string(ranks) +
                             " ranks: choose a divisor of the world size",
                         runtime::ExitCode::bad_input);
  const int replicas = ranks / stages;
  if (options.global_batch % replicas != 0)
    throw runtime::Error(std::to_string(replicas) + " data-parallel ranks cannot share a global batch of " +
                             std::to_string(options.global_batch) + " equally: choose a divisor of it",
                         runtime::ExitCode::bad_input);
  const Dataset dataset(spec);
  const Sampler sampler(dataset.blocks(), options);
  ReadPlan plan;
  plan.samples = dataset.size();
  plan.blocks = static_cast<std::int64_t>(dataset.blocks().size());
  plan.bytes = dataset.bytes();
  plan.steps_per_epoch = sampler.steps_per_epoch();
  plan.partitions = sampler.partitions();
  const std::vector<std::int64_t> order = sampler.order(epoch);
  std::vector<std::int64_t> block_of;
  for (std::size_t b = 0; b < dataset.blocks().size(); ++b) block_of.insert(block_of.end(), static_cast<std::size_t>(dataset.blocks()[b]), static_cast<std::int64_t>(b));
  const std::int64_t share = options.global_batch / replicas;
  for (int w = 0; w < ranks; ++w) {
    RankReads reads;
    reads.stage = w / replicas;
    reads.replica = w % replicas;
    const int r = reads.replica;
    reads.samples_per_batch = share;
    std::tie(reads.first_partition, reads.last_partition) = sampler.partitions_of(r * share, (r + 1) * share);
    std::vector<std::int64_t> samples;
    for (std::int64_t s = 0; s < plan.steps_per_epoch; ++s) {
      const auto first = order.begin() + s * options.global_batch + r * share;
      samples.insert(samples.end(), first, first + share);
    }
    std::vector<std::int64_t> blocks;
    for (const std::int64_t sample : samples) blocks.push_back(block_of[static_cast<std::size_t>(sample)]);
    std::sort(blocks.begin(), blocks.end());
    reads.blocks = std::unique(blocks.begin(), blocks.end()) - blocks.begin();
    const ReadStats footprint = dataset.footprint(samples, Fields::of_stage(reads.stage, stages));
    reads.chunks = footprint.chunks_read;
    reads.bytes = footprint.bytes_read;
    plan.ranks.push_back(reads);
  }
  plan.blocks_per_batch = sampler.blocks_per_batch(epoch);
  SamplerOptions before = options;  // one partition, window 16: the order before partitions
  before.partitions = 1;
  before.window = 16;
  plan.blocks_per_batch_before = Sampler(dataset.blocks(), before).blocks_per_batch(epoch);
  return plan;
}

}  // namespace mpitrain::data

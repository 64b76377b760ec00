// Data loader throughput: mpitrain's Loader (shuffled, background prefetch) against a raw
// sequential read of the same shards through the HDF5 C API, in samples/s and MB/s.
//
//   build/bin/bench_loader --out bench/results/loader.json
//
// Without --source it makes its shards first, from Fashion-MNIST (the Debian package
// dataset-fashion-mnist), once per --gzip level. MB/s counts the bytes as stored per sample
// (Fashion-MNIST: uint8 image + uint8 label = 785 B), so both sides are measured on the same
// bytes. The raw
// read is one H5Dread per dataset per file (HDF5 decompresses chunk after chunk into one
// buffer): the fastest way to get every byte out of the file, and the bound for any loader.
// A loader pass is the next epoch of one Loader, as in a training run: every block is read
// and decompressed again in each epoch (the cache keeps a block only while this epoch's later
// samples need it), into recycled buffers; the raw read reuses its buffer too, so neither side
// pays for faulting in fresh memory, which a long run does not either.
// Each figure is the median of --reps timed passes (raw and loader alternating) after one
// untimed pass of each; with several ranks a pass takes as long as its slowest rank, and the
// raw read gives each rank 1/n of the rows. The global batch is the same at every world size, so
// the loader reads the same order; each rank's counters (decompressed bytes and chunks read,
// cache hits, for the epoch's own batches) give how much of the data it read against 1/n.
// A third pass, the shuffled copy, is the bound for any loader of this order: the rank's input
// rows, already in memory, copied into batch buffers in the loader's order (rows requested
// ahead as the loader does), with nothing else: no file, no bookkeeping, no thread.
#include <ATen/ATen.h>
#include <hdf5.h>

#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <functional>
#include <iostream>
#include <limits>
#include <memory>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include "harness.h"
#include "mpitrain/apps/cli.h"
#include "mpitrain/comm/agreement.h"
#include "mpitrain/comm/communicator.h"
#include "mpitrain/data/loader.h"
#include "mpitrain/data/shards.h"
#include "mpitrain/data/sources.h"
#include "mpitrain/runtime/error.h"
#include "mpitrain/runtime/world.h"

using namespace mpitrain;

namespace {

struct Options {
  std::string source;
  std::string idx_dir = "/usr/share/datasets/fashion-mnist";
  std::string work = "/tmp/mpitrain-bench-loader";
  std::vector<int> gzip = {4, 0};
  std::int64_t chunk_bytes = 1 << 20;
  std::int64_t global_batch = 256;
  int prefetch = 0;  // data.prefetch's default: what fills 1 MiB, 8 to 64 batches
  int workers = 1;   // data.workers
  std::int64_t window = 4;
  std::int64_t partitions = 16;
  int reps = 5;
  double goal = 0.9;
  double read_goal = 1.1;
  std::string out;
};

// This rank's share of a dataset's rows in one H5Dread: the raw reference.
std::int64_t raw_read(hid_t file, const char* name, double share_first, double share_last, std::vector<char>& buffer) {
  // HDF5's chunk cache off, as the loader has it: a chunk read whole is then decompressed
  // straight into the buffer instead of through the cache (faster for chunks over 1 MiB).
  const hid_t access = H5Pcreate(H5P_DATASET_ACCESS);
  H5Pset_chunk_cache(access, H5D_CHUNK_CACHE_NSLOTS_DEFAULT, 0, H5D_CHUNK_CACHE_W0_DEFAULT);
  const hid_t dataset = H5Dopen2(file, name, access);
  H5Pclose(access);
  const hid_t space = H5Dget_space(dataset);
  const hid_t type = H5Dget_type(dataset);
  const int rank = H5Sget_simple_extent_ndims(space);
  std::vector<hsize_t> dims(static_cast<std::size_t>(rank));
  H5Sget_simple_extent_dims(space, dims.data(), nullptr);
  const auto first = static_cast<hsize_t>(share_first * static_cast<double>(dims[0]));
  const auto last = static_cast<hsize_t>(share_last * static_cast<double>(dims[0]));
  std::vector<hsize_t> start(dims.size(), 0), count = dims;
  start[0] = first;
  count[0] = last - first;
  H5Sselect_hyperslab(space, H5S_SELECT_SET, start.data(), nullptr, count.data(), nullptr);
  const hid_t memory = H5Screate_simple(rank, count.data(), nullptr);
  const std::size_t bytes =
      std::accumulate(count.begin(), count.end(), std::size_t{1}, std::multiplies<>()) * H5Tget_size(type);
  if (buffer.size() < bytes) buffer.resize(bytes);
  const herr_t rc = H5Dread(dataset, type, memory, space, H5P_DEFAULT, buffer.data());
  H5Sclose(memory);
  H5Tclose(type);
  H5Sclose(space);
  H5Dclose(dataset);
  if (rc < 0) throw runtime::Error(std::string("raw read of '") + name + "' failed");
  return static_cast<std::int64_t>(bytes);
}

// Shards of Fashion-MNIST train at one gzip level; rank 0 writes, everyone waits.
std::string make_shards(const runtime::World& world, const Options& options, int gzip) {
  const std::string dir = options.work + "/gzip" + std::to_string(gzip);
  struct stat made {};
  if (world.is_root() && stat((dir + "/train.json").c_str(), &made) != 0) {
    const data::Table table = data::read_idx(options.idx_dir + "/train-images-idx3-ubyte.gz",
                                             options.idx_dir + "/train-labels-idx1-ubyte.gz");
    data::ShardOptions shard;
    shard.gzip = gzip;
    shard.chunk_bytes = options.chunk_bytes;
    data::write_shards(dir, "train", {{"inputs", table.inputs}, {"targets", table.targets}}, shard);
  }
  world.barrier();
  return dir + "/train.json";
}

// Every shard's input rows one after the other: row i of the result is sample i.
std::vector<char> all_inputs(const data::Dataset& dataset, std::int64_t row_bytes) {
  std::vector<char> rows(static_cast<std::size_t>(dataset.size() * row_bytes)), file_rows;
  std::size_t at = 0;
  for (const auto& path : dataset.files()) {
    const hid_t file = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
    const std::int64_t bytes = raw_read(file, dataset.spec().inputs.c_str(), 0, 1, file_rows);
    H5Fclose(file);
    std::memcpy(rows.data() + at, file_rows.data(), static_cast<std::size_t>(bytes));
    at += static_cast<std::size_t>(bytes);
  }
  return rows;
}

// Copies the rows of `order` from `rows` into `batches` (one after the other, reused) the way
// the loader's gather does: the rows of the sample 12 ahead requested into L2 and those of the
// sample 4 ahead into L1 while one is copied.
template <int Locality>
void request(const char* from, std::size_t row) {
  for (std::size_t at = 0; at < row; at += 64) {
    __builtin_prefetch(from + at, 0, Locality);
    std::atomic_signal_fence(std::memory_order_seq_cst);  // keeps GCC from deleting the loop
  }
}

void shuffled_copy(const std::vector<char>& rows, std::int64_t row_bytes, const std::vector<std::int64_t>& order,
                   std::vector<char>& batches) {
  constexpr std::size_t near = 4, far = 12;
  const auto row = static_cast<std::size_t>(row_bytes);
  const std::size_t slots = batches.size() / row;
  const auto at = [&](std::size_t i) { return rows.data() + static_cast<std::size_t>(order[i]) * row; };
  for (std::size_t i = 0; i < std::min(order.size(), far); ++i) request<1>(at(i), row);
  for (std::size_t i = 0; i < std::min(order.size(), near); ++i) request<3>(at(i), row);
  for (std::size_t i = 0; i < order.size(); ++i) {
    if (i + far < order.size()) request<1>(at(i + far), row);
    if (i + near < order.size()) request<3>(at(i + near), row);
    std::memcpy(batches.data() + (i % slots) * row, at(i), row);
  }
}

// Waits for every rank without spinning. A pass ends with it, so that a rank done early does
// not take the CPU that the others still need (with more ranks than cores, MPI's busy wait
// would slow the slowest rank's reader threads); each pass then lasts as long as the slowest
// rank's, which is what the figures take anyway.
void sleeping_barrier(MPI_Comm comm) {
  MPI_Request request;
  MPI_Ibarrier(comm, &request);
  for (int done = 0;;) {
    MPI_Test(&request, &done, MPI_STATUS_IGNORE);
    if (done) return;
    std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
}

double median(std::vector<double> values) {
  std::nth_element(values.begin(), values.begin() + static_cast<std::ptrdiff_t>(values.size() / 2), values.end());
  return values[values.size() / 2];
}

nlohmann::json figures(double seconds, std::int64_t samples, std::int64_t bytes) {
  return {{"seconds", seconds}, {"samples_per_s", samples / seconds}, {"mb_per_s", bytes / seconds / 1e6}};
}

int run(const runtime::World& world, const Options& options) {
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  auto comm = comm::make_communicator(world, c10::Device(c10::kCPU));
  std::vector<std::pair<std::string, std::string>> sources;  // label, source
  if (!options.source.empty()) sources.emplace_back("given", options.source);
  else
    for (const int gzip : options.gzip) sources.emplace_back("gzip " + std::to_string(gzip), make_shards(world, options, gzip));

  nlohmann::json results = nlohmann::json::array();
  std::vector<std::vector<std::string>> table;
  double worst = std::numeric_limits<double>::infinity(), most_read = 0;
  int read_ahead = options.prefetch;  // the loader's, once 0 is resolved
  for (const auto& [label, source] : sources) {
    data::LoaderOptions loader_options;
    loader_options.batch_size = options.global_batch / world.size();
    loader_options.partitions = options.partitions;
    loader_options.prefetch = options.prefetch;
    loader_options.workers = options.workers;
    loader_options.shuffle_window = options.window;
    loader_options.seed = 1;
    const auto spec = data::DatasetSpec::classification(source);
    data::Loader loader(spec, loader_options, world.rank(), world.size(), *comm);
    const data::Dataset& dataset = loader.dataset();
    const auto stored_bytes = [](const data::Field& f) {
      const std::string& t = f.stored;  // "uint8", "float32", ...: the digits are the bits
      const std::int64_t bits = std::stoll(t.substr(t.find_first_of("0123456789")));
      return std::accumulate(f.shape.begin(), f.shape.end(), std::int64_t{1}, std::multiplies<>()) * bits / 8;
    };
    const std::int64_t stored_per_sample = stored_bytes(dataset.inputs()) + stored_bytes(dataset.targets());
    const std::int64_t epoch_samples = loader.steps_per_epoch() * loader.global_batch();

    const double share_first = static_cast<double>(world.rank()) / world.size();
    const double share_last = static_cast<double>(world.rank() + 1) / world.size();
    std::vector<char> raw_inputs, raw_targets;
    const auto raw_pass = [&] {
      for (const auto& path : dataset.files()) {
        const hid_t file = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
        raw_read(file, "inputs", share_first, share_last, raw_inputs);
        raw_read(file, "targets", share_first, share_last, raw_targets);
        H5Fclose(file);
      }
    };
    data::ReadStats reads;
    const auto loader_pass = [&] {
      const std::int64_t epoch = loader.state().epoch;
      for (std::int64_t step = 0; step < loader.steps_per_epoch(); ++step) loader.next();
      reads = loader.stats(epoch);
    };
    // The shuffled copy: this rank's samples of an epoch in the loader's order, into as many
    // batch buffers as the loader keeps (its read-ahead + 4, see loader.cpp).
    const std::int64_t input_bytes = stored_bytes(dataset.inputs());
    const std::vector<char> inputs = all_inputs(dataset, input_bytes);
    const std::int64_t begin = world.rank() * loader_options.batch_size;
    const std::vector<std::int64_t> order = loader.sampler().order(0, begin, begin + loader_options.batch_size);
    read_ahead = loader.prefetch();
    std::vector<char> batches(static_cast<std::size_t>((read_ahead + 4) * loader_options.batch_size * input_bytes));
    const auto copy_pass = [&] { shuffled_copy(inputs, input_bytes, order, batches); };
    // Passes alternate, so that a busy moment of a shared machine hits all sides alike.
    std::vector<double> raw_times, loader_times, copy_times;
    const auto timed = [&](int warmup, const std::function<void()>& pass) {
      return bench::time_collective(world.comm(), warmup, 1, [&] {
        pass();
        sleeping_barrier(world.comm());
      });
    };
    for (int rep = 0; rep < options.reps; ++rep) {
      raw_times.push_back(timed(rep == 0 ? 1 : 0, raw_pass));
      loader_times.push_back(timed(rep == 0 ? 1 : 0, loader_pass));
      raw_times.push_back(timed(0, raw_pass));
      copy_times.push_back(timed(rep == 0 ? 1 : 0, copy_pass));
    }
    const double raw = median(raw_times);
    const double ours = median(loader_times);
    const double copy = median(copy_times);
    // Per sample: the loader and the copy pass an epoch (a whole number of batches), the raw
    // read every sample.
    const double per_epoch = static_cast<double>(epoch_samples) / static_cast<double>(dataset.size());
    const double ratio = raw / ours * per_epoch;
    const double copy_ratio = raw / copy * per_epoch;
    worst = std::min(worst, ratio);
    // The last pass's reads, every rank's; against 1/n of the decompressed dataset.
    const auto bytes = comm::gather_per_rank(*comm, reads.bytes_read);
    const auto chunks = comm::gather_per_rank(*comm, reads.chunks_read);
    const auto hits = comm::gather_per_rank(*comm, reads.cache_hits);
    const double fair = static_cast<double>(dataset.bytes()) / world.size();
    const double read_ratio = static_cast<double>(*std::max_element(bytes.begin(), bytes.end())) / fair;
    most_read = std::max(most_read, read_ratio);
    results.push_back({{"data", label},
                       {"source", source},
                       {"samples", dataset.size()},
                       {"stored_bytes_per_sample", stored_per_sample},
                       {"prefetch", read_ahead},
                       {"raw", figures(raw, dataset.size(), dataset.size() * stored_per_sample)},
                       {"loader", figures(ours, epoch_samples, epoch_samples * stored_per_sample)},
                       {"ratio", ratio},
                       {"shuffled_copy", figures(copy, epoch_samples, epoch_samples * input_bytes)},
                       {"shuffled_copy_ratio", copy_ratio},
                       {"dataset_bytes", dataset.bytes()},
                       {"bytes_read_per_rank", bytes},
                       {"chunks_read_per_rank", chunks},
                       {"cache_hits_per_rank", hits},
                       {"read_ratio", read_ratio}});
    table.push_back({label, bench::fixed(dataset.size() / raw, 0), bench::fixed(dataset.size() * stored_per_sample / raw / 1e6, 1),
                     bench::fixed(epoch_samples / ours, 0), bench::fixed(epoch_samples * stored_per_sample / ours / 1e6, 1),
                     bench::fixed(ratio, 3), bench::fixed(epoch_samples / copy, 0), bench::fixed(copy_ratio, 3),
                     bench::fixed(read_ratio, 3)});
  }
  if (!world.is_root()) return 0;
  std::cout << "Loader (shuffled, " << options.partitions << " partitions, window " << options.window
            << " blocks, prefetch " << read_ahead << ", " << options.workers << " worker(s), global batch " << options.global_batch << " over "
            << world.size() << " ranks) vs raw sequential H5Dread; samples/s and MB/s of all ranks; bytes read by the "
               "busiest rank / (dataset / ranks)\n";
  bench::print_table({"data", "raw samples/s", "raw MB/s", "loader samples/s", "loader MB/s", "ratio",
                      "shuffled copy samples/s", "copy / raw", "read / (1/N)"},
                     table);
  const bool met = worst >= options.goal && most_read <= options.read_goal;
  std::cout << "goal: loader >= " << options.goal << "x raw and each rank reads <= " << options.read_goal
            << "x its 1/N; worst ratio " << bench::fixed(worst, 3) << ", most read " << bench::fixed(most_read, 3)
            << (met ? " (met)" : " (NOT met)") << '\n';
  if (!options.out.empty()) {
    bench::write_json(options.out,
                      {{"name", "loader_np" + std::to_string(world.size())},
                       {"what", "samples/s and MB/s of the data Loader (shuffled, prefetch) vs one raw sequential H5Dread "
                                "per dataset of the same shards; MB counted as stored; and the bound for a loader of "
                                "this order: a shuffled copy of the input rows from memory (MB: the input bytes)"},
                       {"settings", {{"global_batch", options.global_batch}, {"prefetch", options.prefetch},
                                     {"workers", options.workers},
                                     {"partitions", options.partitions}, {"shuffle_window_blocks", options.window},
                                     {"chunk_bytes", options.chunk_bytes}, {"reps", options.reps}}},
                       {"machine", bench::machine_description(world.size(), "")},
                       {"date", bench::utc_now()},
                       {"git_commit", bench::git_commit()},
                       {"goal", {{"ratio_at_least", options.goal}, {"read_ratio_at_most", options.read_goal}}},
                       {"worst_ratio", worst},
                       {"most_read_ratio", most_read},
                       {"goal_met", met},
                       {"rows", results}});
    std::cout << "wrote " << options.out << '\n';
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  runtime::World world(&argc, &argv);
  CLI::App app{"Data loader throughput vs a raw sequential HDF5 read"};
  Options options;
  app.add_option("--source", options.source, "a manifest or glob of classification shards (default: make them); each rank holds "
                 "its share of the rows for the raw read and all input rows for the shuffled copy in memory");
  app.add_option("--idx-dir", options.idx_dir, "folder with Fashion-MNIST's IDX files")->capture_default_str();
  app.add_option("--work", options.work, "folder for the shards made from it")->capture_default_str();
  app.add_option("--gzip", options.gzip, "gzip levels to make shards with")->capture_default_str();
  app.add_option("--chunk-size", options.chunk_bytes, "chunk size of the shards made")->capture_default_str();
  app.add_option("--global-batch", options.global_batch, "samples per global batch, shared by the ranks")
      ->capture_default_str();
  app.add_option("--partitions", options.partitions, "canonical partitions of the order (data.partitions)")
      ->capture_default_str();
  app.add_option("--prefetch", options.prefetch, "batches read ahead (0: as the loader chooses)")->capture_default_str();
  app.add_option("--workers", options.workers, "reader threads per rank (data.workers)")->capture_default_str();
  app.add_option("--window", options.window, "shuffle window in blocks (0: uniform)")->capture_default_str();
  app.add_option("--reps", options.reps, "timed passes")->capture_default_str();
  app.add_option("--goal", options.goal, "required loader/raw ratio")->capture_default_str();
  app.add_option("--read-goal", options.read_goal, "most bytes a rank may read, in units of 1/N of the data")
      ->capture_default_str();
  app.add_option("--out", options.out, "JSON result file (written by rank 0)");
  return apps::parse_and_run(world, app, argc, argv, [&] { return run(world, options); });
}

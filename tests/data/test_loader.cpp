// The data layer's behaviour with exact expected values: reading h5py- and h5shard-written
// shards, the order (seed, epoch, world size), rank slices, remainder policies, exact resume
// across world sizes, the agreement at start, and errors raised on the prefetch thread.
#include <ATen/ATen.h>
// After ATen: c10 defines a CHECK macro of its own that Catch must override.
#include <catch2/catch.hpp>

#include <hdf5.h>

#include <sched.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <optional>
#include <map>
#include <set>
#include <thread>
#include <tuple>

#include "data_support.h"
#include "mpitrain/data/dataset.h"
#include "mpitrain/data/loader.h"
#include "mpitrain/data/sampler.h"
#include "mpitrain/data/shards.h"
#include "mpitrain/runtime/error.h"

using namespace mpitrain;
using namespace mpitrain::testing;
using Catch::Contains;

namespace {

std::vector<std::int64_t> to_vector(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kLong).contiguous();
  return std::vector<std::int64_t>(c.data_ptr<std::int64_t>(), c.data_ptr<std::int64_t>() + c.numel());
}

std::vector<std::int64_t> iota(std::int64_t n) {
  std::vector<std::int64_t> v(static_cast<std::size_t>(n));
  std::iota(v.begin(), v.end(), std::int64_t{0});
  return v;
}

// Blocks of one HDF5 chunk each: the test files' chunks are tiny, and the tests want many blocks.
data::DatasetSpec chunked(const std::string& source) {
  data::DatasetSpec spec = data::DatasetSpec::classification(source);
  spec.block_bytes = 0;
  return spec;
}

data::LoaderOptions options(std::int64_t batch, std::uint64_t seed = 5, std::int64_t window = 2) {
  data::LoaderOptions o;
  o.batch_size = batch;
  o.seed = seed;
  o.shuffle_window = window;
  o.prefetch = 3;
  return o;
}

// The UTF-8 text as code points.
std::u32string code_points(const std::string& text) {
  std::u32string out;
  for (std::size_t i = 0; i < text.size();) {
    const auto c = static_cast<unsigned char>(text[i]);
    const int extra = c < 0x80 ? 0 : c < 0xE0 ? 1 : c < 0xF0 ? 2 : 3;
    char32_t value = extra == 0 ? c : c & (0x3F >> extra);
    for (int k = 1; k <= extra; ++k) value = (value << 6) | (static_cast<unsigned char>(text[i + k]) & 0x3F);
    out += value;
    i += static_cast<std::size_t>(extra) + 1;
  }
  return out;
}

}  // namespace

TEST_CASE("an h5py file with chunks, gzip and shuffle reads as written", "[data]") {
  data::Dataset dataset(chunked(fixture("h5py_gzip.h5")));
  REQUIRE(dataset.size() == 103);
  CHECK(dataset.inputs().dtype == at::kFloat);
  CHECK(dataset.inputs().shape == std::vector<std::int64_t>{3, 5});
  CHECK(dataset.targets().dtype == at::kLong);  // int16 labels are delivered as int64
  CHECK(dataset.targets().stored == "int16");
  CHECK(dataset.blocks() == std::vector<std::int64_t>{16, 16, 16, 16, 16, 16, 7});  // the h5py chunks

  const at::Tensor i = at::arange(103, at::kFloat).view({103, 1, 1});
  const at::Tensor inputs = 100 * i + 10 * at::arange(3, at::kFloat).view({1, 3, 1}) + at::arange(5, at::kFloat).view({1, 1, 5});
  const at::Tensor targets = (at::arange(103, at::kLong) * 37).remainder(1000) - 500;
  const data::Batch all = dataset.read(iota(103));
  CHECK(at::equal(all.inputs, inputs));
  CHECK(at::equal(all.targets, targets));

  // Any order, repeats, across chunks: row p is sample indices[p].
  const std::vector<std::int64_t> picks = {102, 0, 17, 16, 50, 17};
  const data::Batch some = dataset.read(picks);
  const at::Tensor index = at::tensor(picks, at::kLong);
  CHECK(at::equal(some.inputs, inputs.index_select(0, index)));
  CHECK(at::equal(some.targets, targets.index_select(0, index)));
}

TEST_CASE("float16 inputs and uint16 targets from h5py", "[data]") {
  data::Dataset dataset(data::DatasetSpec::classification(fixture("h5py_half.h5")));
  REQUIRE(dataset.size() == 40);
  CHECK(dataset.inputs().dtype == at::kHalf);
  const data::Batch all = dataset.read(iota(40));
  const at::Tensor expected = at::arange(40, at::kFloat).view({40, 1}) + at::arange(2, at::kFloat).view({1, 2}) / 2;
  CHECK(at::equal(all.inputs.to(at::kFloat), expected));
  CHECK(at::equal(all.targets, at::arange(40, at::kLong) + 60000));  // uint16 widened, not wrapped
}

TEST_CASE("a token stream is cut into windows of seq_len + 1", "[data]") {
  data::DatasetSpec spec = data::DatasetSpec::token_stream(fixture("h5py_tokens.h5"), 10);
  spec.block_bytes = 0;
  data::Dataset dataset(spec);
  REQUIRE(dataset.size() == 100);  // (1001 - 1) / 10
  CHECK(dataset.inputs().shape == std::vector<std::int64_t>{10});
  // Blocks follow the 64-token chunks: 6 windows each.
  const auto& blocks = dataset.blocks();
  CHECK(blocks.size() == 17);
  CHECK(std::accumulate(blocks.begin(), blocks.end(), std::int64_t{0}) == 100);
  const data::Batch batch = dataset.read({0, 99, 37, 6});
  for (std::int64_t p = 0; p < 4; ++p) {
    const std::int64_t sample = std::vector<std::int64_t>{0, 99, 37, 6}[static_cast<std::size_t>(p)];
    for (std::int64_t j = 0; j < 10; ++j) {
      CHECK(batch.inputs[p][j].item<std::int64_t>() == (7 * (10 * sample + j)) % 65536);
      CHECK(batch.targets[p][j].item<std::int64_t>() == (7 * (10 * sample + j + 1)) % 65536);
    }
  }
}

TEST_CASE("round trip: h5shard output read by the data layer equals the source", "[data]") {
  SECTION("IDX images and labels (3 shards, 3-row chunks)") {
    data::Dataset dataset(data::DatasetSpec::classification(fixture("tool/idx/train.json")));
    REQUIRE(dataset.size() == 50);
    CHECK(dataset.files().size() == 3);
    CHECK(dataset.inputs().dtype == at::kByte);
    const at::Tensor expected = (12 * at::arange(50, at::kLong).view({50, 1, 1}) + 3 * at::arange(4, at::kLong).view({1, 4, 1}) +
                                 at::arange(3, at::kLong).view({1, 1, 3}))
                                    .remainder(256)
                                    .to(at::kByte);
    const data::Batch all = dataset.read(iota(50));
    CHECK(at::equal(all.inputs, expected));
    CHECK(at::equal(all.targets, at::arange(50, at::kLong).remainder(10)));
  }
  SECTION("CSV with a header and text labels") {
    data::Dataset dataset(data::DatasetSpec::classification(fixture("tool/csv/train.json")));
    REQUIRE(dataset.size() == 30);
    const data::Batch all = dataset.read(iota(30));
    const at::Tensor r = at::arange(30, at::kFloat);
    CHECK(at::equal(all.inputs, at::stack({r / 4, -r}, 1)));
    CHECK(at::equal(all.targets, at::arange(30, at::kLong).remainder(3)));  // cat, dog, emu
    const data::Manifest manifest = data::read_manifest(fixture("tool/csv/train.json"));
    CHECK(manifest.metadata["classes"] == nlohmann::json({"cat", "dog", "emu"}));
  }
  SECTION("text, character level, through the loader") {
    const std::string text = [] {
      std::string s;
      for (int k = 0; k < 20; ++k) s += "hello world\n";
      for (int k = 0; k < 20; ++k) s += "h\xC3\xA9llo w\xC3\xB6rld\n";
      return s;
    }();
    const std::u32string stream = code_points(text);
    const data::Manifest manifest = data::read_manifest(fixture("tool/text/train.json"));
    const std::u32string vocab = code_points(manifest.metadata["vocab"].get<std::string>());
    CHECK(vocab == U"\n dehlorw\u00E9\u00F6");
    data::LoaderOptions o = options(2);
    o.shuffle = false;
    const int n = communicator().size();
    o.batch_size = 4 / n;
    data::Loader loader(data::DatasetSpec::token_stream(fixture("tool/text/train.json"), 16), o, communicator().rank(), n,
                        communicator());
    REQUIRE(loader.dataset().size() == (480 - 1) / 16);
    const std::vector<std::int64_t> order = loader.sampler().order(0);
    for (std::int64_t step = 0; step < loader.steps_per_epoch(); ++step) {
      const data::Batch batch = loader.next();
      for (std::int64_t p = 0; p < o.batch_size; ++p) {
        const std::int64_t sample = order[static_cast<std::size_t>(step * 4 + communicator().rank() * o.batch_size + p)];
        for (std::int64_t j = 0; j < 16; ++j) {
          CHECK(vocab[static_cast<std::size_t>(batch.inputs[p][j].item<std::int64_t>())] == stream[static_cast<std::size_t>(16 * sample + j)]);
          CHECK(vocab[static_cast<std::size_t>(batch.targets[p][j].item<std::int64_t>())] == stream[static_cast<std::size_t>(16 * sample + j + 1)]);
        }
      }
    }
  }
}

TEST_CASE("the order is a function of seed and epoch, and groups samples by chunk", "[data]") {
  const std::vector<std::int64_t> blocks = {8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 5};  // 85 samples
  data::SamplerOptions o;
  o.global_batch = 5;
  o.seed = 11;
  o.window = 3;
  const data::Sampler sampler(blocks, o);
  const std::vector<std::int64_t> e0 = sampler.order(0);
  std::vector<std::int64_t> sorted = e0;
  std::sort(sorted.begin(), sorted.end());
  CHECK(sorted == iota(85));                       // a permutation
  CHECK(data::Sampler(blocks, o).order(0) == e0);  // same seed, same epoch: same order
  CHECK(sampler.order(1) != e0);                   // next epoch: another order
  o.seed = 12;
  CHECK(data::Sampler(blocks, o).order(0) != e0);  // another seed: another order
  // With one partition and a window of one block, the order is a run of whole blocks: each
  // chunk is needed by one stretch of consecutive batches, so it is read once.
  o.partitions = 1;
  o.window = 1;
  const std::vector<std::int64_t> runs = data::Sampler(blocks, o).order(0);
  for (std::size_t k = 0; k < runs.size();) {
    const std::int64_t block = runs[k] / 8;
    const auto size = static_cast<std::size_t>(blocks[static_cast<std::size_t>(block)]);
    std::set<std::int64_t> members(runs.begin() + static_cast<std::ptrdiff_t>(k), runs.begin() + static_cast<std::ptrdiff_t>(k + size));
    CHECK(members.size() == size);
    CHECK((*members.begin() == block * 8 && *members.rbegin() == block * 8 + static_cast<std::int64_t>(size) - 1));
    k += size;
  }
  // Pinned values: the generator is mpitrain's own, so an order is the same on every platform
  // (a changed generator would silently change every resumed run). Values from an independent
  // reimplementation of the generator and the order: one partition and window 0 (a uniform
  // shuffle of all samples); two partitions; uneven blocks, windows of one block and wrap.
  o.seed = 1;
  o.window = 0;
  o.global_batch = 8;
  CHECK(data::Sampler({4, 4}, o).order(0) == std::vector<std::int64_t>{6, 0, 5, 1, 7, 3, 2, 4});
  o.partitions = 2;
  CHECK(data::Sampler({4, 4}, o).order(0) == std::vector<std::int64_t>{5, 6, 7, 4, 3, 0, 2, 1});
  {
    data::SamplerOptions w;
    w.global_batch = 4;
    w.partitions = 2;
    w.seed = 9;
    w.window = 1;
    w.remainder = data::Remainder::wrap;
    const data::Sampler sampler({3, 2, 4}, w);
    CHECK(sampler.order(1) == std::vector<std::int64_t>{5, 7, 0, 2, 6, 8, 1, 5, 4, 3, 6, 7});
    // A slice of every batch, computed alone, is that slice of the whole order.
    CHECK(sampler.order(1, 1, 3) == std::vector<std::int64_t>{7, 0, 8, 1, 3, 6});
  }
  o.shuffle = false;
  o.partitions = 1;
  o.global_batch = 5;
  CHECK(data::Sampler(blocks, o).order(3) == iota(85));
}

TEST_CASE("partitions: each gives its share of every global batch from its own stretch of blocks", "[data]") {
  data::SamplerOptions o;
  o.shuffle = false;
  o.global_batch = 4;
  o.partitions = 2;
  // 8 samples, 2 steps: partition 0 owns samples 0-3, partition 1 samples 4-7, two of each per batch.
  CHECK(data::Sampler({2, 2, 2, 2}, o).order(0) == std::vector<std::int64_t>{0, 1, 4, 5, 2, 3, 6, 7});
  // Uneven: G = 5 over 2 partitions gives 3 + 2 per batch; 11 samples give 2 steps (drop), so
  // partition 0 owns the first 6 samples, partition 1 the next 4, and sample 10 is dropped.
  o.global_batch = 5;
  const data::Sampler uneven({4, 4, 3}, o);
  CHECK(uneven.partitions() == 2);
  CHECK((uneven.partition_share(0) == 3 && uneven.partition_share(1) == 2));
  CHECK(uneven.partitions_of(0, 3) == std::pair<std::int64_t, std::int64_t>{0, 0});
  CHECK(uneven.partitions_of(2, 4) == std::pair<std::int64_t, std::int64_t>{0, 1});
  CHECK(uneven.partitions_of(3, 5) == std::pair<std::int64_t, std::int64_t>{1, 1});
  CHECK(uneven.order(0) == std::vector<std::int64_t>{0, 1, 2, 6, 7, 3, 4, 5, 8, 9});
  // More partitions than samples per batch: one sample from each of G partitions.
  o.global_batch = 3;
  o.partitions = 16;
  const data::Sampler many({3, 3, 3}, o);
  CHECK(many.partitions() == 3);
  CHECK(many.order(0) == std::vector<std::int64_t>{0, 3, 6, 1, 4, 7, 2, 5, 8});
  // Shuffled: every sample once per epoch (G divides N), and a partition's samples come from
  // its own stretch of the block sequence, so 4 ranks over 16 partitions each see a quarter of
  // the blocks.
  o.shuffle = true;
  o.seed = 3;
  o.window = 2;
  o.global_batch = 32;
  const std::vector<std::int64_t> blocks(64, 8);  // 512 samples, 16 steps
  const data::Sampler sampler(blocks, o);
  const std::vector<std::int64_t> order = sampler.order(0);
  std::vector<std::int64_t> sorted = order;
  std::sort(sorted.begin(), sorted.end());
  CHECK(sorted == iota(512));
  for (int rank = 0; rank < 4; ++rank) {
    std::set<std::int64_t> mine;
    for (std::int64_t step = 0; step < 16; ++step)
      for (std::int64_t k = rank * 8; k < rank * 8 + 8; ++k) mine.insert(order[static_cast<std::size_t>(step * 32 + k)] / 8);
    CHECK(mine.size() == 16);  // 64 blocks / 4 ranks: no block shared with another rank
  }
  // Shuffle quality: a batch draws from up to 16 partitions x 2-block windows; one partition
  // (the order before partitions) from the two windows the batch spans.
  CHECK(sampler.blocks_per_batch(0) > 20);
  o.partitions = 1;
  CHECK(data::Sampler(blocks, o).blocks_per_batch(0) <= 4);
}

TEST_CASE("remainder policy: drop runs N / G steps, wrap fills the last batch from the start", "[data]") {
  data::SamplerOptions o;
  o.global_batch = 4;
  o.seed = 3;
  o.remainder = data::Remainder::drop;
  const data::Sampler drop({10}, o);
  CHECK(drop.steps_per_epoch() == 2);
  CHECK(drop.order(0).size() == 8);
  o.remainder = data::Remainder::wrap;
  o.partitions = 1;
  const data::Sampler wrap({10}, o);
  CHECK(wrap.steps_per_epoch() == 3);
  const auto order = wrap.order(0);
  REQUIRE(order.size() == 12);
  // Every sample once, then the batch is completed from the start of the block sequence (one
  // block: samples 0 and 1), in a window of its own.
  std::vector<std::int64_t> first(order.begin(), order.begin() + 10);
  std::sort(first.begin(), first.end());
  CHECK(first == iota(10));
  CHECK(std::set<std::int64_t>(order.begin() + 10, order.end()) == std::set<std::int64_t>{0, 1});
  CHECK(wrap.global_batch(order, 2) == std::vector<std::int64_t>(order.begin() + 8, order.end()));
  // Rank slices are contiguous and partition the global batch.
  const auto batch = wrap.global_batch(order, 1);
  CHECK(data::Sampler::slice(batch, 1, 2) == std::vector<std::int64_t>{order[6], order[7]});
  CHECK(data::Sampler::slice(batch, 3, 4) == std::vector<std::int64_t>{order[7]});
  CHECK_THROWS_WITH(data::Sampler::slice(batch, 0, 3), Contains("equal slice"));
  CHECK_THROWS_WITH(data::Sampler({3}, o), Contains("fewer than one global batch"));
}

TEST_CASE("every sample exactly once per epoch across ranks, in the world-size-free order", "[data][mpi]") {
  const int n = communicator().size(), rank = communicator().rank();
  const std::string source = write_ids(scratch("once"), 96, 3, 8);
  data::Loader loader(chunked(source), options(8 / n), rank, n, communicator());
  REQUIRE(loader.steps_per_epoch() == 12);
  REQUIRE(loader.global_batch() == 8);
  std::vector<std::vector<std::int64_t>> orders;
  for (std::int64_t epoch = 0; epoch < 2; ++epoch) {
    const std::vector<std::int64_t> order = loader.sampler().order(epoch);
    std::vector<int> seen(96, 0);
    for (std::int64_t step = 0; step < 12; ++step) {
      const data::Batch batch = loader.next();
      CHECK(batch.epoch == epoch);
      CHECK(batch.step == step);
      CHECK(at::equal(batch.inputs, at::stack({batch.targets, -batch.targets}, 1).to(at::kFloat)));
      const std::vector<std::int64_t> global = gather(batch.targets);
      CHECK(global == std::vector<std::int64_t>(order.begin() + step * 8, order.begin() + step * 8 + 8));
      for (const std::int64_t id : global) ++seen[static_cast<std::size_t>(id)];
    }
    CHECK(std::all_of(seen.begin(), seen.end(), [](int count) { return count == 1; }));
    orders.push_back(order);
  }
  CHECK(orders[0] != orders[1]);
  // The order does not depend on the world size: a one-rank sampler gives the same.
  data::SamplerOptions o;
  o.global_batch = 8;
  o.seed = 5;
  o.window = 2;
  CHECK(data::Sampler(loader.dataset().blocks(), o).order(0) == orders[0]);
}

TEST_CASE("a uniform shuffle (window 0) caches every block and sees every sample once", "[data][mpi]") {
  const int n = communicator().size(), rank = communicator().rank();
  const std::string source = write_ids(scratch("uniform"), 96, 3, 8);
  data::Loader loader(chunked(source), options(8 / n, 3, /*window=*/0), rank, n, communicator());
  std::vector<int> seen(96, 0);
  for (std::int64_t step = 0; step < loader.steps_per_epoch(); ++step)
    for (const std::int64_t id : gather(loader.next().targets)) ++seen[static_cast<std::size_t>(id)];
  CHECK(std::all_of(seen.begin(), seen.end(), [](int count) { return count == 1; }));
}

TEST_CASE("drop and wrap across ranks", "[data][mpi]") {
  const int n = communicator().size(), rank = communicator().rank();
  const std::string source = write_ids(scratch("remainder"), 96, 2, 8);
  for (const data::Remainder policy : {data::Remainder::drop, data::Remainder::wrap}) {
    data::LoaderOptions o = options(40 / n);
    o.remainder = policy;
    data::Loader loader(chunked(source), o, rank, n, communicator());
    const std::vector<std::int64_t> order = loader.sampler().order(0);
    std::vector<int> seen(96, 0);
    for (std::int64_t step = 0; step < loader.steps_per_epoch(); ++step) {
      const std::vector<std::int64_t> global = gather(loader.next().targets);
      CHECK(global == std::vector<std::int64_t>(order.begin() + step * 40, order.begin() + step * 40 + 40));
      for (const std::int64_t id : global) ++seen[static_cast<std::size_t>(id)];
    }
    // drop: 2 steps, 80 samples once and 16 not at all; wrap: 3 steps, 24 samples twice.
    std::map<int, int> times;
    for (const int count : seen) ++times[count];
    if (policy == data::Remainder::drop) CHECK(times == std::map<int, int>{{0, 16}, {1, 80}});
    else CHECK(times == std::map<int, int>{{1, 72}, {2, 24}});
    CHECK(loader.next().epoch == 1);  // the epoch rolls over
  }
}

TEST_CASE("resume mid-epoch gives the batches of an uninterrupted run, also 4 ranks -> 2 ranks with 3 workers",
          "[data][mpi]") {
  const std::string source = write_ids(scratch("resume"), 96, 3, 8);
  const auto spec = chunked(source);
  // Runs `steps` global batches as a world of `ranks` simulated in this process (each Loader
  // construction is collective over the real communicator, in the same order on every rank).
  struct Run {
    std::vector<std::vector<std::int64_t>> batches;
    data::LoaderState state;
  };
  const auto run = [&](int ranks, std::int64_t steps, const std::optional<data::LoaderState>& from, int workers = 1) {
    std::vector<std::unique_ptr<data::Loader>> loaders;
    data::LoaderOptions o = options(8 / ranks);
    o.workers = workers;
    for (int r = 0; r < ranks; ++r) loaders.push_back(std::make_unique<data::Loader>(spec, o, r, ranks, communicator()));
    if (from)
      for (auto& loader : loaders) loader->restore(*from);
    Run out;
    for (std::int64_t s = 0; s < steps; ++s) {
      std::vector<std::int64_t> global;
      for (auto& loader : loaders) {
        const auto mine = to_vector(loader->next().targets);
        global.insert(global.end(), mine.begin(), mine.end());
      }
      out.batches.push_back(global);
    }
    out.state = loaders.front()->state();
    for (auto& loader : loaders) CHECK(nlohmann::json(loader->state()) == nlohmann::json(out.state));
    return out;
  };
  const Run reference = run(1, 20, std::nullopt);  // 12 steps per epoch: crosses into epoch 1

  for (const std::int64_t stop : {7, 12}) {  // mid-epoch, and exactly at the epoch's end
    const Run first = run(4, stop, std::nullopt);
    CHECK(first.state.epoch == stop / 12);
    CHECK(first.state.step == stop % 12);
    // Through JSON, as a checkpoint stores it.
    const data::LoaderState saved = nlohmann::json::parse(nlohmann::json(first.state).dump()).get<data::LoaderState>();
    const Run second = run(2, 20 - stop, saved, /*workers=*/3);
    std::vector<std::vector<std::int64_t>> joined = first.batches;
    joined.insert(joined.end(), second.batches.begin(), second.batches.end());
    CHECK(joined == reference.batches);
  }
}

TEST_CASE("loader state: JSON, and a state from another run is refused", "[data]") {
  const data::LoaderState state{3, 7, 1, 42, 64, 16, 1000};
  const data::LoaderState back = nlohmann::json(state).get<data::LoaderState>();
  CHECK((back.epoch == 3 && back.step == 7 && back.micro == 1 && back.seed == 42 && back.global_batch == 64 &&
         back.partitions == 16 && back.samples == 1000));
  // A state from before partitions cannot resume their order.
  CHECK_THROWS_WITH(
      nlohmann::json({{"epoch", 1}, {"step", 0}, {"seed", 1}, {"global_batch", 8}, {"samples", 96}}).get<data::LoaderState>(),
      Contains("partitions"));
  CHECK_THROWS_WITH(nlohmann::json({{"epoch", 1}}).get<data::LoaderState>(), Contains("is not valid"));

  const int n = communicator().size();
  data::Loader loader(data::DatasetSpec::classification(fixture("ids.h5")), options(4 / n, 9), communicator().rank(), n,
                      communicator());
  data::LoaderState other = loader.state();
  other.seed = 10;
  CHECK_THROWS_WITH(loader.restore(other), Contains("from a different run"));
  other = loader.state();
  other.partitions = 8;
  CHECK_THROWS_WITH(loader.restore(other), Contains("partitions"));
  other = loader.state();
  other.step = loader.steps_per_epoch();
  CHECK_THROWS_WITH(loader.restore(other), Contains("out of range"));
  loader.next();
  CHECK(loader.state().step == 1);
}

TEST_CASE("an error on the prefetch thread reaches next() with its message", "[data]") {
  const std::string dir = scratch("corrupt");
  const std::string source = write_ids(dir, 96, 1, 8);
  const std::string file = dir + "/ids-00000-of-00001.h5";
  int damaged = 1;
  if (world().is_root()) {
    // Overwrite chunk 5 of 'inputs' (samples 40..47) on disk with bytes gzip cannot inflate.
    haddr_t address = 0;
    hsize_t size = 0, offset[2] = {0, 0};
    unsigned mask = 0;
    const hid_t f = H5Fopen(file.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
    const hid_t d = H5Dopen2(f, "inputs", H5P_DEFAULT);
    const hid_t space = H5Dget_space(d);
    damaged = H5Dget_chunk_info(d, space, 5, offset, &mask, &address, &size) >= 0 && offset[0] == 40;
    H5Sclose(space);
    H5Dclose(d);
    H5Fclose(f);
    std::fstream out(file, std::ios::in | std::ios::out | std::ios::binary);
    out.seekp(static_cast<std::streamoff>(address));
    const std::string garbage(size, '\xff');
    out.write(garbage.data(), static_cast<std::streamsize>(garbage.size()));
    damaged = damaged && out.good();
  }
  // Every rank learns whether it worked, so none waits for a rank that left the test.
  MPI_Bcast(&damaged, 1, MPI_INT, 0, world().comm());
  REQUIRE(damaged == 1);
  const int n = communicator().size();
  // With several workers the batches after the damaged one may be read already and queued
  // behind it; next() still hands out the ones before it, then the error, and does not wait
  // for half of the read-ahead (4 here) that will never come.
  for (const int workers : {1, 3}) {
    data::LoaderOptions o = options(8 / n);
    o.shuffle = false;  // with one partition, global batch k is chunk k
    o.partitions = 1;
    o.prefetch = 8;
    o.workers = workers;
    data::Loader loader(chunked(source), o, communicator().rank(), n, communicator());
    for (int step = 0; step < 5; ++step) CHECK(loader.next().step == step);
    try {
      loader.next();
      FAIL("next() should have thrown");
    } catch (const runtime::Error& e) {
      CHECK(e.code() == runtime::ExitCode::bad_input);
      CHECK_THAT(e.what(), Contains("ids-00000-of-00001.h5") && Contains("dataset 'inputs'") &&
                               Contains("epoch 0 step 5") && Contains("rows 40..47"));
    }
    // The loader stays failed, and destroying it stops the threads cleanly.
    CHECK_THROWS_WITH(loader.next(), Contains("epoch 0 step 5"));
  }
}

namespace {

// The number after "name ... :" on the line of a /proc file that starts with name; -1 if none.
long proc_field(const std::filesystem::path& file, const std::string& name) {
  std::ifstream in(file);
  for (std::string line; std::getline(in, line);)
    if (line.rfind(name, 0) == 0) return std::stol(line.substr(line.find(':') + 1));
  return -1;
}

// The scheduling policy of each thread of this process, read from /proc (SCHED_OTHER = 0,
// SCHED_BATCH = 3).
std::vector<int> thread_policies() {
  std::vector<int> policies;
  for (const auto& task : std::filesystem::directory_iterator("/proc/self/task"))
    policies.push_back(static_cast<int>(proc_field(task.path() / "sched", "policy")));
  return policies;
}

}  // namespace

TEST_CASE("the prefetch thread runs as background work (SCHED_BATCH), the caller's thread does not",
          "[data]") {
  const auto batch_threads = [] {
    const std::vector<int> p = thread_policies();
    return std::count(p.begin(), p.end(), SCHED_BATCH);
  };
  const auto before = batch_threads();
  {
    const int n = communicator().size();
    data::Loader loader(chunked(fixture("h5py_gzip.h5")), options(4 / n), communicator().rank(), n, communicator());
    CHECK(loader.next().step == 0);
    CHECK(batch_threads() == before + 1);
    CHECK(sched_getscheduler(0) == SCHED_OTHER);
  }
  CHECK(batch_threads() == before);
  {
    const int n = communicator().size();
    data::LoaderOptions o = options(4 / n);
    o.workers = 3;
    data::Loader loader(chunked(fixture("h5py_gzip.h5")), o, communicator().rank(), n, communicator());
    CHECK(loader.next().step == 0);
    // The first batch needed one worker; the others set their policy when they first run.
    for (int wait = 0; wait < 500 && batch_threads() < before + 3; ++wait)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    CHECK(batch_threads() == before + 3);
  }
  CHECK(batch_threads() == before);
}

namespace {

// How often the loader's reader thread (this process's only SCHED_BATCH thread) has gone to
// sleep: its voluntary context switches, from /proc.
long reader_sleeps() {
  std::vector<long> sleeps;
  for (const auto& task : std::filesystem::directory_iterator("/proc/self/task"))
    if (proc_field(task.path() / "sched", "policy") == SCHED_BATCH)
      sleeps.push_back(proc_field(task.path() / "status", "voluntary_ctxt_switches"));
  REQUIRE(sleeps.size() <= 1);
  return sleeps.empty() ? -1 : sleeps.front();  // -1: the thread has not set its policy yet
}

// Waits until the reader has been asleep for a while (its count of sleeps stays the same).
long reader_asleep() {
  for (long last = -1;;) {
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    const long now = reader_sleeps();
    if (now >= 0 && now == last) return now;
    last = now;
  }
}

// Once the reader has filled the read-ahead and gone to sleep: taking batches down to the
// refill mark (prefetch / 2 left) does not wake it, the next one does, and the queue it then
// fills again never leaves next() waiting.
void check_refill(data::Loader& loader) {
  const int ahead = loader.prefetch();
  const long full = reader_asleep();
  for (int i = 0; i < ahead - ahead / 2 - 1; ++i) loader.next();
  CHECK(reader_asleep() == full);
  loader.next();
  CHECK(reader_asleep() > full);
  const double starved = loader.starved_seconds();
  for (int i = 0; i < ahead; ++i) loader.next();
  CHECK(loader.starved_seconds() == starved);
}

}  // namespace

TEST_CASE("a full read-ahead queue wakes the reader only when half of it has been taken", "[data]") {
  const int n = communicator().size();
  data::LoaderOptions o = options(4 / n);
  o.prefetch = 8;
  data::Loader loader(chunked(fixture("h5py_gzip.h5")), o, communicator().rank(), n, communicator());
  // 8 -> 5 batches ready, above the refill mark of 4: the reader is not woken; 5 -> 4 wakes it.
  check_refill(loader);
}

TEST_CASE("prefetch 0 reads ahead the micro-batches that hold 1 MiB, at least 8 and at most 64", "[data]") {
  const int n = communicator().size(), rank = communicator().rank();
  const std::string dir = scratch("auto-prefetch");
  if (world().is_root()) {
    // 4096 B of inputs and an 8-byte target per sample: 4104 B a sample as delivered.
    data::ShardOptions shards;
    shards.gzip = 0;
    data::write_shards(dir, "rows", {{"inputs", at::zeros({256, 1024}, at::kFloat)}, {"targets", at::arange(256)}},
                       shards);
  }
  world().barrier();
  const auto spec = data::DatasetSpec::classification(dir + "/rows.json");
  const auto chosen = [&](std::int64_t batch, data::Fields fields) {
    data::LoaderOptions o = options(batch);
    o.prefetch = 0;
    o.fields = fields;
    return data::Loader(spec, o, rank, n, communicator()).prefetch();
  };
  const data::Fields both{true, true}, targets{false, true};
  CHECK(chosen(2, both) == 64);       // 8208 B a batch: 127 would fit
  CHECK(chosen(4, both) == 63);       // 1 MiB / 16416 B = 63.9
  CHECK(chosen(8, both) == 31);       // 1 MiB / 32832 B = 31.9
  CHECK(chosen(64, both) == 8);       // 3 would fit
  CHECK(chosen(64, targets) == 64);   // 512 B a batch: only the fields delivered count
  data::LoaderOptions o = options(4);
  o.prefetch = 5;
  CHECK(data::Loader(spec, o, rank, n, communicator()).prefetch() == 5);

  // What it chose is the read-ahead: the reader fills 31 batches, sleeps, and is woken when
  // half of them (15 left) have been taken.
  o = options(8);
  o.prefetch = 0;
  data::Loader loader(spec, o, rank, n, communicator());
  REQUIRE(loader.prefetch() == 31);
  check_refill(loader);
}

TEST_CASE("next() on an empty queue sleeps until half of the read-ahead is ready", "[data]") {
  const auto my_sleeps = [] { return proc_field("/proc/thread-self/status", "voluntary_ctxt_switches"); };
  const int n = communicator().size();
  data::LoaderOptions o = options(4 / n);
  o.prefetch = 8;
  data::Loader loader(chunked(fixture("h5py_gzip.h5")), o, communicator().rank(), n, communicator());
  // Taking batches as fast as it can, right after restore() has emptied the queue, the caller
  // usually outruns the reader; it is then woken once per 4 batches (two waits for 8), not once
  // per batch. A reader that wins the race leaves nothing to wait for: try again.
  for (int trial = 0; trial < 50 && loader.starved_seconds() == 0.0; ++trial) {
    loader.restore(loader.state());
    const long before = my_sleeps();
    REQUIRE(before >= 0);
    for (int i = 0; i < 8; ++i) loader.next();
    CHECK(my_sleeps() - before <= 2);
  }
  CHECK(loader.starved_seconds() > 0.0);
}

TEST_CASE("starved_seconds counts only the waits for a batch the reader had not finished", "[data]") {
  const int n = communicator().size();
  data::LoaderOptions o = options(4 / n);
  o.prefetch = 2;
  data::Loader loader(chunked(fixture("h5py_gzip.h5")), o, communicator().rank(), n, communicator());
  CHECK(loader.starved_seconds() == 0.0);
  // A consumer that takes batches as fast as it can outruns the reader: it waits, and the
  // waits are part of the time it spent in next().
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < 20; ++i) loader.next();
  const double in_next = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const double starved = loader.starved_seconds();
  CHECK(starved > 0.0);
  CHECK(starved <= in_next);
  // Given time, the reader fills the queue: taking those batches waits for nothing.
  std::this_thread::sleep_for(std::chrono::seconds(1));
  for (int i = 0; i < o.prefetch; ++i) loader.next();
  CHECK(loader.starved_seconds() == starved);
}

TEST_CASE("a loader reads only the fields it is asked for, in the same order", "[data]") {
  const int n = communicator().size(), rank = communicator().rank();
  const auto spec = chunked(fixture("h5py_gzip.h5"));
  data::LoaderOptions o = options(4 / n);
  data::Loader both(spec, o, rank, n, communicator());
  o.fields = {false, true};
  data::Loader targets(spec, o, rank, n, communicator());
  o.fields = {true, false};
  data::Loader inputs(spec, o, rank, n, communicator());
  o.fields = {false, false};
  data::Loader neither(spec, o, rank, n, communicator());
  // Into the second epoch: every reader has finished the first, whose counts are then final.
  for (std::int64_t i = 0; i <= both.steps_per_epoch(); ++i) {
    const data::Batch all = both.next(), t = targets.next(), x = inputs.next(), none = neither.next();
    CHECK(!t.inputs.defined());
    CHECK(!x.targets.defined());
    CHECK(!none.inputs.defined());
    CHECK(!none.targets.defined());
    CHECK(t.targets.equal(all.targets));
    CHECK(x.inputs.equal(all.inputs));
    for (const data::Batch* b : {&t, &x, &none})
      CHECK(std::tuple(b->epoch, b->step, b->micro) == std::tuple(all.epoch, all.step, all.micro));
  }
  CHECK(neither.state().step == both.state().step);
  CHECK(neither.state().epoch == both.state().epoch);
  CHECK(both.state().epoch == 1);
  // The targets' and the inputs' reads of the epoch add up to the reads of both.
  CHECK(neither.stats().bytes_read == 0);
  CHECK(targets.stats(0).bytes_read > 0);
  CHECK(targets.stats(0).bytes_read < inputs.stats(0).bytes_read);
  CHECK(targets.stats(0).bytes_read + inputs.stats(0).bytes_read == both.stats(0).bytes_read);
}

TEST_CASE("plan_reads with pipeline stages: the first stage reads the inputs, the last the targets", "[data]") {
  const auto spec = chunked(fixture("h5py_gzip.h5"));
  data::SamplerOptions o;
  o.global_batch = 8;
  o.seed = 5;
  o.window = 2;
  o.partitions = 4;
  const auto bytes = [&](int ranks, int stages) {
    std::vector<std::int64_t> out;
    for (const auto& r : data::plan_reads(spec, o, ranks, 0, stages).ranks) out.push_back(r.bytes);
    return out;
  };
  const std::vector<std::int64_t> whole = bytes(2, 1);  // 2 replicas reading both fields
  const std::vector<std::int64_t> staged = bytes(4, 2);  // ranks 0, 1: stage 0; 2, 3: stage 1
  const std::vector<std::int64_t> deep = bytes(8, 4);
  for (int r = 0; r < 2; ++r) {
    CHECK(staged[r] > staged[2 + r]);  // an input row is larger than a target
    CHECK(staged[2 + r] > 0);
    CHECK(staged[r] + staged[2 + r] == whole[r]);
    CHECK(deep[r] == staged[r]);
    CHECK(deep[6 + r] == staged[2 + r]);
    for (int s = 1; s < 3; ++s) CHECK(deep[2 * s + r] == 0);
  }
  const data::ReadPlan plan = data::plan_reads(spec, o, 8, 0, 4);
  CHECK(plan.ranks[5].stage == 2);
  CHECK(plan.ranks[5].replica == 1);
  CHECK_THROWS_WITH(data::plan_reads(spec, o, 4, 0, 3), Contains("3 pipeline stages do not divide 4 ranks"));
}

TEST_CASE("ranks agree on the dataset and options with one collective, or all fail", "[data][mpi]") {
  const int n = communicator().size(), rank = communicator().rank();
  if (n == 1) return;  // needs peers
  const auto good = data::DatasetSpec::classification(fixture("h5py_gzip.h5"));
  const auto other = data::DatasetSpec::classification(fixture("h5py_half.h5"));
  CHECK_THROWS_WITH(data::Loader(rank == 1 ? other : good, options(1), rank, n, communicator()),
                    Contains("ranks see different datasets"));
  CHECK_THROWS_WITH(data::Loader(good, options(1, rank == 1 ? 2 : 1), rank, n, communicator()),
                    Contains("disagree on the data loader options"));
  const auto missing = data::DatasetSpec::classification(fixture("only-on-rank-0.h5"));
  CHECK_THROWS_WITH(data::Loader(rank == 1 ? missing : good, options(1), rank, n, communicator()),
                    rank == 1 ? Contains("only-on-rank-0.h5") : Contains("could not open the dataset on rank(s) 1"));
}

TEST_CASE("file locking can be turned off", "[data]") {
  data::DatasetSpec spec = data::DatasetSpec::classification(fixture("h5py_gzip.h5"));
  spec.file_locking = false;
  data::Dataset dataset(spec);
  CHECK(dataset.read({5}).targets.item<std::int64_t>() == (37 * 5) % 1000 - 500);
  CHECK(data::inspect_file(fixture("h5py_gzip.h5"), false).datasets.size() == 2);
}

TEST_CASE("apportion: shares proportional to weights, at least one each, summing to the total", "[data][hetero]") {
  using V = std::vector<std::int64_t>;
  CHECK(data::apportion(8, {3, 5}) == V{3, 5});
  CHECK(data::apportion(12, {1, 2, 3, 6}) == V{1, 2, 3, 6});
  CHECK(data::apportion(16, {0.375, 0.625}) == V{6, 10});
  CHECK(data::apportion(10, {1, 1, 1}) == V{4, 3, 3});  // largest remainder; a tie goes to the lower index
  CHECK(data::apportion(7, {2, 1}) == V{5, 2});         // 4.67 and 2.33
  CHECK(data::apportion(5, {1e-9, 1e-9, 3e-9}) == V{1, 1, 3});
  CHECK_THROWS_WITH(data::apportion(8, {10, 0.01}), Contains("give rank 1 none"));
  CHECK_THROWS_WITH(data::apportion(8, {1, -1}), Contains("positive"));
  CHECK_THROWS_WITH(data::apportion(8, {1, std::nan("")}), Contains("positive"));
  CHECK_THROWS_WITH(data::apportion(2, {1, 1, 1}), Contains("at least one each"));
  // A rank's slice starts after the shares of the ranks before it.
  const V batch = {10, 11, 12, 13, 14, 15, 16, 17};
  CHECK(data::Sampler::slice(batch, V{3, 5}, 0) == V{10, 11, 12});
  CHECK(data::Sampler::slice(batch, V{3, 5}, 1) == V{13, 14, 15, 16, 17});
  CHECK_THROWS_WITH(data::Sampler::slice(batch, V{3, 4}, 0), Contains("do not add up"));
}

TEST_CASE("unequal shares read the global batches of one rank; new shares mid-epoch keep the order", "[data][hetero]") {
  const std::string source = write_ids(scratch("shares"), 96, 3, 8);
  const auto spec = chunked(source);
  // Runs `steps` global batches of 8 as `shares.size()` ranks simulated in this process (each
  // Loader construction is collective over the real communicator, in the same order on every
  // rank), switching to `later` shares after `switch_after` steps.
  const auto run = [&](const std::vector<std::int64_t>& shares, std::int64_t steps, std::int64_t switch_after,
                       const std::vector<std::int64_t>& later) {
    const int ranks = static_cast<int>(shares.size());
    std::vector<std::unique_ptr<data::Loader>> loaders;
    for (int r = 0; r < ranks; ++r) {
      data::LoaderOptions o = options(1);
      o.shares = shares;
      loaders.push_back(std::make_unique<data::Loader>(spec, o, r, ranks, communicator()));
      CHECK(loaders.back()->batch_size() == shares[static_cast<std::size_t>(r)]);
      CHECK(loaders.back()->global_batch() == 8);
    }
    std::vector<std::vector<std::int64_t>> batches;
    for (std::int64_t s = 0; s < steps; ++s) {
      if (s == switch_after)
        for (auto& loader : loaders) loader->set_shares(later);
      std::vector<std::int64_t> global;
      for (int r = 0; r < ranks; ++r) {
        const auto mine = to_vector(loaders[static_cast<std::size_t>(r)]->next().targets);
        const auto& now = switch_after < 0 || s < switch_after ? shares : later;
        CHECK(static_cast<std::int64_t>(mine.size()) == now[static_cast<std::size_t>(r)]);
        global.insert(global.end(), mine.begin(), mine.end());
      }
      batches.push_back(global);
    }
    return batches;
  };
  const auto reference = run({8}, 20, -1, {});  // 12 steps per epoch: crosses into epoch 1
  CHECK(run({3, 5}, 20, -1, {}) == reference);
  CHECK(run({1, 2, 3, 2}, 20, -1, {}) == reference);
  CHECK(run({3, 5}, 20, 7, {6, 2}) == reference);         // mid-epoch
  CHECK(run({1, 2, 3, 2}, 20, 12, {2, 2, 2, 2}) == reference);  // at the epoch's end
  data::LoaderOptions o = options(1);
  o.shares = {3, 5};
  data::Loader loader(spec, o, 0, 2, communicator());
  CHECK_THROWS_WITH(loader.set_shares({3, 4}), Contains("keep the global batch of 8"));
  CHECK_THROWS_WITH(loader.set_shares({8, 0}), Contains("one count >= 1 per rank"));
}

TEST_CASE("a global batch's samples do not depend on the world size or the micro-batch split", "[data][mpi]") {
  const std::string source = write_ids(scratch("split"), 96, 3, 4);
  const auto spec = chunked(source);
  // Runs `steps` global batches of 8 as `ranks` ranks simulated in this process, each reading
  // `accumulation` micro-batches per step; returns each step's samples, ranks in order and each
  // rank's micro-batches in order (which is the global batch itself: slices are contiguous).
  struct Run {
    std::vector<std::vector<std::int64_t>> steps;
    data::LoaderState state;
  };
  const auto run = [&](int ranks, std::int64_t accumulation, std::int64_t steps,
                       const std::optional<data::LoaderState>& from) {
    std::vector<std::unique_ptr<data::Loader>> loaders;
    for (int r = 0; r < ranks; ++r) {
      data::LoaderOptions o = options(8 / ranks / accumulation);
      o.accumulation = accumulation;
      loaders.push_back(std::make_unique<data::Loader>(spec, o, r, ranks, communicator()));
      CHECK(loaders.back()->global_batch() == 8);
    }
    if (from)
      for (auto& loader : loaders) loader->restore(*from);
    Run out;
    for (std::int64_t s = 0; s < steps; ++s) {
      std::vector<std::int64_t> global;
      for (auto& loader : loaders)
        for (std::int64_t m = 0; m < accumulation; ++m) {
          const data::Batch batch = loader->next();
          CHECK(batch.micro == m);
          const auto mine = to_vector(batch.targets);
          global.insert(global.end(), mine.begin(), mine.end());
        }
      out.steps.push_back(global);
    }
    out.state = loaders.front()->state();
    return out;
  };
  const Run reference = run(1, 1, 20, std::nullopt);  // 12 steps per epoch: crosses into epoch 1
  CHECK(run(4, 1, 20, std::nullopt).steps == reference.steps);
  CHECK(run(2, 2, 20, std::nullopt).steps == reference.steps);
  CHECK(run(1, 4, 20, std::nullopt).steps == reference.steps);
  CHECK(run(4, 2, 20, std::nullopt).steps == reference.steps);
  // Resume on another split: 2 ranks x 4 for 7 steps, then 1 rank x 4 x accumulation 2.
  const Run first = run(2, 1, 7, std::nullopt);
  CHECK((first.state.step == 7 && first.state.micro == 0));
  const data::LoaderState saved = nlohmann::json::parse(nlohmann::json(first.state).dump()).get<data::LoaderState>();
  Run joined = first;
  const Run second = run(1, 2, 13, saved);
  joined.steps.insert(joined.steps.end(), second.steps.begin(), second.steps.end());
  CHECK(joined.steps == reference.steps);
}

TEST_CASE("each rank reads only the blocks of its partitions, each once per epoch", "[data][mpi]") {
  const int n = communicator().size(), rank = communicator().rank();
  const std::string source = write_ids(scratch("reads"), 512, 1, 8);  // 64 blocks of 8 samples
  data::LoaderOptions o = options(32 / n, 4, /*window=*/2);
  o.prefetch = 1;
  data::Loader loader(chunked(source), o, rank, n, communicator());
  REQUIRE(loader.steps_per_epoch() == 16);
  // What this rank's samples of epoch 0 need: its 4 partitions' stretches of 4 blocks each.
  const std::vector<std::int64_t> order = loader.sampler().order(0);
  std::vector<std::int64_t> samples;
  for (std::int64_t s = 0; s < 16; ++s) {
    const auto begin = order.begin() + s * 32 + rank * (32 / n);
    samples.insert(samples.end(), begin, begin + 32 / n);
  }
  const data::ReadStats epoch = loader.dataset().footprint(samples);
  // Inputs and targets are one chunk (64 bytes) each per block.
  CHECK(epoch.chunks_read == 2 * 64 / n);
  CHECK(epoch.bytes_read == 64 / n * 128);
  CHECK(loader.dataset().bytes() == 64 * 128);
  for (std::int64_t s = 0; s < 16; ++s) loader.next();
  // Read exactly that: every chunk once, the other lookups served by the cache.
  const data::ReadStats read = loader.stats(0);
  CHECK(read.chunks_read == epoch.chunks_read);
  CHECK(read.bytes_read == epoch.bytes_read);
  CHECK(read.cache_hits > 0);
  CHECK(loader.stats().chunks_read >= read.chunks_read);  // and whatever epoch 1 read ahead
  // A cache of one block cannot keep a window: blocks are read again.
  o.cache_bytes = 128;
  data::Loader small(chunked(source), o, rank, n, communicator());
  for (std::int64_t s = 0; s < 16; ++s) small.next();
  CHECK(small.stats(0).chunks_read > epoch.chunks_read);
}

TEST_CASE("an announced block leaves the cache after its last announced sample, not before", "[data]") {
  // 4 blocks of 8 samples; inputs only, and a cache of two blocks' inputs (64 bytes each).
  const std::string source = write_ids(scratch("announce"), 32, 1, 8);
  const auto reads = [&](bool announce) {
    data::Dataset dataset(chunked(source));
    dataset.set_cache_bytes(128);
    const std::vector<std::int64_t> order = {0, 8, 16, 1};  // blocks 0 and 1, then 2, then 0 again
    if (announce) dataset.expect(order);
    std::vector<std::int64_t> got;
    for (const auto& [first, count] : {std::pair<std::size_t, std::size_t>{0, 2}, {2, 1}, {3, 1}}) {
      const std::vector<std::int64_t> batch(order.begin() + first, order.begin() + first + count);
      data::Batch out = dataset.allocate(static_cast<std::int64_t>(count), false, {true, false});
      dataset.read_into(batch, out);
      for (std::int64_t i = 0; i < out.inputs.size(0); ++i) got.push_back(out.inputs[i][0].item<std::int64_t>());
    }
    CHECK(got == order);
    return dataset.stats();
  };
  // Announced: block 1 leaves after the first batch (its last sample), so block 2 fits beside
  // block 0, which the last batch finds in the cache.
  const data::ReadStats announced = reads(true);
  CHECK(announced.chunks_read == 3);
  CHECK(announced.cache_hits == 1);
  CHECK(announced.bytes_read == 3 * 64);
  // Not announced: block 2 pushes out the least recently used, block 0, which is read again.
  const data::ReadStats unannounced = reads(false);
  CHECK(unannounced.chunks_read == 4);
  CHECK(unannounced.cache_hits == 0);
}

TEST_CASE("several workers deliver the batches, reads and cache hits of one", "[data][mpi]") {
  const int n = communicator().size(), rank = communicator().rank();
  for (const int gzip : {1, 0}) {  // decompressed into the cache; copied from the file's pages
    const std::string dir = scratch("workers-gzip" + std::to_string(gzip));
    if (world().is_root()) {
      const at::Tensor ids = at::arange(384, at::kLong);
      data::ShardOptions shards;
      shards.shards = 2;
      shards.chunk_bytes = 8 * 8;  // 8 rows per chunk in both columns: 48 blocks
      shards.gzip = gzip;
      data::write_shards(dir, "ids", {{"inputs", at::stack({ids, -ids}, 1).to(at::kFloat)}, {"targets", ids}}, shards);
    }
    world().barrier();
    // A cache that keeps every window, and one of a single block that reads blocks again.
    for (const std::int64_t cache : {std::int64_t{0}, std::int64_t{128}}) {
      struct Run {
        std::vector<std::vector<std::int64_t>> targets;
        std::vector<std::array<std::int64_t, 3>> where;  // epoch, step, micro
        data::ReadStats epoch0, epoch1;
      };
      const auto run = [&](int workers) {
        data::LoaderOptions o = options(8 / n, 7, /*window=*/2);
        o.accumulation = 2;
        o.partitions = 4;
        o.prefetch = 5;
        o.cache_bytes = cache;
        o.workers = workers;
        data::Loader loader(chunked(dir + "/ids.json"), o, rank, n, communicator());
        Run out;
        // Two epochs and into the third.
        for (std::int64_t i = 0; i < 2 * (2 * loader.steps_per_epoch()) + 3; ++i) {
          const data::Batch b = loader.next();
          // Every row whole and in its place: inputs (i, -i) beside target i.
          CHECK(at::equal(b.inputs.select(1, 0).to(at::kLong), b.targets));
          CHECK(at::equal(b.inputs.select(1, 1).to(at::kLong), -b.targets));
          out.targets.push_back(to_vector(b.targets));
          out.where.push_back({b.epoch, b.step, b.micro});
        }
        out.epoch0 = loader.stats(0);
        out.epoch1 = loader.stats(1);
        return out;
      };
      const Run one = run(1);
      for (const int workers : {2, 3}) {
        INFO("gzip " << gzip << ", cache " << cache << " bytes, " << workers << " workers");
        const Run many = run(workers);
        CHECK(many.targets == one.targets);
        CHECK((many.where == one.where));
        for (const auto& [a, b] : {std::pair(many.epoch0, one.epoch0), std::pair(many.epoch1, one.epoch1)}) {
          CHECK(a.bytes_read == b.bytes_read);
          CHECK(a.chunks_read == b.chunks_read);
          CHECK(a.cache_hits == b.cache_hits);
        }
      }
      // Each block once per epoch with the window kept, more than once without.
      const std::int64_t blocks = 2 * 48 / n;
      if (cache == 0 && n == 1) CHECK(one.epoch0.chunks_read == blocks);
      if (cache != 0) CHECK(one.epoch0.chunks_read > blocks);
    }
  }
}

// The loader on a GPU: batches read into pinned memory and copied on the loader's own stream
// arrive on the training device with exactly the bytes, epochs and steps of a CPU read, usable
// at once on the consumer's stream, and stay intact while they are held.
#include <ATen/ATen.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
// After ATen: c10 defines a CHECK macro of its own that Catch must override.
#include <catch2/catch.hpp>

#include <ftw.h>
#include <sys/stat.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "ddp_support.h"
#include "gpu_support.h"
#include "mpitrain/data/loader.h"
#include "mpitrain/data/shards.h"

using namespace mpitrain;
using namespace mpitrain::testing;

namespace {

// A scratch folder removed with its contents at the end of the scope. (POSIX calls: libtorch's
// exported std::filesystem::remove_all crashes when called from the tests, see tests/data.)
struct Scratch {
  std::string path;
  Scratch() {
    char name[] = "/tmp/mpitrain-gpu-loader-XXXXXX";
    REQUIRE(mkdtemp(name) != nullptr);
    path = name;
  }
  ~Scratch() {
    nftw(path.c_str(), [](const char* p, const struct stat*, int, struct FTW*) { return std::remove(p); }, 8,
         FTW_DEPTH | FTW_PHYS);
  }
};

}  // namespace

TEST_CASE("loader on CUDA delivers the bytes of a CPU read", "[loader]") {
  const Scratch scratch;
  const std::int64_t rows = 999;
  at::Generator random = at::make_generator<at::CPUGeneratorImpl>(17);
  // Images as bytes (the usual case: they become floats on the device) and float features.
  const std::vector<std::pair<std::string, at::Tensor>> sets = {
      {"bytes", at::randint(256, {rows, 7, 9}, random, at::kLong).to(at::kByte)},
      {"floats", at::randn({rows, 13}, random, at::kFloat)}};
  for (const auto& [name, inputs] : sets) {
    INFO("inputs " << name);
    const at::Tensor targets = at::randint(1000, {rows}, random, at::kLong);
    data::ShardOptions shards;
    shards.shards = 3;
    shards.chunk_bytes = 2048;  // many blocks, so the shuffled order jumps between chunks and files
    shards.gzip = 1;
    const auto set = data::write_shards(scratch.path, name, {{"inputs", inputs}, {"targets", targets}}, shards);
    const data::DatasetSpec spec = data::DatasetSpec::classification(set.manifest);

    data::LoaderOptions options;
    options.batch_size = 32;
    options.seed = 3;
    options.prefetch = 4;
    data::Loader on_host(spec, options, 0, 1, communicator());
    options.device = gpu();
    data::Loader on_gpu(spec, options, 0, 1, communicator());
    REQUIRE(on_gpu.steps_per_epoch() == on_host.steps_per_epoch());

    // The consumer works on a stream of its own, as a training step might.
    const c10::cuda::CUDAStream consumer = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, gpu().index());
    const c10::cuda::CUDAStreamGuard on_consumer(consumer);
    std::vector<data::Batch> host_batches, gpu_batches;
    const std::int64_t steps = 2 * on_host.steps_per_epoch() + 3;  // into a third epoch
    for (std::int64_t s = 0; s < steps; ++s) {
      INFO("batch " << s);
      const data::Batch expected = on_host.next();
      const data::Batch batch = on_gpu.next();
      REQUIRE(batch.inputs.device() == gpu());
      REQUIRE(batch.targets.device() == gpu());
      CHECK(batch.epoch == expected.epoch);
      CHECK(batch.step == expected.step);
      CHECK(batch.inputs.scalar_type() == expected.inputs.scalar_type());
      // Used at once on the consumer's stream: a kernel there reads what the copy wrote.
      const at::Tensor inputs_now = batch.inputs.clone(), targets_now = batch.targets.clone();
      CHECK(at::equal(inputs_now.cpu(), expected.inputs));
      CHECK(at::equal(targets_now.cpu(), expected.targets));
      host_batches.push_back({expected.inputs.clone(), expected.targets.clone(), expected.epoch, expected.step});
      gpu_batches.push_back(batch);
    }
    // Batches held all along were not overwritten by later copies.
    for (std::size_t s = 0; s < gpu_batches.size(); ++s) {
      INFO("held batch " << s);
      CHECK(at::equal(gpu_batches[s].inputs.cpu(), host_batches[s].inputs));
      CHECK(at::equal(gpu_batches[s].targets.cpu(), host_batches[s].targets));
    }
  }
}

TEST_CASE("loader on CUDA keeps two batches on the device, however far it reads ahead", "[loader]") {
  const Scratch scratch;
  at::Generator random = at::make_generator<at::CPUGeneratorImpl>(5);
  const at::Tensor inputs = at::randn({640, 8192}, random, at::kFloat);
  const at::Tensor targets = at::randint(10, {640}, random, at::kLong);
  data::ShardOptions shards;
  shards.gzip = 0;
  const auto set = data::write_shards(scratch.path, "large", {{"inputs", inputs}, {"targets", targets}}, shards);
  data::LoaderOptions options;
  options.batch_size = 16;
  options.prefetch = 8;
  options.device = gpu();
  // What one batch takes on the device: 512 KiB of inputs and 128 bytes of targets, which the
  // caching allocator rounds up to its 512-byte granule.
  const std::int64_t batch_bytes = 16 * 8192 * 4 + 512;
  const auto device = gpu().index();
  const auto allocated = [&] {
    return c10::cuda::CUDACachingAllocator::getDeviceStats(device)
        .allocated_bytes[static_cast<std::size_t>(c10::CachingAllocator::StatType::AGGREGATE)];
  };
  c10::cuda::CUDACachingAllocator::resetPeakStats(device);
  const std::int64_t before = allocated().current;
  data::Loader loader(data::DatasetSpec::classification(set.manifest), options, 0, 1, communicator());
  for (int step = 0; step < 12; ++step) {
    // A step slower than the reader: its queue of 8 is full whenever next() is called.
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    const data::Batch batch = loader.next();
    REQUIRE(batch.inputs.device() == gpu());
    REQUIRE(batch.inputs.size(0) == 16);
    c10::cuda::device_synchronize();
  }
  // The batch returned and the next one, being copied: not the 8 read ahead, which wait in
  // pinned host memory.
  CHECK(allocated().peak - before <= 2 * batch_bytes);
}

// All-reduce bandwidth: mpitrain's Communicator against the raw library call on the same
// buffers (MPI_Allreduce for the MPI backend on CPU, ncclAllReduce for NCCL on a GPU).
//
//   mpirun -np 2 build/bin/bench_allreduce --backend mpi --out bench/results/allreduce_mpi_np2.json
#include <ATen/ATen.h>

#include <iostream>
#include <limits>
#include <string>
#include <vector>

#ifdef MPITRAIN_HAVE_NCCL
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "mpitrain/runtime/cuda_check.h"
#endif

#include "harness.h"
#include "mpitrain/apps/cli.h"
#include "mpitrain/comm/communicator.h"
#include "mpitrain/runtime/check.h"
#include "mpitrain/runtime/device.h"
#include "mpitrain/runtime/error.h"
#include "mpitrain/runtime/world.h"

using namespace mpitrain;

namespace {

struct Options {
  std::string backend = "mpi";
  std::string dtype = "float32";
  std::int64_t min_bytes = std::int64_t{1} << 10;
  std::int64_t max_bytes = std::int64_t{256} << 20;
  int warmup = 3;
  int reps = 50;
  double goal = 0.95;
  std::int64_t goal_from = std::int64_t{1} << 20;
  std::string out;
};

c10::ScalarType parse_dtype(const std::string& name) {
  if (name == "float32") return at::kFloat;
  if (name == "bfloat16") return at::kBFloat16;
  if (name == "float16") return at::kHalf;
  throw runtime::Error("--dtype " + name + ": expected float32, bfloat16 or float16",
                       runtime::ExitCode::bad_input);
}

// The raw library call that the communicator is measured against. NCCL binds a communicator
// and a stream to the device that is current when they are created, so every CUDA call here
// runs under a guard for the rank's device.
class RawAllReduce {
 public:
  RawAllReduce(const runtime::World& world, c10::Device device) : world_(world), device_(device) {
#ifdef MPITRAIN_HAVE_NCCL
    if (device.is_cuda()) {
      const c10::cuda::CUDAGuard guard(device);
      ncclUniqueId id;
      if (world.is_root()) MPITRAIN_CHECK_NCCL(ncclGetUniqueId(&id));
      MPITRAIN_CHECK_MPI(MPI_Bcast(&id, sizeof id, MPI_BYTE, 0, world.comm()));
      MPITRAIN_CHECK_NCCL(ncclCommInitRank(&nccl_, world.size(), id, world.rank()));
      MPITRAIN_CHECK_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    }
#else
    (void)device;
#endif
  }
  ~RawAllReduce() {
#ifdef MPITRAIN_HAVE_NCCL
    if (!device_.is_cuda()) return;
    const c10::cuda::CUDAGuard guard(device_);
    if (nccl_ != nullptr) ncclCommDestroy(nccl_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
#endif
  }

  void run(at::Tensor& tensor) {
#ifdef MPITRAIN_HAVE_NCCL
    if (tensor.is_cuda()) {
      const c10::cuda::CUDAGuard guard(device_);
      const ncclDataType_t type = tensor.scalar_type() == at::kFloat      ? ncclFloat32
                                  : tensor.scalar_type() == at::kBFloat16 ? ncclBfloat16
                                                                          : ncclFloat16;
      MPITRAIN_CHECK_NCCL(ncclAllReduce(tensor.data_ptr(), tensor.data_ptr(), static_cast<size_t>(tensor.numel()),
                                        type, ncclSum, nccl_, stream_));
      MPITRAIN_CHECK_CUDA(cudaStreamSynchronize(stream_));
      return;
    }
#endif
    if (tensor.scalar_type() != at::kFloat)
      throw runtime::Error("the raw MPI reference runs float32 only (MPI has no 16-bit float types)",
                           runtime::ExitCode::bad_input);
    MPITRAIN_CHECK_MPI(MPI_Allreduce(MPI_IN_PLACE, tensor.data_ptr(), static_cast<int>(tensor.numel()),
                                     MPI_FLOAT, MPI_SUM, world_.comm()));
  }

 private:
  const runtime::World& world_;
  c10::Device device_;
#ifdef MPITRAIN_HAVE_NCCL
  ncclComm_t nccl_ = nullptr;
  cudaStream_t stream_ = nullptr;
#endif
};

// Waits for the rank's own device: the communicator's work is ordered on its current stream.
void synchronize(c10::Device device) {
#ifdef MPITRAIN_HAVE_NCCL
  if (device.is_cuda())
    MPITRAIN_CHECK_CUDA(cudaStreamSynchronize(at::cuda::getCurrentCUDAStream(device.index()).stream()));
#else
  (void)device;
#endif
}

std::string device_name(c10::Device device) {
#ifdef MPITRAIN_HAVE_NCCL
  if (device.is_cuda()) return at::cuda::getDeviceProperties(device.index())->name;
#else
  (void)device;
#endif
  return "";
}

int run(const runtime::World& world, const Options& options) {
  const comm::Backend backend = comm::parse_backend(options.backend);
  const runtime::DeviceKind kind = backend == comm::Backend::nccl ? runtime::DeviceKind::cuda : runtime::DeviceKind::cpu;
  const c10::Device device = runtime::choose_device(world, {kind, false});
#ifdef MPITRAIN_HAVE_NCCL
  // The rank's GPU is the current one for everything below (tensors, LibTorch's streams).
  if (device.is_cuda()) at::cuda::set_device(device.index());
#endif
  auto communicator = comm::make_communicator(world, device, {}, backend);
  RawAllReduce raw(world, device);
  const c10::ScalarType type = parse_dtype(options.dtype);
  const double factor = bench::allreduce_busbw_factor(world.size());

  std::vector<std::vector<std::string>> table;
  nlohmann::json rows = nlohmann::json::array();
  double worst_ratio = std::numeric_limits<double>::infinity();
  for (std::int64_t bytes : bench::size_sweep(options.min_bytes, options.max_bytes)) {
    const std::int64_t numel = bytes / static_cast<std::int64_t>(c10::elementSize(type));
    at::Tensor buffer = at::ones({numel}, at::TensorOptions().dtype(type).device(device));
    const int reps = bench::repetitions_for(bytes, options.reps);
    // Alternate so that neither side always runs on a warmer cache or a quieter machine.
    const double ours = bench::time_collective(world.comm(), options.warmup, reps, [&] {
      communicator->all_reduce(buffer, comm::ReduceOp::sum);
      synchronize(device);
    });
    const double reference = bench::time_collective(world.comm(), options.warmup, reps, [&] { raw.run(buffer); });
    const double ours_busbw = bench::algbw_gbps(bytes, ours) * factor;
    const double raw_busbw = bench::algbw_gbps(bytes, reference) * factor;
    const double ratio = reference / ours;  // = ours_busbw / raw_busbw
    if (bytes >= options.goal_from) worst_ratio = std::min(worst_ratio, ratio);
    rows.push_back({{"bytes", bytes},
                    {"reps", reps},
                    {"mpitrain", {{"time_us", ours * 1e6}, {"algbw_gbps", ours_busbw / factor}, {"busbw_gbps", ours_busbw}}},
                    {"raw", {{"time_us", reference * 1e6}, {"algbw_gbps", raw_busbw / factor}, {"busbw_gbps", raw_busbw}}},
                    {"ratio", ratio}});
    table.push_back({bench::format_size(bytes), bench::fixed(ours * 1e6, 1), bench::fixed(ours_busbw, 3),
                     bench::fixed(reference * 1e6, 1), bench::fixed(raw_busbw, 3), bench::fixed(ratio, 3)});
  }

  if (!world.is_root()) return 0;
  const std::string raw_name = device.is_cuda() ? "ncclAllReduce" : "MPI_Allreduce";
  std::cout << "all_reduce(sum) " << options.dtype << ", " << comm::to_string(backend) << " backend, "
            << world.size() << " ranks; busbw = algbw * 2(n-1)/n\n";
  bench::print_table({"size", "mpitrain us", "busbw GB/s", raw_name + " us", "busbw GB/s", "ratio"}, table);
  const bool met = world.size() == 1 || worst_ratio >= options.goal;
  std::cout << "goal: busbw >= " << options.goal << "x " << raw_name << " from " << bench::format_size(options.goal_from)
            << " up; worst ratio " << bench::fixed(worst_ratio, 3) << (met ? " (met)" : " (NOT met)") << '\n';
  if (!options.out.empty()) {
    const nlohmann::json result = {
        {"name", "allreduce_" + std::string(comm::to_string(backend)) + "_np" + std::to_string(world.size())},
        {"what", "all_reduce(sum) busbw of mpitrain's " + std::string(comm::to_string(backend)) +
                     " communicator vs " + raw_name + " on the same buffers"},
        {"dtype", options.dtype},
        {"machine", bench::machine_description(world.size(), device_name(device))},
        {"date", bench::utc_now()},
        {"git_commit", bench::git_commit()},
        {"goal", {{"ratio_at_least", options.goal}, {"from_bytes", options.goal_from}}},
        {"worst_ratio", worst_ratio},
        {"goal_met", met},
        {"rows", rows}};
    bench::write_json(options.out, result);
    std::cout << "wrote " << options.out << '\n';
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  runtime::World world(&argc, &argv);
  CLI::App app{"All-reduce bandwidth: mpitrain communicator vs the raw library call"};
  Options options;
  app.add_option("--backend", options.backend, "mpi (CPU tensors) or nccl (CUDA tensors)")
      ->check(CLI::IsMember({"mpi", "nccl"}));
  app.add_option("--dtype", options.dtype, "float32, bfloat16 or float16 (raw MPI: float32 only)");
  app.add_option("--min-bytes", options.min_bytes, "smallest buffer");
  app.add_option("--max-bytes", options.max_bytes, "largest buffer");
  app.add_option("--warmup", options.warmup, "untimed calls per size");
  app.add_option("--reps", options.reps, "timed calls per size (fewer for large sizes)");
  app.add_option("--goal", options.goal, "required busbw ratio against the raw call");
  app.add_option("--goal-from", options.goal_from, "smallest size the goal applies to");
  app.add_option("--out", options.out, "JSON result file (written by rank 0)");
  return apps::parse_and_run(world, app, argc, argv, [&] { return run(world, options); });
}

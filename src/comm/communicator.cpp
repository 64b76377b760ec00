#include "mpitrain/comm/communicator.h"

#include <ATen/ATen.h>

#include <array>
#include <cstdio>
#include <vector>

#include "mpitrain/runtime/check.h"
#include "mpitrain/runtime/error.h"
#include "mpitrain/runtime/fatal.h"
#include "mpitrain/runtime/world.h"

namespace mpitrain::comm {

using runtime::Error;
using runtime::ExitCode;

const char* to_string(ReduceOp op) {
  switch (op) {
    case ReduceOp::sum: return "sum";
    case ReduceOp::avg: return "avg";
    case ReduceOp::max: return "max";
    case ReduceOp::min: return "min";
  }
  return "?";
}

Backend parse_backend(const std::string& text) {
  if (text == "auto") return Backend::automatic;
  if (text == "mpi") return Backend::mpi;
  if (text == "nccl") return Backend::nccl;
  throw Error("unknown communication backend '" + text + "': expected auto, mpi or nccl",
              ExitCode::bad_input);
}

const char* to_string(Backend backend) {
  switch (backend) {
    case Backend::automatic: return "auto";
    case Backend::mpi: return "mpi";
    case Backend::nccl: return "nccl";
  }
  return "?";
}

std::string format_bytes(std::int64_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double value = static_cast<double>(bytes);
  int unit = 0;
  while (value >= 1024.0 && unit < 4) {
    value /= 1024.0;
    ++unit;
  }
  char text[32];
  std::snprintf(text, sizeof(text), unit == 0 ? "%.0f %s" : "%.1f %s", value, units[unit]);
  return text;
}

std::string describe(const char* operation, const at::Tensor& tensor, const char* detail) {
  std::string text = operation;
  if (detail) text += std::string("(") + detail + ")";
  text += " of " + std::to_string(tensor.numel()) + " " +
          std::string(c10::toString(tensor.scalar_type())) + " elements (" +
          format_bytes(static_cast<std::int64_t>(tensor.nbytes())) + ")";
  return text;
}

namespace {

bool supported(c10::ScalarType type) {
  switch (type) {
    case c10::kFloat: case c10::kDouble: case c10::kBFloat16: case c10::kHalf:
    case c10::kInt: case c10::kLong: case c10::kByte:
      return true;
    default:
      return false;
  }
}

// The identity of a call, compared across ranks by verify_collectives.
enum class OpCode : std::int64_t { all_reduce = 1, broadcast, all_gather, reduce_scatter, barrier };

}  // namespace

struct Communicator::Control {
  MPI_Comm comm = MPI_COMM_NULL;
};

Communicator::Communicator(const runtime::World& world, const CommOptions& options)
    : control_(std::make_unique<Control>()), options_(options) {
  // Non-blocking and bounded: at start-up a rank that never arrives (stopped, say) must end the
  // job after the timeout, not hold the others in MPI_Comm_dup.
  MPI_Request request = MPI_REQUEST_NULL;
  MPITRAIN_CHECK_MPI(MPI_Comm_idup(world.comm(), &control_->comm, &request));
  runtime::wait_or_die(&request, options_.timeout, "creating the communicator's control channel (MPI_Comm_idup)");
  MPITRAIN_CHECK_MPI(MPI_Comm_rank(control_->comm, &rank_));
  MPITRAIN_CHECK_MPI(MPI_Comm_size(control_->comm, &size_));
}

Communicator::~Communicator() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (control_->comm != MPI_COMM_NULL && !finalized) MPI_Comm_free(&control_->comm);
}

void Communicator::check_tensor(const char* operation, const at::Tensor& tensor) const {
  const std::string where = std::string(operation) + " on " + runtime::where() + ": ";
  if (!tensor.defined()) throw Error(where + "the tensor is undefined");
  if (tensor.device() != device())
    throw Error(where + "the tensor is on " + tensor.device().str() + " but this " +
                to_string(backend()) + " communicator works on " + device().str() +
                ": move it first (tensor.to(device))");
  if (!tensor.is_contiguous())
    throw Error(where + "the tensor is not contiguous: call .contiguous() first");
  if (!supported(tensor.scalar_type()))
    throw Error(where + "dtype " + std::string(c10::toString(tensor.scalar_type())) +
                " is not supported (float32, float64, bfloat16, float16, int32, int64, uint8)");
}

void Communicator::verify_across_ranks(const char* operation, const at::Tensor* tensor,
                                       std::int64_t extra) {
  static_assert(sizeof(OpCode) == sizeof(std::int64_t));
  OpCode code = OpCode::barrier;
  const std::string name = operation;
  if (name == "all_reduce") code = OpCode::all_reduce;
  if (name == "broadcast") code = OpCode::broadcast;
  if (name == "all_gather") code = OpCode::all_gather;
  if (name == "reduce_scatter") code = OpCode::reduce_scatter;
  const std::array<std::int64_t, 4> mine = {
      static_cast<std::int64_t>(code),
      tensor ? static_cast<std::int64_t>(tensor->scalar_type()) : -1,
      tensor ? tensor->numel() : 0, extra};
  std::vector<std::int64_t> all(mine.size() * static_cast<std::size_t>(size_));
  MPI_Request request;
  MPITRAIN_CHECK_MPI(MPI_Iallgather(mine.data(), 4, MPI_INT64_T, all.data(), 4, MPI_INT64_T,
                                    control_->comm, &request));
  runtime::wait_or_die(&request, options_.timeout, "verify_collectives: the check before " + name);
  const char* names[] = {"?", "all_reduce", "broadcast", "all_gather", "reduce_scatter", "barrier"};
  auto show = [&](const std::int64_t* s) {
    const auto op = s[0] >= 1 && s[0] <= 5 ? names[s[0]] : "?";
    std::string text = std::string(op);
    if (s[1] >= 0) text += " of " + std::to_string(s[2]) + " " +
                           std::string(c10::toString(static_cast<c10::ScalarType>(s[1]))) +
                           " elements, arg " + std::to_string(s[3]);
    return text;
  };
  for (int r = 0; r < size_; ++r) {
    const std::int64_t* theirs = all.data() + 4 * r;
    if (std::equal(mine.begin(), mine.end(), theirs)) continue;
    throw Error("collectives disagree across ranks: rank " + std::to_string(rank_) + " calls " +
                show(mine.data()) + " but rank " + std::to_string(r) + " calls " + show(theirs) +
                " (every rank must call the same collectives in the same order)");
  }
}

WorkPtr Communicator::all_reduce_async(at::Tensor& tensor, ReduceOp op) {
  check_tensor("all_reduce", tensor);
  if (op == ReduceOp::avg && !at::isFloatingType(tensor.scalar_type()))
    throw Error("all_reduce(avg) on " + runtime::where() + ": avg is defined for floating-point "
                "tensors only, got " + std::string(c10::toString(tensor.scalar_type())) +
                "; reduce with sum and divide");
  if (options_.verify_collectives) verify_across_ranks("all_reduce", &tensor, static_cast<int>(op));
  return do_all_reduce(tensor, op);
}

WorkPtr Communicator::broadcast_async(at::Tensor& tensor, int root) {
  check_tensor("broadcast", tensor);
  if (root < 0 || root >= size_)
    throw Error("broadcast on " + runtime::where() + ": root " + std::to_string(root) +
                " is not a rank of this world of " + std::to_string(size_));
  if (options_.verify_collectives) verify_across_ranks("broadcast", &tensor, root);
  return do_broadcast(tensor, root);
}

WorkPtr Communicator::all_gather_async(at::Tensor& output, const at::Tensor& input) {
  check_tensor("all_gather", output);
  check_tensor("all_gather", input);
  if (output.scalar_type() != input.scalar_type() || output.numel() != input.numel() * size_)
    throw Error("all_gather on " + runtime::where() + ": output must hold world size (" +
                std::to_string(size_) + ") x input elements of the input's dtype, got " +
                describe("output", output) + " for " + describe("input", input));
  if (options_.verify_collectives) verify_across_ranks("all_gather", &input, 0);
  return do_all_gather(output, input);
}

WorkPtr Communicator::reduce_scatter_async(at::Tensor& output, const at::Tensor& input,
                                           ReduceOp op) {
  check_tensor("reduce_scatter", output);
  check_tensor("reduce_scatter", input);
  if (output.scalar_type() != input.scalar_type() || input.numel() != output.numel() * size_)
    throw Error("reduce_scatter on " + runtime::where() + ": input must hold world size (" +
                std::to_string(size_) + ") x output elements of the output's dtype, got " +
                describe("input", input) + " for " + describe("output", output));
  if (op == ReduceOp::avg && !at::isFloatingType(output.scalar_type()))
    throw Error("reduce_scatter(avg) on " + runtime::where() +
                ": avg is defined for floating-point tensors only");
  if (options_.verify_collectives) verify_across_ranks("reduce_scatter", &input, static_cast<int>(op));
  return do_reduce_scatter(output, input, op);
}

void Communicator::check_peer(const char* operation, int peer) const {
  if (peer < 0 || peer >= size_ || peer == rank_)
    throw Error(std::string(operation) + " on " + runtime::where() + ": peer " + std::to_string(peer) +
                " is not another rank of this communicator of " + std::to_string(size_));
}

WorkPtr Communicator::send_async(const at::Tensor& tensor, int peer) {
  check_tensor("send", tensor);
  check_peer("send", peer);
  return do_send(tensor, peer);
}

WorkPtr Communicator::recv_async(at::Tensor& tensor, int peer) {
  check_tensor("recv", tensor);
  check_peer("recv", peer);
  return do_recv(tensor, peer);
}

WorkPtr Communicator::barrier_async() {
  if (options_.verify_collectives) verify_across_ranks("barrier", nullptr, 0);
  return do_barrier();
}

}  // namespace mpitrain::comm

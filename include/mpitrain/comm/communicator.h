#pragma once
// Collectives over tensors, the one interface the layers above use.
//
// Contract:
// - Every rank calls the same collectives in the same order, with the same dtype and sizes.
//   Operations are launched in call order and complete in that order.
// - Tensors must live on device(), be contiguous and have a supported dtype (float32, float64,
//   bfloat16, float16, int32, int64, uint8); all_gather/reduce_scatter sizes must be world
//   size multiples of each other. A violation throws runtime::Error before anything is sent.
// - *_async returns a Work. After Work::wait(), work that the caller queues afterwards (on the
//   host for CPU tensors, on the caller's current CUDA stream for CUDA tensors) sees the result.
//   The tensors must not be freed or written until then; the communicator keeps them alive.
// - Avg divides the sum by the world size once, after the reduction; it is defined for
//   floating-point dtypes only.
// - A collective that does not complete within options().timeout ends the job on every rank
//   (runtime::fatal with ExitCode::comm_timeout) with a message naming the operation, its size
//   and this rank. No hang, ever.
// - With verify_collectives, each call first compares (operation, dtype, size, root) across
//   ranks and a mismatch is an error on every rank; it costs one small collective per call, so
//   it is meant for debugging and tests.
// - Point-to-point (send_async/recv_async, for pipeline activations and their gradients): a
//   send to rank `peer` matches that peer's recv from this rank, in the order each side posts
//   them; the receiving tensor has the sent dtype and element count (a mismatch is an error or
//   a timeout, never silent). Unlike collectives, p2p work completes as soon as its own
//   transfer has, not in call order. The timeout and abort rules are those of collectives. On
//   NCCL sends and receives run on the communicator's one stream in call order, so the two
//   sides must post them in matching order (the pipeline gives each direction its own
//   communicator for that).
// - While timing is on (set_timing), each operation launched records when it ran, on this
//   host's steady clock, for the trainer's step timeline: Work::timing() gives it once the work
//   has completed. Off by default, because on CUDA it costs two host callbacks per operation.

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

namespace mpitrain::runtime {
class World;
}

namespace mpitrain::comm {

enum class ReduceOp { sum, avg, max, min };
const char* to_string(ReduceOp op);

enum class Backend { automatic, mpi, nccl };
Backend parse_backend(const std::string& text);  // "auto" | "mpi" | "nccl"
const char* to_string(Backend backend);

/// When an operation ran, on this host's std::chrono::steady_clock.
struct WorkTiming {
  /// The backend started it: MPI when the progress thread posts it, NCCL when the
  /// communicator's stream reaches it (after the caller's earlier work and earlier collectives).
  std::chrono::steady_clock::time_point started;
  /// The result was in place: MPI when the progress thread sees the request complete, NCCL when
  /// the stream has run the collective.
  std::chrono::steady_clock::time_point completed;
};

class Work {
 public:
  virtual ~Work() = default;
  /// True when the result is in place (never blocks).
  virtual bool is_completed() = 0;
  /// See the contract above: host-blocking for CPU tensors, stream-ordering for CUDA tensors.
  virtual void wait() = 0;
  /// Once completed, when the operation ran, if it was launched while timing was on; otherwise
  /// nothing. Never blocks.
  virtual std::optional<WorkTiming> timing() = 0;
};
using WorkPtr = std::shared_ptr<Work>;

struct CommOptions {
  std::chrono::milliseconds timeout{std::chrono::minutes(10)};
  bool verify_collectives = false;
};

class Communicator {
 public:
  virtual ~Communicator();
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  const CommOptions& options() const { return options_; }
  virtual c10::Device device() const = 0;
  virtual Backend backend() const = 0;

  WorkPtr all_reduce_async(at::Tensor& tensor, ReduceOp op);
  WorkPtr broadcast_async(at::Tensor& tensor, int root);
  /// output.numel() == size() * input.numel(); rank r's input lands in output's r-th slice.
  WorkPtr all_gather_async(at::Tensor& output, const at::Tensor& input);
  /// input.numel() == size() * output.numel(); rank r gets the reduction of every input's r-th slice.
  WorkPtr reduce_scatter_async(at::Tensor& output, const at::Tensor& input, ReduceOp op);
  WorkPtr barrier_async();
  /// To rank `peer` of this communicator (not this rank).
  WorkPtr send_async(const at::Tensor& tensor, int peer);
  /// From rank `peer`, into tensor (same dtype and element count as the send).
  WorkPtr recv_async(at::Tensor& tensor, int peer);

  void all_reduce(at::Tensor& tensor, ReduceOp op = ReduceOp::sum) { all_reduce_async(tensor, op)->wait(); }
  void broadcast(at::Tensor& tensor, int root) { broadcast_async(tensor, root)->wait(); }
  void all_gather(at::Tensor& output, const at::Tensor& input) { all_gather_async(output, input)->wait(); }
  void reduce_scatter(at::Tensor& output, const at::Tensor& input, ReduceOp op = ReduceOp::sum) {
    reduce_scatter_async(output, input, op)->wait();
  }
  void barrier() { barrier_async()->wait(); }

  /// Whether operations launched from now on record their WorkTiming (see the contract).
  void set_timing(bool on) { timing_.store(on, std::memory_order_relaxed); }
  bool timing() const { return timing_.load(std::memory_order_relaxed); }

  /// Tears the communicator down without waiting for peers (the crash path). Safe to call from
  /// any thread; the communicator is unusable afterwards.
  virtual void abort() noexcept = 0;

 protected:
  /// Over the world's ranks; the base class keeps its own duplicate of the world's MPI
  /// communicator for verify_collectives (MPI stays out of this header).
  Communicator(const runtime::World& world, const CommOptions& options);

  virtual WorkPtr do_all_reduce(at::Tensor& tensor, ReduceOp op) = 0;
  virtual WorkPtr do_broadcast(at::Tensor& tensor, int root) = 0;
  virtual WorkPtr do_all_gather(at::Tensor& output, const at::Tensor& input) = 0;
  virtual WorkPtr do_reduce_scatter(at::Tensor& output, const at::Tensor& input, ReduceOp op) = 0;
  virtual WorkPtr do_barrier() = 0;
  virtual WorkPtr do_send(const at::Tensor& tensor, int peer) = 0;
  virtual WorkPtr do_recv(at::Tensor& tensor, int peer) = 0;

 private:
  void check_tensor(const char* operation, const at::Tensor& tensor) const;
  void check_peer(const char* operation, int peer) const;
  void verify_across_ranks(const char* operation, const at::Tensor* tensor, std::int64_t extra);

  struct Control;  // the MPI communicator verify_collectives uses
  std::unique_ptr<Control> control_;
  int rank_ = 0;
  int size_ = 1;
  CommOptions options_;
  std::atomic<bool> timing_{false};
};

/// Builds the communicator for device: NCCL for CUDA devices, MPI for CPU, unless backend
/// names one (an impossible pairing, e.g. NCCL on CPU, is an error).
std::unique_ptr<Communicator> make_communicator(const runtime::World& world, c10::Device device,
                                                const CommOptions& options = {},
                                                Backend backend = Backend::automatic);

/// "all_reduce(sum) of 4096 float32 elements (16.0 KiB)": how errors name an operation.
std::string describe(const char* operation, const at::Tensor& tensor, const char* detail = nullptr);

/// Human-readable byte count: "16.0 KiB".
std::string format_bytes(std::int64_t bytes);

}  // namespace mpitrain::comm

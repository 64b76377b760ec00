#include "mpitrain/comm/nccl_communicator.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <atomic>
#include <condition_variable>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "mpitrain/runtime/cuda_check.h"
#include "mpitrain/runtime/error.h"
#include "mpitrain/runtime/fatal.h"
#include "mpitrain/runtime/world.h"

namespace mpitrain::comm {
namespace {

ncclDataType_t nccl_type(c10::ScalarType type) {
  switch (type) {
    case c10::kFloat: return ncclFloat32;
    case c10::kDouble: return ncclFloat64;
    case c10::kBFloat16: return ncclBfloat16;
    case c10::kHalf: return ncclFloat16;
    case c10::kInt: return ncclInt32;
    case c10::kLong: return ncclInt64;
    case c10::kByte: return ncclUint8;
    default: break;
  }
  throw runtime::Error(std::string("no NCCL type for ") + c10::toString(type));
}

// Avg is a sum here, divided afterwards (see launch): NCCL's ncclAvg scales every input by
// 1/size in the element type before summing, which in bf16 at 3 ranks is 0.2 % off and can
// push fp16 values under their range.
ncclRedOp_t nccl_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::sum:
    case ReduceOp::avg: return ncclSum;
    case ReduceOp::max: return ncclMax;
    case ReduceOp::min: return ncclMin;
  }
  return ncclSum;
}

// Completion events, reused: a collective needs two (the caller's stream ready, the operation
// done), and creating and destroying them on every call costs driver calls in the step's
// critical path. Created without timing, which makes recording and querying cheaper. Shared by
// the communicator and every operation, so an operation a caller still holds keeps it alive.
class EventPool {
 public:
  explicit EventPool(c10::DeviceIndex device) : device_(device) {}
  ~EventPool() {
    c10::cuda::CUDAGuard guard(device_);
    for (cudaEvent_t event : free_) cudaEventDestroy(event);  // teardown: nothing to report to
  }
  EventPool(const EventPool&) = delete;
  EventPool& operator=(const EventPool&) = delete;

  cudaEvent_t take() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!free_.empty()) {
        const cudaEvent_t event = free_.back();
        free_.pop_back();
        return event;
      }
    }
    c10::cuda::CUDAGuard guard(device_);
    cudaEvent_t event = nullptr;
    MPITRAIN_CHECK_CUDA(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
    return event;
  }
  void give(cudaEvent_t event) {
    std::lock_guard<std::mutex> lock(mutex_);
    free_.push_back(event);
  }
  c10::DeviceIndex device() const { return device_; }

 private:
  c10::DeviceIndex device_;
  std::mutex mutex_;
  std::vector<cudaEvent_t> free_;
};

// One event taken from the pool for as long as this object lives. Re-recording a pooled event
// is safe once its last record has been waited for or queried complete: a stream that waits on
// an event (cudaStreamWaitEvent) waits for the record made before that call, not a later one.
class PooledEvent {
 public:
  explicit PooledEvent(std::shared_ptr<EventPool> pool) : pool_(std::move(pool)), event_(pool_->take()) {}
  ~PooledEvent() { pool_->give(event_); }
  PooledEvent(const PooledEvent&) = delete;
  PooledEvent& operator=(const PooledEvent&) = delete;

  void record(cudaStream_t stream) { MPITRAIN_CHECK_CUDA(cudaEventRecord(event_, stream)); }
  void block(cudaStream_t stream) { MPITRAIN_CHECK_CUDA(cudaStreamWaitEvent(stream, event_, 0)); }
  bool query() const {
    c10::cuda::CUDAGuard guard(pool_->device());
    const cudaError_t state = cudaEventQuery(event_);
    if (state == cudaErrorNotReady) {
      (void)cudaGetLastError();  // not an error: clear it so it is not reported by a later call
      return false;
    }
    MPITRAIN_CHECK_CUDA(state);
    return true;
  }

 private:
  std::shared_ptr<EventPool> pool_;
  cudaEvent_t event_;
};

// When the stream reached an operation and finished it, in steady_clock ticks (0 = not yet).
// Written by host callbacks on a CUDA driver thread; apart from InFlight so that a callback,
// which must not call CUDA, never destroys the event.
struct Stamps {
  std::atomic<std::chrono::steady_clock::rep> started{0};
  std::atomic<std::chrono::steady_clock::rep> completed{0};
};

// One launched operation, as the watchdog and the caller see it.
struct InFlight {
  explicit InFlight(std::shared_ptr<EventPool> pool) : done(std::move(pool)) {}
  std::string what;
  PooledEvent done;
  std::chrono::steady_clock::time_point launched = std::chrono::steady_clock::now();
  std::shared_ptr<Stamps> stamps;  // set when launched with timing on
};

// A host callback's argument: which stamp to take, and a reference that keeps it alive.
struct StampSlot {
  std::shared_ptr<Stamps> stamps;
  bool start;
};

void CUDART_CB take_stamp(void* argument) {
  const std::unique_ptr<StampSlot> slot(static_cast<StampSlot*>(argument));
  auto& stamp = slot->start ? slot->stamps->started : slot->stamps->completed;
  stamp.store(std::chrono::steady_clock::now().time_since_epoch().count(), std::memory_order_release);
}

// Takes a stamp when `stream` reaches this point.
void stamp_on(cudaStream_t stream, const std::shared_ptr<Stamps>& stamps, bool start) {
  // The callback owns the slot and deletes it.
  MPITRAIN_CHECK_CUDA(cudaLaunchHostFunc(stream, take_stamp, new StampSlot{stamps, start}));
}

class NcclWork final : public Work {
 public:
  NcclWork(std::shared_ptr<InFlight> op, c10::DeviceIndex device, bool host_blocking,
           std::chrono::milliseconds timeout)
      : op_(std::move(op)), device_(device), host_blocking_(host_blocking), timeout_(timeout) {}

  bool is_completed() override { return op_->done.query(); }

  std::optional<WorkTiming> timing() override {
    // The done event follows the completion stamp on the stream, so both are set once it is.
    if (!op_->stamps || !op_->done.query()) return std::nullopt;
    using Clock = std::chrono::steady_clock;
    return WorkTiming{Clock::time_point(Clock::duration(op_->stamps->started.load(std::memory_order_acquire))),
                      Clock::time_point(Clock::duration(op_->stamps->completed.load(std::memory_order_acquire)))};
  }

  void wait() override {
    if (!host_blocking_) {
      c10::cuda::CUDAGuard guard(device_);
      op_->done.block(at::cuda::getCurrentCUDAStream(device_).stream());
      return;
    }
    // Poll, never cudaEventSynchronize: the watchdog must stay able to abort us. Backoff keeps
    // a long wait (a peer that has not arrived) from burning the core.
    runtime::Backoff backoff;
    while (!op_->done.query()) {
      if (std::chrono::steady_clock::now() - op_->launched > timeout_ + timeout_ / 10)
        runtime::fatal("NCCL " + op_->what + " did not complete within its timeout on " +
                           runtime::where(),
                       runtime::ExitCode::comm_timeout);
      backoff.pause();
    }
  }

 private:
  std::shared_ptr<InFlight> op_;
  c10::DeviceIndex device_;
  bool host_blocking_;
  std::chrono::milliseconds timeout_;
};

}  // namespace

class NcclCommunicator::State {
 public:
  State(const runtime::World& world, c10::Device device, std::chrono::milliseconds timeout)
      : device_(device), timeout_(timeout),
        stream_(at::cuda::getStreamFromPool(/*isHighPriority=*/true, device.index())),
        events_(std::make_shared<EventPool>(device.index())) {
    c10::cuda::CUDAGuard guard(device);
    ncclUniqueId id;
    if (world.rank() == 0) MPITRAIN_CHECK_NCCL(ncclGetUniqueId(&id));
    MPI_Request request;
    MPITRAIN_CHECK_MPI(MPI_Ibcast(&id, sizeof(id), MPI_BYTE, 0, world.comm(), &request));
    runtime::wait_or_die(&request, timeout, "the NCCL unique id broadcast");
    // Every rank holds the id before anyone initialises (avoids a deferred-broadcast hang).
    MPITRAIN_CHECK_MPI(MPI_Ibarrier(world.comm(), &request));
    runtime::wait_or_die(&request, timeout, "the barrier before NCCL initialisation");

    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    MPITRAIN_CHECK_NCCL(ncclCommInitRankConfig(&comm_, world.size(), id, world.rank(), &config));
    wait_ready("ncclCommInitRankConfig");

    abort_handle_ = runtime::add_abort_action([this] { abort(); });
    watchdog_ = std::thread([this] {
      try {
        // The rank's own device first: a thread's CUDA calls otherwise go to device 0, creating
        // a context there (about 0.5 GiB per rank) beside the kernels of another rank.
        c10::cuda::set_device(device_.index());
        watch();
      } catch (const std::exception& e) {
        runtime::fatal("the NCCL watchdog on " + runtime::where() + " (device " + device_.str() +
                       ") failed: " + e.what());
      }
    });
  }

  ~State() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    cv_.notify_all();
    watchdog_.join();
    runtime::remove_abort_action(abort_handle_);
    c10::cuda::CUDAGuard guard(device_);
    // Finalize flushes outstanding work; both calls are non-blocking here, so poll.
    ncclResult_t finalized = ncclSuccess;
    {
      std::lock_guard<std::mutex> lock(comm_mutex_);
      if (aborted_.load()) return;
      finalized = ncclCommFinalize(comm_);
    }
    MPITRAIN_CHECK_NCCL(finalized);
    if (!wait_ready("ncclCommFinalize")) return;
    std::lock_guard<std::mutex> lock(comm_mutex_);
    if (!aborted_.load()) ncclCommDestroy(comm_);
  }

  // May run on fatal()'s thread while the watchdog or the caller is inside an NCCL call on the
  // communicator: comm_mutex_ keeps it from freeing the communicator under them.
  void abort() noexcept {
    std::lock_guard<std::mutex> lock(comm_mutex_);
    if (aborted_.exchange(true)) return;
    cudaSetDevice(device_.index());  // fatal()'s thread has no device yet; nothing to report to
    ncclCommAbort(comm_);
  }

  // Launches one NCCL call on the communicator's stream, ordered after the caller's stream;
  // then, when `average` is defined, divides it by `size` on that stream (ReduceOp::avg).
  template <typename Launch>
  WorkPtr launch(std::string what, std::initializer_list<at::Tensor> tensors, bool host_blocking,
                 bool timed, Launch&& call, const at::Tensor& average = {}, int size = 1) {
    if (aborted_.load()) throw aborted();
    c10::cuda::CUDAGuard guard(device_);
    auto op = std::make_shared<InFlight>(events_);
    op->what = std::move(what);
    std::lock_guard<std::mutex> lock(launch_mutex_);  // one launch order per communicator
    {
      PooledEvent ready(events_);
      ready.record(at::cuda::getCurrentCUDAStream(device_.index()).stream());
      ready.block(stream_.stream());
    }
    if (timed) {
      op->stamps = std::make_shared<Stamps>();
      stamp_on(stream_.stream(), op->stamps, /*start=*/true);
    }
    ncclResult_t launched = ncclSuccess;
    {
      std::lock_guard<std::mutex> comm_lock(comm_mutex_);
      if (aborted_.load()) throw aborted();
      launched = call(stream_.stream());
    }
    MPITRAIN_CHECK_NCCL(launched);
    if (!wait_ready(op->what.c_str())) throw aborted();
    if (average.defined()) {
      const c10::cuda::CUDAStreamGuard on_stream(stream_);
      average.div_(size);
    }
    if (timed) stamp_on(stream_.stream(), op->stamps, /*start=*/false);
    for (const at::Tensor& t : tensors)
      if (t.numel() > 0)
        c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(), stream_);
    op->done.record(stream_.stream());
    {
      std::lock_guard<std::mutex> watch_lock(mutex_);
      in_flight_.push_back(op);
    }
    return std::make_shared<NcclWork>(op, device_.index(), host_blocking, timeout_);
  }

  ncclComm_t comm() const { return comm_; }

 private:
  // A non-blocking communicator may answer ncclInProgress; the next call must wait until the
  // previous one is enqueued. Polled with the same deadline as everything else. False when the
  // communicator was aborted meanwhile.
  bool wait_ready(const char* what) {
    const auto deadline = std::chrono::steady_clock::now() + timeout_;
    runtime::Backoff backoff;
    for (;;) {
      const std::optional<ncclResult_t> state = async_state();
      if (!state) return false;
      if (*state == ncclSuccess) return true;
      if (*state != ncclInProgress) fail(what, *state);
      if (std::chrono::steady_clock::now() > deadline)
        runtime::fatal(std::string("NCCL ") + what + " did not finish within " +
                           std::to_string(timeout_.count()) + " ms on " + runtime::where(),
                       runtime::ExitCode::comm_timeout);
      backoff.pause();
    }
  }

  static runtime::Error aborted() {
    return runtime::Error("NCCL communicator on " + runtime::where() + " was aborted");
  }

  // The communicator's asynchronous state; nullopt once it is aborted. Under comm_mutex_, so
  // that abort() never frees the communicator during the call; the failure is reported after
  // the lock is released (fatal() runs abort(), which takes it).
  std::optional<ncclResult_t> async_state() {
    ncclResult_t rc = ncclSuccess, state = ncclSuccess;
    {
      std::lock_guard<std::mutex> lock(comm_mutex_);
      if (aborted_.load()) return std::nullopt;
      rc = ncclCommGetAsyncError(comm_, &state);
    }
    if (rc != ncclSuccess) fail("ncclCommGetAsyncError", rc);
    return state;
  }

  [[noreturn]] void fail(const std::string& what, ncclResult_t state) {
    std::string detail;
    {
      // Another thread's fatal() may have aborted (freed) the communicator meanwhile.
      std::lock_guard<std::mutex> lock(comm_mutex_);
      if (!aborted_.load()) detail = ncclGetLastError(comm_);
    }
    runtime::fatal("NCCL " + what + " failed on " + runtime::where() + " (device " + device_.str() +
                   "): " + ncclGetErrorString(state) + (detail.empty() ? "" : ": " + detail));
  }

  // The watchdog: retires completed operations, ends the job on a timeout or an async error.
  void watch() {
    std::unique_lock<std::mutex> lock(mutex_);
    while (!stopping_) {
      cv_.wait_for(lock, std::chrono::milliseconds(10));
      for (auto it = in_flight_.begin(); it != in_flight_.end();) {
        if ((*it)->done.query()) {
          it = in_flight_.erase(it);
          continue;
        }
        if (std::chrono::steady_clock::now() - (*it)->launched > timeout_)
          runtime::fatal("NCCL " + (*it)->what + " did not complete within " +
                             std::to_string(timeout_.count()) + " ms on " + runtime::where() +
                             ": a peer rank is stalled or dead, or the ranks called collectives "
                             "in different orders",
                         runtime::ExitCode::comm_timeout);
        ++it;
      }
      const std::optional<ncclResult_t> state = async_state();
      if (state && *state != ncclSuccess && *state != ncclInProgress) fail("asynchronous error", *state);
    }
  }

  c10::Device device_;
  std::chrono::milliseconds timeout_;
  at::cuda::CUDAStream stream_;
  ncclComm_t comm_ = nullptr;
  std::shared_ptr<EventPool> events_;
  std::mutex comm_mutex_;  // around every call on comm_ that abort() could overlap
  std::atomic<bool> aborted_{false};
  int abort_handle_ = 0;
  std::mutex launch_mutex_;
  std::mutex mutex_;
  std::condition_variable cv_;
  bool stopping_ = false;
  std::list<std::shared_ptr<InFlight>> in_flight_;
  std::thread watchdog_;
};

NcclCommunicator::NcclCommunicator(const runtime::World& world, c10::Device device,
                                   const CommOptions& options)
    : Communicator(world, options),
      device_(device),
      state_(std::make_unique<State>(world, device, options.timeout)) {}

NcclCommunicator::~NcclCommunicator() = default;

void NcclCommunicator::abort() noexcept { state_->abort(); }

namespace {
// Device memory for a possibly empty tensor: NCCL accepts any pointer with a zero count.
void* data(const at::Tensor& tensor) { return tensor.numel() == 0 ? nullptr : tensor.data_ptr(); }
}  // namespace

WorkPtr NcclCommunicator::do_all_reduce(at::Tensor& tensor, ReduceOp op) {
  const auto type = nccl_type(tensor.scalar_type());
  void* buffer = data(tensor);
  const auto count = static_cast<std::size_t>(tensor.numel());
  ncclComm_t comm = state_->comm();
  return state_->launch(
      describe("all_reduce", tensor, to_string(op)), {tensor}, false, timing(),
      [&](cudaStream_t stream) { return ncclAllReduce(buffer, buffer, count, type, nccl_op(op), comm, stream); },
      op == ReduceOp::avg ? tensor : at::Tensor(), size());
}

WorkPtr NcclCommunicator::do_broadcast(at::Tensor& tensor, int root) {
  const auto type = nccl_type(tensor.scalar_type());
  void* buffer = data(tensor);
  const auto count = static_cast<std::size_t>(tensor.numel());
  ncclComm_t comm = state_->comm();
  return state_->launch(describe("broadcast", tensor, ("root " + std::to_string(root)).c_str()),
                        {tensor}, false, timing(), [&](cudaStream_t stream) {
                          return ncclBroadcast(buffer, buffer, count, type, root, comm, stream);
                        });
}

WorkPtr NcclCommunicator::do_all_gather(at::Tensor& output, const at::Tensor& input) {
  const auto type = nccl_type(input.scalar_type());
  const auto count = static_cast<std::size_t>(input.numel());
  void* in = data(input);
  void* out = data(output);
  ncclComm_t comm = state_->comm();
  return state_->launch(describe("all_gather", input), {output, input}, false, timing(),
                        [&](cudaStream_t stream) {
                          return ncclAllGather(in, out, count, type, comm, stream);
                        });
}

WorkPtr NcclCommunicator::do_reduce_scatter(at::Tensor& output, const at::Tensor& input,
                                            ReduceOp op) {
  const auto type = nccl_type(input.scalar_type());
  const auto count = static_cast<std::size_t>(output.numel());
  void* in = data(input);
  void* out = data(output);
  ncclComm_t comm = state_->comm();
  return state_->launch(
      describe("reduce_scatter", input, to_string(op)), {output, input}, false, timing(),
      [&](cudaStream_t stream) { return ncclReduceScatter(in, out, count, type, nccl_op(op), comm, stream); },
      op == ReduceOp::avg ? output : at::Tensor(), size());
}

WorkPtr NcclCommunicator::do_barrier() {
  auto token = at::zeros({1}, at::TensorOptions().device(device_).dtype(at::kFloat));
  void* buffer = token.data_ptr();
  ncclComm_t comm = state_->comm();
  return state_->launch("barrier", {token}, true, timing(), [&](cudaStream_t stream) {
    return ncclAllReduce(buffer, buffer, 1, ncclFloat32, ncclSum, comm, stream);
  });
}

WorkPtr NcclCommunicator::do_send(const at::Tensor& tensor, int peer) {
  const auto type = nccl_type(tensor.scalar_type());
  const auto count = static_cast<std::size_t>(tensor.numel());
  void* buffer = data(tensor);
  ncclComm_t comm = state_->comm();
  return state_->launch(describe("send", tensor, ("to rank " + std::to_string(peer)).c_str()), {tensor}, false,
                        timing(), [&](cudaStream_t stream) { return ncclSend(buffer, count, type, peer, comm, stream); });
}

WorkPtr NcclCommunicator::do_recv(at::Tensor& tensor, int peer) {
  const auto type = nccl_type(tensor.scalar_type());
  const auto count = static_cast<std::size_t>(tensor.numel());
  void* buffer = data(tensor);
  ncclComm_t comm = state_->comm();
  return state_->launch(describe("recv", tensor, ("from rank " + std::to_string(peer)).c_str()), {tensor}, false,
                        timing(), [&](cudaStream_t stream) { return ncclRecv(buffer, count, type, peer, comm, stream); });
}

}  // namespace mpitrain::comm

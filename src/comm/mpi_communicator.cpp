#include "mpitrain/comm/mpi_communicator.h"

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <optional>
#include <thread>

#include "mpitrain/runtime/check.h"
#include "mpitrain/runtime/error.h"
#include "mpitrain/runtime/fatal.h"
#include "mpitrain/runtime/world.h"

namespace mpitrain::comm {
namespace {

// --- 16-bit floating-point reductions: MPI has no such types -----------------------------------
// Each pair is combined in float32 and rounded back, the same arithmetic NCCL uses.

struct Sum { float operator()(float a, float b) const { return a + b; } };
struct Max { float operator()(float a, float b) const { return std::max(a, b); } };
struct Min { float operator()(float a, float b) const { return std::min(a, b); } };

template <typename T, typename F>
void reduce_16bit(void* in, void* inout, int* length, MPI_Datatype*) {
  const T* a = static_cast<const T*>(in);
  T* b = static_cast<T*>(inout);
  const F f;
  for (int i = 0; i < *length; ++i) b[i] = T(f(static_cast<float>(a[i]), static_cast<float>(b[i])));
}

struct Ops16 {
  MPI_Op half[3];   // sum, max, min
  MPI_Op bf16[3];
  Ops16() {
    MPITRAIN_CHECK_MPI(MPI_Op_create(&reduce_16bit<c10::Half, Sum>, 1, &half[0]));
    MPITRAIN_CHECK_MPI(MPI_Op_create(&reduce_16bit<c10::Half, Max>, 1, &half[1]));
    MPITRAIN_CHECK_MPI(MPI_Op_create(&reduce_16bit<c10::Half, Min>, 1, &half[2]));
    MPITRAIN_CHECK_MPI(MPI_Op_create(&reduce_16bit<c10::BFloat16, Sum>, 1, &bf16[0]));
    MPITRAIN_CHECK_MPI(MPI_Op_create(&reduce_16bit<c10::BFloat16, Max>, 1, &bf16[1]));
    MPITRAIN_CHECK_MPI(MPI_Op_create(&reduce_16bit<c10::BFloat16, Min>, 1, &bf16[2]));
  }
  ~Ops16() {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (finalized) return;
    for (MPI_Op& op : half) MPI_Op_free(&op);
    for (MPI_Op& op : bf16) MPI_Op_free(&op);
  }
};

MPI_Datatype mpi_type(c10::ScalarType type) {
  switch (type) {
    case c10::kFloat: return MPI_FLOAT;
    case c10::kDouble: return MPI_DOUBLE;
    case c10::kInt: return MPI_INT32_T;
    case c10::kLong: return MPI_INT64_T;
    case c10::kByte: return MPI_UINT8_T;
    case c10::kHalf: case c10::kBFloat16: return MPI_UINT16_T;  // bits; reductions use Ops16
    default: break;
  }
  throw runtime::Error(std::string("no MPI type for ") + c10::toString(type));
}

int mpi_count(const char* operation, const at::Tensor& tensor) {
  if (tensor.numel() > INT_MAX)
    throw runtime::Error(describe(operation, tensor) + " on " + runtime::where() +
                         ": more than 2^31-1 elements in one MPI call; split the tensor");
  return static_cast<int>(tensor.numel());
}

// Host memory for a possibly empty tensor: MPI accepts any pointer with a zero count.
void* data(const at::Tensor& tensor) {
  static char empty;
  return tensor.numel() == 0 ? &empty : tensor.data_ptr();
}

class MpiWork final : public Work {
 public:
  MpiWork(std::string what, std::function<void(MPI_Request*)> start, std::function<void()> finish,
          std::vector<at::Tensor> tensors, bool ordered = true)
      : what_(std::move(what)),
        start_(std::move(start)),
        finish_(std::move(finish)),
        tensors_(std::move(tensors)),
        ordered_(ordered) {}

  bool is_completed() override { return done_.load(std::memory_order_acquire); }

  std::optional<WorkTiming> timing() override {
    if (!timed_ || !is_completed()) return std::nullopt;
    return WorkTiming{started_, completed_};
  }

  // Before submission only.
  void record_timing(bool on) { timed_ = on; }

  void wait() override {
    if (is_completed()) return;
    std::unique_lock<std::mutex> lock(mutex_);
    cv_.wait(lock, [&] { return is_completed(); });
  }

  // Engine side, on the progress thread only.
  void start() {
    started_ = std::chrono::steady_clock::now();
    start_(&request_);
  }
  bool test() {
    int flag = 0;
    MPITRAIN_CHECK_MPI(MPI_Test(&request_, &flag, MPI_STATUS_IGNORE));
    return flag != 0;
  }
  void complete() {
    if (finish_) finish_();
    completed_ = std::chrono::steady_clock::now();
    tensors_.clear();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      done_.store(true, std::memory_order_release);
    }
    cv_.notify_all();
  }
  std::chrono::steady_clock::duration age() const { return std::chrono::steady_clock::now() - started_; }
  const std::string& what() const { return what_; }
  // Collectives complete in call order; point-to-point work as soon as its transfer has.
  bool ordered() const { return ordered_; }

 private:
  std::string what_;
  std::function<void(MPI_Request*)> start_;
  std::function<void()> finish_;
  std::vector<at::Tensor> tensors_;  // kept alive while MPI reads or writes them
  bool ordered_;
  MPI_Request request_ = MPI_REQUEST_NULL;
  bool timed_ = false;
  // Written by the progress thread before done_ is released.
  std::chrono::steady_clock::time_point started_;
  std::chrono::steady_clock::time_point completed_;
  std::atomic<bool> done_{false};
  std::mutex mutex_;
  std::condition_variable cv_;
};

}  // namespace

// The progress thread. Protocol: submit() appends to `queued_`; the thread moves queued work to
// `active_` starting each MPI operation in submission order (so every rank starts them in the
// same order), then tests only the oldest active collective and completes collectives strictly
// in order; point-to-point operations are tested each pass and complete when done. While anything is active it polls, paced by runtime::Backoff (yielding at first, then
// sleeping up to a millisecond, so a collective a peer withholds costs almost no CPU); otherwise
// it sleeps on the condition variable. It never touches CUDA (this backend is for CPU tensors).
// An exception on it (an operation's finishing step failing) ends the job through fatal().
class MpiCommunicator::Engine {
 public:
  Engine(MPI_Comm comm, std::chrono::milliseconds timeout) : comm_(comm), timeout_(timeout) {
    thread_ = std::thread([this] {
      try {
        run();
      } catch (const std::exception& e) {
        runtime::fatal(std::string("the MPI communicator's progress thread failed: ") + e.what());
      }
    });
  }

  ~Engine() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    cv_.notify_all();
    thread_.join();
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Comm_free(&comm_);
  }

  WorkPtr submit(std::shared_ptr<MpiWork> work, bool timed) {
    work->record_timing(timed);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      queued_.push_back(work);
    }
    cv_.notify_one();
    return work;
  }

  MPI_Comm comm() const { return comm_; }
  const Ops16& ops16() const { return ops16_; }

 private:
  void run() {
    std::deque<std::shared_ptr<MpiWork>> active;
    runtime::Backoff backoff;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        if (active.empty())
          cv_.wait(lock, [&] { return stopping_ || !queued_.empty(); });
        if (stopping_ && queued_.empty() && active.empty()) return;
        if (!queued_.empty()) backoff.reset();
        while (!queued_.empty()) {
          active.push_back(std::move(queued_.front()));
          queued_.pop_front();
          active.back()->start();
        }
      }
      bool oldest_collective = true;
      for (auto it = active.begin(); it != active.end();) {
        const bool ordered = (*it)->ordered();
        if ((!ordered || oldest_collective) && (*it)->test()) {
          (*it)->complete();
          it = active.erase(it);
          backoff.reset();
          continue;
        }
        if ((*it)->age() > timeout_) {
          runtime::fatal("MPI " + (*it)->what() + " did not complete within " + std::to_string(timeout_.count()) +
                             " ms on " + runtime::where() +
                             ": a peer rank is stalled or dead, or the ranks called collectives (or sends and "
                             "receives) in different orders",
                         runtime::ExitCode::comm_timeout);
        }
        if (ordered) oldest_collective = false;
        ++it;
      }
      if (!active.empty()) backoff.pause();
    }
  }

  MPI_Comm comm_;
  std::chrono::milliseconds timeout_;
  Ops16 ops16_;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<MpiWork>> queued_;
  bool stopping_ = false;
  std::thread thread_;
};

namespace {

// Non-blocking and bounded: a rank that never arrives (stopped during start-up) ends the job
// after the timeout instead of holding the others in MPI_Comm_dup.
MPI_Comm dup(MPI_Comm comm, std::chrono::milliseconds timeout) {
  MPI_Comm copy = MPI_COMM_NULL;
  MPI_Request request = MPI_REQUEST_NULL;
  MPITRAIN_CHECK_MPI(MPI_Comm_idup(comm, &copy, &request));
  runtime::wait_or_die(&request, timeout, "creating the MPI communicator (MPI_Comm_idup)");
  return copy;
}

}  // namespace

MpiCommunicator::MpiCommunicator(const runtime::World& world, const CommOptions& options)
    : Communicator(world, options), engine_(std::make_unique<Engine>(dup(world.comm(), options.timeout), options.timeout)) {}

MpiCommunicator::~MpiCommunicator() = default;

void MpiCommunicator::abort() noexcept {
  // Nothing to tear down beyond what MPI_Abort does: MPI has no per-communicator abort that
  // unblocks peers; fatal() follows with MPI_Abort, which ends every rank.
}

namespace {

MPI_Op reduce_op(const Ops16& ops16, c10::ScalarType type, ReduceOp op) {
  const int index = op == ReduceOp::max ? 1 : op == ReduceOp::min ? 2 : 0;  // avg = sum, then divide
  if (type == c10::kHalf) return ops16.half[index];
  if (type == c10::kBFloat16) return ops16.bf16[index];
  const MPI_Op builtin[3] = {MPI_SUM, MPI_MAX, MPI_MIN};
  return builtin[index];
}

std::function<void()> average_after(ReduceOp op, at::Tensor tensor, int size) {
  if (op != ReduceOp::avg) return nullptr;
  return [tensor, size]() mutable { tensor.div_(size); };
}

}  // namespace

WorkPtr MpiCommunicator::do_all_reduce(at::Tensor& tensor, ReduceOp op) {
  const int count = mpi_count("all_reduce", tensor);
  const MPI_Datatype type = mpi_type(tensor.scalar_type());
  const MPI_Op mpi_op = reduce_op(engine_->ops16(), tensor.scalar_type(), op);
  MPI_Comm comm = engine_->comm();
  void* buffer = data(tensor);
  return engine_->submit(std::make_shared<MpiWork>(
      describe("all_reduce", tensor, to_string(op)),
      [=](MPI_Request* request) {
        MPITRAIN_CHECK_MPI(MPI_Iallreduce(MPI_IN_PLACE, buffer, count, type, mpi_op, comm, request));
      },
      average_after(op, tensor, size()), std::vector<at::Tensor>{tensor}),
      timing());
}

WorkPtr MpiCommunicator::do_broadcast(at::Tensor& tensor, int root) {
  const int count = mpi_count("broadcast", tensor);
  const MPI_Datatype type = mpi_type(tensor.scalar_type());
  MPI_Comm comm = engine_->comm();
  void* buffer = data(tensor);
  return engine_->submit(std::make_shared<MpiWork>(
      describe("broadcast", tensor, ("root " + std::to_string(root)).c_str()),
      [=](MPI_Request* request) {
        MPITRAIN_CHECK_MPI(MPI_Ibcast(buffer, count, type, root, comm, request));
      },
      nullptr, std::vector<at::Tensor>{tensor}),
      timing());
}

WorkPtr MpiCommunicator::do_all_gather(at::Tensor& output, const at::Tensor& input) {
  const int count = mpi_count("all_gather", input);
  mpi_count("all_gather", output);
  const MPI_Datatype type = mpi_type(input.scalar_type());
  MPI_Comm comm = engine_->comm();
  void* in = data(input);
  void* out = data(output);
  return engine_->submit(std::make_shared<MpiWork>(
      describe("all_gather", input),
      [=](MPI_Request* request) {
        MPITRAIN_CHECK_MPI(MPI_Iallgather(in, count, type, out, count, type, comm, request));
      },
      nullptr, std::vector<at::Tensor>{output, input}),
      timing());
}

WorkPtr MpiCommunicator::do_reduce_scatter(at::Tensor& output, const at::Tensor& input, ReduceOp op) {
  const int count = mpi_count("reduce_scatter", output);
  mpi_count("reduce_scatter", input);
  const MPI_Datatype type = mpi_type(input.scalar_type());
  const MPI_Op mpi_op = reduce_op(engine_->ops16(), input.scalar_type(), op);
  MPI_Comm comm = engine_->comm();
  void* in = data(input);
  void* out = data(output);
  return engine_->submit(std::make_shared<MpiWork>(
      describe("reduce_scatter", input, to_string(op)),
      [=](MPI_Request* request) {
        MPITRAIN_CHECK_MPI(MPI_Ireduce_scatter_block(in, out, count, type, mpi_op, comm, request));
      },
      average_after(op, output, size()), std::vector<at::Tensor>{output, input}),
      timing());
}

WorkPtr MpiCommunicator::do_barrier() {
  MPI_Comm comm = engine_->comm();
  return engine_->submit(std::make_shared<MpiWork>(
      "barrier", [=](MPI_Request* request) { MPITRAIN_CHECK_MPI(MPI_Ibarrier(comm, request)); },
      nullptr, std::vector<at::Tensor>{}),
      timing());
}

// One tag: messages between two ranks of this communicator match in the order they were posted.
constexpr int kP2pTag = 0;

WorkPtr MpiCommunicator::do_send(const at::Tensor& tensor, int peer) {
  const int count = mpi_count("send", tensor);
  const MPI_Datatype type = mpi_type(tensor.scalar_type());
  MPI_Comm comm = engine_->comm();
  void* buffer = data(tensor);
  return engine_->submit(std::make_shared<MpiWork>(
      describe("send", tensor, ("to rank " + std::to_string(peer)).c_str()),
      [=](MPI_Request* request) { MPITRAIN_CHECK_MPI(MPI_Isend(buffer, count, type, peer, kP2pTag, comm, request)); },
      nullptr, std::vector<at::Tensor>{tensor}, /*ordered=*/false),
      timing());
}

WorkPtr MpiCommunicator::do_recv(at::Tensor& tensor, int peer) {
  const int count = mpi_count("recv", tensor);
  const MPI_Datatype type = mpi_type(tensor.scalar_type());
  MPI_Comm comm = engine_->comm();
  void* buffer = data(tensor);
  return engine_->submit(std::make_shared<MpiWork>(
      describe("recv", tensor, ("from rank " + std::to_string(peer)).c_str()),
      [=](MPI_Request* request) { MPITRAIN_CHECK_MPI(MPI_Irecv(buffer, count, type, peer, kP2pTag, comm, request)); },
      nullptr, std::vector<at::Tensor>{tensor}, /*ordered=*/false),
      timing());
}

}  // namespace mpitrain::comm

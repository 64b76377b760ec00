#include "mpitrain/runtime/fatal.h"

#include <mpi.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <condition_variable>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <thread>

#include "mpitrain/runtime/check.h"

namespace mpitrain::runtime {
namespace {

struct CrashState {
  std::mutex mutex;
  int rank = -1;
  std::string host;
  int next_handle = 1;
  std::map<int, std::function<void()>> actions;
};

CrashState& state() {
  static CrashState s;  // deliberately leaked order-independent: see fatal.h
  return s;
}

std::string local_host() {
  char name[256] = {};
  gethostname(name, sizeof(name) - 1);
  return name;
}

// Set by fatal(): the process is ending. Other threads that reach a wait park there, so that a
// failing rank does no more work with its peers (finishing a checkpoint's barriers, say) while
// the launcher takes the job down.
std::atomic<bool> ending{false};

// fatal() gives the abort actions this long, then calls MPI_Abort without them; the process
// ends by itself at kExitBound whatever happens.
constexpr std::chrono::seconds kActionBound{2};
constexpr std::chrono::seconds kExitBound{4};

// Runs the abort actions on their own thread and waits for them at most kActionBound: an
// action that blocks (NCCL teardown behind a stuck kernel) must not keep MPI_Abort from running.
void run_bounded(std::map<int, std::function<void()>> actions) {
  if (actions.empty()) return;
  struct Done {
    std::mutex mutex;
    std::condition_variable cv;
    bool done = false;
  };
  auto done = std::make_shared<Done>();
  auto body = [done, actions = std::move(actions)]() mutable {
    for (auto& entry : actions) {
      try {
        entry.second();
      } catch (...) {
        // An action that breaks its no-throw promise must not stop the others or the abort.
      }
    }
    {
      std::lock_guard<std::mutex> lock(done->mutex);
      done->done = true;
    }
    done->cv.notify_all();
  };
  try {
    std::thread(std::move(body)).detach();
  } catch (const std::exception&) {
    return;  // no thread: skip the actions rather than risk blocking; MPI_Abort follows
  }
  std::unique_lock<std::mutex> lock(done->mutex);
  if (!done->cv.wait_for(lock, kActionBound, [&] { return done->done; })) {
    std::fprintf(stderr, "[mpitrain %s] fatal: the communicators' teardown did not finish within %lld s; "
                 "aborting without it\n", where().c_str(), static_cast<long long>(kActionBound.count()));
    std::fflush(stderr);
  }
}

}  // namespace

void set_identity(int rank, const std::string& host) {
  std::lock_guard<std::mutex> lock(state().mutex);
  state().rank = rank;
  state().host = host;
}

int own_rank() {
  std::lock_guard<std::mutex> lock(state().mutex);
  return state().rank;
}

std::string where() {
  std::lock_guard<std::mutex> lock(state().mutex);
  const std::string rank = state().rank < 0 ? "?" : std::to_string(state().rank);
  const std::string host = state().host.empty() ? local_host() : state().host;
  return "rank " + rank + " (" + host + ")";
}

int add_abort_action(std::function<void()> action) {
  std::lock_guard<std::mutex> lock(state().mutex);
  const int handle = state().next_handle++;
  state().actions.emplace(handle, std::move(action));
  return handle;
}

void remove_abort_action(int handle) {
  std::lock_guard<std::mutex> lock(state().mutex);
  state().actions.erase(handle);
}

void fatal(const std::string& what, ExitCode code) {
  // Only the first thread to fail reports and aborts; any other waits to be killed.
  static std::once_flag once;
  std::call_once(once, [&] {
    ending.store(true);
    std::fprintf(stderr, "[mpitrain %s] fatal: %s\n", where().c_str(), what.c_str());
    std::fflush(stderr);
    // Whatever blocks below (an abort action behind a stuck kernel, MPI_Abort itself), this
    // rank ends within kExitBound; the launcher then ends the others on its non-zero exit.
    try {
      std::thread([code] {
        std::this_thread::sleep_for(kExitBound);
        std::fprintf(stderr, "[mpitrain %s] fatal: the abort did not end the process within %lld s; exiting\n",
                     where().c_str(), static_cast<long long>(kExitBound.count()));
        std::fflush(stderr);
        std::_Exit(to_int(code));
      }).detach();
    } catch (const std::exception&) {
      // No thread to spare: go on unbounded rather than not abort at all.
    }
    std::map<int, std::function<void()>> actions;
    {
      std::lock_guard<std::mutex> lock(state().mutex);
      actions.swap(state().actions);
    }
    run_bounded(std::move(actions));
    int initialized = 0, finalized = 0;
    MPI_Initialized(&initialized);
    MPI_Finalized(&finalized);
    if (initialized && !finalized) MPI_Abort(MPI_COMM_WORLD, to_int(code));
    std::_Exit(to_int(code));
  });
  for (;;) pause();
}

namespace detail {

void mpi_failed(int code, const char* expr, const char* file, int line) {
  char message[MPI_MAX_ERROR_STRING] = {};
  int length = 0;
  MPI_Error_string(code, message, &length);
  library_failed("MPI", message, expr, file, line);
}

void library_failed(const char* library, const char* message, const char* expr,
                    const char* file, int line) {
  fatal(std::string(library) + " call failed: " + expr + ": " + message + " (at " + file + ":" +
        std::to_string(line) + ")");
}

}  // namespace detail
}  // namespace mpitrain::runtime

namespace mpitrain::runtime {

Backoff::Backoff(std::chrono::microseconds spin) : spin_(spin) { reset(); }

void Backoff::reset() {
  start_ = std::chrono::steady_clock::now();
  sleep_ = std::chrono::microseconds(0);
}

void Backoff::pause() {
  constexpr std::chrono::microseconds first{20}, most{1000};
  while (ending.load(std::memory_order_relaxed)) ::pause();
  if (sleep_.count() == 0 && std::chrono::steady_clock::now() - start_ < spin_) {
    std::this_thread::yield();
    return;
  }
  sleep_ = sleep_.count() == 0 ? first : std::min(sleep_ * 2, most);
  std::this_thread::sleep_for(sleep_);
}

void wait_or_die(MPI_Request* request, std::chrono::milliseconds timeout, const std::string& what) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  Backoff backoff;
  for (int done = 0;;) {
    MPITRAIN_CHECK_MPI(MPI_Test(request, &done, MPI_STATUS_IGNORE));
    if (done) return;
    if (std::chrono::steady_clock::now() > deadline)
      fatal(what + " did not complete within " + std::to_string(timeout.count()) + " ms on " +
                where() + ": a peer rank is stalled, dead or not calling it",
            ExitCode::comm_timeout);
    backoff.pause();
  }
}

}  // namespace mpitrain::runtime

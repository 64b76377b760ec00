#include "mpitrain/runtime/fatal.h"

#include <mpi.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <map>
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

}  // namespace

void set_identity(int rank, const std::string& host) {
  std::lock_guard<std::mutex> lock(state().mutex);
  state().rank = rank;
  state().host = host;
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
    std::fprintf(stderr, "[mpitrain %s] fatal: %s\n", where().c_str(), what.c_str());
    std::fflush(stderr);
    std::map<int, std::function<void()>> actions;
    {
      std::lock_guard<std::mutex> lock(state().mutex);
      actions.swap(state().actions);
    }
    for (auto& entry : actions) entry.second();
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

void wait_or_die(MPI_Request* request, std::chrono::milliseconds timeout, const std::string& what) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (int done = 0;;) {
    MPITRAIN_CHECK_MPI(MPI_Test(request, &done, MPI_STATUS_IGNORE));
    if (done) return;
    if (std::chrono::steady_clock::now() > deadline)
      fatal(what + " did not complete within " + std::to_string(timeout.count()) + " ms on " +
                where() + ": a peer rank is stalled, dead or not calling it",
            ExitCode::comm_timeout);
    std::this_thread::yield();
  }
}

}  // namespace mpitrain::runtime

#pragma once
// Check macros for calls into MPI (and, in cuda_check.h, CUDA and NCCL). A failed call is not
// an exception that a caller might swallow while peers wait: it reports what failed, the
// library's own message, file:line, rank and host, and ends the job through fatal().

#include <mpi.h>

namespace mpitrain::runtime::detail {
[[noreturn]] void mpi_failed(int code, const char* expr, const char* file, int line);
[[noreturn]] void library_failed(const char* library, const char* message, const char* expr,
                                 const char* file, int line);
}  // namespace mpitrain::runtime::detail

#define MPITRAIN_CHECK_MPI(call)                                                  \
  do {                                                                            \
    const int mpitrain_rc_ = (call);                                              \
    if (mpitrain_rc_ != MPI_SUCCESS)                                              \
      ::mpitrain::runtime::detail::mpi_failed(mpitrain_rc_, #call, __FILE__, __LINE__); \
  } while (0)

#include <chrono>
#include <string>

namespace mpitrain::runtime {

/// Paces a polling loop so that a long wait costs almost no CPU. For the first `spin` of a
/// wait it only yields (most operations finish within that, and MPI and CUDA progress only while
/// polled); after that it sleeps, doubling from 20 µs to at most 1 ms. A rank waiting for a
/// stalled peer then polls about a thousand times a second (well under 1 % of a core), and a
/// deadline checked between pauses is overshot by at most a millisecond. reset() starts a new
/// wait (when something completed). Once fatal() has begun, pause() never returns: a failing
/// process's other threads stop at their next wait instead of working on with its peers.
class Backoff {
 public:
  explicit Backoff(std::chrono::microseconds spin = std::chrono::milliseconds(20));
  void pause();
  void reset();

 private:
  std::chrono::microseconds spin_;
  std::chrono::steady_clock::time_point start_;
  std::chrono::microseconds sleep_{0};
};

/// Waits for a non-blocking MPI request (polling with Backoff); past the timeout the job ends
/// with ExitCode::comm_timeout and a message naming `what`. For set-up collectives that must
/// not hang when a peer never arrives.
void wait_or_die(MPI_Request* request, std::chrono::milliseconds timeout, const std::string& what);
}  // namespace mpitrain::runtime

#include "mpitrain/runtime/signals.h"

#include <atomic>
#include <cstring>
#include <exception>

#include "mpitrain/runtime/check.h"
#include "mpitrain/runtime/world.h"

namespace mpitrain::runtime {
namespace {

constexpr int kSignals[3] = {SIGTERM, SIGUSR1, SIGINT};

// Written from a signal handler: a lock-free atomic is async-signal-safe.
std::atomic<int> g_first_signal{0};
static_assert(std::atomic<int>::is_always_lock_free);

extern "C" void on_stop_signal(int signo) {
  int expected = 0;
  if (!g_first_signal.compare_exchange_strong(expected, signo) && signo == SIGINT) {
    // A second Ctrl-C: the user means it. Default action, re-raised.
    std::signal(SIGINT, SIG_DFL);
    std::raise(SIGINT);
  }
}

}  // namespace

StopSignals::StopSignals() {
  g_first_signal.store(0);
  struct sigaction action;
  std::memset(&action, 0, sizeof(action));
  action.sa_handler = on_stop_signal;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESTART;  // a signal must not make a blocking read fail with EINTR
  for (int i = 0; i < 3; ++i) sigaction(kSignals[i], &action, &previous_[i]);
}

StopSignals::~StopSignals() {
  // After a stop, the process is on its way out with the requeue exit code; a signal arriving
  // during MPI_Finalize must not turn that into a death by signal, so the handlers stay.
  if (requested()) return;
  for (int i = 0; i < 3; ++i) sigaction(kSignals[i], &previous_[i], nullptr);
}

bool StopSignals::requested() const { return g_first_signal.load() != 0; }

int StopSignals::signal() const { return g_first_signal.load(); }

struct StopAgreement::State {
  const StopSignals& signals;
  std::chrono::milliseconds timeout;
  MPI_Comm comm = MPI_COMM_NULL;
  MPI_Request request = MPI_REQUEST_NULL;
  int local = 0;  // the buffers of the check in flight
  int any = 0;
};

StopAgreement::StopAgreement(const World& world, const StopSignals& signals, std::chrono::milliseconds timeout)
    : state_(std::make_unique<State>(State{signals, timeout})) {
  // Its own communicator, so the check in flight never interleaves with the world's collectives.
  MPITRAIN_CHECK_MPI(MPI_Comm_dup(world.comm(), &state_->comm));
}

StopAgreement::~StopAgreement() {
  if (std::uncaught_exceptions() > 0) return;
  if (state_->request != MPI_REQUEST_NULL)
    wait_or_die(&state_->request, state_->timeout, "the last stop-signal check");
  MPI_Comm_free(&state_->comm);
}

bool StopAgreement::poll() {
  State& s = *state_;
  bool stop = false;
  if (s.request != MPI_REQUEST_NULL) {
    wait_or_die(&s.request, s.timeout, "the stop-signal check started at the previous step boundary");
    stop = s.any != 0;
  }
  s.local = s.signals.requested() ? 1 : 0;
  MPITRAIN_CHECK_MPI(MPI_Iallreduce(&s.local, &s.any, 1, MPI_INT, MPI_MAX, s.comm, &s.request));
  return stop;
}

}  // namespace mpitrain::runtime

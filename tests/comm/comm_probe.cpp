// Failure scenarios as real jobs, checked from outside by expect_job_failure.sh:
//   withhold: the last rank never joins an all-reduce; the others must time out and the whole
//             job must end non-zero (no hang) with a message naming the operation.
//             An abort action prints how long after the start of the collective the job was
//             ended, which the test compares with the timeout.
//   mismatch: the last rank all-reduces a different size; with verify_collectives every rank
//             must report the disagreement and the job must end non-zero.
//   idle:     the last rank joins an all-reduce, then a bounded barrier (runtime::wait_or_die),
//             3 s late each; every other rank measures the CPU time its process (all threads)
//             spent waiting and fails unless it is under 10 % of one core and each wait ended
//             within 1 s of the last rank's arrival. Exits 0 when every rank passes.
//   stuck_abort: every rank registers an abort action that never returns (a communicator
//             teardown stuck behind a hung kernel); the last rank fails. fatal() must still end
//             the job: MPI_Abort after the actions' 2 s, the process itself at 4 s.
// Usage: comm_probe withhold|mismatch|idle|stuck_abort TIMEOUT_S [cpu|cuda]
#include <ATen/ATen.h>

#include <sys/resource.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <thread>

#ifdef MPITRAIN_HAVE_NCCL
#include <ATen/cuda/Sleep.h>
#endif

#include "mpitrain/comm/communicator.h"
#include "mpitrain/runtime/device.h"
#include "mpitrain/runtime/error.h"
#include "mpitrain/runtime/fatal.h"
#include "mpitrain/runtime/world.h"

using namespace mpitrain;

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

// CPU seconds of this process, every thread (the communicator's progress thread included).
double cpu_seconds() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) +
         static_cast<double>(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) / 1e6;
}

// Runs `wait` on a rank whose peer arrives `late` seconds after it starts; false (and why on
// stderr) when the wait cost 10 % of a core or more, or did not end within 1 s of the arrival.
template <typename Wait>
bool waits_quietly(const runtime::World& world, const char* what, double late, Wait&& wait) {
  const auto start = Clock::now();
  const double cpu_start = cpu_seconds();
  wait();
  const double waited = seconds_since(start);
  const double cpu = (cpu_seconds() - cpu_start) / waited;
  std::printf("rank %d: waited %.2f s in %s (the peer came after %.1f s) using %.1f %% of one core\n", world.rank(),
              waited, what, late, 100 * cpu);
  std::fflush(stdout);
  if (cpu < 0.10 && waited > late - 0.1 && waited < late + 1.0) return true;
  std::fprintf(stderr, "rank %d: %s: the wait should use under 10 %% of a core and end within 1 s of the peer\n",
               world.rank(), what);
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  runtime::World world(&argc, &argv);
  if (argc < 3) {
    std::fprintf(stderr, "usage: comm_probe withhold|withhold_send|mismatch TIMEOUT_S [cpu|cuda]\n");
    return 2;
  }
  const std::string scenario = argv[1];
  comm::CommOptions options;
  options.timeout = std::chrono::seconds(std::stoi(argv[2]));
  options.verify_collectives = scenario == "mismatch";
  const auto kind = runtime::parse_device_kind(argc > 3 ? argv[3] : "cpu");
  const c10::Device device = runtime::choose_device(world, {kind, false});

  return runtime::run_guarded(world, [&] {
    auto comm = comm::make_communicator(world, device, options);
    const bool odd_one = world.rank() == world.size() - 1;
    auto tensor = at::ones({1000}, at::TensorOptions().device(device));
    if (scenario == "withhold") {
      const auto start = Clock::now();
      runtime::add_abort_action([start] {
        std::printf("rank %d: the job was ended %.1f s after the collective began\n", runtime::own_rank(),
                    seconds_since(start));
        std::fflush(stdout);
      });
      if (world.size() == 1 && device.is_cuda()) {
#ifdef MPITRAIN_HAVE_NCCL
        // A world of one cannot withhold: hold the caller's stream busy instead, so the
        // collective (ordered after it) cannot complete in time.
        at::cuda::sleep(int64_t{1} << 40);
#endif
      } else if (odd_one) {
        std::this_thread::sleep_for(options.timeout * 4);
        std::printf("rank %d: still alive after withholding; the job should have ended\n",
                    world.rank());
        return 0;
      }
      comm->all_reduce(tensor);
      comm->barrier();
      std::printf("rank %d: the collective completed; it should have timed out\n", world.rank());
      return 0;
    }
    if (scenario == "withhold_send") {
      // Rank 0 waits for a message its peer never sends: the receive times out like a collective.
      if (world.size() > 1 && world.rank() == 1) {
        std::this_thread::sleep_for(options.timeout * 4);
        return 0;
      }
      if (world.rank() == 0 && world.size() > 1) comm->recv_async(tensor, 1)->wait();
      world.barrier();
      std::printf("rank %d: the receive completed; it should have timed out\n", world.rank());
      return 0;
    }
    if (scenario == "mismatch") {
      auto other = at::ones({odd_one ? 1001 : 1000}, at::TensorOptions().device(device));
      comm->all_reduce(other);
      std::printf("rank %d: mismatched collective went through\n", world.rank());
      return 0;
    }
    if (scenario == "idle") {
      constexpr double late = 3.0;
      const auto hold = std::chrono::milliseconds(static_cast<int>(late * 1000));
      bool ok = true;
      if (odd_one) std::this_thread::sleep_for(hold);
      if (odd_one) comm->all_reduce(tensor);
      else ok = waits_quietly(world, "a withheld all-reduce", late, [&] { comm->all_reduce(tensor); }) && ok;
      if (odd_one) std::this_thread::sleep_for(hold);
      const auto barrier = [&] { world.barrier(options.timeout, "the probe's bounded barrier"); };
      if (odd_one) barrier();
      else ok = waits_quietly(world, "a withheld bounded barrier", late, barrier) && ok;
      return ok ? 0 : 1;
    }
    if (scenario == "stuck_abort") {
      runtime::add_abort_action([] {
        for (;;) std::this_thread::sleep_for(std::chrono::hours(1));
      });
      if (odd_one) runtime::fatal("injected failure with a teardown that never returns");
      comm->barrier();
      std::printf("rank %d: the barrier completed; the job should have ended\n", world.rank());
      return 0;
    }
    throw runtime::Error("unknown scenario " + scenario, runtime::ExitCode::bad_input);
  });
}

// Real multi-rank jobs for the runtime's script tests:
//   runtime_probe            every rank runs "steps" until the agreed stop flag says to stop,
//                            then prints the step it stopped at (the driver sends the signal);
//   runtime_probe barrier S  the last rank never reaches a barrier bounded by S seconds, which
//                            must end the job.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>

#include "mpitrain/runtime/signals.h"
#include "mpitrain/runtime/world.h"

int main(int argc, char** argv) {
  mpitrain::runtime::World world(&argc, &argv);
  if (argc == 3 && std::string(argv[1]) == "barrier") {
    if (world.rank() == world.size() - 1) std::this_thread::sleep_for(std::chrono::seconds(120));
    world.barrier(std::chrono::seconds(std::atoi(argv[2])), "the test's bounded barrier");
    std::printf("rank %d passed the barrier; it should have timed out\n", world.rank());
    return 0;
  }
  mpitrain::runtime::StopSignals signals;
  std::printf("rank %d pid %d\n", world.rank(), static_cast<int>(getpid()));
  std::fflush(stdout);
  mpitrain::runtime::StopAgreement agreement(world, signals, std::chrono::seconds(60));
  for (int step = 1; step <= 6000; ++step) {
    // Ranks of different speeds: each answer arrives on each rank at a different moment.
    std::this_thread::sleep_for(std::chrono::milliseconds(10 + 7 * world.rank()));
    if (agreement.poll()) {
      std::printf("rank %d stopped at step %d (signal %d here)\n", world.rank(), step,
                  signals.signal());
      return 0;
    }
  }
  std::printf("rank %d was never asked to stop\n", world.rank());
  return 1;
}

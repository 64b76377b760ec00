// A real multi-rank job for the signal test: every rank runs "steps" until the agreed stop
// flag says to stop, then prints the step it stopped at. The driver script sends a real signal
// to one rank's process from outside.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <thread>

#include "mpitrain/runtime/signals.h"
#include "mpitrain/runtime/world.h"

int main(int argc, char** argv) {
  mpitrain::runtime::World world(&argc, &argv);
  mpitrain::runtime::StopSignals signals;
  std::printf("rank %d pid %d\n", world.rank(), static_cast<int>(getpid()));
  std::fflush(stdout);
  for (int step = 1; step <= 6000; ++step) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    if (signals.agree(world)) {
      std::printf("rank %d stopped at step %d (signal %d here)\n", world.rank(), step,
                  signals.signal());
      return 0;
    }
  }
  std::printf("rank %d was never asked to stop\n", world.rank());
  return 1;
}

// A DDP job that must end by itself, for expect_job_failure.sh.
// Usage: ddp_probe mismatch   — rank 1 builds a wider model than the others.
#include <torch/torch.h>

#include <cstdio>
#include <string>

#include "mpitrain/comm/communicator.h"
#include "mpitrain/ddp/ddp.h"
#include "mpitrain/runtime/error.h"
#include "mpitrain/runtime/world.h"
#include "tiny_models.h"

using namespace mpitrain;

int main(int argc, char** argv) {
  runtime::World world(&argc, &argv);
  if (argc != 2 || std::string(argv[1]) != "mismatch") {
    std::fprintf(stderr, "usage: ddp_probe mismatch\n");
    return 2;
  }
  return runtime::run_guarded(world, [&] {
    comm::CommOptions options;
    options.timeout = std::chrono::seconds(20);
    auto comm = comm::make_communicator(world, c10::Device(c10::kCPU), options);
    auto model = std::make_shared<testing::TinyMlp>(world.rank() == 1 ? 48 : 32);
    ddp::DistributedDataParallel ddp(model, *comm);
    std::printf("rank %d: DDP construction should have failed\n", world.rank());
    return 0;
  });
}

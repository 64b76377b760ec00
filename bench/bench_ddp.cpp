// DDP cost: (1) at world size 1, the training step with DDP against the same LibTorch loop
// without it, on an MLP of >= 10 M parameters (goal: <= 3 % overhead); (2) at any world size,
// the gradient bytes reduced per second of backward-plus-wait.
//
//   build/bin/bench_ddp --out bench/results/ddp_np1.json
//   mpirun -np 2 build/bin/bench_ddp --out bench/results/ddp_np2.json
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <iostream>
#include <vector>

#include "harness.h"
#include "mpitrain/apps/cli.h"
#include "mpitrain/comm/communicator.h"
#include "mpitrain/ddp/ddp.h"
#include "mpitrain/runtime/error.h"
#include "mpitrain/runtime/world.h"

using namespace mpitrain;

namespace {

struct Options {
  int64_t width = 2048;
  int layers = 4;
  int64_t batch = 32;
  int warmup = 3;
  int steps = 20;
  double goal = 0.03;
  std::string out;
};

torch::nn::Sequential make_mlp(const Options& options) {
  torch::nn::Sequential mlp;
  for (int i = 0; i < options.layers; ++i) {
    mlp->push_back(torch::nn::Linear(options.width, options.width));
    mlp->push_back(torch::nn::ReLU());
  }
  return mlp;
}

double median(std::vector<double> values) {
  std::nth_element(values.begin(), values.begin() + values.size() / 2, values.end());
  return values[values.size() / 2];
}

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

int run(const runtime::World& world, const Options& options) {
  auto comm = comm::make_communicator(world, c10::Device(c10::kCPU));
  torch::manual_seed(0);
  auto x = torch::randn({options.batch, options.width});
  auto target = torch::randn({options.batch, options.width});

  // The same step, with and without DDP; models built identically.
  auto time_steps = [&](torch::nn::Sequential model, ddp::DistributedDataParallel* ddp,
                        std::vector<double>* backward_seconds) {
    torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(1e-3));
    std::vector<double> steps;
    for (int i = 0; i < options.warmup + options.steps; ++i) {
      MPI_Barrier(world.comm());
      const auto start = Clock::now();
      if (ddp != nullptr) ddp->before_forward();
      auto loss = torch::mse_loss(model->forward(x), target);
      const auto backward_start = Clock::now();
      loss.backward();
      if (ddp != nullptr) ddp->finish_backward();
      const double backward = seconds_since(backward_start);
      optimizer.step();
      // Zero in place, as the trainer does: both loops keep their gradient tensors.
      optimizer.zero_grad(/*set_to_none=*/false);
      if (i >= options.warmup) {
        steps.push_back(seconds_since(start));
        if (backward_seconds != nullptr) backward_seconds->push_back(backward);
      }
    }
    return median(steps);
  };

  torch::manual_seed(1);
  auto plain_model = make_mlp(options);
  const int64_t parameters = [&] {
    int64_t n = 0;
    for (const auto& p : plain_model->parameters()) n += p.numel();
    return n;
  }();
  const double plain = time_steps(plain_model, nullptr, nullptr);

  torch::manual_seed(1);
  auto ddp_model = make_mlp(options);
  ddp::DistributedDataParallel ddp(ddp_model.ptr(), *comm);
  std::vector<double> backward_seconds;
  const double with_ddp = time_steps(ddp_model, &ddp, &backward_seconds);

  const auto& stats = ddp.stats();
  const double bytes_per_step = static_cast<double>(stats.bytes_reduced) / static_cast<double>(stats.synchronised_backwards);
  const double reduced_gbps = bytes_per_step / median(backward_seconds) / 1e9;
  const double overhead = with_ddp / plain - 1.0;
  if (!world.is_root()) return 0;

  std::cout << "MLP " << options.layers << " x " << options.width << " (" << parameters << " parameters), batch "
            << options.batch << " per rank, " << world.size() << " rank(s), CPU\n";
  bench::print_table({"loop", "step ms", "backward+wait ms", "reduced GB/s"},
                     {{"LibTorch, no DDP", bench::fixed(plain * 1e3, 2), "", ""},
                      {"mpitrain DDP", bench::fixed(with_ddp * 1e3, 2), bench::fixed(median(backward_seconds) * 1e3, 2),
                       bench::fixed(reduced_gbps, 3)}});
  std::cout << "DDP overhead " << bench::fixed(overhead * 100, 2) << " %; buckets launched during backward: "
            << stats.buckets_launched_during_backward << " of " << stats.buckets_launched << '\n';
  if (world.size() == 1)
    std::cout << "goal: overhead <= " << options.goal * 100 << " % at world size 1: "
              << (overhead <= options.goal ? "met" : "NOT met") << '\n';
  if (!options.out.empty()) {
    bench::write_json(options.out,
                      {{"name", "ddp_np" + std::to_string(world.size())},
                       {"what", "training step time of an MLP with and without mpitrain DDP (CPU, MPI backend), "
                                "and gradient bytes reduced per second of backward + wait"},
                       {"machine", bench::machine_description(world.size(), "")},
                       {"date", bench::utc_now()},
                       {"git_commit", bench::git_commit()},
                       {"model", {{"layers", options.layers}, {"width", options.width}, {"parameters", parameters}}},
                       {"batch_per_rank", options.batch},
                       {"steps", options.steps},
                       {"plain_step_s", plain},
                       {"ddp_step_s", with_ddp},
                       {"overhead", overhead},
                       {"backward_and_wait_s", median(backward_seconds)},
                       {"bytes_reduced_per_step", bytes_per_step},
                       {"reduced_gbps", reduced_gbps},
                       {"buckets_launched_during_backward", stats.buckets_launched_during_backward},
                       {"buckets_launched", stats.buckets_launched},
                       {"goal", {{"overhead_at_most", options.goal}, {"applies_at_world_size", 1}}},
                       {"goal_met", world.size() != 1 || overhead <= options.goal}});
    std::cout << "wrote " << options.out << '\n';
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  runtime::World world(&argc, &argv);
  CLI::App app{"DDP overhead and reduction bandwidth on CPU"};
  Options options;
  app.add_option("--width", options.width, "MLP width");
  app.add_option("--layers", options.layers, "MLP layers");
  app.add_option("--batch", options.batch, "batch per rank");
  app.add_option("--warmup", options.warmup, "untimed steps");
  app.add_option("--steps", options.steps, "timed steps (the median is reported)");
  app.add_option("--out", options.out, "JSON result file (written by rank 0)");
  return apps::parse_and_run(world, app, argc, argv, [&] { return run(world, options); });
}

// DDP on a GPU over NCCL gives the weights of the same steps taken by one process on the CPU:
// the tiny models of tests/ddp, SGD and AdamW, float32 (relative 1e-5) and float64, with
// gradient accumulation, clipping and ZeRO stage 1 (reduce-scatter, then all-gather).
#include <torch/torch.h>
// After torch: c10 defines a CHECK macro of its own that Catch must override.
#include <catch2/catch.hpp>

#include <memory>
#include <vector>

#include "ddp_support.h"
#include "gpu_support.h"
#include "mpitrain/ddp/ddp.h"
#include "tiny_models.h"

using namespace mpitrain;
using namespace mpitrain::testing;

namespace {

enum class Opt { sgd, adamw };

std::unique_ptr<torch::optim::Optimizer> make_optimizer(Opt kind, const std::vector<torch::Tensor>& params) {
  if (kind == Opt::sgd)
    return std::make_unique<torch::optim::SGD>(params, torch::optim::SGDOptions(0.05).momentum(0.9));
  return std::make_unique<torch::optim::AdamW>(params, torch::optim::AdamWOptions(1e-2).weight_decay(0.01));
}

struct CudaRun {
  Opt optimizer = Opt::sgd;
  c10::ScalarType dtype = at::kFloat;
  int accumulation = 1;
  int zero_stage = 0;
  double clip = 0;  // 0: no clipping
  int steps = 10;
};

std::vector<at::Tensor> on_cpu(const std::vector<at::Tensor>& tensors) {
  std::vector<at::Tensor> out;
  for (const auto& t : tensors) out.push_back(t.detach().cpu());
  return out;
}

// The same initial weights and batches on both sides; returns the worst relative weight
// difference after run.steps steps.
template <typename Model>
double cuda_against_cpu(const CudaRun& run) {
  // The CPU reference computes in IEEE float32; so must the GPU, or TF32 alone differs by 1e-3.
  at::globalContext().setAllowTF32CuBLAS(false);
  at::globalContext().setAllowTF32CuDNN(false);
  torch::manual_seed(7);
  auto reference = std::make_shared<Model>();
  torch::manual_seed(7);
  auto model = std::make_shared<Model>();
  reference->to(run.dtype);
  model->to(run.dtype);
  model->to(gpu());

  ddp::Options options;
  options.first_bucket_bytes = 256;  // several buckets even for tiny models
  options.bucket_bytes = 2048;
  options.zero_stage = run.zero_stage;
  ddp::DistributedDataParallel ddp(model, nccl(), options);
  std::vector<at::Tensor> stepped = model->parameters();
  if (run.zero_stage == 1) {
    stepped.clear();
    for (const auto& slice : ddp.shard()) stepped.push_back(slice.value);
  }
  auto reference_opt = make_optimizer(run.optimizer, reference->parameters());
  auto opt = make_optimizer(run.optimizer, stepped);

  at::Generator data = at::make_generator<at::CPUGeneratorImpl>(1234);
  for (int step = 0; step < run.steps; ++step) {
    for (int micro = 0; micro < run.accumulation; ++micro) {
      auto [x, y] = reference->batch(8, data);
      if (at::isFloatingType(x.scalar_type())) x = x.to(run.dtype);
      (reference->loss(reference->forward(x), y) / run.accumulation).backward();

      const at::Tensor xs = x.to(gpu()), ys = y.to(gpu());
      if (micro + 1 < run.accumulation) {
        auto guard = ddp.no_sync();
        (model->loss(model->forward(xs), ys) / run.accumulation).backward();
      } else {
        ddp.before_forward();
        (model->loss(model->forward(xs), ys) / run.accumulation).backward();
        ddp.finish_backward();
      }
    }
    if (run.clip > 0) {
      const double expected = torch::nn::utils::clip_grad_norm_(reference->parameters(), run.clip);
      const double norm = ddp.clip_grad_norm(run.clip).item<double>();
      INFO("step " << step << ": gradient norm " << norm << " on the GPU, " << expected << " on the CPU");
      CHECK(std::abs(norm - expected) <= 1e-5 * expected);
    }
    reference_opt->step();
    opt->step();
    ddp.finish_step();
    reference_opt->zero_grad();
    model->zero_grad(/*set_to_none=*/false);
  }
  for (const auto& p : model->parameters()) CHECK(p.device() == gpu());
  return worst_relative_difference(on_cpu(model->parameters()), reference->parameters());
}

template <typename Model>
void check_models(const char* name) {
  for (const Opt opt : {Opt::sgd, Opt::adamw}) {
    for (const c10::ScalarType dtype : {at::kFloat, at::kDouble}) {
      CudaRun run;
      run.optimizer = opt;
      run.dtype = dtype;
      const double tolerance = dtype == at::kDouble ? 1e-10 : 1e-5;
      const double worst = cuda_against_cpu<Model>(run);
      INFO(name << (opt == Opt::sgd ? " SGD " : " AdamW ") << c10::toString(dtype) << ": worst relative difference "
                << worst);
      CHECK(worst <= tolerance);
    }
  }
}

}  // namespace

TEST_CASE("DDP on CUDA equals the CPU: MLP", "[ddp]") { check_models<TinyMlp>("MLP"); }
TEST_CASE("DDP on CUDA equals the CPU: CNN", "[ddp]") { check_models<TinyCnn>("CNN"); }
TEST_CASE("DDP on CUDA equals the CPU: GPT (tied weights, attention)", "[ddp]") { check_models<TinyGpt>("GPT"); }

TEST_CASE("DDP on CUDA equals the CPU: accumulation, clipping and ZeRO stage 1", "[ddp]") {
  CudaRun run;
  run.optimizer = Opt::adamw;
  run.accumulation = 3;
  run.clip = 0.5;
  const double accumulated = cuda_against_cpu<TinyMlp>(run);
  INFO("accumulation 3, clip 0.5: worst relative difference " << accumulated);
  CHECK(accumulated <= 1e-5);
  run.zero_stage = 1;
  const double sharded = cuda_against_cpu<TinyGpt>(run);
  INFO("ZeRO stage 1: worst relative difference " << sharded);
  CHECK(sharded <= 1e-5);
}

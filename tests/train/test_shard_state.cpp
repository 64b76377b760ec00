// ZeRO checkpoints: the optimizer state of shard slices saved under parameter[begin:end] names
// and loaded into slices cut elsewhere (another world size) is the same state, element for
// element, and stepping on from it gives the uncut optimizer's weights; what cannot be the state
// of these slices is refused.
#include <torch/torch.h>
// After torch: c10 defines a CHECK macro of its own that Catch must override.
#include <catch2/catch.hpp>

#include <ftw.h>
#include <stdlib.h>

#include <cstdio>
#include <string>

#include "mpitrain/checkpoint/safetensors.h"
#include "mpitrain/runtime/error.h"
#include "mpitrain/train/optim.h"
#include "train/shard_state.h"

using namespace mpitrain;

namespace {

config::OptimizerConfig adamw() {
  config::OptimizerConfig c;
  c.name = config::OptimizerName::adamw;
  c.lr = 0.01;
  c.betas = {0.9, 0.95};
  c.eps = 1e-8;
  c.weight_decay = 0.1;
  c.fused = config::Fused::off;
  return c;
}

// Slices of `parameter` (1-D views of its storage) at the given cut points, as ddp::shard()
// would give them to ranks that each own one.
std::vector<ddp::ShardSlice> cut(const std::string& name, const torch::Tensor& parameter, std::vector<int64_t> points) {
  std::vector<ddp::ShardSlice> slices;
  points.insert(points.begin(), 0);
  points.push_back(parameter.numel());
  for (size_t i = 0; i + 1 < points.size(); ++i) {
    ddp::ShardSlice slice;
    slice.name = name;
    slice.parameter = parameter;
    slice.begin = points[i];
    slice.value = parameter.detach().view({-1}).narrow(0, points[i], points[i + 1] - points[i]);
    slice.grad = parameter.grad().view({-1}).narrow(0, points[i], points[i + 1] - points[i]);
    slice.value.mutable_grad() = slice.grad;
    slices.push_back(slice);
  }
  return slices;
}

// A temporary folder, removed with POSIX calls (libtorch.so's exported
// std::filesystem::remove_all crashes when called from a test).
struct Folder {
  std::string path;
  Folder() {
    char name[] = "/tmp/shard_state_XXXXXX";
    path = ::mkdtemp(name);
  }
  ~Folder() {
    ::nftw(path.c_str(), [](const char* p, const struct stat*, int, struct FTW*) { return std::remove(p); }, 8,
           FTW_DEPTH | FTW_PHYS);
  }
  std::string file(const std::string& name) const { return path + "/" + name; }
};

}  // namespace

TEST_CASE("optimizer state cut in 2 loads into a cut in 3 exactly, and training goes on identically", "[zero]") {
  torch::manual_seed(1);
  const torch::Tensor weight = torch::randn({4, 5}).requires_grad_(), bias = torch::randn({5}).requires_grad_();
  weight.mutable_grad() = torch::zeros_like(weight);
  bias.mutable_grad() = torch::zeros_like(bias);
  const torch::Tensor whole_weight = weight.detach().clone().requires_grad_();
  const torch::Tensor whole_bias = bias.detach().clone().requires_grad_();
  torch::optim::AdamW whole({whole_weight, whole_bias},
                          torch::optim::AdamWOptions(0.01).betas({0.9, 0.95}).eps(1e-8).weight_decay(0.1));

  // "Two ranks": weight cut at 7 and 15, bias at 2; the third piece of each is the other rank's.
  auto two = cut("w", weight, {7, 15});
  auto two_bias = cut("b", bias, {2});
  std::vector<ddp::ShardSlice> rank0 = {two[0], two[1], two_bias[0]}, rank1 = {two[2], two_bias[1]};
  auto opt0 = train::make_optimizer(adamw(), rank0, c10::Device(c10::kCPU));
  auto opt1 = train::make_optimizer(adamw(), rank1, c10::Device(c10::kCPU));
  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(9);
  const auto step = [&](std::vector<torch::optim::Optimizer*> optimizers) {
    const torch::Tensor gw = torch::randn({4, 5}, g), gb = torch::randn({5}, g);
    weight.grad().copy_(gw);
    bias.grad().copy_(gb);
    whole_weight.mutable_grad() = gw.clone();
    whole_bias.mutable_grad() = gb.clone();
    for (auto* o : optimizers) o->step();
    whole.step();
  };
  // The uncut reference uses decay on both tensors; give the sliced ones the same (group 0).
  for (auto* o : {opt0.get(), opt1.get()}) {
    auto& groups = o->param_groups();
    for (auto& p : groups[1].params()) groups[0].params().push_back(p);
    groups[1].params().clear();
  }
  for (int k = 0; k < 3; ++k) step({opt0.get(), opt1.get()});

  Folder folder;
  checkpoint::write_safetensors(folder.file("r0.safetensors"), train::shard_state(*opt0, rank0));
  checkpoint::write_safetensors(folder.file("r1.safetensors"), train::shard_state(*opt1, rank1));

  // "Three ranks": cut elsewhere; each loads from both files.
  auto three = cut("w", weight, {4, 12});
  auto three_bias = cut("b", bias, {1, 3});
  std::vector<std::vector<ddp::ShardSlice>> ranks = {{three[0], three_bias[0]}, {three[1], three_bias[1]}, {three[2], three_bias[2]}};
  std::vector<std::unique_ptr<torch::optim::Optimizer>> opts;
  for (auto& shard : ranks) {
    opts.push_back(train::make_optimizer(adamw(), shard, c10::Device(c10::kCPU)));
    auto& groups = opts.back()->param_groups();
    for (auto& p : groups[1].params()) groups[0].params().push_back(p);
    groups[1].params().clear();
    train::load_shard_state(*opts.back(), shard, {folder.file("r1.safetensors"), folder.file("r0.safetensors")});
  }
  // Element for element, the reassembled moments are the uncut optimizer's.
  for (size_t r = 0; r < ranks.size(); ++r) {
    for (const auto& slice : ranks[r]) {
      const auto& state = static_cast<const torch::optim::AdamWParamState&>(
          *opts[r]->state().at(slice.value.unsafeGetTensorImpl()));
      const torch::Tensor& reference = slice.name == "w" ? whole_weight : whole_bias;
      const auto& full = static_cast<const torch::optim::AdamWParamState&>(*whole.state().at(reference.unsafeGetTensorImpl()));
      const auto range = [&](const torch::Tensor& t) { return t.view({-1}).narrow(0, slice.begin, slice.value.numel()); };
      CHECK(state.step() == 3);
      CHECK(torch::equal(state.exp_avg(), range(full.exp_avg())));
      CHECK(torch::equal(state.exp_avg_sq(), range(full.exp_avg_sq())));
    }
  }
  std::vector<torch::optim::Optimizer*> three_optimizers;
  for (auto& o : opts) three_optimizers.push_back(o.get());
  for (int k = 0; k < 2; ++k) step(three_optimizers);
  CHECK(torch::equal(weight, whole_weight));
  CHECK(torch::equal(bias, whole_bias));
}

TEST_CASE("state that cannot be these slices' is refused, naming the parameter", "[zero]") {
  const torch::Tensor weight = torch::randn({10}).requires_grad_();
  weight.mutable_grad() = torch::ones_like(weight);
  auto slices = cut("w", weight, {5});
  auto opt = train::make_optimizer(adamw(), slices, c10::Device(c10::kCPU));
  opt->step();
  Folder folder;
  const auto state = train::shard_state(*opt, slices);
  REQUIRE(state.count("w[0:5].exp_avg") == 1);
  REQUIRE(state.count("w[5:10].step") == 1);

  // Only the first half saved: elements 5-9 are in no file.
  std::map<std::string, torch::Tensor> half;
  for (const auto& [name, t] : state)
    if (name.rfind("w[0:5]", 0) == 0) half[name] = t;
  checkpoint::write_safetensors(folder.file("half.safetensors"), half);
  auto fresh = train::make_optimizer(adamw(), slices, c10::Device(c10::kCPU));
  CHECK_THROWS_WITH(train::load_shard_state(*fresh, slices, {folder.file("half.safetensors")}),
                    Catch::Contains("do not hold the whole state of parameter 'w'"));

  // A name of another form, and SGD's state into AdamW.
  checkpoint::write_safetensors(folder.file("odd.safetensors"), {{"w.exp_avg", torch::zeros({10})}});
  CHECK_THROWS_WITH(train::load_shard_state(*fresh, slices, {folder.file("odd.safetensors")}),
                    Catch::Contains("not a parameter[begin:end].field name"));
  checkpoint::write_safetensors(folder.file("sgd.safetensors"), {{"w[0:10].momentum_buffer", torch::zeros({10})}});
  CHECK_THROWS_WITH(train::load_shard_state(*fresh, slices, {folder.file("sgd.safetensors")}),
                    Catch::Contains("which this run's optimizer (adamw) does not keep"));

  // Files without any state (saved before the first step) leave none.
  checkpoint::write_safetensors(folder.file("empty.safetensors"), {});
  train::load_shard_state(*fresh, slices, {folder.file("empty.safetensors")});
  CHECK(fresh->state().empty());
}

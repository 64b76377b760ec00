// Links LibTorch as mpitrain's programs do (TORCH_LIBRARIES, run paths from
// cmake/mpitrainTorch.cmake) and computes one matrix product: tests/package/no_toolkit.sh builds
// it without a CUDA toolkit to show that such a build links and runs. Prints the product and
// exits non-zero when it is not the exact expected one.
#include <ATen/ATen.h>

#include <cstdio>

int main() {
  const at::Tensor a = at::arange(6, at::kFloat).reshape({2, 3});  // [[0 1 2] [3 4 5]]
  const at::Tensor p = a.matmul(a.t());
  const at::Tensor expected = at::tensor({5.0F, 14.0F, 14.0F, 50.0F}).reshape({2, 2});
  std::printf("a a^T = [[%g %g] [%g %g]]\n", p[0][0].item<float>(), p[0][1].item<float>(),
              p[1][0].item<float>(), p[1][1].item<float>());
  return at::equal(p, expected) ? 0 : 1;
}

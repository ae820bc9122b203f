// C++ test of torch_dlt::sequential_hvp through the dispatcher: the Hessian-vector products of
// a Linear -> tanh -> Linear net under a summed squared error, with and without a reused primal
// pass, against libtorch's double backward.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd.h>

#include <cstdio>
#include <optional>
#include <vector>

namespace {

using SequentialHvpFn = std::vector<at::Tensor>(
    const at::Tensor&, const at::Tensor&, at::TensorList,
    const c10::List<std::optional<at::Tensor>>&, at::IntArrayRef, at::ArrayRef<double>, int64_t,
    int64_t, bool, at::TensorList);
using SequentialPrimalFn = std::vector<at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                   at::TensorList, at::IntArrayRef,
                                                   at::ArrayRef<double>, int64_t, int64_t, bool);

int failures = 0;

void expect_close(const at::Tensor& got, const at::Tensor& want, const char* what) {
  if (!got.sizes().equals(want.sizes()) || !at::allclose(got, want, 1e-10, 1e-12)) {
    std::printf("FAIL %s\n", what);
    ++failures;
  }
}

}  // namespace

int main() {
  const auto op = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("torch_dlt::sequential_hvp", "")
                      .typed<SequentialHvpFn>();
  at::manual_seed(0);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor x = at::randn({5, 3}, f64), t = at::randn({5, 2}, f64);
  std::vector<at::Tensor> params = {at::randn({4, 3}, f64), at::randn({4}, f64),
                                    at::randn({2, 4}, f64), at::randn({2}, f64)};
  const int64_t k = 2;
  // The second layer's bias is a constant: no direction, an empty result.
  c10::List<std::optional<at::Tensor>> directions;
  for (size_t i = 0; i < params.size(); ++i) {
    directions.push_back(i == 3 ? std::nullopt
                                : std::optional<at::Tensor>(at::randn(
                                      [&] {
                                        auto s = params[i].sizes().vec();
                                        s.insert(s.begin(), k);
                                        return s;
                                      }(),
                                      f64)));
  }
  // Linear(bias) -> tanh (kind 3) -> Linear(bias); MSE (1) with sum reduction (1).
  const std::vector<int64_t> program = {1, 1, 3, 3, 1, 1};
  const std::vector<double> constants = {0.0, 0.0};
  const auto got = op.call(x, t, params, directions, program, constants, 1, 1, false, {});
  // The same products from a primal pass computed once.
  const auto primal_op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("torch_dlt::sequential_primal", "")
                             .typed<SequentialPrimalFn>();
  const auto primal = primal_op.call(x, t, params, program, constants, 1, 1, true);
  const auto reused = op.call(x, t, params, directions, program, constants, 1, 1, false, primal);

  std::vector<at::Tensor> leaves;
  for (const auto& p : params) leaves.push_back(p.detach().requires_grad_(true));
  const at::Tensor z =
      at::linear(at::tanh(at::linear(x, leaves[0], leaves[1])), leaves[2], leaves[3]);
  const at::Tensor loss = (z - t).pow(2).sum();
  const auto grads = torch::autograd::grad({loss}, leaves, {}, true, true);
  for (int64_t j = 0; j < k; ++j) {
    at::Tensor dot = at::zeros({}, f64);
    for (size_t i = 0; i < 3; ++i) dot = dot + (grads[i] * (*directions.get(i))[j]).sum();
    const auto hv = torch::autograd::grad({dot}, leaves, {}, true, false, true);
    for (size_t i = 0; i < 3; ++i) {
      expect_close(got[i][j], hv[i], "H v block");
      expect_close(reused[i][j], hv[i], "H v block from a primal pass");
    }
  }
  if (got[3].numel() != 0) {
    std::printf("FAIL a constant gets a non-empty result\n");
    ++failures;
  }
  if (failures == 0) std::printf("test_hvp: all checks passed\n");
  return failures == 0 ? 0 : 1;
}

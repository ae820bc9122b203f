// C++ test of torch_dlt::moments through the dispatcher, against a two-pass ATen oracle.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <tuple>
#include <vector>

namespace {

using MomentsFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, int64_t);

int failures = 0;

void expect_close(const at::Tensor& got, const at::Tensor& want, double rtol, double atol,
                  const char* what) {
  if (!at::allclose(got, want, rtol, atol)) {
    const double err = (got - want).abs().max().item<double>();
    std::printf("FAIL %s: max abs error %.3e\n", what, err);
    ++failures;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> two_pass(const at::Tensor& x, int64_t dim) {
  const at::Tensor mean = x.mean(dim, /*keepdim=*/true);
  const at::Tensor d = x - mean;
  const at::Tensor m2 = (d * d).mean(dim);
  const at::Tensor m4 = (d * d * d * d).mean(dim);
  return {mean.squeeze(dim), m2, m4 / (m2 * m2) - 3.0};
}

}  // namespace

int main() {
  const auto op = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("torch_dlt::moments", "")
                      .typed<MomentsFn>();
  at::manual_seed(0);

  struct Case {
    std::vector<int64_t> shape;
    int64_t dim;
  };
  const std::vector<Case> cases = {{{1000, 7}, 0}, {{3, 50000}, 1}, {{4, 129, 70}, 1},
                                   {{1}, 0},       {{2, 3, 5}, -1}, {{200000}, 0}};
  for (const auto dtype : {at::kFloat, at::kDouble}) {
    const double rtol = dtype == at::kFloat ? 2e-4 : 1e-10;
    for (const auto& c : cases) {
      const at::Tensor x = at::randn(c.shape, at::TensorOptions().dtype(dtype)) * 3.0 + 1.5;
      const auto [mean, var, kurt] = op.call(x, c.dim);
      const auto [m, v, k] = two_pass(x.to(at::kDouble), c.dim);
      expect_close(mean.to(at::kDouble), m, rtol, rtol, "mean");
      expect_close(var.to(at::kDouble), v, rtol, rtol, "variance");
      if (x.size(c.dim < 0 ? c.dim + x.dim() : c.dim) > 1) {
        expect_close(kurt.to(at::kDouble), k, rtol, 10 * rtol, "excess kurtosis");
      }
    }
  }

  // A large offset breaks naive sums of powers; the merged central sums must not care.
  const at::Tensor u = at::rand({400000}, at::TensorOptions().dtype(at::kDouble));
  const auto [mean, var, kurt] = op.call(u + 1e9, 0);
  expect_close(var, at::full({}, 1.0 / 12.0, u.options()), 1e-2, 0, "uniform variance");
  expect_close(kurt, at::full({}, -1.2, u.options()), 0, 2e-2, "uniform excess kurtosis");
  expect_close(mean - 1e9, at::full({}, 0.5, u.options()), 0, 5e-3, "uniform mean");

  if (failures == 0) std::printf("test_moments: all checks passed\n");
  return failures == 0 ? 0 : 1;
}

"""torch_dlt.robust.lipschitz_upper_bound against the per-layer norms users compute instead.

The usual shortcut (what ``torch.nn.utils.parametrizations.spectral_norm`` normalises) takes a
convolution's norm as the spectral norm of its kernel reshaped to ``[out, in * k * k]``; that is
neither the operator norm of the strided / padded convolution nor a bound on it. For every
convolution of LeNet-5 (trained briefly on the digits, 28x28) and of a strided CNN this script
compares, against the dense oracle (the convolution's full matrix, SVD):

- ours: the operator norm through autograd (power iteration with its stated upward correction,
  and the exact dense-eigenvalue path), with the power iteration's time;
- the reshaped-kernel norm and ``spectral_norm``'s own estimate after its default single
  power-iteration step per forward (run 20 forwards);

and the whole-model bound: ours (merged linear maps) vs the product of separate layer norms vs
the product with reshaped-kernel norms. Writes JSON to benchmarks/results/.

    python benchmarks/lipschitz.py [--quick]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from _common import median_time, write_json
from torch import nn
from torch.nn import functional as F

from torch_dlt.data import digits
from torch_dlt.nn import LeNet5
from torch_dlt.robust import lipschitz_factors, lipschitz_upper_bound


def _lenet(steps: int) -> nn.Module:
    torch.manual_seed(0)
    model = LeNet5(activation="relu", pooling="max")
    x, y = digits(size=28)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _strided_cnn() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 10),
    ).eval()


def _conv_inputs(model: nn.Module, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    shapes, handles = {}, []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            handles.append(
                m.register_forward_hook(
                    lambda mod, a, o, name=name: shapes.__setitem__(name, tuple(a[0].shape[1:]))
                )
            )
    with torch.no_grad():
        model(torch.zeros(shape))
    for h in handles:
        h.remove()
    return shapes


def _dense_norm(conv: nn.Conv2d, in_shape: tuple[int, ...]) -> float:
    n = math.prod(in_shape)
    eye = torch.eye(n, dtype=torch.float64).reshape(n, *in_shape)
    w = conv.weight.detach().double()
    out = F.conv2d(eye, w, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    return float(torch.linalg.matrix_norm(out.reshape(n, -1), ord=2))


def _spectral_norm_estimate(conv: nn.Conv2d, in_shape: tuple[int, ...], forwards: int) -> float:
    """sigma that torch's spectral_norm parametrisation divides by after ``forwards`` calls."""
    layer = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                      conv.padding)  # fmt: skip
    layer.load_state_dict(conv.state_dict())
    sn = nn.utils.parametrizations.spectral_norm(layer)
    sn.train()
    x = torch.zeros(1, *in_shape)
    torch.manual_seed(0)
    with torch.no_grad():
        for _ in range(forwards):
            sn(x)
        sn.eval()
        normalised = sn.parametrizations.weight.original
        return float((normalised.flatten(1) / sn.weight.flatten(1)).abs().max())


def layer_rows(model: nn.Module, shape: tuple[int, ...], quick: bool) -> list[dict]:
    rows = []
    for name, in_shape in _conv_inputs(model, shape).items():
        conv = dict(model.named_modules())[name]
        t0 = time.perf_counter()
        oracle = _dense_norm(conv, in_shape)
        dense_s = time.perf_counter() - t0
        single = nn.Sequential(conv)
        ours_power = lipschitz_upper_bound(single, (1, *in_shape), dense_limit=0)
        ours_dense = lipschitz_upper_bound(single, (1, *in_shape), dense_limit=4096)
        power_s = median_time(
            lambda single=single, in_shape=in_shape: lipschitz_upper_bound(
                single, (1, *in_shape), dense_limit=0
            ),
            repeats=3 if quick else 5,
            warmup=1,
            min_time=0.0,
        )
        reshaped = float(torch.linalg.matrix_norm(conv.weight.detach().double().flatten(1), 2))
        rows.append(
            dict(
                layer=name,
                input=list(in_shape),
                stride=list(conv.stride),
                padding=list(conv.padding),
                dense_oracle=oracle,
                ours_power_iteration=ours_power,
                ours_dense=ours_dense,
                reshaped_kernel=reshaped,
                spectral_norm_20_forwards=_spectral_norm_estimate(conv, in_shape, 20),
                reshaped_over_oracle=reshaped / oracle,
                ours_power_over_oracle=ours_power / oracle,
                ours_power_s=power_s,
                dense_svd_s=dense_s,
            )
        )
        print(
            f"{name:>16} in {in_shape}: oracle {oracle:.4f} | ours {ours_power:.4f} (power, "
            f"{power_s:.3f} s) {ours_dense:.4f} (dense) | reshaped kernel {reshaped:.4f} "
            f"(x{reshaped / oracle:.3f}) | spectral_norm "
            f"{rows[-1]['spectral_norm_20_forwards']:.4f} | dense SVD {dense_s:.2f} s"
        )
    return rows


def model_row(model: nn.Module, shape: tuple[int, ...]) -> dict:
    merged = lipschitz_upper_bound(model, shape)
    separate = lipschitz_upper_bound(model, shape, merge=False)
    reshaped = 1.0
    for f in lipschitz_factors(model, shape, merge=False):
        module = dict(model.named_modules()).get(f.layers[0])
        if isinstance(module, nn.Conv2d):
            w = module.weight.detach().double().flatten(1)
            reshaped *= float(torch.linalg.matrix_norm(w, 2))
        else:
            reshaped *= f.bound
    print(
        f"whole model: ours merged {merged:.4g}, separate layers {separate:.4g}, "
        f"with reshaped-kernel conv norms {reshaped:.4g} (not a bound)"
    )
    return dict(ours_merged=merged, ours_separate=separate, reshaped_kernel_product=reshaped)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, less training")
    args = parser.parse_args()
    cases = {
        "LeNet-5 (ReLU, max pool), digits 28x28": (
            _lenet(50 if args.quick else 300),
            (1, 1, 28, 28),
        ),
        "strided CNN (stride 2, padding 1)": (_strided_cnn(), (1, 1, 28, 28)),
    }
    result = {"benchmark": "lipschitz", "device": "cpu", "cases": {}}
    for label, (model, shape) in cases.items():
        print(f"== {label}")
        result["cases"][label] = {
            "convolutions": layer_rows(model, shape, args.quick),
            "model": model_row(model, shape),
        }
    path = write_json(f"lipschitz_cpu_threads{torch.get_num_threads()}", result)
    print(f"-> {path}")


if __name__ == "__main__":
    main()

"""The diagnose report's sections (registered on import, in this order).

1. ``meanfield``: each layer's (sigma_w^2, sigma_b^2) on the order-to-chaos phase diagram
   (Poole et al. 2016; Schoenholz et al. 2017).
2. ``signal``: measured per-layer pre-activation statistics and gradient norms, with the mean-field
   length map's prediction of each layer's q^l.
3. ``jacobian``: the input-output Jacobian spectrum against the free-probability prediction
   (Pennington, Schoenholz & Ganguli 2017).
4. ``optimiser``: a short sweep of the initial step size, AdaGrad-Norm against SGD
   (Ward, Wu & Bottou 2019).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from torch_dlt.probes._state import restored_mode
from torch_dlt.report._html import Figure, Section, Table, figure_png
from torch_dlt.report.diagnose import DiagnoseContext, register_section

_WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class LayerInit:
    """A weight layer's initialisation in mean-field terms (W_ij ~ N(0, sigma_w2 / fan_in))."""

    name: str
    kind: str
    fan_in: int
    sigma_w2: float
    sigma_b2: float


def layer_variances(model: nn.Module) -> list[LayerInit]:
    """sigma_w^2 = fan_in * mean(W^2) and sigma_b^2 = mean(b^2) of every Linear / Conv layer."""
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, _WEIGHT_LAYERS):
            continue
        w = module.weight.detach().double()
        fan_in = w[0].numel()
        b = module.bias
        sigma_b2 = float(b.detach().double().square().mean()) if b is not None else 0.0
        out.append(
            LayerInit(
                name, type(module).__name__, fan_in, fan_in * float(w.square().mean()), sigma_b2
            )
        )
    return out


def _activation(ctx: DiagnoseContext) -> str:
    if ctx.activation is None:
        from torch_dlt.init import activation_of

        ctx.activation = activation_of(ctx.model)
    return ctx.activation


@register_section("meanfield")
def meanfield_section(ctx: DiagnoseContext) -> Section:
    """Phase of each layer's initialisation, chi_1 and the correlation depth scale xi_c."""
    from torch_dlt.theory import meanfield

    act = _activation(ctx)
    layers = layer_variances(ctx.model)
    if not layers:
        raise ValueError("the model has no Linear or Conv layer to place on the phase diagram")
    rows, flagged, chis = [], [], []
    hidden = layers[:-1] or layers  # the readout layer is not followed by the activation
    for i, layer in enumerate(layers):
        chi = meanfield.chi1(act, layer.sigma_w2, layer.sigma_b2)
        label = meanfield.phase(act, layer.sigma_w2, layer.sigma_b2, tol=0.05)
        _, xi_c = meanfield.depth_scales(act, layer.sigma_w2, layer.sigma_b2)
        critical = meanfield.critical_sigma_w2(act, layer.sigma_b2)
        rows.append(
            [
                layer.name,
                layer.kind,
                layer.fan_in,
                layer.sigma_w2,
                layer.sigma_b2,
                chi,
                xi_c,
                critical,
                label,
            ]
        )
        if layer in hidden:
            chis.append(chi)
            if label != "critical":
                flagged.append(i)
    chi_geo = math.exp(float(np.mean(np.log(chis))))
    depth = len(hidden)
    summary = [
        f"activation {act}; {len(layers)} weight layers, {depth} followed by the activation",
        f"geometric-mean chi_1 over those layers = {chi_geo:.3g}: "
        + (
            "ordered phase (gradients shrink by"
            if chi_geo < 1
            else "chaotic phase (gradients grow by"
        )
        + f" about x{chi_geo**depth:.3g} over the {depth} layers)",
    ]
    med_b2 = float(np.median([layer.sigma_b2 for layer in hidden]))
    summary.append(
        f"edge of chaos at the model's median sigma_b^2 = {med_b2:.3g}: sigma_w^2 = "
        f"{meanfield.critical_sigma_w2(act, med_b2):.4g}; torch_dlt.init.critical_init_(model) "
        "puts every layer there"
    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w_hi = max(4.0, 1.2 * max(layer.sigma_w2 for layer in layers))
    b_hi = max(0.3, 1.2 * max(layer.sigma_b2 for layer in layers))
    n_grid = 25 if ctx.quick else 60
    fig, ax = plt.subplots(figsize=(6.2, 4.4))
    meanfield.phase_diagram(
        act, np.linspace(w_hi / n_grid, w_hi, n_grid), np.linspace(0.0, b_hi, n_grid // 2), ax=ax
    )
    for layer in layers:
        ax.plot(layer.sigma_w2, layer.sigma_b2, "o", mfc="white", mec="black")
        ax.annotate(
            layer.name,
            (layer.sigma_w2, layer.sigma_b2),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax.set_title(f"{act}: the model's layers on the order-to-chaos diagram")
    return Section(
        title="Mean-field phase of the initialisation",
        summary=summary,
        tables=[
            Table(
                [
                    "layer",
                    "type",
                    "fan_in",
                    "sigma_w^2",
                    "sigma_b^2",
                    "chi_1",
                    "xi_c",
                    "critical sigma_w^2",
                    "phase",
                ],
                rows,
                flagged_rows=flagged,
            )
        ],
        figures=[
            Figure(
                figure_png(fig),
                "log chi_1 over (sigma_w^2, sigma_b^2); black line: "
                "chi_1 = 1; circles: the model's layers",
            )
        ],
        notes=[
            "sigma_w^2 = fan_in * mean(W^2) and sigma_b^2 = mean(b^2) as read from the weights; "
            "chi_1 = sigma_w^2 E[phi'(h)^2] at the fixed point q* (Schoenholz et al. 2017), "
            "xi_c = -1/log(chi_c) the depth over which input correlations are forgotten; "
            "the theory assumes i.i.d. weights and wide layers."
        ],
    )


@register_section("signal")
def signal_section(ctx: DiagnoseContext) -> Section:
    """Per-layer pre-activation statistics and gradient norms on one batch, and q^l predicted."""
    from torch_dlt.probes import SignalMonitor
    from torch_dlt.theory import meanfield

    model = ctx.model
    params = [p for p in model.parameters() if p.requires_grad]
    with restored_mode(model), SignalMonitor(model) as monitor:
        output = model(ctx.inputs)
        targets = ctx.targets if ctx.targets is not None else torch.zeros_like(output)
        loss = ctx.loss_fn(output, targets)
        # autograd.grad, not backward(): the user's .grad buffers stay as they were.
        torch.autograd.grad(loss, params, allow_unused=True)
    report = monitor.report()

    inits = {layer.name: layer for layer in layer_variances(model)}
    try:
        act = _activation(ctx)
    except ValueError:
        act = None
    predicted = []
    previous_q = None
    for layer in report.layers:
        init = inits.get(layer.name)
        if act is None or init is None or previous_q is None:
            predicted.append(math.nan)
        else:
            predicted.append(meanfield.length_map(act, init.sigma_w2, init.sigma_b2, previous_q))
        previous_q = layer.q
    rows, flagged = [], []
    for i, (layer, pred) in enumerate(zip(report.layers, predicted)):
        rows.append(
            [
                layer.name,
                layer.layer_type,
                layer.mean,
                layer.var,
                layer.kurtosis,
                layer.q,
                pred,
                layer.grad_norm,
                layer.weight_grad_norm,
                ", ".join(layer.flags) or "-",
            ]
        )
        if layer.flags:
            flagged.append(i)

    summary = [f"loss on the batch: {float(loss.detach()):.4g}"]
    if report.flagged:
        summary.append(
            "flagged: "
            + "; ".join(
                f"{layer.name} ({', '.join(layer.flags)})" for layer in report.layers if layer.flags
            )
        )
    else:
        summary.append("no layer flagged (" + report.rule + ")")
    grads = [layer.grad_norm for layer in report.layers if layer.grad_norm > 0]
    if len(grads) >= 2:
        summary.append(
            f"|dL/dh| first / last layer = {grads[0] / grads[-1]:.3g} (1 is ideal; << 1: "
            "vanishing, >> 1: exploding gradients)"
        )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [layer.name for layer in report.layers]
    x = np.arange(len(names))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.semilogy(x, [layer.q for layer in report.layers], "o-", label="measured q^l")
    if act is not None:
        ax1.semilogy(x, predicted, "s--", mfc="none", label="length map of the measured q^(l-1)")
    ax1.set_ylabel("mean squared pre-activation q^l")
    ax2.semilogy(x, [layer.grad_norm for layer in report.layers], "o-", label="|dL/dh^l|")
    ax2.semilogy(x, [layer.weight_grad_norm for layer in report.layers], "^-", label="|dL/dW^l|")
    ax2.set_ylabel("gradient norm")
    for ax in (ax1, ax2):
        ax.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return Section(
        title="Signal propagation, layer by layer",
        summary=summary,
        tables=[
            Table(
                [
                    "layer",
                    "type",
                    "mean",
                    "var",
                    "excess kurtosis",
                    "q^l",
                    "q^l predicted",
                    "|dL/dh|",
                    "|dL/dW|",
                    "flags",
                ],
                rows,
                flagged_rows=flagged,
            )
        ],
        figures=[
            Figure(
                figure_png(fig),
                "left: measured q^l and the mean-field length map "
                "applied to the previous layer's measured q; right: gradient norms",
            )
        ],
        notes=[
            "One forward and backward pass on the batch in eval mode (the model's .grad, "
            "BatchNorm statistics and training flags are untouched). Pre-activations are the "
            "outputs of each Linear / Conv layer, channels as features for convolutions. "
            "Excess kurtosis near 0 is what the Gaussian mean-field ansatz assumes. The "
            "prediction q^l = sigma_w^2 E[phi(h)^2] + sigma_b^2, h ~ N(0, q^(l-1)) "
            "(Poole et al. 2016) ignores pooling between layers."
        ],
    )


_AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_ADAPTIVE_AVG_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)


def _linear_stages(model: nn.Module, x: torch.Tensor, act: str):
    """Each stage's factor of the mean of sigma^2 and its normalised variance, in forward order.

    A hidden weight layer contributes sigma_w^2 mu_1 and mu_2/mu_1^2 - 1 (+1 for square Gaussian
    weights, Marchenko-Pastur), mu_k = E[phi'(h)^(2k)] at its measured q^l; the readout layer has
    no activation. An average pool over r inputs has P P^T = I / r: factor 1/r, no variance.
    """
    from torch_dlt.probes import SignalMonitor
    from torch_dlt.theory import derivative_moments

    layers = {layer.name: layer for layer in layer_variances(model)}
    ratios: dict[str, float] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, _AVG_POOLS + _ADAPTIVE_AVG_POOLS):

            def hook(mod, inputs, output, name=name):
                ratios[name] = output[0].numel() / inputs[0][0].numel()

            handles.append(module.register_forward_hook(hook))
    try:
        with (
            torch.no_grad(),
            restored_mode(model),
            SignalMonitor(model, layers=list(layers)) as monitor,
        ):
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    q_by_name = {layer.name: layer.q for layer in monitor.report().layers}
    last = list(layers)[-1]
    stages = []  # (name, mean factor, normalised variance without / with Gaussian weights)
    for name, module in model.named_modules():
        if name in layers:
            if name == last:
                mu1, mu2 = 1.0, 1.0
            else:
                mu1, mu2 = derivative_moments(act, q_by_name[name], 2)[:2]
            stages.append((name, layers[name].sigma_w2 * mu1, mu2 / mu1**2 - 1.0, True))
        elif name in ratios:
            if isinstance(module, _AVG_POOLS):
                k = module.kernel_size
                dims = _AVG_POOLS.index(type(module)) + 1 if type(module) in _AVG_POOLS else 1
                factor = 1.0 / (math.prod(k) if isinstance(k, tuple) else k**dims)
            else:
                factor = ratios[name]
            stages.append((name, factor, 0.0, False))
    return stages


def _free_product_prediction(stages, gaussian: bool) -> tuple[float, float]:
    """Mean and variance of sigma^2 for a product of free stages (Pennington et al. 2017).

    For free factors the S-transforms multiply; to first order in z the means multiply and the
    normalised variances m2/m1^2 - 1 add.
    """
    mean, nvar = 1.0, 0.0
    for _, factor, stage_nvar, is_weight in stages:
        mean *= factor
        nvar += stage_nvar + (1.0 if gaussian and is_weight else 0.0)
    return mean, nvar * mean**2


@register_section("jacobian")
def jacobian_section(ctx: DiagnoseContext) -> Section:
    """The input-output Jacobian's squared singular values against the prediction."""
    from torch_dlt.probes import jacobian_spectrum

    model = ctx.model
    n = 4 if ctx.quick else 16
    x = ctx.inputs[:n]
    spectrum = jacobian_spectrum(
        model, x, generator=torch.Generator(x.device).manual_seed(ctx.seed)
    )
    measured_mean = float(spectrum.mean.mean())
    measured_var = float(spectrum.variance.mean())
    top, bottom = float(spectrum.top.mean()), float(spectrum.bottom.mean())
    summary = [
        f"J is {spectrum.out_features} x {spectrum.in_features} per sample ({spectrum.method}, "
        f"{len(x)} samples): mean sigma^2 = {measured_mean:.4g}, variance = {measured_var:.4g}, "
        f"max / min sigma^2 = {top:.4g} / {bottom:.4g}"
    ]
    rows = [
        [
            "measured",
            measured_mean,
            measured_var,
            float(spectrum.top.mean()),
            float(spectrum.bottom.mean()),
        ]
    ]
    predicted = None
    try:
        act = _activation(ctx)
    except ValueError as exc:
        act = None
        summary.append(f"no prediction: {exc}")
    if act is not None:
        stages = _linear_stages(model, x, act)
        for weights in ("gaussian", "orthogonal"):
            mean, var = _free_product_prediction(stages, weights == "gaussian")
            rows.append([f"predicted, {weights} i.i.d. weights", mean, var, "-", "-"])
            if weights == "gaussian":
                predicted = mean
        summary.append(
            f"free-probability prediction (Gaussian weights) of the mean sigma^2: {predicted:.4g} "
            f"(measured / predicted = {measured_mean / predicted:.3g})"
        )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.2, 3.8))
    if spectrum.squared_singular_values is not None:
        values = spectrum.squared_singular_values.flatten().clamp_min(1e-300).log10().numpy()
        ax.hist(values, bins=40, color="tab:blue", alpha=0.8, label="measured")
        ax.set_xlabel("log10 sigma^2 (squared singular values of J)")
    else:
        ritz = spectrum.ritz_values.flatten().clamp_min(1e-300).log10().numpy()
        ax.hist(
            ritz, bins=40, weights=spectrum.ritz_weights.flatten().numpy(), label="measured (SLQ)"
        )
        ax.set_xlabel("log10 sigma^2 (stochastic Lanczos quadrature)")
    ax.axvline(
        math.log10(max(measured_mean, 1e-300)), color="tab:blue", ls="-", label="measured mean"
    )
    if predicted is not None and predicted > 0:
        ax.axvline(math.log10(predicted), color="tab:red", ls="--", label="predicted mean")
    ax.axvline(0.0, color="gray", ls=":", label="isometry (sigma^2 = 1)")
    ax.legend(fontsize=8)
    return Section(
        title="Input-output Jacobian spectrum (dynamical isometry)",
        summary=summary,
        tables=[
            Table(["", "mean sigma^2", "variance sigma^2", "max sigma^2", "min sigma^2"], rows)
        ],
        figures=[
            Figure(
                figure_png(fig),
                "squared singular values of d output / d input over the "
                "samples; dynamical isometry puts them all near 1",
            )
        ],
        notes=[
            "The prediction treats each Linear / Conv layer as an i.i.d. square random matrix "
            "with the model's sigma_w^2, evaluated at each layer's measured q^l; weight sharing "
            "in convolutions, pooling and non-square layers are outside the theory, so read it "
            "as the order of magnitude to expect. Pennington, Schoenholz & Ganguli (2017)."
        ],
    )


def _train_copy(model: nn.Module, make_opt, ctx: DiagnoseContext, steps: int) -> list[float]:
    """Losses of ``steps`` full-batch steps on a deep copy of the model (the model is untouched)."""
    import copy

    net = copy.deepcopy(model)
    opt = make_opt(net.parameters()) if steps else None
    targets = ctx.targets
    losses = []
    for _ in range(steps):
        output = net(ctx.inputs)
        if targets is None:
            targets = torch.zeros_like(output)
        loss = ctx.loss_fn(output, targets)
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        losses.append(float(ctx.loss_fn(net(ctx.inputs), targets)))
    return losses


@register_section("optimiser")
def optimiser_section(ctx: DiagnoseContext) -> Section:
    """A short sweep of the initial step 1/b0: AdaGrad-Norm against SGD (Ward et al. 2019)."""
    from torch_dlt.optim import AdaGradNorm

    b0s = np.logspace(-2, 4, 4 if ctx.quick else 7)
    steps = 8 if ctx.quick else 30
    initial = _train_copy(ctx.model, None, ctx, 0)[-1]
    runs = {"AdaGrad-Norm (lr=1, b0)": [], "SGD (lr=1/b0)": []}
    for b0 in b0s:
        runs["AdaGrad-Norm (lr=1, b0)"].append(
            _train_copy(
                ctx.model, lambda p, b0=b0: AdaGradNorm(p, lr=1.0, b0=float(b0)), ctx, steps
            )
        )
        runs["SGD (lr=1/b0)"].append(
            _train_copy(ctx.model, lambda p, b0=b0: torch.optim.SGD(p, lr=1.0 / b0), ctx, steps)
        )
    final = {name: [r[-1] for r in rs] for name, rs in runs.items()}

    def trained(values: list[float]) -> list[float]:
        return [b for b, v in zip(b0s, values) if math.isfinite(v) and v < 0.9 * initial]

    summary = [f"loss at the start {initial:.4g}; {steps} full-batch steps per run on the batch"]
    for name, values in final.items():
        ok = trained(values)
        span = f"b0 in [{min(ok):.3g}, {max(ok):.3g}]" if ok else "no b0"
        summary.append(
            f"{name}: loss reduced by 10% or more for {len(ok)} of {len(b0s)} b0 values ({span})"
        )
    rows = [[f"{b0:.3g}", *[final[name][i] for name in final]] for i, b0 in enumerate(b0s)]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.2, 3.8))
    for (name, values), marker in zip(final.items(), ("o-", "s--")):
        shown = [v if math.isfinite(v) else np.nan for v in values]
        ax.loglog(b0s, shown, marker, label=name)
    ax.axhline(initial, color="gray", ls=":", label="loss at the start")
    ax.set_xlabel("b0 (initial step 1/b0)")
    ax.set_ylabel(f"loss after {steps} steps")
    ax.legend(fontsize=8)
    return Section(
        title="Optimiser: robustness to the initial step size",
        summary=summary,
        tables=[Table(["b0", *final], rows)],
        figures=[
            Figure(
                figure_png(fig),
                "final loss against b0; missing points diverged (nan or inf)",
            )
        ],
        notes=[
            "AdaGrad-Norm (Ward, Wu & Bottou 2019) divides the step by b_j, with b_j^2 the "
            "running sum of squared gradient norms starting at b0^2, so an initial step 1/b0 "
            "that is far too large is tamed after a few steps and one that is far too small "
            "grows into a useful one; SGD with the fixed step 1/b0 trains only in a narrow "
            "band. Each run trains a copy of the model; the model itself is not changed."
        ],
    )


@register_section("landscape")
def landscape_section(ctx: DiagnoseContext) -> Section:
    """Filter-normalised 1-D and 2-D slices of the loss and the top Hessian eigenvalue."""
    from torch_dlt.probes import (
        plot_contour,
        random_direction,
        slice_1d,
        surface_2d,
        top_hessian_eigenvalue,
    )

    model = ctx.model
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(ctx.seed)
    d1 = random_direction(model, generator=generator)
    d2 = random_direction(model, generator=generator)
    targets = ctx.targets
    if targets is None:
        with torch.no_grad(), restored_mode(model):
            targets = torch.zeros_like(model(ctx.inputs))
    batch = (ctx.inputs, targets)
    line = slice_1d(model, ctx.loss_fn, batch, d1, steps=11 if ctx.quick else 41)
    surface = surface_2d(model, ctx.loss_fn, batch, (d1, d2), steps=7 if ctx.quick else 21)
    eig = top_hessian_eigenvalue(
        model, ctx.loss_fn, batch, iters=10 if ctx.quick else 50, generator=generator
    )
    centre = float(line.losses[len(line.losses) // 2])
    summary = [
        f"loss at the weights {centre:.4g}; along a filter-normalised direction it reaches "
        f"{float(line.losses.min()):.4g} to {float(line.losses.max()):.4g} for alpha in [-1, 1]",
        f"top Hessian eigenvalue (power iteration, {eig.iterations} Hessian-vector products): "
        f"{eig.eigenvalue:.4g}",
    ]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(line.alphas.numpy(), line.losses.numpy(), "-")
    ax1.set_xlabel("alpha (filter-normalised direction)")
    ax1.set_ylabel("loss")
    plot_contour(surface, ax=ax2, filled=True, log=True)
    ax2.plot([0.0], [0.0], "r+", markersize=10)
    ax2.set_xlabel("alpha")
    ax2.set_ylabel("beta")
    fig.tight_layout()
    return Section(
        title="Loss landscape around the weights",
        summary=summary,
        figures=[
            Figure(
                figure_png(fig),
                "left: the loss along one random filter-normalised direction; right: log10 "
                "loss over the plane of two such directions (+ marks the weights)",
            )
        ],
        notes=[
            "Directions are Gaussian, each filter rescaled to the norm of the corresponding "
            "filter of the weights, biases and BatchNorm parameters left out (Li et al. 2018), "
            "so pictures of different models are comparable. Evaluated in eval mode on the "
            "report's batch; the model is restored exactly."
        ],
    )

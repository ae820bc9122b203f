"""The diagnose report's curvature section: the loss Hessian's top eigenvalues, trace and density.

Lanczos eigenvalues, the Hutch++ trace (Meyer et al. 2021) and the stochastic Lanczos quadrature
density (Ubaru, Chen & Saad 2017) with Pennington & Bahri's (2017) index, on the report's batch.
"""

from __future__ import annotations

import warnings

import torch

from torch_dlt.probes._state import restored_mode
from torch_dlt.report._html import Figure, Section, Table, figure_png
from torch_dlt.report.diagnose import DiagnoseContext, register_section


@register_section("curvature")
def curvature_section(ctx: DiagnoseContext) -> Section:
    """Top Hessian eigenvalues, the trace and the spectral density of the loss on the batch."""
    from torch_dlt.probes.hessian import (
        CurvatureConvergenceWarning,
        HessianOperator,
        hessian_index,
        plot_spectral_density,
        spectral_density,
        top_eigenvalues,
        trace,
    )

    model = ctx.model
    title = "Curvature: the loss Hessian's spectrum"
    # About a hundred Hessian-vector products on a slice of the batch: LeNet-5 takes a few
    # seconds at 1 thread (quick) and a 1.3M-parameter, 22-layer MLP about ten (full).
    count = min(len(ctx.inputs), 32 if ctx.quick else 64)
    inputs = ctx.inputs[:count]
    targets = ctx.targets[:count] if ctx.targets is not None else None
    if targets is None:
        with torch.no_grad(), restored_mode(model):
            targets = torch.zeros_like(model(inputs))
    try:
        H = HessianOperator(model, ctx.loss_fn, (inputs, targets))
    except ValueError as exc:
        return Section(title=title, summary=[f"not applicable: {exc}"])
    k, slq_probes, slq_steps, trace_matvecs = (2, 2, 10, 15) if ctx.quick else (3, 2, 30, 45)
    slq_steps = min(slq_steps, H.shape[0])
    k = min(k, H.shape[0])
    device = H.device
    generator = torch.Generator(device if device.type == "cuda" else "cpu").manual_seed(ctx.seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CurvatureConvergenceWarning)
        top = top_eigenvalues(H, k, tol=1e-2, generator=generator)
    tr = trace(H, num_matvecs=trace_matvecs, generator=generator)
    density = spectral_density(
        H, num_probes=slq_probes, lanczos_steps=slq_steps, generator=generator
    )
    index = hessian_index(density)
    values = top.eigenvalues.tolist()
    summary = [
        f"{H.shape[0]} parameters, {count} samples, backend {H.backend!r}: largest Hessian "
        f"eigenvalue {values[0]:.4g}" + ("" if top.converged else " (not converged)"),
        f"trace {tr.estimate:.4g} +- {tr.std_error:.2g} (Hutch++, {tr.num_matvecs} products)"
        + (
            f"; lambda_max / trace = {values[0] / tr.estimate:.3g}"
            if tr.estimate > 2 * tr.std_error
            else ""
        ),
        f"index (fraction of negative eigenvalues, SLQ) {index:.3f}: "
        + ("a minimum-like point" if index < 0.02 else "negative curvature remains"),
    ]
    if caught:
        summary.append(str(caught[0].message))
    rows = [
        [i + 1, value, float(top.residuals[i]), float(top.error_bounds[i])]
        for i, value in enumerate(values)
    ]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.2, 3.8))
    plot_spectral_density(density, ax=ax, label="SLQ density")
    for value in values:
        ax.axvline(value, color="tab:red", ls=":", lw=1)
    ax.axvline(0.0, color="gray", lw=0.8)
    ax.legend(fontsize=8)
    return Section(
        title=title,
        summary=summary,
        tables=[Table(["#", "eigenvalue", "relative residual", "relative error bound"], rows)],
        figures=[
            Figure(
                figure_png(fig),
                "spectral density of the Hessian by stochastic Lanczos quadrature (log scale, "
                "Gaussian-smoothed); dotted: the top eigenvalues by Lanczos",
            )
        ],
        notes=[
            "Exact Hessian-vector products on the batch in eval mode (dropout off, BatchNorm "
            "running statistics); the model, its .grad and the RNG are untouched. Top "
            "eigenvalues by Lanczos with full re-orthogonalisation; trace by Hutch++ (Meyer, "
            "Musco, Musco & Woodruff 2021); density by stochastic Lanczos quadrature (Ubaru, "
            "Chen & Saad 2017), whose index reads the mass below 0 and blurs eigenvalues near "
            "0. Pennington & Bahri (2017) predict the index to vanish as the loss falls below "
            "a critical value set by the ratio of parameters to data."
        ],
    )

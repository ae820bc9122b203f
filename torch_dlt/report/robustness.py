"""The diagnose report's robustness section: DeepFool's rho_adv (Moosavi-Dezfooli et al. 2016),
robust accuracy against the PGD budget (Madry et al. 2018) and the Lipschitz interval
(Gopalakrishnan et al. 2018), with the l2 radius the upper bound certifies (Tsuzuku et al. 2018).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from torch_dlt.probes._state import forked_rng, restored_mode
from torch_dlt.report._html import Figure, Section, Table, figure_png
from torch_dlt.report.diagnose import DiagnoseContext, register_section

_QUICK_EPS = (0.0, 0.02, 0.05, 0.1)
_FULL_EPS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3)


def _not_applicable(reason: str) -> Section:
    return Section(title="Robustness to adversarial perturbations", summary=[reason])


def certified_radius(logits: Tensor, labels: Tensor, lipschitz: float) -> Tensor:
    r"""The l2 radius within which no perturbation can change the prediction, given an upper
    bound L on the l2 Lipschitz constant of the logits (Tsuzuku, Sato & Sugiyama 2018).

    The margin :math:`m = f_y(x) - \max_{j \ne y} f_j(x)` moves by at most
    :math:`|e_y - e_j|_2 L |\delta|_2 = \sqrt{2} L |\delta|_2`, so the prediction holds for
    :math:`|\delta|_2 < m / (\sqrt{2} L)`; misclassified inputs get radius 0.

    Args:
        logits (Tensor[B, K]): the model's outputs.
        labels (Tensor[B]): the classes to keep.
        lipschitz (float): the l2 Lipschitz upper bound of the logits.

    Returns:
        Tensor[B]: certified radii.

    Example:
        >>> certified_radius(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]), 1.0)
        tensor([1.4142, 0.0000])
    """
    true = logits.gather(1, labels[:, None])[:, 0]
    others = logits.clone()
    others.scatter_(1, labels[:, None], -math.inf)
    margin = true - others.amax(dim=1)
    return margin.clamp_min(0.0) / (math.sqrt(2.0) * lipschitz)


@register_section("robustness")
def robustness_section(ctx: DiagnoseContext) -> Section:
    """rho_adv by DeepFool, robust accuracy against the l_inf budget by PGD, the Lipschitz
    interval and the radius it certifies, on a slice of the report's batch."""
    from torch_dlt.robust.attacks import deepfool, pgd
    from torch_dlt.robust.lipschitz import lipschitz_factors, lipschitz_lower_bound

    model = ctx.model
    n = 32 if ctx.quick else 128
    x = ctx.inputs[:n].detach()
    with torch.no_grad(), restored_mode(model), forked_rng(model, x):
        logits = model(x)
    if logits.dim() != 2 or logits.shape[1] < 2:
        return _not_applicable(
            f"not applicable: the model's output has shape {tuple(logits.shape)}, not class "
            "logits [B, K >= 2]"
        )
    predicted = logits.argmax(dim=1)
    targets = ctx.targets
    labelled = (
        targets is not None
        and not targets.is_floating_point()
        and targets.dim() == 1
        and int(targets.min()) >= 0
        and int(targets.max()) < logits.shape[1]
    )
    y = targets[:n] if labelled else predicted
    lo, hi = float(x.min()), float(x.max())
    domain = (0.0, 1.0) if lo >= 0.0 and hi <= 1.0 else None
    scale = 1.0 if domain else hi - lo
    notes = []

    # On the model's own predictions, as Moosavi-Dezfooli et al. do; rho_adv is their Eq. 15
    # over the inputs it fooled.
    df_result = deepfool(model, x, domain=domain)
    fooled = df_result.norms[df_result.success]
    rho_adv = float((fooled / x.flatten(1).norm(dim=1)[df_result.success]).mean())
    median_distance = float(fooled.median()) if fooled.numel() else math.nan
    generator = torch.Generator(x.device).manual_seed(ctx.seed)
    eps_grid = [e * scale for e in (_QUICK_EPS if ctx.quick else _FULL_EPS)]
    steps = 10 if ctx.quick else 40
    robust_acc = []
    for eps in eps_grid:
        if eps == 0.0:
            robust_acc.append(float((predicted == y).float().mean()))
            continue
        result = pgd(model, x, y, eps=eps, steps=steps, domain=domain, generator=generator)
        robust_acc.append(float((~result.success).float().mean()))

    n_lower = 4 if ctx.quick else 16
    lower = lipschitz_lower_bound(
        model, x[:n_lower], steps=3 if ctx.quick else 20, generator=generator
    )
    try:
        factors = lipschitz_factors(
            model,
            tuple(x.shape),
            dense_limit=128 if ctx.quick else 512,
            iterations=300 if ctx.quick else 1000,
            seed=ctx.seed,
        )
        upper = math.prod(f.bound for f in factors)
    except (TypeError, ValueError) as exc:
        factors, upper = [], math.nan
        notes.append(f"no Lipschitz upper bound for this model: {exc}")

    summary = [
        f"DeepFool (l2, overshoot 0.02) on {len(x)} inputs: rho_adv = {rho_adv:.4g} (mean "
        f"|r| / |x| over the {df_result.success_rate:.0%} it fooled; Moosavi-Dezfooli et al. "
        f"report 0.2 for LeNet on MNIST), median |r|_2 = {median_distance:.4g}",
        "PGD l_inf robust accuracy "
        + ", ".join(f"{a:.0%} at eps={e:.3g}" for e, a in zip(eps_grid, robust_acc))
        + ("" if labelled else " (against the model's own predictions: no labels given)"),
    ]
    radius = None
    if factors:
        radius = certified_radius(logits.double(), y, upper)
        correct = predicted == y
        certified = float(radius[correct].median()) if correct.any() else math.nan
        summary.append(
            f"Lipschitz constant (l2) in [{lower:.4g}, {upper:.4g}] (empirical lower, product "
            f"upper bound; ratio {upper / lower:.3g}); on the {int(correct.sum())} inputs "
            f"classified correctly it certifies a median l2 radius of {certified:.3g}, against "
            f"DeepFool's median {median_distance:.3g}"
        )
    else:
        summary.append(f"Lipschitz constant (l2) >= {lower:.4g} (empirical); no upper bound")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(eps_grid, robust_acc, "o-")
    ax1.set_xlabel("l_inf budget eps")
    ax1.set_ylabel("accuracy under PGD")
    ax1.set_ylim(-0.02, 1.02)
    ax1.set_title(f"PGD, {steps} steps")
    distances = df_result.norms.clone()
    distances[~df_result.success] = math.nan
    order = torch.arange(len(x))
    ax2.semilogy(order, distances.sort().values, ".", label="DeepFool |r|_2 (attack found)")
    if radius is not None:
        ax2.semilogy(
            order, radius.sort().values, ".", label="certified m / (sqrt(2) L) (no attack within)"
        )
    ax2.set_xlabel("input (sorted)")
    ax2.set_ylabel("l2 distance")
    ax2.legend(fontsize=8)
    fig.tight_layout()

    tables = [
        Table(["eps (l_inf)", "robust accuracy"], [[e, a] for e, a in zip(eps_grid, robust_acc)])
    ]
    if factors:
        tables.append(
            Table(
                ["layers", "kind", "Lipschitz factor", "in", "out", "how"],
                [
                    [", ".join(f.layers), f.kind, f.bound, f.in_features, f.out_features, f.method]
                    for f in factors
                ],
            )
        )
    notes.append(
        "DeepFool gives an upper bound on each input's distance to the decision boundary, the "
        "Lipschitz radius a lower bound: the true minimal l2 perturbation lies between them. "
        "The upper bound is the product of per-layer operator norms (consecutive linear layers "
        "merged, exact norms of the convolution operators), which Gopalakrishnan et al. (2018) "
        "use to explain why sparsity helps; the lower bound is the largest local Jacobian norm "
        "found by gradient ascent over inputs."
        + ("" if domain else " Inputs are outside [0, 1]: attacks ran unbounded, eps is relative "
           "to the data range.")
    )  # fmt: skip
    return Section(
        title="Robustness to adversarial perturbations",
        summary=summary,
        tables=tables,
        figures=[
            Figure(
                figure_png(fig),
                "left: accuracy under PGD against the l_inf budget; right: per input, the l2 "
                "distance DeepFool needed and the radius certified by the Lipschitz bound",
            )
        ],
        notes=notes,
    )

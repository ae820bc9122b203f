"""The diagnose report's certification section: accuracy certified by IBP and CROWN-IBP (Gowal
et al. 2018; Zhang et al. 2020) against the l_inf budget, beside PGD's (Madry et al. 2018)
empirical robust accuracy, on a slice of the report's batch.
"""

from __future__ import annotations

import torch

from torch_dlt.probes._state import forked_rng, restored_mode
from torch_dlt.report._html import Figure, Section, Table, figure_png
from torch_dlt.report.diagnose import DiagnoseContext, register_section

_TITLE = "Certified robustness (IBP, CROWN-IBP)"
# l_inf radii as fractions of the data range: 1/255 to 0.1 covers the MNIST / CIFAR budgets.
_QUICK_EPS = (0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255, 0.1)
_FULL_EPS = (0.0, 0.5 / 255, 1 / 255, 2 / 255, 4 / 255, 8 / 255, 0.1, 0.2, 0.3)


def _not_applicable(reason: str) -> Section:
    return Section(title=_TITLE, summary=[reason])


@register_section("certification")
def certification_section(ctx: DiagnoseContext) -> Section:
    """Fraction of inputs certified at each l_inf radius, by each bound, and the fraction PGD
    cannot break (an upper limit of what any sound certificate can reach)."""
    from torch_dlt.robust import bounds
    from torch_dlt.robust.attacks import pgd
    from torch_dlt.robust.certified import certify

    model = ctx.model
    n = 64 if ctx.quick else 256
    x = ctx.inputs[:n].detach()
    with torch.no_grad(), restored_mode(model), forked_rng(model, x):
        logits = model(x)
    if logits.dim() != 2 or logits.shape[1] < 2:
        return _not_applicable(
            f"not applicable: the model's output has shape {tuple(logits.shape)}, not class "
            "logits [B, K >= 2]"
        )
    lo, hi = float(x.min()), float(x.max())
    domain = (0.0, 1.0) if lo >= 0.0 and hi <= 1.0 else None
    try:
        with torch.no_grad(), restored_mode(model):
            bounds.interval_bounds(model, x[:1], x[:1], domain=domain)
    except (TypeError, ValueError, NotImplementedError) as exc:
        return _not_applicable(f"not applicable: the bounds do not support this model ({exc})")

    predicted = logits.argmax(dim=1)
    targets = ctx.targets
    labelled = (
        targets is not None
        and not targets.is_floating_point()
        and targets.dim() == 1
        and len(targets) >= len(x)
        and int(targets[: len(x)].min()) >= 0
        and int(targets[: len(x)].max()) < logits.shape[1]
    )
    y = targets[: len(x)].to(predicted.device) if labelled else predicted
    scale = 1.0 if domain else hi - lo
    eps_grid = [e * scale for e in (_QUICK_EPS if ctx.quick else _FULL_EPS)]
    methods = ("ibp", "crown-ibp")
    steps = 10 if ctx.quick else 40
    generator = torch.Generator(x.device).manual_seed(ctx.seed)

    clean = float((predicted == y).float().mean())
    certified = {m: [] for m in methods}
    empirical = []
    with forked_rng(model, x):
        for eps in eps_grid:
            for method in methods:
                if eps > 0.0 and certified[method] and certified[method][-1] == 0.0:
                    # Larger boxes contain smaller ones and their interval bounds only widen,
                    # so once a bound certifies nothing, larger radii are not evaluated.
                    certified[method].append(0.0)
                    continue
                if eps == 0.0 and method != methods[0]:
                    # At eps = 0 every bound is the exact margin: certified = correct.
                    certified[method].append(certified[methods[0]][0])
                    continue
                result = certify(model, x, y, eps, method=method, domain=domain)
                certified[method].append(float(result.verified.float().mean()))
            if eps == 0.0:
                empirical.append(clean)
                continue
            attack = pgd(model, x, y, eps=eps, steps=steps, domain=domain, generator=generator)
            empirical.append(float(((predicted == y) & ~attack.success).float().mean()))
    best = [max(values) for values in zip(*certified.values())]

    last_certified = max((i for i, a in enumerate(best) if a > 0), default=None)
    summary = [
        f"on {len(x)} inputs"
        + ("" if labelled else " (against the model's own predictions: no labels given)")
        + f", clean accuracy {clean:.0%}",
        "certified accuracy (best bound) "
        + ", ".join(f"{a:.0%} at eps={e:.3g}" for e, a in zip(eps_grid, best)),
        "PGD robust accuracy "
        + ", ".join(f"{a:.0%} at eps={e:.3g}" for e, a in zip(eps_grid, empirical)),
    ]
    if last_certified is None:
        summary.append("nothing is certified, not even at eps = 0: no input is classified right")
    elif last_certified == len(eps_grid) - 1:
        summary.append(f"inputs are still certified at the largest radius, eps={eps_grid[-1]:.3g}")
    else:
        gap = empirical[last_certified + 1] - best[last_certified + 1]
        summary.append(
            f"nothing is certified beyond eps={eps_grid[last_certified]:.3g}; at "
            f"eps={eps_grid[last_certified + 1]:.3g} PGD still fails on {gap:.0%} of the inputs: "
            "the gap between what the bounds prove and what attacks find, which certified "
            "training (torch_dlt.robust.CertifiedTraining) narrows."
        )
    flagged = [i for i, (c, e) in enumerate(zip(best, empirical)) if c > e]
    if flagged:
        summary.append(
            "UNSOUND: certified accuracy above PGD's robust accuracy at eps="
            + ", ".join(f"{eps_grid[i]:.3g}" for i in flagged)
        )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot(eps_grid, empirical, "o-", color="k", label=f"PGD ({steps} steps): empirical")
    for method, values in certified.items():
        ax.plot(eps_grid, values, "s--", label=f"certified by {method}")
    ax.set_xlabel("l_inf radius eps" + ("" if domain else " (data range units)"))
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()

    table = Table(
        ["eps (l_inf)", "PGD robust accuracy"] + [f"certified ({m})" for m in methods],
        [
            [e, a] + [certified[m][i] for m in methods]
            for i, (e, a) in enumerate(zip(eps_grid, empirical))
        ],
        flagged_rows=flagged,
    )
    notes = [
        "A sample is certified when the model classifies it right and a lower bound of every "
        "margin logit_y - logit_j over the l_inf ball (clamped to the data domain) is positive: "
        "IBP (Gowal et al. 2018) and CROWN-IBP (Zhang et al. 2020); full CROWN (Zhang et al. "
        "2018), tighter but one backward pass per hidden unit, is "
        "torch_dlt.robust.certify(model, x, y, eps, method='crown'). "
        "A certified sample cannot be broken by any attack, so certified accuracy is at most "
        "PGD's robust accuracy; the region between the curves is undecided. Once a bound "
        "certifies nothing, larger radii are reported as 0 without being evaluated."
    ]
    if domain is None:
        notes.append(
            "Inputs are outside [0, 1]: the box is not clamped; eps is relative to the data range."
        )
    return Section(
        title=_TITLE,
        summary=summary,
        tables=[table],
        figures=[Figure(figure_png(fig), "accuracy certified by each bound and under PGD, by eps")],
        notes=notes,
    )

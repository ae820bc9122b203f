"""Robustness: adversarial attacks, Lipschitz bounds, certified bounds and certified training.

- :mod:`torch_dlt.robust.attacks`: FGSM, PGD, DeepFool (Moosavi-Dezfooli et al. 2016) and the
  spatial attack of Engstrom et al. (2019).
- :mod:`torch_dlt.robust.lipschitz`: upper and empirical lower bounds on a model's Lipschitz
  constant (Gopalakrishnan et al. 2018).
- :mod:`torch_dlt.robust.bounds`: interval (Gowal et al. 2018) and linear-relaxation (CROWN,
  Zhang et al. 2018; Wong & Kolter 2018; alpha-CROWN, Xu et al. 2021) output bounds.
- :mod:`torch_dlt.robust.certified`: certification and certified training.
"""

__all__: list[str] = []

from torch_dlt.robust.certified import (  # noqa: E402
    CertificationResult,
    CertifiedAccuracy,
    CertifiedLoss,
    CertifiedTraining,
    RampSchedule,
    certified_accuracy,
    certify,
    evaluate_certified,
    worst_case_logits,
)

__all__ += [
    "CertificationResult",
    "CertifiedAccuracy",
    "CertifiedLoss",
    "CertifiedTraining",
    "RampSchedule",
    "certified_accuracy",
    "certify",
    "evaluate_certified",
    "worst_case_logits",
]

from torch_dlt.robust.lipschitz import (  # noqa: E402
    LipschitzFactor,
    LipschitzInterval,
    lipschitz_factors,
    lipschitz_interval,
    lipschitz_lower_bound,
    lipschitz_upper_bound,
)

__all__ += [
    "LipschitzFactor",
    "LipschitzInterval",
    "lipschitz_factors",
    "lipschitz_interval",
    "lipschitz_lower_bound",
    "lipschitz_upper_bound",
]

from torch_dlt.robust.bounds import (  # noqa: E402
    Normalize,
    Residual,
    crown_bounds,
    interval_bounds,
    margin_matrix,
)

__all__ += ["Normalize", "Residual", "crown_bounds", "interval_bounds", "margin_matrix"]

from torch_dlt.robust.attacks import (  # noqa: E402
    AttackResult,
    RobustnessResult,
    deepfool,
    fgsm,
    pgd,
    robustness,
    spatial,
    spatial_grid,
)

__all__ += [
    "AttackResult",
    "RobustnessResult",
    "deepfool",
    "fgsm",
    "pgd",
    "robustness",
    "spatial",
    "spatial_grid",
]

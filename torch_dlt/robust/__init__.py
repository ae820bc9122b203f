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

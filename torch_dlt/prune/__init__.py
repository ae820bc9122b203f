"""Sparsifying models and inputs: magnitude pruning on ``torch.nn.utils.prune`` and the
sparsifying front end of Gopalakrishnan et al. (2018)."""

__all__: list[str] = []

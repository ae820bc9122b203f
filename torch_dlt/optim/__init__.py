"""Optimisers and schedules from the theory of SGD (Ward, Wu & Bottou 2019; Johnson & Zhang 2013;
Smith et al. 2018); torch's own SGD, Adagrad and Adam are reused, not rewritten."""

__all__: list = []

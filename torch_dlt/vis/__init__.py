"""Seeing what CNN filters and units do: filter grids, spectral signatures, wavelet-likeness,
activation maximisation (Olah et al. 2017) and top examples."""

__all__: list[str] = []

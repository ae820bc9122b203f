"""Reference models and layers used by the probes, examples and the diagnose report."""

from torch_dlt.nn.models import ACTIVATIONS, DeepCNN, DeepMLP, Erf, LeNet5, activation_layer

__all__ = ["ACTIVATIONS", "DeepCNN", "DeepMLP", "Erf", "LeNet5", "activation_layer"]

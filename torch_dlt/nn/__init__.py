"""Reference models and layers: LeNet-5 and deep nets for the probes and examples, and small
generative models (VAE, denoising autoencoder, DCGAN) with the generator unit probe."""

from torch_dlt.nn.generative import (
    ELBO,
    ConvVAE,
    DCGANDiscriminator,
    DCGANGenerator,
    DenoisingAutoencoder,
    UnitIntervention,
    VAEOutput,
    gan_discriminator_loss,
    gan_generator_loss,
    rank_units,
    train_autoencoder,
    train_gan,
    train_vae,
    unit_intervention,
)
from torch_dlt.nn.models import ACTIVATIONS, DeepCNN, DeepMLP, Erf, LeNet5, activation_layer

__all__ = [
    "ACTIVATIONS",
    "ELBO",
    "ConvVAE",
    "DCGANDiscriminator",
    "DCGANGenerator",
    "DeepCNN",
    "DeepMLP",
    "DenoisingAutoencoder",
    "Erf",
    "LeNet5",
    "UnitIntervention",
    "VAEOutput",
    "activation_layer",
    "gan_discriminator_loss",
    "gan_generator_loss",
    "rank_units",
    "train_autoencoder",
    "train_gan",
    "train_vae",
    "unit_intervention",
]

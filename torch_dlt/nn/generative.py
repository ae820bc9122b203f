"""Small generative models for 28x28 images, short training loops and a generator unit probe.

A VAE (Kingma & Welling 2014), a denoising autoencoder (Vincent et al. 2008), a DCGAN (Goodfellow
et al. 2014; Radford et al. 2016) and the unit ablation / insertion probe of Bau et al. (2020).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch_dlt.probes._state import forked_rng, restored_mode

__all__ = [
    "ELBO",
    "ConvVAE",
    "DCGANDiscriminator",
    "DCGANGenerator",
    "DenoisingAutoencoder",
    "UnitIntervention",
    "VAEOutput",
    "gan_discriminator_loss",
    "gan_generator_loss",
    "rank_units",
    "train_autoencoder",
    "train_gan",
    "train_vae",
    "unit_intervention",
]

_SIDE = 28
_REDUCTIONS = ("mean", "sum", "none")
_NOISES = ("gaussian", "masking")

ImageData = Union[Tensor, Sequence[Tensor], Iterable]
"""Images ``Tensor[N, C, 28, 28]``, a tuple ``(x, y, ...)`` of them, or an iterable of batches."""


def _check_positive_int(value: object, argument: str, owner: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{owner}: {argument} must be a positive int, got {value!r}")


def _check_images(x: object, channels: int, owner: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{owner}: expected a Tensor of images, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1:] != (channels, _SIDE, _SIDE):
        raise ValueError(
            f"{owner}: expected images of shape [B, {channels}, {_SIDE}, {_SIDE}], "
            f"got {tuple(x.shape)}"
        )


def _check_reduction(reduction: object, owner: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{owner}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _reduce(values: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    return values


def _bernoulli_log_likelihood(logits: Tensor, x: Tensor) -> Tensor:
    # log p(x | z) summed over pixels; for grey levels in [0, 1] this is the cross-entropy used
    # for MNIST by Kingma & Welling (2014), not a normalised density.
    return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)


def _conv_encoder(in_channels: int, width: int) -> nn.Sequential:
    # 28 -> 14 -> 7 with stride-2 4x4 convolutions, the DCGAN down-sampling block.
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
    )


def _conv_decoder(in_features: int, out_channels: int, width: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_features, 2 * width * 7 * 7),
        nn.ReLU(),
        nn.Unflatten(1, (2 * width, 7, 7)),
        nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.ConvTranspose2d(width, out_channels, 4, stride=2, padding=1),
    )


class VAEOutput(NamedTuple):
    """What :meth:`ConvVAE.forward` returns.

    Attributes:
        logits (Tensor[B, C, 28, 28]): Bernoulli logits of the reconstruction.
        mu (Tensor[B, latent_dim]): mean of q(z | x).
        logvar (Tensor[B, latent_dim]): log-variance of q(z | x).
    """

    logits: Tensor
    mu: Tensor
    logvar: Tensor


class ELBO(NamedTuple):
    """The evidence lower bound and its two terms (Kingma & Welling 2014, eq. 10).

    Attributes:
        elbo (Tensor): ``reconstruction - kl``; ``[B]`` with ``reduction="none"``, else scalar.
        reconstruction (Tensor): one-sample estimate of E_q[log p(x | z)], in nats.
        kl (Tensor): KL(q(z | x) || N(0, I)) in closed form, in nats.
    """

    elbo: Tensor
    reconstruction: Tensor
    kl: Tensor


class ConvVAE(nn.Module):
    r"""A convolutional variational autoencoder for 28x28 images (Kingma & Welling 2014).

    Encoder ``conv 4x4/2 -> ReLU -> conv 4x4/2 -> ReLU -> linear`` gives the mean and
    log-variance of a diagonal Gaussian q(z | x); the decoder mirrors it with transposed
    convolutions and returns Bernoulli logits per pixel (p(x | z) = Bernoulli(sigmoid(logits)),
    the paper's MNIST likelihood; grey levels in [0, 1] enter the cross-entropy as they are).
    The prior is N(0, I).

    Args:
        latent_dim (int): size of z.
        in_channels (int): channels of the images.
        width (int): channels of the first convolution (the second has twice as many).

    Shape:
        - Input: ``[B, in_channels, 28, 28]`` with values in [0, 1]
        - Output: :class:`VAEOutput` of logits ``[B, in_channels, 28, 28]``, mu and logvar
          ``[B, latent_dim]``

    Example:
        >>> vae = ConvVAE(latent_dim=4, width=8)
        >>> out = vae(torch.rand(2, 1, 28, 28), generator=torch.Generator().manual_seed(0))
        >>> out.logits.shape, out.mu.shape
        (torch.Size([2, 1, 28, 28]), torch.Size([2, 4]))
    """

    def __init__(self, latent_dim: int = 16, in_channels: int = 1, *, width: int = 32) -> None:
        super().__init__()
        for value, argument in ((latent_dim, "latent_dim"), (in_channels, "in_channels")):
            _check_positive_int(value, argument, "ConvVAE")
        _check_positive_int(width, "width", "ConvVAE")
        self.latent_dim = latent_dim
        self.in_channels = in_channels
        self.width = width
        self.encoder = _conv_encoder(in_channels, width)
        self.posterior = nn.Linear(2 * width * 7 * 7, 2 * latent_dim)
        self.decoder = _conv_decoder(latent_dim, in_channels, width)

    def extra_repr(self) -> str:
        return f"latent_dim={self.latent_dim}, in_channels={self.in_channels}, width={self.width}"

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log-variance ``(Tensor[B, latent_dim], Tensor[B, latent_dim])`` of q(z | x)."""
        _check_images(x, self.in_channels, "ConvVAE")
        mu, logvar = self.posterior(self.encoder(x)).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: Tensor) -> Tensor:
        """Bernoulli logits ``Tensor[B, C, 28, 28]`` of p(x | z) for z ``[B, latent_dim]``."""
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(
                f"ConvVAE: expected z of shape [B, {self.latent_dim}], got {tuple(z.shape)}"
            )
        return self.decoder(z)

    @staticmethod
    def reparameterize(
        mu: Tensor, logvar: Tensor, *, generator: torch.Generator | None = None
    ) -> Tensor:
        r"""z = mu + exp(logvar / 2) * eps with eps ~ N(0, I) (Kingma & Welling 2014, sec. 2.4).

        Args:
            mu (Tensor[B, D]): means.
            logvar (Tensor[B, D]): log-variances.
            generator (torch.Generator | None): source of eps; the global RNG when ``None``.

        Returns:
            Tensor[B, D]: a sample of N(mu, diag(exp(logvar))), differentiable in mu and logvar.

        Example:
            >>> ConvVAE.reparameterize(torch.ones(2, 3), torch.full((2, 3), -100.0))
            tensor([[1., 1., 1.],
                    [1., 1., 1.]])
        """
        eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
        return mu + torch.exp(0.5 * logvar) * eps

    def forward(self, x: Tensor, *, generator: torch.Generator | None = None) -> VAEOutput:
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar, generator=generator)
        return VAEOutput(self.decode(z), mu, logvar)

    def elbo(
        self, x: Tensor, *, reduction: str = "mean", generator: torch.Generator | None = None
    ) -> ELBO:
        r"""The evidence lower bound of ``x`` with one reparameterised sample of z.

        .. math::
            \mathcal L(x) = \mathbb E_{q(z|x)}[\log p(x|z)] - \tfrac12\sum_j
            (\mu_j^2 + \sigma_j^2 - \log\sigma_j^2 - 1)

        (Kingma & Welling 2014, eq. 10 and appendix B), in nats per image.

        Args:
            x (Tensor[B, C, 28, 28]): images in [0, 1].
            reduction (str): ``"mean"`` or ``"sum"`` over the batch, or ``"none"`` for ``[B]``.
            generator (torch.Generator | None): source of the sample eps (drawn as
                ``torch.randn(mu.shape)``).

        Returns:
            ELBO: ``(elbo, reconstruction, kl)``.

        Example:
            >>> vae = ConvVAE(latent_dim=4, width=8)
            >>> terms = vae.elbo(torch.rand(3, 1, 28, 28), reduction="none")
            >>> terms.elbo.shape, bool((terms.kl >= 0).all())
            (torch.Size([3]), True)
        """
        _check_reduction(reduction, "ConvVAE.elbo")
        logits, mu, logvar = self(x, generator=generator)
        reconstruction = _bernoulli_log_likelihood(logits, x)
        kl = 0.5 * (mu.square() + logvar.exp() - logvar - 1.0).sum(1)
        return ELBO(
            _reduce(reconstruction - kl, reduction),
            _reduce(reconstruction, reduction),
            _reduce(kl, reduction),
        )

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """``n`` images ``Tensor[n, C, 28, 28]``: pixel means sigmoid(decode(z)), z ~ N(0, I).

        Example:
            >>> ConvVAE(latent_dim=4, width=8).sample(5).shape
            torch.Size([5, 1, 28, 28])
        """
        _check_positive_int(n, "n", "ConvVAE.sample")
        weight = self.posterior.weight
        z = torch.randn(
            n, self.latent_dim, generator=generator, dtype=weight.dtype, device=weight.device
        )
        return torch.sigmoid(self.decode(z))


class DenoisingAutoencoder(nn.Module):
    r"""A convolutional denoising autoencoder (Vincent, Larochelle, Bengio & Manzagol 2008).

    It learns to reconstruct the clean image from a corrupted one. Corruption: ``"masking"``
    sets each pixel to 0 independently with probability ``noise_level`` (the paper's masking
    noise); ``"gaussian"`` adds N(0, noise_level^2) per pixel, unclipped. The reconstruction is
    scored by the cross-entropy of the clean image under Bernoulli logits, as in the paper.

    Args:
        noise (str): ``"gaussian"`` or ``"masking"``.
        noise_level (float): standard deviation (gaussian) or masked fraction in [0, 1) (masking).
        in_channels (int): channels of the images.
        width (int): channels of the first convolution.
        code_dim (int): size of the bottleneck code.

    Example:
        >>> dae = DenoisingAutoencoder("masking", 0.25, width=8)
        >>> x = torch.rand(2, 1, 28, 28)
        >>> dae(dae.corrupt(x)).shape
        torch.Size([2, 1, 28, 28])
    """

    def __init__(
        self,
        noise: str = "gaussian",
        noise_level: float = 0.3,
        *,
        in_channels: int = 1,
        width: int = 32,
        code_dim: int = 64,
    ) -> None:
        super().__init__()
        if noise not in _NOISES:
            raise ValueError(f"DenoisingAutoencoder: noise must be one of {_NOISES}, got {noise!r}")
        if not isinstance(noise_level, (int, float)) or isinstance(noise_level, bool):
            raise TypeError(
                f"DenoisingAutoencoder: noise_level must be a float, got {noise_level!r}"
            )
        if noise_level < 0 or (noise == "masking" and noise_level >= 1):
            accepted = "[0, 1)" if noise == "masking" else ">= 0"
            raise ValueError(
                f"DenoisingAutoencoder: noise_level for {noise} noise must be in {accepted}, "
                f"got {noise_level!r}"
            )
        for value, argument in (
            (in_channels, "in_channels"),
            (width, "width"),
            (code_dim, "code_dim"),
        ):
            _check_positive_int(value, argument, "DenoisingAutoencoder")
        self.noise = noise
        self.noise_level = float(noise_level)
        self.in_channels = in_channels
        self.width = width
        self.code_dim = code_dim
        self.encoder = nn.Sequential(
            _conv_encoder(in_channels, width), nn.Linear(2 * width * 7 * 7, code_dim), nn.ReLU()
        )
        self.decoder = _conv_decoder(code_dim, in_channels, width)

    def extra_repr(self) -> str:
        return (
            f"noise={self.noise!r}, noise_level={self.noise_level}, "
            f"in_channels={self.in_channels}, width={self.width}, code_dim={self.code_dim}"
        )

    def corrupt(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A corrupted copy ``Tensor[B, C, 28, 28]`` of ``x`` (the input is not modified).

        Example:
            >>> dae = DenoisingAutoencoder("masking", 0.5, width=8)
            >>> noisy = dae.corrupt(torch.ones(1, 1, 28, 28), torch.Generator().manual_seed(0))
            >>> sorted(noisy.unique().tolist())
            [0.0, 1.0]
        """
        _check_images(x, self.in_channels, "DenoisingAutoencoder")
        if self.noise == "gaussian":
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            return x + self.noise_level * noise
        keep = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        return torch.where(keep < self.noise_level, torch.zeros_like(x), x)

    def forward(self, x: Tensor) -> Tensor:
        """Bernoulli logits ``Tensor[B, C, 28, 28]`` of the clean image given ``x``."""
        _check_images(x, self.in_channels, "DenoisingAutoencoder")
        return self.decoder(self.encoder(x))

    def reconstruction_loss(
        self, x: Tensor, *, reduction: str = "mean", generator: torch.Generator | None = None
    ) -> Tensor:
        """Cross-entropy (nats per image) of clean ``x`` given ``corrupt(x)`` (Vincent et al. 2008).

        Example:
            >>> dae = DenoisingAutoencoder(width=8)
            >>> dae.reconstruction_loss(torch.rand(4, 1, 28, 28), reduction="none").shape
            torch.Size([4])
        """
        _check_reduction(reduction, "DenoisingAutoencoder.reconstruction_loss")
        logits = self(self.corrupt(x, generator))
        return _reduce(-_bernoulli_log_likelihood(logits, x), reduction)


class DCGANGenerator(nn.Module):
    r"""The DCGAN generator (Radford, Metz & Chintala 2016) scaled to 28x28 images.

    ``z [B, latent_dim] -> convT 7x7 -> 7x7 -> BN -> ReLU -> convT 4x4/2 -> 14x14 -> BN -> ReLU
    -> convT 4x4/2 -> 28x28 -> sigmoid``; the sigmoid (instead of the paper's tanh) puts the
    images in [0, 1] like :func:`torch_dlt.data.digits`. Its children are named ``project``,
    ``bn1``, ``relu1`` (``2 * width`` units at 7x7), ``up1``, ``bn2``, ``relu2`` (``width`` units
    at 14x14), ``up2``, ``output``: the layer names :func:`unit_intervention` takes.

    Args:
        latent_dim (int): size of z.
        width (int): units of the 14x14 layer (the 7x7 layer has twice as many).
        out_channels (int): channels of the images.

    Example:
        >>> gen = DCGANGenerator(latent_dim=8, width=4)
        >>> gen(torch.randn(3, 8)).shape
        torch.Size([3, 1, 28, 28])
    """

    def __init__(self, latent_dim: int = 64, width: int = 64, *, out_channels: int = 1) -> None:
        super().__init__()
        for value, argument in (
            (latent_dim, "latent_dim"),
            (width, "width"),
            (out_channels, "out_channels"),
        ):
            _check_positive_int(value, argument, "DCGANGenerator")
        self.latent_dim = latent_dim
        self.width = width
        self.out_channels = out_channels
        # No biases before BatchNorm: its shift makes them redundant (Radford et al. 2016).
        layers = OrderedDict(
            project=nn.ConvTranspose2d(latent_dim, 2 * width, 7, bias=False),
            bn1=nn.BatchNorm2d(2 * width),
            relu1=nn.ReLU(),
            up1=nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1, bias=False),
            bn2=nn.BatchNorm2d(width),
            relu2=nn.ReLU(),
            up2=nn.ConvTranspose2d(width, out_channels, 4, stride=2, padding=1),
            output=nn.Sigmoid(),
        )
        for name, layer in layers.items():
            self.add_module(name, layer)

    def extra_repr(self) -> str:
        return f"latent_dim={self.latent_dim}, width={self.width}, out_channels={self.out_channels}"

    def forward(self, z: Tensor) -> Tensor:
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(
                f"DCGANGenerator: expected z of shape [B, {self.latent_dim}], got {tuple(z.shape)}"
            )
        h = z[:, :, None, None]
        for layer in self.children():
            h = layer(h)
        return h

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """``n`` images ``Tensor[n, C, 28, 28]`` from z ~ N(0, I) (in the current train/eval mode).

        Example:
            >>> DCGANGenerator(latent_dim=8, width=4).eval().sample(2).shape
            torch.Size([2, 1, 28, 28])
        """
        _check_positive_int(n, "n", "DCGANGenerator.sample")
        weight = self.project.weight
        z = torch.randn(
            n, self.latent_dim, generator=generator, dtype=weight.dtype, device=weight.device
        )
        return self(z)


class DCGANDiscriminator(nn.Module):
    r"""The DCGAN discriminator (Radford, Metz & Chintala 2016) for 28x28 images.

    ``conv 4x4/2 -> LeakyReLU(0.2) -> conv 4x4/2 -> BN -> LeakyReLU(0.2) -> linear``, no
    BatchNorm on the input layer as in the paper; returns the logit of "real".

    Args:
        width (int): channels of the first convolution (the second has twice as many).
        in_channels (int): channels of the images.

    Shape:
        - Input: ``[B, in_channels, 28, 28]``
        - Output: ``[B]`` logits

    Example:
        >>> DCGANDiscriminator(width=4)(torch.rand(3, 1, 28, 28)).shape
        torch.Size([3])
    """

    def __init__(self, width: int = 64, *, in_channels: int = 1) -> None:
        super().__init__()
        _check_positive_int(width, "width", "DCGANDiscriminator")
        _check_positive_int(in_channels, "in_channels", "DCGANDiscriminator")
        self.width = width
        self.in_channels = in_channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.LeakyReLU(0.2),
            nn.Flatten(),
        )
        self.logit = nn.Linear(2 * width * 7 * 7, 1)

    def extra_repr(self) -> str:
        return f"width={self.width}, in_channels={self.in_channels}"

    def forward(self, x: Tensor) -> Tensor:
        _check_images(x, self.in_channels, "DCGANDiscriminator")
        return self.logit(self.features(x)).squeeze(1)


def gan_discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    r"""The discriminator's loss -E[log D(x)] - E[log(1 - D(G(z)))] (Goodfellow et al. 2014).

    With D = sigmoid(logit): ``mean(softplus(-real_logits)) + mean(softplus(fake_logits))``.

    Args:
        real_logits (Tensor[B]): discriminator logits on data.
        fake_logits (Tensor[B']): discriminator logits on generated images.

    Example:
        >>> round(gan_discriminator_loss(torch.zeros(2), torch.zeros(3)).item(), 4)  # 2 log 2
        1.3863
    """
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def gan_generator_loss(fake_logits: Tensor) -> Tensor:
    r"""The non-saturating generator loss -E[log D(G(z))] (Goodfellow et al. 2014, sec. 3).

    It has the same fixed point as minimising E[log(1 - D(G(z)))] but strong gradients early,
    when D rejects the samples; ``mean(softplus(-fake_logits))``.

    Example:
        >>> round(gan_generator_loss(torch.zeros(4)).item(), 4)  # log 2
        0.6931
    """
    return F.softplus(-fake_logits).mean()


def _images_of(data: ImageData) -> Tensor | None:
    if isinstance(data, Tensor):
        return data
    if isinstance(data, (tuple, list)) and data and isinstance(data[0], Tensor):
        return data[0]
    return None


def _batches(
    data: ImageData, batch_size: int, generator: torch.Generator, owner: str
) -> Iterator[Tensor]:
    """Endless image batches: a tensor is reshuffled every epoch from ``generator``."""
    images = _images_of(data)
    if images is not None:
        if images.dim() != 4 or images.shape[-2:] != (_SIDE, _SIDE) or len(images) == 0:
            raise ValueError(
                f"{owner}: expected data of shape [N, C, {_SIDE}, {_SIDE}], "
                f"got {tuple(images.shape)}"
            )
        while True:
            order = torch.randperm(len(images), generator=generator)
            for start in range(0, len(order), batch_size):
                yield images[order[start : start + batch_size]]
    while True:
        empty = True
        for batch in data:
            empty = False
            yield batch[0] if isinstance(batch, (tuple, list)) else batch
        if empty:
            raise ValueError(f"{owner}: data yielded no batches")


def _progress(steps: int, description: str, progress: bool):
    from tqdm.auto import trange

    return trange(steps, desc=description, disable=not progress, leave=False)


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    parameter = next(model.parameters())
    return parameter.device, parameter.dtype


def train_vae(
    model: ConvVAE,
    data: ImageData,
    *,
    steps: int = 500,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, list[float]]:
    """Maximise the ELBO of ``model`` on ``data`` with Adam for ``steps`` steps (in place).

    Batches and the reparameterisation noise come from a generator seeded with ``seed``, so a
    run is reproducible and leaves the global RNG alone.

    Args:
        model (ConvVAE): the VAE, trained in place.
        data: images ``Tensor[N, C, 28, 28]`` in [0, 1], a tuple ``(x, y)``, or an iterable of
            such batches (e.g. :func:`torch_dlt.data.data_loader`).
        steps (int): optimiser steps.
        batch_size (int): images per step (for tensor data).
        lr (float): Adam's learning rate.
        seed (int): seed of the batches and of eps.
        progress (bool): show a tqdm bar.

    Returns:
        dict[str, list[float]]: per step ``"loss"`` (-ELBO), ``"reconstruction"``, ``"kl"``
        (nats per image).

    Example:
        >>> vae = ConvVAE(latent_dim=2, width=4)
        >>> history = train_vae(vae, torch.rand(8, 1, 28, 28), steps=2, progress=False)
        >>> len(history["loss"])
        2
    """
    _check_positive_int(steps, "steps", "train_vae")
    _check_positive_int(batch_size, "batch_size", "train_vae")
    generator = torch.Generator().manual_seed(seed)
    device, dtype = _device_dtype(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    batches = _batches(data, batch_size, generator, "train_vae")
    history: dict[str, list[float]] = {"loss": [], "reconstruction": [], "kl": []}
    model.train()
    bar = _progress(steps, "train_vae", progress)
    # eps is drawn on the model's device; on the CPU the batches' generator serves for both.
    noise = generator if device.type == "cpu" else torch.Generator(device).manual_seed(seed)
    for _ in bar:
        x = next(batches).to(device, dtype)
        elbo, reconstruction, kl = model.elbo(x, reduction="mean", generator=noise)
        loss = -elbo
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history["loss"].append(loss.item())
        history["reconstruction"].append(reconstruction.item())
        history["kl"].append(kl.item())
        bar.set_postfix(loss=f"{loss.item():.1f}")
    return history


def train_autoencoder(
    model: DenoisingAutoencoder,
    data: ImageData,
    *,
    steps: int = 500,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, list[float]]:
    """Train a :class:`DenoisingAutoencoder` to undo its corruption, with Adam (in place).

    Args:
        model (DenoisingAutoencoder): trained in place.
        data: as in :func:`train_vae`.
        steps (int): optimiser steps.
        batch_size (int): images per step (for tensor data).
        lr (float): Adam's learning rate.
        seed (int): seed of the batches and the corruption.
        progress (bool): show a tqdm bar.

    Returns:
        dict[str, list[float]]: ``"loss"``, the reconstruction cross-entropy per image per step.

    Example:
        >>> dae = DenoisingAutoencoder(width=4, code_dim=4)
        >>> len(train_autoencoder(dae, torch.rand(8, 1, 28, 28), steps=2, progress=False)["loss"])
        2
    """
    _check_positive_int(steps, "steps", "train_autoencoder")
    _check_positive_int(batch_size, "batch_size", "train_autoencoder")
    generator = torch.Generator().manual_seed(seed)
    device, dtype = _device_dtype(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    batches = _batches(data, batch_size, generator, "train_autoencoder")
    history: dict[str, list[float]] = {"loss": []}
    model.train()
    bar = _progress(steps, "train_autoencoder", progress)
    for _ in bar:
        x = next(batches).to(device, dtype)
        noisy = model.corrupt(x.cpu(), generator).to(device)
        loss = -_bernoulli_log_likelihood(model(noisy), x).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history["loss"].append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.1f}")
    return history


def train_gan(
    generator: DCGANGenerator,
    discriminator: nn.Module,
    data: ImageData,
    *,
    steps: int = 1000,
    batch_size: int = 64,
    lr: float = 2e-4,
    betas: tuple[float, float] = (0.5, 0.999),
    seed: int = 0,
    progress: bool = True,
) -> dict[str, list[float]]:
    """Alternate one discriminator and one generator step per batch (Goodfellow et al. 2014).

    The discriminator minimises :func:`gan_discriminator_loss`, the generator the
    non-saturating :func:`gan_generator_loss`; Adam with the DCGAN settings (lr 2e-4,
    beta1 0.5; Radford et al. 2016).

    Args:
        generator (nn.Module): maps z ``[B, generator.latent_dim]`` to images; trained in place.
        discriminator (nn.Module): maps images to logits ``[B]``; trained in place.
        data: as in :func:`train_vae`.
        steps (int): generator steps (each after one discriminator step).
        batch_size (int): images and latents per step.
        lr (float): Adam's learning rate of both.
        betas (tuple[float, float]): Adam's betas.
        seed (int): seed of the batches and the latents.
        progress (bool): show a tqdm bar.

    Returns:
        dict[str, list[float]]: ``"discriminator"`` and ``"generator"`` losses per step.

    Example:
        >>> gen, disc = DCGANGenerator(latent_dim=4, width=4), DCGANDiscriminator(width=4)
        >>> history = train_gan(gen, disc, torch.rand(8, 1, 28, 28), steps=2, progress=False)
        >>> len(history["generator"])
        2
    """
    _check_positive_int(steps, "steps", "train_gan")
    _check_positive_int(batch_size, "batch_size", "train_gan")
    latent_dim = getattr(generator, "latent_dim", None)
    if not isinstance(latent_dim, int):
        raise TypeError("train_gan: generator must have an int attribute latent_dim")
    rng = torch.Generator().manual_seed(seed)
    device, dtype = _device_dtype(generator)
    opt_g = torch.optim.Adam(generator.parameters(), lr=lr, betas=betas)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=lr, betas=betas)
    batches = _batches(data, batch_size, rng, "train_gan")
    history: dict[str, list[float]] = {"discriminator": [], "generator": []}
    generator.train()
    discriminator.train()
    bar = _progress(steps, "train_gan", progress)
    for _ in bar:
        real = next(batches).to(device, dtype)
        z = torch.randn(len(real), latent_dim, generator=rng, dtype=dtype).to(device)
        fake = generator(z)
        d_loss = gan_discriminator_loss(discriminator(real), discriminator(fake.detach()))
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        g_loss = gan_generator_loss(discriminator(fake))
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        history["discriminator"].append(d_loss.item())
        history["generator"].append(g_loss.item())
        bar.set_postfix(d=f"{d_loss.item():.2f}", g=f"{g_loss.item():.2f}")
    return history


@dataclass
class UnitIntervention:
    """What switching generator units off or on did to the classes of its images (Bau et al. 2020).

    Attributes:
        layer (str): the intervened layer.
        channels (tuple[int, ...]): the intervened units (channels).
        mode (str): ``"ablate"`` or ``"force"``.
        value (Tensor[K] | None): the activation each unit was forced to (``None`` when ablated).
        hist_before (Tensor[num_classes]): class frequencies of the unedited images (sum 1).
        hist_after (Tensor[num_classes]): class frequencies after the intervention (sum 1).
        delta (Tensor[num_classes]): ``hist_after - hist_before``.
        labels_before (Tensor[n_samples]): predicted class of each unedited image.
        labels_after (Tensor[n_samples]): predicted class of the edited image from the same z.
        images_before (Tensor[n_samples, C, H, W]): the unedited images.
        images_after (Tensor[n_samples, C, H, W]): the edited images.
    """

    layer: str
    channels: tuple
    mode: str
    value: Tensor | None
    hist_before: Tensor
    hist_after: Tensor
    delta: Tensor
    labels_before: Tensor
    labels_after: Tensor
    images_before: Tensor
    images_after: Tensor

    @property
    def flip_rate(self) -> float:
        """Fraction of paired images whose predicted class changed."""
        return (self.labels_before != self.labels_after).double().mean().item()


def _named_layer(model: nn.Module, layer: str, owner: str) -> nn.Module:
    modules = dict(model.named_modules())
    if not isinstance(layer, str) or layer not in modules or layer == "":
        names = [name for name in modules if name]
        raise ValueError(f"{owner}: unknown layer {layer!r}; the model's layers are {names}")
    return modules[layer]


def _check_channels(channels: object, units: int, layer: str, owner: str) -> tuple:
    chosen = (channels,) if isinstance(channels, int) else tuple(channels)
    if not chosen or not all(isinstance(c, int) and not isinstance(c, bool) for c in chosen):
        raise TypeError(f"{owner}: channels must be an int or a non-empty sequence of ints")
    bad = [c for c in chosen if not 0 <= c < units]
    if bad:
        raise ValueError(
            f"{owner}: channels {bad} out of range for layer {layer!r} with {units} channels "
            f"(accepted: 0..{units - 1})"
        )
    return chosen


def _latents(
    model: nn.Module,
    z: Tensor | None,
    n_samples: int,
    generator: torch.Generator | None,
    owner: str,
) -> Tensor:
    if z is not None:
        return z
    _check_positive_int(n_samples, "n_samples", owner)
    latent_dim = getattr(model, "latent_dim", None)
    if not isinstance(latent_dim, int):
        raise TypeError(f"{owner}: pass z=, or give the model an int attribute latent_dim")
    rng = generator if generator is not None else torch.Generator().manual_seed(0)
    parameter = next(model.parameters(), None)
    dtype = parameter.dtype if parameter is not None else torch.get_default_dtype()
    z = torch.randn(n_samples, latent_dim, generator=rng, device=rng.device, dtype=dtype)
    return z if parameter is None else z.to(parameter.device)


def _run(
    model: nn.Module,
    module: nn.Module,
    z: Tensor,
    edit: Callable[[Tensor], Tensor] | None,
    batch_size: int,
) -> tuple[Tensor, Tensor]:
    """Images and the layer's (unedited) output for every z, with ``edit`` applied in the hook."""
    seen: list[Tensor] = []

    def hook(_module: nn.Module, _inputs: tuple, output: Tensor) -> Tensor | None:
        if not isinstance(output, Tensor) or output.dim() < 2:
            raise ValueError("unit_intervention: the layer must output a Tensor [B, C, ...]")
        seen.append(output.detach())
        return None if edit is None else edit(output)

    handle = module.register_forward_hook(hook)
    try:
        images = torch.cat([model(chunk) for chunk in z.split(batch_size)])
    finally:
        handle.remove()
    return images, torch.cat(seen)


def _classify(classifier: Callable[[Tensor], Tensor], images: Tensor) -> tuple[Tensor, Tensor]:
    with restored_mode(classifier):
        logits = classifier(images)
    if not isinstance(logits, Tensor) or logits.dim() != 2 or len(logits) != len(images):
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(
            f"unit_intervention: classifier must map images {tuple(images.shape)} to logits "
            f"[{len(images)}, num_classes], got {shape}"
        )
    labels = logits.argmax(1)
    hist = torch.bincount(labels, minlength=logits.shape[1]).double() / len(labels)
    return labels, hist


def unit_intervention(
    model: nn.Module,
    layer: str,
    channels: int | Sequence[int],
    *,
    classifier: Callable[[Tensor], Tensor],
    mode: str = "ablate",
    value: float | Tensor | None = None,
    quantile: float = 0.99,
    n_samples: int = 500,
    z: Tensor | None = None,
    generator: torch.Generator | None = None,
    batch_size: int = 256,
) -> UnitIntervention:
    r"""Switch units of a generator layer off or on and count how the generated classes change.

    Bau, Zhu, Strobelt, Lapedriza, Zhou & Torralba (2020), "Understanding the role of
    individual units in a deep neural network": a unit (channel) of a GAN generator causes a
    concept when zeroing it ("ablate") removes the concept from the images and setting it high
    ("force", their insertion) adds it. Here the concept is the class a ``classifier`` sees.
    Both conditions use the same latents z (paired), in eval mode, without gradients; the
    model's parameters, modes, buffers and the global RNG are unchanged afterwards and the
    hook is removed even if something raises.

    Args:
        model (nn.Module): the generator, ``z [B, latent_dim] -> images``.
        layer (str): name of the intervened submodule (``dict(model.named_modules())``), whose
            output is ``[B, C, ...]``, e.g. ``"relu1"`` of :class:`DCGANGenerator`.
        channels (int | Sequence[int]): the units, in ``0..C-1``.
        classifier (Callable): images ``[B, C, H, W] -> logits [B, num_classes]`` (run in eval
            mode if it is a Module).
        mode (str): ``"ablate"`` (set to 0) or ``"force"`` (set the whole map to ``value``).
        value (float | Tensor[K] | None): forced activation per unit; ``None`` takes each unit's
            ``quantile`` over all its activations in the unedited run.
        quantile (float): in (0, 1], the quantile used when ``value`` is ``None``.
        n_samples (int): number of latents when ``z`` is not given.
        z (Tensor[n, latent_dim] | None): the latents; drawn N(0, I) from ``generator`` if None.
        generator (torch.Generator | None): source of z; a generator seeded with 0 when None.
        batch_size (int): latents per forward pass.

    Returns:
        UnitIntervention: histograms before and after, their difference, the paired labels
        and images.

    Example:
        >>> gen = DCGANGenerator(latent_dim=8, width=4)
        >>> classifier = lambda images: images.flatten(1)[:, :3]  # a toy 3-class "classifier"
        >>> result = unit_intervention(gen, "relu1", [0, 1], classifier=classifier, n_samples=20)
        >>> result.hist_before.shape, round(result.hist_after.sum().item(), 6)
        (torch.Size([3]), 1.0)
    """
    owner = "unit_intervention"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{owner}: model must be an nn.Module, got {type(model).__name__}")
    if mode not in ("ablate", "force"):
        raise ValueError(f"{owner}: mode must be 'ablate' or 'force', got {mode!r}")
    if not (isinstance(quantile, (int, float)) and 0 < quantile <= 1):
        raise ValueError(f"{owner}: quantile must be in (0, 1], got {quantile!r}")
    _check_positive_int(batch_size, "batch_size", owner)
    module = _named_layer(model, layer, owner)
    with forked_rng(model), torch.no_grad(), restored_mode(model):
        latents = _latents(model, z, n_samples, generator, owner)
        images_before, activations = _run(model, module, latents, None, batch_size)
        chosen = _check_channels(channels, activations.shape[1], layer, owner)
        index = torch.tensor(chosen, device=activations.device)
        forced = None
        if mode == "force":
            if value is None:
                per_unit = activations.index_select(1, index).transpose(0, 1).flatten(1)
                forced = torch.quantile(per_unit.double(), quantile, dim=1).to(activations.dtype)
            else:
                forced = torch.as_tensor(value, dtype=activations.dtype, device=index.device)
                if forced.numel() not in (1, len(chosen)):
                    raise ValueError(
                        f"{owner}: value must be a number or hold one value per channel "
                        f"({len(chosen)}), got shape {tuple(forced.shape)}"
                    )
                forced = forced.reshape(-1).expand(len(chosen)).clone()

        def edit(output: Tensor) -> Tensor:
            edited = output.clone()
            shape = (1, len(chosen)) + (1,) * (output.dim() - 2)
            edited[:, index] = 0.0 if forced is None else forced.view(shape).to(output.dtype)
            return edited

        images_after, _ = _run(model, module, latents, edit, batch_size)
        labels_before, hist_before = _classify(classifier, images_before)
        labels_after, hist_after = _classify(classifier, images_after)
    return UnitIntervention(
        layer=layer,
        channels=chosen,
        mode=mode,
        value=forced,
        hist_before=hist_before,
        hist_after=hist_after,
        delta=hist_after - hist_before,
        labels_before=labels_before,
        labels_after=labels_after,
        images_before=images_before,
        images_after=images_after,
    )


def rank_units(
    model: nn.Module,
    layer: str,
    *,
    classifier: Callable[[Tensor], Tensor],
    target_class: int,
    n_samples: int = 500,
    z: Tensor | None = None,
    generator: torch.Generator | None = None,
    batch_size: int = 256,
) -> Tensor:
    """How much ablating each unit of ``layer`` alone changes the frequency of ``target_class``.

    Bau et al. (2020) rank a generator's units by their causal effect on a concept; here the
    effect is ``hist_after[target_class] - hist_before[target_class]`` of
    :func:`unit_intervention`, with the same z for every unit. The most negative score is the
    unit the class depends on most.

    Args:
        model, layer, classifier, n_samples, z, generator, batch_size: as in
            :func:`unit_intervention`.
        target_class (int): the class whose frequency is scored.

    Returns:
        Tensor[C]: one score per unit of ``layer``, float64.

    Example:
        >>> gen = DCGANGenerator(latent_dim=8, width=2)
        >>> scores = rank_units(gen, "relu1", classifier=lambda x: x.flatten(1)[:, :3],
        ...                     target_class=0, n_samples=10)
        >>> scores.shape
        torch.Size([4])
    """
    owner = "rank_units"
    if not isinstance(target_class, int) or isinstance(target_class, bool) or target_class < 0:
        raise ValueError(f"{owner}: target_class must be a non-negative int, got {target_class!r}")
    module = _named_layer(model, layer, owner)
    with forked_rng(model), torch.no_grad(), restored_mode(model):
        latents = _latents(model, z, n_samples, generator, owner)
        probe = latents[:1]
        units = _run(model, module, probe, None, batch_size)[1].shape[1]
    scores = torch.empty(units, dtype=torch.float64)
    for unit in range(units):
        result = unit_intervention(
            model, layer, unit, classifier=classifier, z=latents, batch_size=batch_size
        )
        if target_class >= len(result.delta):
            raise ValueError(
                f"{owner}: target_class {target_class} out of range for a classifier with "
                f"{len(result.delta)} classes"
            )
        scores[unit] = result.delta[target_class]
    return scores

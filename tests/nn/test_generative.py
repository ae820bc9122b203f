"""Tests of torch_dlt/nn/generative.py: VAE, denoising autoencoder, DCGAN, training, unit probe."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.distributions import Normal, kl_divergence

from torch_dlt.data import digits
from torch_dlt.nn import (
    ConvVAE,
    DCGANDiscriminator,
    DCGANGenerator,
    DenoisingAutoencoder,
    gan_discriminator_loss,
    gan_generator_loss,
    rank_units,
    train_autoencoder,
    train_gan,
    train_vae,
    unit_intervention,
)
from torch_dlt.testing import ModelSnapshot, randn, seeded


def built(make, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make().double()


def images(n, seed=0):
    return torch.rand(n, 1, 28, 28, generator=seeded(seed), dtype=torch.float64)


@pytest.fixture(scope="module")
def digits28():
    x, _ = digits(size=28, dtype=torch.float64)
    return x


# ---------------------------------------------------------------------------------------- VAE


def test_vae_shapes():
    vae = built(lambda: ConvVAE(latent_dim=5, width=4))
    x = images(3)
    mu, logvar = vae.encode(x)
    assert mu.shape == logvar.shape == (3, 5)
    assert vae.decode(mu).shape == (3, 1, 28, 28)
    out = vae(x, generator=seeded(1))
    assert out.logits.shape == (3, 1, 28, 28)
    samples = vae.sample(7, generator=seeded(2))
    assert samples.shape == (7, 1, 28, 28)
    assert 0 <= samples.min() and samples.max() <= 1
    assert ConvVAE(latent_dim=3, in_channels=2, width=4).sample(2).shape == (2, 2, 28, 28)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_vae_elbo_terms_match_hand_computation(reduction):
    vae = built(lambda: ConvVAE(latent_dim=6, width=4))
    x = images(4, seed=3)
    terms = vae.elbo(x, reduction=reduction, generator=seeded(7))

    mu, logvar = vae.encode(x)
    std = torch.exp(0.5 * logvar)
    eps = torch.randn(mu.shape, generator=seeded(7), dtype=mu.dtype)
    p = torch.sigmoid(vae.decode(mu + std * eps))
    log_lik = torch.stack(
        [(x[b] * torch.log(p[b]) + (1 - x[b]) * torch.log(1 - p[b])).sum() for b in range(4)]
    )
    kl = kl_divergence(Normal(mu, std), Normal(torch.zeros_like(mu), torch.ones_like(mu))).sum(1)
    reduce = {"none": lambda t: t, "mean": torch.mean, "sum": torch.sum}[reduction]
    torch.testing.assert_close(terms.reconstruction, reduce(log_lik))
    torch.testing.assert_close(terms.kl, reduce(kl))
    torch.testing.assert_close(terms.elbo, reduce(log_lik - kl))


def test_reparameterisation_mean_and_variance_by_monte_carlo():
    n = 200_000
    mu = torch.tensor([[-1.0, 0.5, 2.0]], dtype=torch.float64)
    logvar = torch.tensor([[0.0, -2.0, 1.0]], dtype=torch.float64)
    z = ConvVAE.reparameterize(mu.expand(n, 3), logvar.expand(n, 3), generator=seeded(0))
    var = logvar.exp().squeeze(0)
    # Standard errors of the sample mean (sigma / sqrt n) and variance (sigma^2 sqrt(2 / n)).
    assert ((z.mean(0) - mu.squeeze(0)).abs() < 5 * (var / n).sqrt()).all()
    assert ((z.var(0) - var).abs() < 5 * var * math.sqrt(2 / n)).all()


def test_vae_bad_input():
    vae = ConvVAE(latent_dim=4, width=4)
    with pytest.raises(ValueError, match=r"expected images of shape \[B, 1, 28, 28\], got"):
        vae.encode(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"expected z of shape \[B, 4\]"):
        vae.decode(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="reduction must be one of"):
        vae.elbo(torch.zeros(1, 1, 28, 28), reduction="avg")
    with pytest.raises(ValueError, match="latent_dim must be a positive int"):
        ConvVAE(latent_dim=0)


# ------------------------------------------------------------------------ denoising autoencoder


def test_masking_noise_fraction_within_sampling_error():
    level = 0.3
    dae = DenoisingAutoencoder("masking", level, width=4)
    x = torch.full((50, 1, 28, 28), 0.7, dtype=torch.float64)
    noisy = dae.corrupt(x, seeded(0))
    n = x.numel()
    masked = (noisy == 0).double().mean().item()
    assert abs(masked - level) < 5 * math.sqrt(level * (1 - level) / n)
    assert ((noisy == 0) | (noisy == x)).all()
    assert (x == 0.7).all()


def test_gaussian_noise_moments_within_sampling_error():
    level = 0.4
    dae = DenoisingAutoencoder("gaussian", level, width=4)
    x = images(50, seed=1)
    diff = dae.corrupt(x, seeded(2)) - x
    n = diff.numel()
    assert abs(diff.mean().item()) < 5 * level / math.sqrt(n)
    assert abs(diff.var().item() - level**2) < 5 * level**2 * math.sqrt(2 / n)


def test_denoising_loss_is_the_cross_entropy_of_the_clean_image():
    dae = built(lambda: DenoisingAutoencoder("masking", 0.5, width=4, code_dim=8))
    x = images(3, seed=4)
    loss = dae.reconstruction_loss(x, reduction="none", generator=seeded(5))
    p = torch.sigmoid(dae(dae.corrupt(x, seeded(5))))
    by_hand = -(x * torch.log(p) + (1 - x) * torch.log(1 - p)).flatten(1).sum(1)
    torch.testing.assert_close(loss, by_hand)


def test_denoising_bad_arguments():
    with pytest.raises(ValueError, match="noise must be one of"):
        DenoisingAutoencoder("salt")
    with pytest.raises(ValueError, match=r"noise_level for masking noise must be in \[0, 1\)"):
        DenoisingAutoencoder("masking", 1.0)
    with pytest.raises(ValueError, match=r"expected images of shape \[B, 1, 28, 28\]"):
        DenoisingAutoencoder(width=4).corrupt(torch.zeros(1, 28, 28))


# -------------------------------------------------------------------------------------- GAN


def test_dcgan_shapes_and_range():
    gen = built(lambda: DCGANGenerator(latent_dim=8, width=4))
    out = gen(randn(5, 8))
    assert out.shape == (5, 1, 28, 28)
    assert 0 <= out.min() and out.max() <= 1
    assert built(lambda: DCGANDiscriminator(width=4))(out).shape == (5,)
    with pytest.raises(ValueError, match=r"expected z of shape \[B, 8\]"):
        gen(randn(5, 7))
    with pytest.raises(ValueError, match=r"expected images of shape \[B, 1, 28, 28\]"):
        DCGANDiscriminator(width=4)(torch.zeros(2, 1, 14, 14))


def test_gan_losses_match_hand_formulas():
    real = [2.0, -0.5, 0.0]
    fake = [-1.0, 3.0]

    def d(logit):
        return 1 / (1 + math.exp(-logit))

    d_loss = -sum(math.log(d(r)) for r in real) / 3 - sum(math.log(1 - d(f)) for f in fake) / 2
    g_loss = -sum(math.log(d(f)) for f in fake) / 2
    real_t, fake_t = (
        torch.tensor(real, dtype=torch.float64),
        torch.tensor(fake, dtype=torch.float64),
    )
    assert gan_discriminator_loss(real_t, fake_t).item() == pytest.approx(d_loss, rel=1e-12)
    assert gan_generator_loss(fake_t).item() == pytest.approx(g_loss, rel=1e-12)


# --------------------------------------------------------------------------------- training


def test_train_vae_reduces_the_loss_on_digits(digits28):
    x = digits28[:256]
    vae = built(lambda: ConvVAE(latent_dim=4, width=4))

    def loss():
        with torch.no_grad():
            return -vae.elbo(x, generator=seeded(9)).elbo.item()

    before = loss()
    history = train_vae(vae, x, steps=25, batch_size=64, lr=3e-3, progress=False)
    assert len(history["loss"]) == 25
    assert loss() < 0.9 * before
    assert history["loss"][0] == pytest.approx(history["kl"][0] - history["reconstruction"][0])


def test_training_is_deterministic_and_leaves_the_global_rng_alone(digits28):
    x = digits28[:64]
    state = torch.get_rng_state()
    runs = []
    for _ in range(2):
        gen = built(lambda: DCGANGenerator(latent_dim=4, width=4))
        disc = built(lambda: DCGANDiscriminator(width=4), seed=1)
        dae = built(lambda: DenoisingAutoencoder("masking", 0.3, width=4, code_dim=4))
        runs.append(
            (
                train_gan(gen, disc, x, steps=3, batch_size=16, seed=5, progress=False),
                train_autoencoder(dae, (x, None), steps=3, batch_size=16, seed=5, progress=False),
            )
        )
    assert runs[0] == runs[1]
    assert len(runs[0][0]["generator"]) == len(runs[0][0]["discriminator"]) == 3
    assert torch.get_rng_state().equal(state)


def test_training_bad_data():
    with pytest.raises(ValueError, match=r"expected data of shape \[N, C, 28, 28\]"):
        train_vae(ConvVAE(width=4), torch.zeros(4, 1, 8, 8), steps=1, progress=False)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        train_vae(ConvVAE(width=4), torch.zeros(4, 1, 28, 28), steps=0, progress=False)


# ------------------------------------------------------------------------------- unit probe


def toy_classifier(x):
    # Three "classes" scored by the mean brightness of three horizontal bands.
    return torch.stack(
        [x[:, 0, :9].mean((1, 2)), x[:, 0, 9:18].mean((1, 2)), x[:, 0, 18:].mean((1, 2))], 1
    )


def manual_forward(gen, z, layer, edit):
    """The generator's layers applied one by one, ``edit`` on ``layer``'s output."""
    h = z[:, :, None, None]
    for name, module in gen.named_children():
        h = module(h)
        if name == layer:
            h = edit(h)
    return h


@pytest.mark.parametrize("layer, channels", [("relu1", list(range(8))), ("bn2", [0, 2])])
def test_ablation_equals_zeroing_the_activation_directly(layer, channels):
    gen = built(lambda: DCGANGenerator(latent_dim=6, width=4)).eval()
    z = randn(40, 6, seed=3)

    def zero(h):
        h = h.clone()
        h[:, channels] = 0
        return h

    result = unit_intervention(gen, layer, channels, classifier=toy_classifier, z=z)
    with torch.no_grad():
        torch.testing.assert_close(result.images_before, gen(z))
        torch.testing.assert_close(result.images_after, manual_forward(gen, z, layer, zero))
        labels = toy_classifier(result.images_after).argmax(1)
    assert result.labels_after.equal(labels)
    counts = [sum(int(label) == k for label in labels) / 40 for k in range(3)]
    torch.testing.assert_close(result.hist_after, torch.tensor(counts, dtype=torch.float64))
    assert result.hist_before.sum().item() == pytest.approx(1.0)
    assert result.delta.sum().item() == pytest.approx(0.0, abs=1e-12)
    torch.testing.assert_close(result.delta, result.hist_after - result.hist_before)


def test_forcing_uses_the_quantile_of_the_unit_activation():
    gen = built(lambda: DCGANGenerator(latent_dim=6, width=4)).eval()
    z = randn(30, 6, seed=4)
    result = unit_intervention(
        gen, "relu2", [1, 3], classifier=toy_classifier, mode="force", quantile=0.9, z=z
    )
    seen = []
    with torch.no_grad():
        manual_forward(gen, z, "relu2", lambda h: seen.append(h) or h)
    values = [torch.quantile(seen[0][:, c].flatten(), 0.9) for c in (1, 3)]
    torch.testing.assert_close(result.value, torch.stack(values))

    def force(h):
        h = h.clone()
        h[:, 1], h[:, 3] = values
        return h

    with torch.no_grad():
        torch.testing.assert_close(result.images_after, manual_forward(gen, z, "relu2", force))
    assert not result.images_after.equal(result.images_before)


def test_probe_leaves_the_generator_unchanged_and_removes_hooks():
    gen = built(lambda: DCGANGenerator(latent_dim=6, width=4)).train()
    snapshot = ModelSnapshot.take(gen)
    result = unit_intervention(
        gen, "relu1", 2, classifier=toy_classifier, n_samples=16, generator=seeded(0)
    )
    assert snapshot.differences(gen) == []
    assert all(not m._forward_hooks for m in gen.modules())
    # Same generator seed -> same paired latents -> same images.
    again = unit_intervention(
        gen, "relu1", 2, classifier=toy_classifier, n_samples=16, generator=seeded(0)
    )
    assert again.images_after.equal(result.images_after)

    def failing(_):
        raise RuntimeError("classifier failed")

    with pytest.raises(RuntimeError, match="classifier failed"):
        unit_intervention(gen, "relu1", 0, classifier=failing, n_samples=4)
    assert all(not m._forward_hooks for m in gen.modules())
    assert snapshot.differences(gen) == []


def test_rank_units_scores_each_single_ablation():
    gen = built(lambda: DCGANGenerator(latent_dim=6, width=2)).eval()
    z = randn(30, 6, seed=5)
    scores = rank_units(gen, "relu1", classifier=toy_classifier, target_class=1, z=z)
    assert scores.shape == (4,)
    for unit in range(4):
        with torch.no_grad():
            before = toy_classifier(gen(z)).argmax(1)

            def zero(h, unit=unit):
                h = h.clone()
                h[:, unit] = 0
                return h

            after = toy_classifier(manual_forward(gen, z, "relu1", zero)).argmax(1)
        expected = ((after == 1).double().mean() - (before == 1).double().mean()).item()
        assert scores[unit].item() == pytest.approx(expected)


def test_probe_bad_input():
    gen = DCGANGenerator(latent_dim=6, width=4)
    snapshot = ModelSnapshot.take(gen)
    with pytest.raises(ValueError, match=r"unknown layer 'relu9'; the model's layers are \["):
        unit_intervention(gen, "relu9", 0, classifier=toy_classifier, n_samples=4)
    with pytest.raises(ValueError, match=r"channels \[8\] out of range for layer 'relu1' with 8"):
        unit_intervention(gen, "relu1", [1, 8], classifier=toy_classifier, n_samples=4)
    with pytest.raises(ValueError, match="mode must be 'ablate' or 'force'"):
        unit_intervention(gen, "relu1", 0, classifier=toy_classifier, mode="boost", n_samples=4)
    with pytest.raises(ValueError, match=r"classifier must map images \(4, 1, 28, 28\) to logits"):
        unit_intervention(gen, "relu1", 0, classifier=lambda x: x.sum(), n_samples=4)
    with pytest.raises(ValueError, match=r"expected z of shape \[B, 6\]"):
        unit_intervention(gen, "relu1", 0, classifier=toy_classifier, z=torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"value must be a number or hold one value per channel"):
        unit_intervention(
            gen, "relu1", [0, 1], classifier=toy_classifier, mode="force", value=[1.0, 2.0, 3.0]
        )
    assert snapshot.differences(gen) == []
    assert all(not m._forward_hooks for m in gen.modules())


def test_forcing_to_a_given_value_sets_the_whole_map():
    gen = built(lambda: DCGANGenerator(latent_dim=6, width=4)).eval()
    z = randn(10, 6, seed=6)
    result = unit_intervention(
        gen, "relu1", [2, 5], classifier=toy_classifier, mode="force", value=3.0, z=z
    )

    def force(h):
        h = h.clone()
        h[:, [2, 5]] = 3.0
        return h

    with torch.no_grad():
        torch.testing.assert_close(result.images_after, manual_forward(gen, z, "relu1", force))


def test_probe_works_on_any_generator_with_a_named_layer():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 4 * 28 * 28)
            self.out = nn.Conv2d(4, 1, 1)

        def forward(self, z):
            return torch.sigmoid(self.out(self.fc(z).view(-1, 4, 28, 28)))

    net = built(Tiny)
    z = randn(10, 3)
    result = unit_intervention(net, "fc", [0], classifier=toy_classifier, z=z)
    with torch.no_grad():
        h = net.fc(z)
        h[:, 0] = 0
        expected = torch.sigmoid(net.out(h.view(-1, 4, 28, 28)))
    torch.testing.assert_close(result.images_after, expected)

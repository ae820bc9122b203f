"""Small generative models on handwritten digits, and which GAN units make which digit.

Trains a VAE (Kingma & Welling 2014), a denoising autoencoder (Vincent et al. 2008) and a DCGAN
(Goodfellow et al. 2014; Radford et al. 2016) on 28x28 digits: MNIST from
``../shared/data/mnist.npz`` when it is there, else scikit-learn's 1797 digits resized to 28x28.
A LeNet-5 trained on the same data labels the GAN's samples; every unit of the generator's 7x7
layer is then ablated in turn (Bau et al. 2020) and the unit whose removal changes the class
histogram most is shown, with the histogram before and after, and after forcing it on.

    python examples/generative.py --quick    # ~1-2 minutes on 2 cores
    python examples/generative.py            # a few minutes
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from torch_dlt.data import digits, mnist  # noqa: E402
from torch_dlt.nn import (  # noqa: E402
    ConvVAE,
    DCGANDiscriminator,
    DCGANGenerator,
    DenoisingAutoencoder,
    LeNet5,
    rank_units,
    train_autoencoder,
    train_gan,
    train_vae,
    unit_intervention,
)

MNIST_PATH = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mnist.npz"
TOP_K = 8
PRESETS = {
    # name: (MNIST images, VAE steps, DAE steps, GAN steps, classifier steps, probe samples)
    "quick": (6000, 300, 300, 600, 300, 300),
    "default": (20000, 1200, 1000, 2500, 800, 1000),
}


def load_data(limit: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    if MNIST_PATH.is_file():
        split = mnist(MNIST_PATH, limit=limit)
        return split.x_train, split.y_train, f"MNIST ({len(split.x_train)} images)"
    x, y = digits(size=28)
    return x, y, "scikit-learn digits at 28x28 (1797 images)"


def train_classifier(x: torch.Tensor, y: torch.Tensor, steps: int, seed: int) -> LeNet5:
    torch.manual_seed(seed)
    net = LeNet5(activation="relu", pooling="max")
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = torch.randint(len(x), (128,), generator=generator)
        loss = F.cross_entropy(net(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval()


def grid(images: torch.Tensor, rows: int) -> np.ndarray:
    """[rows * cols, 1, 28, 28] -> one [rows * 28, cols * 28] picture."""
    cols = len(images) // rows
    tiles = images[: rows * cols, 0].reshape(rows, cols, 28, 28)
    return tiles.permute(0, 2, 1, 3).reshape(rows * 28, cols * 28).detach().numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs (~1-2 minutes)")
    parser.add_argument("--out", default="examples/out/generative.png", help="output PNG")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    limit, vae_steps, dae_steps, gan_steps, clf_steps, n_probe = PRESETS[
        "quick" if args.quick else "default"
    ]
    start = time.time()
    x, y, source = load_data(limit)
    print(f"data: {source}")
    torch.manual_seed(args.seed)

    vae = ConvVAE(latent_dim=16, width=32)
    vae_history = train_vae(vae, x, steps=vae_steps, lr=2e-3, seed=args.seed)
    vae.eval()
    print(f"VAE: -ELBO {vae_history['loss'][0]:.1f} -> {np.mean(vae_history['loss'][-50:]):.1f}")

    dae = DenoisingAutoencoder("masking", 0.5, width=32, code_dim=64)
    dae_history = train_autoencoder(dae, x, steps=dae_steps, lr=2e-3, seed=args.seed)
    dae.eval()
    print(f"DAE: loss {dae_history['loss'][0]:.1f} -> {np.mean(dae_history['loss'][-50:]):.1f}")

    gen, disc = DCGANGenerator(latent_dim=32, width=32), DCGANDiscriminator(width=32)
    gan_history = train_gan(gen, disc, x, steps=gan_steps, seed=args.seed)
    gen.eval()
    print(
        f"GAN: last 50 steps D {np.mean(gan_history['discriminator'][-50:]):.2f}, "
        f"G {np.mean(gan_history['generator'][-50:]):.2f}"
    )

    classifier = train_classifier(x, y, clf_steps, args.seed)
    with torch.no_grad():
        accuracy = (classifier(x[:2000]).argmax(1) == y[:2000]).double().mean().item()
    print(f"LeNet-5 training accuracy {accuracy:.3f}")

    # Rank the units by how much ablating each alone lowers the most frequent generated class;
    # single units are largely redundant, so the top TOP_K units are also ablated together.
    z = torch.randn(n_probe, gen.latent_dim, generator=torch.Generator().manual_seed(1))
    baseline = unit_intervention(gen, "relu1", 0, classifier=classifier, z=z)
    target = int(baseline.hist_before.argmax())
    scores = rank_units(gen, "relu1", classifier=classifier, target_class=target, z=z)
    top = [int(u) for u in scores.argsort()[:TOP_K]]
    unit = top[0]
    ablated = unit_intervention(gen, "relu1", unit, classifier=classifier, z=z)
    ablated_top = unit_intervention(gen, "relu1", top, classifier=classifier, z=z)
    forced = unit_intervention(gen, "relu1", unit, classifier=classifier, z=z, mode="force")
    print(
        f"probe: class {target} is {baseline.hist_before[target]:.2f} of the samples; ablating "
        f"unit {unit} of relu1 changes it by {scores[unit]:+.3f} (flip rate "
        f"{ablated.flip_rate:.2f}), ablating units {top} by {ablated_top.delta[target]:+.3f}; "
        f"forcing unit {unit} on moves {forced.delta.abs().sum() / 2:.2f} of the histogram"
    )

    with torch.no_grad():
        vae_samples = vae.sample(48, generator=torch.Generator().manual_seed(2))
        clean = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(3))[:12]]
        noisy = dae.corrupt(clean, torch.Generator().manual_seed(4))
        denoised = torch.sigmoid(dae(noisy))
        gan_samples = gen.sample(48, generator=torch.Generator().manual_seed(5))

    fig = plt.figure(figsize=(15, 8))
    layout = fig.add_gridspec(3, 3, height_ratios=[1.1, 1.1, 1.0])
    panels = [
        (layout[0, 0], grid(vae_samples, 4), f"VAE samples ({vae_steps} steps)"),
        (
            layout[0, 1],
            grid(torch.cat([noisy.clamp(0, 1), denoised, clean]), 3),
            "denoising AE, 50% masking: noisy / reconstructed / clean",
        ),
        (layout[0, 2], grid(gan_samples, 4), f"DCGAN samples ({gan_steps} steps)"),
        (layout[1, 0], grid(baseline.images_before[:24], 2), "GAN samples (probe latents)"),
        (
            layout[1, 1],
            grid(ablated_top.images_after[:24], 2),
            f"same z, top {TOP_K} units ablated",
        ),
        (layout[1, 2], grid(forced.images_after[:24], 2), f"same z, relu1 unit {unit} forced on"),
    ]
    for spec, picture, title in panels:
        ax = fig.add_subplot(spec)
        ax.imshow(picture, cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(title, fontsize=10)
        ax.axis("off")

    ax = fig.add_subplot(layout[2, 0:2])
    classes = np.arange(len(baseline.hist_before))
    bars = (
        (baseline.hist_before, "before"),
        (ablated.hist_after, f"unit {unit} ablated"),
        (ablated_top.hist_after, f"top {TOP_K} units ablated"),
        (forced.hist_after, f"unit {unit} forced on"),
    )
    for offset, (hist, label) in zip((-0.3, -0.1, 0.1, 0.3), bars):
        ax.bar(classes + offset, hist.numpy(), width=0.2, label=label)
    ax.set_xticks(classes)
    ax.set_xlabel("class predicted by LeNet-5")
    ax.set_ylabel("fraction of generated images")
    ax.set_title(f"Unit probe (Bau et al. 2020) on {n_probe} paired latents")
    ax.legend()

    ax = fig.add_subplot(layout[2, 2])
    ax.bar(np.arange(len(scores)), scores.numpy(), color="tab:gray")
    ax.bar(top, scores[top].numpy(), color="tab:red", label=f"top {TOP_K}")
    ax.legend()
    ax.set_xlabel("unit of relu1 (7x7 layer)")
    ax.set_ylabel(f"change of class {target} frequency")
    ax.set_title("effect of ablating each unit alone")

    fig.suptitle(f"Generative models on {source}", fontsize=12)
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    print(f"wrote {out} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()

"""Figures with matplotlib: each function takes arrays (and an optional ``ax``) and
returns the :class:`~matplotlib.figure.Figure`, so notebooks show it and scripts save it.

Figures are built without ``pyplot``: no GUI backend is needed and nothing global changes.
Pictures of images always show the likelihood's *mean* (``Distribution.mean``), not its
raw parameter: for the continuous Bernoulli the two differ.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .estimators import fixed_noise
from .model import VAE
from .runner.rundir import Run

IMAGE_SHAPE = (28, 28)


def _axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def tile(images, ncols: int, image_shape=IMAGE_SHAPE, pad: int = 1) -> np.ndarray:
    """Lay ``(N, H*W)`` images out in a grid; returns one ``(rows*(H+pad), ...)`` array."""
    images = np.asarray(images, dtype=np.float32).reshape(-1, *image_shape)
    n, (h, w) = len(images), image_shape
    nrows = math.ceil(n / ncols)
    canvas = np.ones((nrows * (h + pad) - pad, ncols * (w + pad) - pad), dtype=np.float32)
    for i, image in enumerate(images):
        r, c = divmod(i, ncols)
        canvas[r * (h + pad) : r * (h + pad) + h, c * (w + pad) : c * (w + pad) + w] = image
    return canvas


def image_grid(images, ncols: int | None = None, title: str | None = None,
               image_shape=IMAGE_SHAPE, ax: Axes | None = None) -> Figure:
    """A grid of gray-scale images with pixel values in [0, 1] (clipped for display)."""
    images = np.clip(np.asarray(images, dtype=np.float32), 0.0, 1.0)
    ncols = ncols or math.ceil(math.sqrt(len(images)))
    nrows = math.ceil(len(images) / ncols)
    fig, ax = _axes(ax, (0.45 * ncols + 0.3, 0.45 * nrows + 0.5))
    ax.imshow(tile(images, ncols, image_shape), cmap="gray", vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def reconstructions(inputs, means, ncols: int = 16, image_shape=IMAGE_SHAPE,
                    ax: Axes | None = None) -> Figure:
    """Inputs (top row of each pair) above their reconstructions (likelihood means)."""
    inputs, means = np.asarray(inputs), np.asarray(means)
    rows = []
    for start in range(0, len(inputs), ncols):
        rows += [inputs[start : start + ncols], means[start : start + ncols]]
    grid = np.concatenate([np.pad(r, ((0, ncols - len(r)), (0, 0)), constant_values=1)
                           for r in rows])
    fig = image_grid(grid, ncols, image_shape=image_shape, ax=ax,
                     title="inputs (odd rows) and reconstructions: mean of p(x | z = E_q[z])")
    return fig


def training_curves(metrics: Sequence[dict], ax: Axes | None = None) -> Figure:
    """Train and test ELBO (nats per image) against epoch, from ``metrics.jsonl`` records."""
    fig, ax = _axes(ax, (5.5, 3.6))
    epochs = [r["epoch"] for r in metrics]
    train = [np.nan if r["train_elbo"] is None else r["train_elbo"] for r in metrics]
    ax.plot(epochs, train, "o-", label="train (average over epoch)")
    ax.plot(epochs, [r["test_elbo"] for r in metrics], "s-", label="test")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("ELBO (nats per image)")
    ax.set_title("Training curves (higher is better)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def pca_2d(z: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """Project ``(N, d)`` points on their first two principal components.

    Returns the ``(N, 2)`` projection and the fraction of variance of each component.
    """
    centred = z - z.mean(0)
    _, s, vt = torch.linalg.svd(centred, full_matrices=False)
    explained = (s**2 / (s**2).sum())[:2].tolist()
    return centred @ vt[:2].T, explained


def latent_scatter(z, labels, ax: Axes | None = None) -> Figure:
    """Posterior means of test images, coloured by label (PCA to 2-D when ``d > 2``)."""
    z = torch.as_tensor(np.asarray(z), dtype=torch.float32)
    labels = np.asarray(labels)
    if z.shape[1] > 2:
        points, explained = pca_2d(z)
        xlabel, ylabel = (f"PC {i + 1} ({100 * e:.0f}% of variance)"
                          for i, e in enumerate(explained))
        title = f"Posterior means E_q[z | x] of test images (PCA of {z.shape[1]}-d z)"
    else:
        points, xlabel, ylabel = z, "z_1", "z_2" if z.shape[1] == 2 else "0"
        if z.shape[1] == 1:
            points = torch.cat([z, torch.zeros_like(z)], 1)
        title = "Posterior means E_q[z | x] of test images"
    fig, ax = _axes(ax, (5.6, 4.8))
    points = points.numpy()
    scatter = ax.scatter(points[:, 0], points[:, 1], c=labels, cmap="tab10", s=6, alpha=0.8,
                         vmin=-0.5, vmax=9.5)
    fig.colorbar(scatter, ax=ax, ticks=range(10), label="label")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    return fig


@torch.no_grad()
def latent_manifold(vae: VAE, n: int = 15, image_shape=IMAGE_SHAPE,
                    ax: Axes | None = None) -> Figure:
    """For a 2-D latent space: decoded means over a grid of prior quantiles 5%..95%."""
    if vae.z_dim != 2:
        raise ValueError(f"the manifold plot needs z_dim = 2, this VAE has {vae.z_dim}")
    device = next(vae.parameters()).device
    q = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, n))
    z1, z2 = torch.meshgrid(q, q.flip(0), indexing="xy")  # z_2 grows upwards
    z = torch.stack([z1.reshape(-1), z2.reshape(-1)], -1).to(device)
    means = vae.decode(z).mean.cpu()
    fig, ax = _axes(ax, (5.2, 5.2))
    h, w = image_shape
    ax.imshow(tile(means.clamp(0, 1), n, image_shape, pad=0), cmap="gray", vmin=0, vmax=1,
              interpolation="nearest", extent=(-0.5, n * w - 0.5, n * h - 0.5, -0.5))
    ticks = [0, n // 2, n - 1]
    ax.set_xticks([t * w + w / 2 for t in ticks], [f"{q[t]:.2f}" for t in ticks])
    ax.set_yticks([t * h + h / 2 for t in ticks], [f"{q.flip(0)[t]:.2f}" for t in ticks])
    ax.set_xlabel("z_1 (prior quantiles 5% to 95%)")
    ax.set_ylabel("z_2")
    ax.set_title("Decoded means over the latent grid", fontsize=10)
    return fig


@torch.no_grad()
def prior_samples(vae: VAE, num_samples: int = 64, seed: int = 0) -> dict[str, Figure]:
    """Images from the prior: the likelihood's means and, where it has them, actual draws."""
    device = next(vae.parameters()).device
    with fixed_noise(seed, device):
        d = vae.sample_prior(num_samples)
        figures = {"samples": image_grid(d.mean.cpu(), title="Prior samples: mean of p(x | z)")}
        try:
            draws = d.sample().cpu()
        except NotImplementedError:  # the relaxed Bernoulli is not a distribution
            return figures
    figures["samples_drawn"] = image_grid(draws, title="Prior samples: draws x ~ p(x | z)")
    return figures


@torch.no_grad()
def run_figures(vae: VAE, test_x: torch.Tensor, test_y: torch.Tensor,
                metrics: Sequence[dict] = (), kinds: Sequence[str] | None = None,
                num_images: int = 2000) -> dict[str, Figure]:
    """All figures of a trained run (or the ``kinds`` named), by file stem."""
    kinds = set(kinds or ("reconstructions", "samples", "curves", "latent", "manifold"))
    figures: dict[str, Figure] = {}
    vae.eval()
    if "reconstructions" in kinds:
        x = test_x[:32]
        figures["reconstructions"] = reconstructions(x.cpu(), vae.reconstruct(x).cpu())
    if "samples" in kinds:
        figures.update(prior_samples(vae))
    if "curves" in kinds and metrics:
        figures["curves"] = training_curves(metrics)
    if "latent" in kinds:
        z = vae.encode(test_x[:num_images]).loc.cpu()
        figures["latent"] = latent_scatter(z, test_y[:num_images].cpu())
    if "manifold" in kinds and vae.z_dim == 2:
        figures["manifold"] = latent_manifold(vae)
    return figures


def figures_for_run(run: Run, kinds: Sequence[str] | None = None) -> dict[str, Figure]:
    """:func:`run_figures` of a :class:`~pyro_vae.runner.rundir.Run` and its own data."""
    return run_figures(run.vae, run.data.test_x, run.data.test_y, run.metrics, kinds)


def save_figures(figures: dict[str, Figure], folder: str | Path, dpi: int = 110) -> list[Path]:
    """Write each figure to ``folder/NAME.png``; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in figures.items():
        path = folder / f"{name}.png"
        fig.savefig(path, dpi=dpi)
        paths.append(path)
    return paths


def labelled_rows(rows: Sequence[tuple[str, object]], ncols: int = 10, title: str | None = None,
                  image_shape=IMAGE_SHAPE) -> Figure:
    """One row of images per ``(label, images)`` pair, the label on the left.

    ``images`` may be ``None`` for a row that has none (drawn empty, label kept).
    """
    fig = Figure(figsize=(0.55 * ncols + 3.4, 0.62 * len(rows) + 0.4), layout="constrained")
    axes = fig.subplots(len(rows), 1, squeeze=False)[:, 0]
    for ax, (label, images) in zip(axes, rows):
        if images is not None:
            images = np.clip(np.asarray(images, dtype=np.float32)[:ncols], 0, 1)
            ax.imshow(tile(images, ncols, image_shape), cmap="gray", vmin=0, vmax=1,
                      interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


# -- Posterior diagnostics -------------------------------------------------------------------


def posterior_pairs(guide_draws, nuts_draws, pairs=((0, 1), (2, 3)), title: str | None = None
                    ) -> Figure:
    """Guide draws against NUTS draws for pairs of latent dimensions of one image.

    ``guide_draws``: ``(draw, latent)``; ``nuts_draws``: ``(chain, draw, latent)``.
    """
    guide_draws = np.asarray(guide_draws)
    nuts = np.asarray(nuts_draws).reshape(-1, guide_draws.shape[-1])
    pairs = [p for p in pairs if max(p) < guide_draws.shape[-1]] or [(0, 0)]
    fig = Figure(figsize=(4.2 * len(pairs), 4.0), layout="constrained")
    for ax, (i, j) in zip(fig.subplots(1, len(pairs), squeeze=False)[0], pairs):
        ax.scatter(nuts[:, i], nuts[:, j], s=4, alpha=0.35, label="NUTS (reference)")
        ax.scatter(guide_draws[:, i], guide_draws[:, j], s=4, alpha=0.35,
                   label="guide q(z | x)")
        ax.set_xlabel(f"z_{i + 1}")
        ax.set_ylabel(f"z_{j + 1}")
        ax.legend(markerscale=3, fontsize=8)
    fig.suptitle(title or "Posterior draws: amortized guide against NUTS", fontsize=10)
    return fig


def forest(guide_draws, nuts_draws, prob: float = 0.94, ax: Axes | None = None) -> Figure:
    """Per latent dimension: mean and central ``prob`` interval, guide against NUTS."""
    guide_draws = np.asarray(guide_draws)
    nuts = np.asarray(nuts_draws).reshape(-1, guide_draws.shape[-1])
    d = guide_draws.shape[-1]
    fig, ax = _axes(ax, (5.5, 0.28 * d + 1.2))
    lo, hi = (1 - prob) / 2, 1 - (1 - prob) / 2
    for offset, draws, name in [(-0.15, nuts, "NUTS"), (0.15, guide_draws, "guide")]:
        y = np.arange(d) + offset
        q = np.quantile(draws, [lo, hi], axis=0)
        ax.hlines(y, q[0], q[1], color="C0" if name == "NUTS" else "C1", label=name)
        ax.plot(draws.mean(0), y, "o", ms=3, color="C0" if name == "NUTS" else "C1")
    ax.set_yticks(np.arange(d), [f"z_{i + 1}" for i in range(d)])
    ax.invert_yaxis()
    ax.set_xlabel(f"value (mean and {100 * prob:.0f}% interval)")
    ax.set_title("Forest plot of one image's posterior", fontsize=10)
    ax.legend(fontsize=8)
    return fig


def khat_per_image(k_hat: Sequence[float], ax: Axes | None = None) -> Figure:
    """Pareto k-hat of the guide's importance weights per image, with the usual thresholds."""
    fig, ax = _axes(ax, (5.5, 3.2))
    ax.bar(np.arange(len(k_hat)), k_hat, color="C2")
    for level, text in [(0.5, "0.5 good"), (0.7, "0.7 unreliable")]:
        ax.axhline(level, ls="--", lw=1, color="gray")
        ax.text(len(k_hat) - 0.5, level, text, ha="right", va="bottom", fontsize=8)
    ax.set_xlabel("image")
    ax.set_ylabel("Pareto k-hat")
    ax.set_title("How well q(z | x) serves as an importance proposal", fontsize=10)
    return fig


def inference_gap_bars(approximation, amortization, ax: Axes | None = None) -> Figure:
    """Stacked per-image bars: approximation gap and amortization gap (nats)."""
    fig, ax = _axes(ax, (5.5, 3.2))
    idx = np.arange(len(approximation))
    ax.bar(idx, approximation, label="approximation gap: log p(x) - ELBO(q*)")
    ax.bar(idx, amortization, bottom=np.maximum(approximation, 0),
           label="amortization gap: ELBO(q*) - ELBO(q)")
    ax.set_xlabel("image")
    ax.set_ylabel("nats")
    ax.set_title("log p(x) - ELBO, decomposed (Cremer et al. 2018)", fontsize=10)
    ax.legend(fontsize=8)
    return fig

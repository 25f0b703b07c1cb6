"""Figures with matplotlib: each function takes arrays (and an optional ``ax``) and
returns the :class:`~matplotlib.figure.Figure`, so notebooks show it and scripts save it.

Figures are built without ``pyplot``: no GUI backend is needed and nothing global changes.
Pictures of images always show the likelihood's *mean* (``Distribution.mean``), not its
raw parameter: for the continuous Bernoulli the two differ.
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .errors import ConfigError
from .estimators import fixed_noise
from .files import write_atomic
from .latents import interpolations, kl_per_dimension, prior_quantiles, traversals
from .model import VAE
from .runner.rundir import Run

IMAGE_SHAPE = (28, 28)
INLINE_DPI = 80  # notebooks: small PNGs that read on a repository page


class InlineFigure(Figure):
    """A matplotlib :class:`~matplotlib.figure.Figure` that shows itself as a PNG in
    Jupyter and VS Code (``_repr_png_``), with no pyplot and no inline backend needed."""

    def _repr_png_(self) -> bytes:
        return png_bytes(self, INLINE_DPI)


def new_figure(figsize: tuple[float, float]) -> InlineFigure:
    return InlineFigure(figsize=figsize, layout="constrained")


def _axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig = new_figure(figsize)
    return fig, fig.add_subplot()


def _title(text: str, width_inches: float) -> str:
    """``text`` wrapped to the width of a figure (10-point characters)."""
    return "\n".join(textwrap.wrap(text, max(16, int(width_inches * 11))))


def _with(title: str, about: str | None) -> str:
    return f"{title} -- {about}" if about else title


def tile(images, ncols: int, image_shape=IMAGE_SHAPE, pad: int = 1) -> np.ndarray:
    """Lay ``(N, H*W)`` images out in a grid; returns one ``(rows*(H+pad), ...)`` array.

    What torchvision's ``make_grid`` does (without its outer border), written out here:
    importing torchvision costs 2.3 s, which every ``plot``, ``sample`` and ``train`` on
    data that needs no torchvision reader would pay for one grid.
    """
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
    width = max(0.45 * ncols + 0.3, 3.0)  # room for a title above one or two images
    if title:
        title = _title(title, width)
    lines = title.count("\n") + 1 if title else 0
    fig, ax = _axes(ax, (width, 0.45 * nrows + 0.3 + 0.2 * lines))
    ax.imshow(tile(images, ncols, image_shape), cmap="gray", vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def reconstructions(inputs, means, ncols: int = 16, image_shape=IMAGE_SHAPE,
                    ax: Axes | None = None, about: str | None = None) -> Figure:
    """Inputs (top row of each pair) above their reconstructions (likelihood means)."""
    inputs, means = np.asarray(inputs), np.asarray(means)
    rows = []
    for start in range(0, len(inputs), ncols):
        rows += [inputs[start : start + ncols], means[start : start + ncols]]
    grid = np.concatenate([np.pad(r, ((0, ncols - len(r)), (0, 0)), constant_values=1)
                           for r in rows])
    fig = image_grid(grid, ncols, image_shape=image_shape, ax=ax,
                     title=_with("inputs (odd rows) and reconstructions: mean of "
                                 "p(x | z = E_q[z])", about))
    return fig


def training_curves(metrics: Sequence[dict], ax: Axes | None = None,
                    about: str | None = None) -> Figure:
    """Train and test ELBO (nats per image) against epoch, from ``metrics.jsonl`` records.

    The first epoch's train ELBO (an average over a model still learning) is often far
    below the rest; the y-axis is then scaled to the later epochs and the first point is
    marked off the scale instead of squashing every other one.
    """
    fig, ax = _axes(ax, (5.5, 3.6))
    epochs = np.array([r["epoch"] for r in metrics])
    def column(key):
        return np.array([np.nan if r.get(key) is None else r[key] for r in metrics], dtype=float)

    # an epoch that optimized the IWAE bound or a KL-weighted ELBO records train_objective
    weighted = any("train_objective" in r for r in metrics)
    train = column("train_objective" if weighted else "train_elbo")
    test = column("test_elbo")
    ax.plot(epochs, train, "o-", label="train objective (average over epoch)" if weighted
            else "train (average over epoch)")
    ax.plot(epochs, test, "s-", label="test ELBO")
    if any("test_iwae" in r for r in metrics):
        ax.plot(epochs, column("test_iwae"), "^-", label="test IWAE bound")
    later = np.concatenate([train[1:], test[1:]])
    later = later[np.isfinite(later)]
    if len(later) >= 2:
        lo, hi = later.min(), later.max()
        margin = 0.1 * (hi - lo) or 1.0
        first = np.nanmin([train[0], test[0]]) if np.isfinite([train[0], test[0]]).any() \
            else np.nan
        if np.isfinite(first) and first < lo - 3 * margin:
            ax.set_ylim(lo - margin, hi + margin)
            ax.annotate(f"epoch {epochs[0]}: {first:.1f} (off scale)", (epochs[0], lo - margin),
                        xytext=(4, 6), textcoords="offset points", fontsize=8, color="gray")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("ELBO (nats per image)")
    ax.set_title(_title(_with("Training curves (higher is better)", about), 5.5), fontsize=10)
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


def latent_scatter(z, labels, ax: Axes | None = None, about: str | None = None) -> Figure:
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
    ax.set_title(_title(_with(title, about), 5.6), fontsize=10)
    return fig


@torch.no_grad()
def latent_manifold(vae: VAE, n: int = 15, image_shape=IMAGE_SHAPE,
                    ax: Axes | None = None, about: str | None = None) -> Figure:
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
    ax.set_title(_title(_with("Decoded means over the latent grid", about), 5.2), fontsize=10)
    return fig


@torch.no_grad()
def prior_samples(vae: VAE, num_samples: int = 64, seed: int = 0, about: str | None = None
                  ) -> dict[str, Figure]:
    """Images from the prior: the likelihood's means and, where it has them, actual draws."""
    device = next(vae.parameters()).device
    with fixed_noise(seed, device):
        d = vae.sample_prior(num_samples)
        figures = {"samples": image_grid(
            d.mean.cpu(), title=_with(f"{num_samples} prior samples: mean of p(x | z)", about))}
        try:
            draws = d.sample().cpu()
        except NotImplementedError:  # the relaxed Bernoulli is not a distribution
            return figures
    figures["samples_drawn"] = image_grid(
        draws, title=_with(f"{num_samples} prior samples: draws x ~ p(x | z)", about))
    return figures


def _image_rows(rows, labels: Sequence[str], columns: Sequence[str], title: str,
                image_shape=IMAGE_SHAPE) -> Figure:
    """A grid ``rows`` ``(R, C, H*W)`` with a label per row and per column."""
    rows = np.clip(np.asarray(rows, dtype=np.float32), 0, 1)
    nrows, ncols = rows.shape[:2]
    h, w = image_shape
    width = 0.5 * ncols + 1.6
    fig = new_figure((width, 0.5 * nrows + 0.9))
    ax = fig.add_subplot()
    ax.imshow(tile(rows.reshape(nrows * ncols, -1), ncols, image_shape, pad=0), cmap="gray",
              vmin=0, vmax=1, interpolation="nearest",
              extent=(-0.5, ncols * w - 0.5, nrows * h - 0.5, -0.5))
    ax.set_yticks([r * h + h / 2 for r in range(nrows)], labels, fontsize=8)
    ax.set_xticks([c * w + w / 2 for c in range(ncols)], columns, fontsize=7)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(_title(title, width), fontsize=10)
    return fig


@torch.no_grad()
def traversal_grid(vae: VAE, x: torch.Tensor, x_pool: torch.Tensor | None = None,
                   num_dims: int = 8, steps: int = 9, about: str | None = None) -> Figure:
    """Latent traversals of the one image ``x``: for the ``num_dims`` dimensions with the
    largest average KL over ``x_pool`` (default: ``x`` alone), each set to prior quantiles
    5%..95% with the others at the posterior mean of ``x``; the decoded means."""
    x = x.reshape(1, -1)
    kl = kl_per_dimension(vae, x if x_pool is None else x_pool)
    dims = kl.argsort(descending=True)[: min(num_dims, vae.z_dim)].tolist()
    values = prior_quantiles(steps, device=x.device)
    images = traversals(vae, x[0], dims, values).cpu()
    labels = [f"z_{d + 1} (KL {kl[d]:.2f})" for d in dims]
    columns = [f"{v:+.1f}" for v in values.tolist()]
    return _image_rows(images, labels, columns, _with(
        "Latent traversals: one dimension at prior quantiles 5%..95% (columns), the others "
        "at E_q[z | x]; rows by average KL", about))


@torch.no_grad()
def interpolation_grid(vae: VAE, x_from: torch.Tensor, x_to: torch.Tensor, steps: int = 10,
                       about: str | None = None) -> Figure:
    """For each pair of images: the linear and the spherical path between their posterior
    means, decoded (rows in pairs: linear, then spherical)."""
    linear = interpolations(vae, x_from, x_to, steps, "linear").cpu()
    spherical = interpolations(vae, x_from, x_to, steps, "spherical").cpu()
    rows = torch.stack([linear, spherical], 1).flatten(0, 1)  # (2P, steps, D)
    labels = [f"pair {p + 1} {kind}" for p in range(len(x_from))
              for kind in ("linear", "spherical")]
    columns = [f"{t:.2f}" for t in torch.linspace(0, 1, steps).tolist()]
    return _image_rows(rows, labels, columns, _with(
        "Interpolations between the posterior means of two test images, t = 0..1", about))


@torch.no_grad()
def conditional_generation(vae, x: torch.Tensor, about: str | None = None) -> Figure:
    """Kingma et al.'s (2014) figure for a model with classes: each row keeps the style of
    one test image (first column) and draws it as every class (``vae.analogies``)."""
    drawn = vae.analogies(x).cpu()  # (R, C, D)
    rows = torch.cat([x.cpu().unsqueeze(1), drawn], 1)
    columns = ["image", *(str(c) for c in range(drawn.shape[1]))]
    return _image_rows(rows, [f"test {i}" for i in range(len(x))], columns, _with(
        "Conditional generation: the style z of each test image, drawn as every class y",
        about))


def confusion_matrix(predicted, true, num_classes: int | None = None, ax: Axes | None = None,
                     about: str | None = None) -> Figure:
    """Counts of (true class, predicted class), with the accuracy in the title."""
    predicted, true = np.asarray(predicted), np.asarray(true)
    c = num_classes or int(max(predicted.max(initial=0), true.max(initial=0))) + 1
    counts = np.zeros((c, c), dtype=int)
    np.add.at(counts, (true, predicted), 1)
    fig, ax = _axes(ax, (5.4, 4.8))
    image = ax.imshow(counts, cmap="Blues")
    fig.colorbar(image, ax=ax, label="images")
    top = counts.max(initial=0)
    for (i, j), n in np.ndenumerate(counts):
        if n:
            ax.text(j, i, str(n), ha="center", va="center", fontsize=6,
                    color="white" if n > top / 2 else "black")
    ax.set_xticks(range(c))
    ax.set_yticks(range(c))
    ax.set_xlabel("predicted class (argmax q(y | x))")
    ax.set_ylabel("true class")
    accuracy = float((predicted == true).mean()) if len(true) else float("nan")
    ax.set_title(_title(_with(f"Confusion matrix, {len(true)} test images, accuracy "
                              f"{accuracy:.4f}", about), 5.4), fontsize=10)
    return fig


def accuracy_curves(metrics: Sequence[dict], ax: Axes | None = None,
                    about: str | None = None) -> Figure:
    """Test (and validation) accuracy of the model's classifier against epoch."""
    fig, ax = _axes(ax, (5.5, 3.6))
    epochs = [r["epoch"] for r in metrics]
    for key, style, label in [("test_accuracy", "s-", "test"),
                              ("validation_accuracy", "o-", "validation")]:
        if any(key in r for r in metrics):
            ax.plot(epochs, [r.get(key, np.nan) for r in metrics], style, label=label)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("accuracy of argmax q(y | x)")
    ax.set_title(_title(_with("Classification accuracy (higher is better)", about), 5.5),
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


FIGURE_KINDS = ("reconstructions", "samples", "curves", "latent", "manifold", "traversals",
                "interpolations", "accuracy", "confusion", "conditional", "pseudo_inputs")

# what each figure asks of the model (the optional methods of pyro_vae.models' protocol)
_NEEDS = {"reconstructions": ("reconstruct",), "samples": ("sample_prior",), "curves": (),
          "latent": ("encode",), "manifold": ("decode",),
          "traversals": ("encode", "decode"), "interpolations": ("encode", "decode"),
          "accuracy": ("classify",), "confusion": ("classify",),
          "conditional": ("analogies",), "pseudo_inputs": ("pseudo_inputs",)}


def figure_kinds(vae) -> tuple[str, ...]:
    """The figure kinds a model supports: those whose methods it has."""
    return tuple(k for k in FIGURE_KINDS if all(hasattr(vae, m) for m in _NEEDS[k]))


@torch.no_grad()
def run_figures(vae: VAE, test_x: torch.Tensor, test_y: torch.Tensor,
                metrics: Sequence[dict] = (), kinds: Sequence[str] | None = None,
                num_images: int = 2000, about: str | None = None) -> dict[str, Figure]:
    """All figures of a trained run that its model supports (:func:`figure_kinds`), or the
    ``kinds`` named, by file stem; ``about`` (e.g. the run and its likelihood) ends every
    title."""
    unknown = set(kinds or ()) - set(FIGURE_KINDS)
    if unknown:
        raise ValueError(f"unknown figure kinds {sorted(unknown)}; choose from {FIGURE_KINDS}")
    supported = figure_kinds(vae)
    lacking = [k for k in kinds or () if k not in supported]
    if lacking:
        methods = sorted({m for k in lacking for m in _NEEDS[k] if not hasattr(vae, m)})
        raise ConfigError(f"figure {lacking[0]} needs a model with {', '.join(methods)}(); "
                          f"{type(vae).__name__} has none; its figures are: "
                          f"{', '.join(supported)}")
    kinds = set(kinds or supported)
    figures: dict[str, Figure] = {}
    vae.eval()
    if "reconstructions" in kinds:
        x = test_x[:32]
        figures["reconstructions"] = reconstructions(x.cpu(), vae.reconstruct(x).cpu(),
                                                     about=about)
    if "samples" in kinds:
        figures.update(prior_samples(vae, about=about))
    if "curves" in kinds and metrics:
        figures["curves"] = training_curves(metrics, about=about)
    if "latent" in kinds:
        z = vae.encode(test_x[:num_images]).loc.cpu()
        figures["latent"] = latent_scatter(z, test_y[:num_images].cpu(), about=about)
    if "manifold" in kinds and vae.z_dim == 2:
        figures["manifold"] = latent_manifold(vae, about=about)
    if "traversals" in kinds:
        figures["traversals"] = traversal_grid(vae, test_x[0], test_x[:num_images],
                                               about=about)
    if "interpolations" in kinds and len(test_x) >= 2:
        pairs = min(3, len(test_x) // 2)
        figures["interpolations"] = interpolation_grid(
            vae, test_x[:pairs], test_x[pairs : 2 * pairs], about=about)
    if "accuracy" in kinds and any("test_accuracy" in r for r in metrics):
        figures["accuracy"] = accuracy_curves(metrics, about=about)
    if "confusion" in kinds:
        predicted = torch.cat([vae.classify(xb).argmax(-1) for xb in test_x.split(1000)])
        figures["confusion"] = confusion_matrix(predicted.cpu().numpy(), test_y.cpu().numpy(),
                                                about=about)
    if "conditional" in kinds:
        figures["conditional"] = conditional_generation(vae, test_x[:8], about=about)
    if "pseudo_inputs" in kinds:
        figures["pseudo_inputs"] = pseudo_input_grid(vae.pseudo_inputs(), about=about)
    return figures


def pseudo_input_grid(pseudo_inputs: torch.Tensor, max_shown: int = 100,
                      about: str | None = None) -> Figure:
    """The first ``max_shown`` of a VampPrior's learned pseudo-inputs ``(K, x_dim)``."""
    shown = pseudo_inputs[:max_shown].detach().cpu()
    return image_grid(shown, title=_with(f"VampPrior pseudo-inputs ({len(shown)} of "
                                         f"{len(pseudo_inputs)})", about))


def describe(run: Run) -> str:
    """``runs/quickstart: bernoulli, epoch 10``: what every title of a run names."""
    name = run.path.name if run.path is not None else "in memory"
    return f"{name}: {run.vae.likelihood.name}, epoch {run.epoch}"


def figures_for_run(run: Run, kinds: Sequence[str] | None = None) -> dict[str, Figure]:
    """:func:`run_figures` of a :class:`~pyro_vae.runner.rundir.Run` and its own data."""
    return run_figures(run.vae, run.data.test_x, run.data.test_y, run.metrics, kinds,
                       about=describe(run))


def save_figures(figures: dict[str, Figure], folder: str | Path, dpi: int = 110,
                 root: str | Path | None = None) -> list[Path]:
    """Write each figure to ``folder/NAME.png``; returns the paths.

    Each is rendered first and written like a checkpoint (:func:`pyro_vae.files.write_atomic`:
    a temporary file renamed over the old one), never through a symbolic link below
    ``root`` (default: ``folder``); a folder that cannot be written keeps what it holds.
    """
    folder = Path(folder)
    paths = []
    for name, fig in figures.items():
        path = folder / f"{name}.png"
        write_atomic(path, png_bytes(fig, dpi), root=root if root is not None else folder)
        paths.append(path)
    return paths


def png_bytes(fig: Figure, dpi: int = 110) -> bytes:
    """The figure as the bytes of a PNG file."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def labelled_rows(rows: Sequence[tuple[str, object]], ncols: int = 10, title: str | None = None,
                  image_shape=IMAGE_SHAPE) -> Figure:
    """One row of images per ``(label, images)`` pair, the label on the left.

    ``images`` may be ``None`` for a row that has none (drawn empty, label kept).
    """
    fig = new_figure((0.55 * ncols + 3.4, 0.62 * len(rows) + 0.4))
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


def posterior_pairs(guide_draws, nuts_draws, pairs=((0, 1), (2, 3)), title: str | None = None,
                    image: str | None = None) -> Figure:
    """Guide draws against NUTS draws for pairs of latent dimensions of one image.

    ``guide_draws``: ``(draw, latent)``; ``nuts_draws``: ``(chain, draw, latent)``;
    ``image`` names the image in the title (e.g. ``"test image 0, label 7"``).
    """
    guide_draws = np.asarray(guide_draws)
    nuts = np.asarray(nuts_draws).reshape(-1, guide_draws.shape[-1])
    pairs = [p for p in pairs if max(p) < guide_draws.shape[-1]] or [(0, 0)]
    fig = new_figure((4.2 * len(pairs), 4.0))
    for ax, (i, j) in zip(fig.subplots(1, len(pairs), squeeze=False)[0], pairs):
        ax.scatter(nuts[:, i], nuts[:, j], s=4, alpha=0.35, label="NUTS (reference)")
        ax.scatter(guide_draws[:, i], guide_draws[:, j], s=4, alpha=0.35,
                   label="guide q(z | x)")
        ax.set_xlabel(f"z_{i + 1}")
        ax.set_ylabel(f"z_{j + 1}")
        ax.legend(markerscale=3, fontsize=8)
    fig.suptitle(title or _with("Posterior draws: amortized guide against NUTS", image),
                 fontsize=10)
    return fig


def forest(guide_draws, nuts_draws, prob: float = 0.94, ax: Axes | None = None,
           image: str | None = None) -> Figure:
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
    ax.set_title(_title(_with("Forest plot of one image's posterior", image), 5.5),
                 fontsize=10)
    ax.legend(fontsize=8)
    return fig


KHAT_GOOD, KHAT_BAD = 0.5, 0.7  # Vehtari et al.: < 0.5 good, 0.5-0.7 usable, > 0.7 bad


def _image_axis(ax: Axes, images: Sequence[int] | None, n: int) -> np.ndarray:
    """Bars at 0..n-1, labelled with the images' own indices (integers, never 0.5)."""
    idx = np.arange(n)
    ax.set_xticks(idx, [str(i) for i in (images if images is not None else idx)])
    ax.set_xlabel("test image")
    return idx


def khat_per_image(k_hat: Sequence[float], ax: Axes | None = None,
                   images: Sequence[int] | None = None, about: str | None = None) -> Figure:
    """Pareto k-hat of the guide's importance weights per image, coloured by the usual
    thresholds (green < 0.5 good, orange up to 0.7 usable, red above: unreliable)."""
    fig, ax = _axes(ax, (5.5, 3.2))
    k_hat = np.asarray(k_hat, dtype=float)
    colours = np.where(k_hat < KHAT_GOOD, "tab:green",
                       np.where(k_hat <= KHAT_BAD, "tab:orange", "tab:red"))
    idx = _image_axis(ax, images, len(k_hat))
    ax.bar(idx, k_hat, color=colours, width=0.6)
    top = max(float(np.nanmax(k_hat, initial=0.0)), KHAT_BAD) * 1.15
    ax.set_ylim(min(0.0, float(np.nanmin(k_hat, initial=0.0)) * 1.15), top)
    for level, text in [(KHAT_GOOD, "0.5\ngood below"), (KHAT_BAD, "0.7\nbad above")]:
        ax.axhline(level, ls="--", lw=1, color="gray")
        ax.text(1.01, level, text, transform=ax.get_yaxis_transform(), ha="left",
                va="center", fontsize=7, color="dimgray")  # beside the axes: never on a bar
    ax.set_ylabel("Pareto k-hat")
    ax.set_title(_title(_with("How well q(z | x) serves as an importance proposal", about),
                        5.5), fontsize=10)
    return fig


def inference_gap_bars(approximation, amortization, ax: Axes | None = None,
                       images: Sequence[int] | None = None, about: str | None = None) -> Figure:
    """Stacked per-image bars: approximation gap and amortization gap (nats)."""
    fig, ax = _axes(ax, (5.5, 3.2))
    idx = _image_axis(ax, images, len(approximation))
    ax.bar(idx, approximation, label="approximation gap: log p(x) - ELBO(q*)")
    ax.bar(idx, amortization, bottom=np.maximum(approximation, 0),
           label="amortization gap: ELBO(q*) - ELBO(q)")
    ax.set_ylabel("nats")
    ax.set_title(_title(_with("log p(x) - ELBO, decomposed (Cremer et al. 2018)", about), 5.5),
                 fontsize=10)
    ax.legend(fontsize=8)
    return fig


def calibration_ecdf(calibration, max_panels: int = 24, about: str | None = None) -> Figure:
    """Simulation-based calibration: per coordinate, the ECDF of the PIT values minus the
    uniform's, inside its simultaneous band (Säilynoja et al., 2022), red where it leaves
    it. An over-confident guide (U-shaped ranks: the truth in the tails) rises above zero
    and then falls below it; an under-confident one (a hump) does the mirror image."""
    points, lower, upper = calibration.band
    total = len(calibration.names)
    shown = list(range(total)) if total <= max_panels else \
        [*range(max_panels - 1), total - 1]  # the first coordinates and the last statistic
    ncols = min(6, len(shown))
    nrows = math.ceil(len(shown) / ncols)
    fig = new_figure((2.1 * ncols, 1.7 * nrows + 0.6))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, sharex=True, sharey=True)).ravel()
    for ax, j in zip(axes, shown):
        name = calibration.names[j]
        ecdf = (calibration.pit[:, j][:, None] <= points).mean(0)
        ax.fill_between(points, lower - points, upper - points, color="0.85", lw=0)
        ax.axhline(0, color="0.5", lw=0.6)
        ax.plot(points, ecdf - points, color="C0" if calibration.in_band[j] else "C3", lw=1.2)
        ax.set_title(f"{name}: {calibration.shape_of(j)}", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[len(shown):]:
        ax.set_axis_off()
    verdict = "calibrated" if calibration.passed else "not calibrated"
    some = f" ({len(shown)} of {total} shown)" if len(shown) < total else ""
    fig.suptitle(_title(_with(f"SBC of q(z | x){some}: ECDF(PIT) - uniform, "
                              f"{len(calibration.pit)} simulations x {calibration.draws} draws, "
                              f"{1 - calibration.alpha:.0%} simultaneous bands; {verdict}",
                              about), 2.1 * ncols), fontsize=9)
    fig.supxlabel("PIT value u", fontsize=8)
    return fig

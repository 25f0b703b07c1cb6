"""Walks through latent space: traversals and interpolations, as tensors of images.

- :func:`kl_per_dimension`: the average KL(q(z_d | x) || N(0, 1)) of each latent
  dimension over images -- which dimensions the model uses (near 0: an unused,
  "collapsed" dimension);
- :func:`active_units`: how many dimensions the posterior mean moves with the image
  (Burda et al., 2015: ``Cov_x(E_q[z_d | x]) > 0.01``), for any guide with a
  ``posterior(x)``;
- :func:`traversals`: one image's posterior mean with one dimension at a time set to prior
  quantiles (the picture of disentanglement papers and pythae);
- :func:`interpolations`: decoded points on the path between two images' posterior
  means, linear or spherical (``slerp``, White 2016: under a Gaussian prior the straight
  line passes through the unlikely region near the origin).

Images are the likelihood's mean, ``E[x | z]``. :mod:`pyro_vae.plots` draws them;
:mod:`pyro_vae.tracking` logs them to TensorBoard.
"""

from __future__ import annotations

import torch
from torch.distributions import Normal, kl_divergence

from .model import VAE

INTERPOLATIONS = ("linear", "spherical")


ACTIVE_THRESHOLD = 0.01  # Burda et al. (2015)
MEAN_DRAWS = 500  # draws per image where the posterior mean has no closed form (flows)


@torch.no_grad()
def _posterior_means(vae, x: torch.Tensor, batch_size: int = 100
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(E_q[z | x] (N, z_dim), noise (z_dim,))``: the means, in closed form where the
    guide has one (noise 0), else averages of :data:`MEAN_DRAWS` draws, with ``noise`` the
    average variance of those averages (the draws' variance over ``MEAN_DRAWS``)."""
    means, noise = [], []
    for xb in x.split(batch_size):
        q = vae.posterior(xb)
        try:
            means.append(q.mean)
            noise.append(torch.zeros_like(q.mean))
        except NotImplementedError:
            draws = q.sample((MEAN_DRAWS,))
            means.append(draws.mean(0))
            noise.append(draws.var(0) / MEAN_DRAWS)
    return torch.cat(means), torch.cat(noise).mean(0)


def posterior_means(vae, x: torch.Tensor, batch_size: int = 100) -> torch.Tensor:
    """``E_q[z | x]`` for each image ``(N, z_dim)``: the guide's mean where it has one in
    closed form (the Gaussian), else the average of :data:`MEAN_DRAWS` draws (a flow)."""
    return _posterior_means(vae, x, batch_size)[0]


def active_units(vae, x: torch.Tensor, threshold: float = ACTIVE_THRESHOLD) -> int:
    """The number of latent dimensions whose posterior mean varies over the images ``x``
    by more than ``threshold`` (a variance; Burda et al., 2015). Where the means are Monte
    Carlo averages, their own noise is subtracted from the variance (an unbiased estimate
    of ``Cov_x(E_q[z | x])``), so no dimension counts as active because of it."""
    means, noise = _posterior_means(vae, x)
    return int((means.var(0) - noise > threshold).sum())


@torch.no_grad()
def kl_per_dimension(vae: VAE, x: torch.Tensor) -> torch.Tensor:
    """Mean over the images ``x`` of the closed-form KL(q(z_d | x) || N(0, 1)), ``(z_dim,)``."""
    q = vae.encode(x)
    prior = Normal(torch.zeros_like(q.loc), torch.ones_like(q.scale))
    return kl_divergence(q, prior).mean(0)


def prior_quantiles(steps: int = 9, low: float = 0.05, high: float = 0.95,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """``steps`` values of a standard normal latent, at quantiles ``low`` .. ``high``."""
    probs = torch.linspace(low, high, steps, device=device)
    return torch.distributions.Normal(0.0, 1.0).icdf(probs)


@torch.no_grad()
def traversals(vae: VAE, x: torch.Tensor, dims: list[int], values: torch.Tensor
               ) -> torch.Tensor:
    """Images ``(len(dims), len(values), x_dim)``: row ``i`` sets latent ``dims[i]`` of
    the posterior mean of the one image ``x`` ``(x_dim,)`` to each of ``values``."""
    base = vae.encode(x.reshape(1, -1)).loc[0]  # (z_dim,)
    z = base.expand(len(dims), len(values), -1).clone()
    for row, d in enumerate(dims):
        z[row, :, d] = values.to(z)
    return vae.decode(z).mean


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between vectors ``a`` and ``b`` ``(d,)`` at ``t`` ``(T,)``:
    ``(T, d)``. Norms are interpolated linearly; (anti)parallel vectors fall back to a
    straight line."""
    t = t.reshape(-1, 1)
    na, nb = a.norm(), b.norm()
    cos = (a @ b / (na * nb).clamp_min(1e-12)).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    if omega.abs() < 1e-4 or (torch.pi - omega).abs() < 1e-4:
        return (1 - t) * a + t * b
    direction = (torch.sin((1 - t) * omega) * a / na + torch.sin(t * omega) * b / nb) / \
        torch.sin(omega)
    return direction / direction.norm(dim=-1, keepdim=True) * ((1 - t) * na + t * nb)


@torch.no_grad()
def interpolations(vae: VAE, x_from: torch.Tensor, x_to: torch.Tensor, steps: int = 10,
                   kind: str = "linear") -> torch.Tensor:
    """Images ``(P, steps, x_dim)``: for each pair of images (``x_from[p]``, ``x_to[p]``,
    ``(P, x_dim)`` each) the decoded path between their posterior means, ends included."""
    if kind not in INTERPOLATIONS:
        raise ValueError(f"kind must be one of {', '.join(INTERPOLATIONS)}, got {kind!r}")
    a, b = vae.encode(x_from).loc, vae.encode(x_to).loc  # (P, z_dim)
    t = torch.linspace(0.0, 1.0, steps, device=a.device)
    if kind == "linear":
        z = a[:, None] + t[None, :, None] * (b - a)[:, None]
    else:
        z = torch.stack([slerp(a[p], b[p], t) for p in range(len(a))])
    return vae.decode(z).mean

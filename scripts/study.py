"""Helpers of the likelihood study that the library does not need."""

from __future__ import annotations

import torch

from pyro_vae import VAE
from pyro_vae.estimators import fixed_noise


@torch.no_grad()
def knn_accuracy(train_z: torch.Tensor, train_y: torch.Tensor, test_z: torch.Tensor,
                 test_y: torch.Tensor, k: int = 5, batch_size: int = 1000) -> float:
    """Accuracy of a k-nearest-neighbour vote (Euclidean) of test points among train points.

    A measure of how well the latent space separates classes: use posterior means.
    """
    correct = 0
    for zb, yb in zip(test_z.split(batch_size), test_y.split(batch_size)):
        nearest = torch.cdist(zb, train_z).topk(k, largest=False).indices  # (b, k)
        votes = torch.nn.functional.one_hot(train_y[nearest], int(train_y.max()) + 1).sum(1)
        correct += (votes.argmax(-1) == yb).sum().item()
    return correct / len(test_y)


@torch.no_grad()
def missing_log_normalizer(vae: VAE, x: torch.Tensor, batch_size: int = 1000,
                           seed: int | None = 0) -> torch.Tensor | None:
    """E_q[sum over pixels of log C(lambda)] per image, for an unnormalized likelihood.

    For ``bernoulli-relaxed`` this is what its log-"likelihood" leaves out: adding it to
    the relaxed ELBO gives the ELBO of a continuous Bernoulli with the same decoder. Returns
    ``None`` for likelihoods without a ``log_normalizer`` (the normalized ones).
    """
    out = []
    with fixed_noise(seed, x.device):
        for xb in x.split(batch_size):
            z = vae.encode(xb).rsample()
            d = vae.decode(z)
            if not hasattr(d, "log_normalizer"):
                return None
            out.append(d.log_normalizer().sum(-1))
    return torch.cat(out)

"""A hand-written PyTorch VAE, the yardstick for pyro-vae's speed and quality.

This is the network and loss of PyTorch's ``examples/vae/main.py`` (784-400-20, ReLU,
``logvar`` head, binary cross-entropy summed over pixels plus the analytic KL), trained
on the same device-resident tensor batches that pyro-vae uses. Benchmarks and the parity
test train both side by side. It is deliberately a plain PyTorch loop with its own
``backward``: the anchor that pyro-vae's one training step is measured against.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from pyro_vae.data import DeviceBatches
from pyro_vae.estimators import fixed_noise


class ReferenceVAE(nn.Module):
    """PyTorch example VAE with configurable sizes (defaults: 784-400-20)."""

    def __init__(self, x_dim: int = 784, hidden_dim: int = 400, z_dim: int = 20):
        super().__init__()
        self.fc1 = nn.Linear(x_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, 2 * z_dim)  # mu and logvar, as fc21 / fc22
        self.fc3 = nn.Linear(z_dim, hidden_dim)
        self.fc4 = nn.Linear(hidden_dim, x_dim)

    def forward(self, x: torch.Tensor):
        mu, logvar = self.fc2(F.relu(self.fc1(x))).chunk(2, dim=-1)  # (B, z) each
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.fc4(F.relu(self.fc3(z))), mu, logvar  # logits (B, x_dim)

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """Negative ELBO summed over the batch: BCE + analytic KL (the example's loss)."""
        logits, mu, logvar = self(x)
        bce = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
        kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
        return bce + kld


def train_reference_epoch(vae: ReferenceVAE, optimizer: torch.optim.Optimizer,
                          batches: DeviceBatches, epoch: int) -> tuple[float, float]:
    """One epoch; returns (train ELBO in nats per image, seconds)."""
    vae.train()
    total = torch.zeros((), device=batches.x.device)
    start = time.perf_counter()
    for xb in batches.batches(batches.permutation(epoch)):
        loss = vae.loss(xb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach()
    elbo = -total.item() / len(batches.x)
    return elbo, time.perf_counter() - start


@torch.no_grad()
def reference_test_elbo(vae: ReferenceVAE, x: torch.Tensor, seed: int = 0) -> float:
    """One-sample test ELBO in nats per image."""
    vae.eval()
    with fixed_noise(seed, x.device):
        return -sum(vae.loss(xb).item() for xb in x.split(1000)) / len(x)

"""The semi-supervised VAE "M2" of Kingma, Rezende, Mohamed & Welling (2014).

Generative model, for each image ``n``::

    y_n ~ Categorical(1 / C)                  # the class, C = 10 for MNIST
    z_n ~ Normal(0, I)                        # the style, (z_dim,)
    x_n ~ likelihood(decoder(z_n, y_n))

Guide ``q(y | x) q(z | x, y)``: a classifier and a Gaussian encoder given the class.

On an unlabelled image the guide's ``y`` is summed out by parallel enumeration
(``TraceEnum_ELBO``): every image is scored under all ``C`` classes at once, weighted by
``q(y | x)``, which is Kingma et al.'s ``U(x)`` (eq. 7). On a labelled image the class is
known: the guide's ``q(y | x)`` is replaced by a point mass on the label, so the same
enumerated sum keeps the label's term alone and is their ``L(x, y)`` (eq. 6), with
``log p(y)``; terms of probability zero are dropped exactly
(:class:`~pyro_vae.objective.SyncFreeTraceEnum_ELBO`). The classifier then learns from the
labelled images through ``alpha * log q(y | x)`` (eq. 9), a ``pyro.factor`` of the model,
``alpha = aux_loss_multiplier``. One program serves labelled, unlabelled and mixed batches
(training gives labelled images batches of their own, as Pyro's example does), so one
traced step per batch shape, with no host read.

The labels come from the training set by position: :meth:`M2.set_labels` stores one per
training image (-1 where unknown) and the batch's ``index`` (the data plate's subsample)
looks them up. Evaluation passes no ``index``: every image is unlabelled there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

from . import seeds
from .errors import ConfigError
from .likelihoods import Likelihood
from .model import data_plate, weighted
from .networks import _activation, mlp

__all__ = ["M2", "choose_labels"]

# the logit of a class a point mass excludes: exp() of it is exactly 0 in float32 and
# float64, while every arithmetic on it stays finite (no 0 * inf in the gradients)
EXCLUDED = -1e30


class ConditionalMLP(nn.Module):
    """``(v, y) -> `` an MLP over ``[v, one_hot(y)]``, computed as ``W v + E[y]`` in the
    first layer: enumerating the ``C`` classes repeats the layers after it only, and the
    one-hot product is a lookup. ``v`` ``(..., in_dim)`` and ``y`` (class indices) broadcast.
    """

    def __init__(self, in_dim: int, num_classes: int, hidden_dims: Sequence[int],
                 out_dim: int, activation: str):
        super().__init__()
        self.input = nn.Linear(in_dim, hidden_dims[0])
        self.label = nn.Parameter(torch.empty(num_classes, hidden_dims[0]))
        bound = 1 / math.sqrt(in_dim + num_classes)  # nn.Linear's init for the joint input
        for t in (self.input.weight, self.input.bias, self.label):
            nn.init.uniform_(t, -bound, bound)
        self.act = _activation(activation)()
        self.body = mlp(list(hidden_dims), activation)
        self.head = nn.Linear(hidden_dims[-1], out_dim)

    def forward(self, v: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.act(self.input(v) + self.label[y])
        return self.head(self.body(h))


class M2(nn.Module):
    """Kingma et al.'s M2 (see the module docstring) with a swappable likelihood.

    ``hidden_dims``: the hidden sizes of the classifier and the encoder (the decoder mirrors
    them); Pyro's example uses one layer of 500, ``z_dim`` 50 and ``softplus``.
    ``aux_loss_multiplier``: ``alpha`` of eq. 9 per labelled image (Pyro's example: 46).
    """

    enumerated = True  # the guide's y is summed out by parallel enumeration

    def __init__(self, likelihood: Likelihood, x_dim: int = 784, z_dim: int = 50,
                 hidden_dims: Sequence[int] = (500,), activation: str = "softplus",
                 num_classes: int = 10, aux_loss_multiplier: float = 46.0,
                 likelihood_options: dict | None = None):
        super().__init__()
        self.likelihood = likelihood
        self.likelihood_options = dict(likelihood_options or {})
        likelihood.check_options(self.likelihood_options)
        self.x_dim, self.z_dim, self.num_classes = x_dim, z_dim, num_classes
        self.aux_loss_multiplier = aux_loss_multiplier
        hidden = list(hidden_dims)
        self.classifier = nn.Sequential(mlp([x_dim, *hidden], activation),
                                        nn.Linear(hidden[-1], num_classes))
        self.encoder = ConditionalMLP(x_dim, num_classes, hidden, 2 * z_dim, activation)
        self.decoder = ConditionalMLP(z_dim, num_classes, hidden[::-1],
                                      likelihood.num_params * x_dim, activation)
        # the class of each training image, -1 where unknown; set by set_labels (not saved
        # with the weights: training derives it from the data and the seed)
        self.register_buffer("labels", torch.empty(0, dtype=torch.long), persistent=False)

    @property
    def enumerated_values(self) -> int:
        """How many values the enumeration scores per image (one per class)."""
        return self.num_classes

    def set_labels(self, labels: torch.Tensor | None) -> None:
        """Labels ``(N,)`` of the training images by position (-1: unknown); ``None``: none."""
        device = self.classifier[-1].weight.device
        self.labels = (torch.empty(0, dtype=torch.long) if labels is None
                       else labels.long()).to(device)

    def known_labels(self, index: torch.Tensor | None) -> torch.Tensor | None:
        """The labels of the batch at ``index`` (-1 where unknown); ``None`` without any."""
        if index is None or self.labels.numel() == 0:
            return None
        return self.labels[index]

    def model(self, x: torch.Tensor, num_data: int | None = None,
              kl_weight: torch.Tensor | None = None, index: torch.Tensor | None = None
              ) -> None:
        """p(y) p(z) p(x | y, z), plus ``alpha log q(y | x)`` on the labelled images."""
        batch = x.shape[0]
        with data_plate(x, num_data, index):
            with weighted(kl_weight):
                y = pyro.sample("y", dist.Categorical(logits=x.new_zeros(self.num_classes))
                                .expand([batch]))
                prior = dist.Normal(x.new_zeros(()), x.new_ones(())).expand([batch, self.z_dim])
                z = pyro.sample("z", prior.to_event(1))
            pyro.sample("x", self.observation(z, y).to_event(1), obs=x)
            known = self.known_labels(index)
            if known is not None and self.aux_loss_multiplier > 0:
                log_q = self.classify(x).log_softmax(-1).gather(
                    -1, known.clamp(min=0).unsqueeze(-1)).squeeze(-1)
                pyro.factor("classification",
                            self.aux_loss_multiplier * torch.where(known >= 0, log_q, 0.0))

    def guide(self, x: torch.Tensor, num_data: int | None = None,
              kl_weight: torch.Tensor | None = None, index: torch.Tensor | None = None
              ) -> None:
        """q(y | x) (a point mass on a known label) and q(z | x, y), y enumerated."""
        with data_plate(x, num_data, index), weighted(kl_weight):
            logits = self.classify(x)  # (B, C)
            known = self.known_labels(index)
            if known is not None:
                point = torch.where(F.one_hot(known.clamp(min=0), self.num_classes).bool(),
                                    0.0, EXCLUDED)
                logits = torch.where((known >= 0).unsqueeze(-1), point, logits)
            y = pyro.sample("y", dist.Categorical(logits=logits),
                            infer={"enumerate": "parallel"})
            loc, scale = self.encoder_given(x, y)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """The logits of q(y | x), ``(..., C)``."""
        return self.classifier(x)

    def encoder_given(self, x: torch.Tensor, y: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)`` of q(z | x, y), broadcast over ``x`` and ``y``."""
        loc, raw = self.encoder(x, y).chunk(2, dim=-1)
        return loc, F.softplus(raw) + 1e-6

    def observation(self, z: torch.Tensor, y: torch.Tensor) -> dist.Distribution:
        """p(x | y, z), batch shape ``(..., x_dim)``."""
        raw = self.decoder(z, y).unflatten(-1, (self.likelihood.num_params, self.x_dim))
        return self.likelihood.distribution(raw, **self.likelihood_options)

    def decode_class(self, z: torch.Tensor, y: torch.Tensor) -> dist.Distribution:
        """p(x | y, z) for the style ``z`` ``(..., z_dim)`` and the class ``y``. (No
        ``decode(z)``: without a class the style alone draws nothing, so the figures that
        walk the latent space alone -- traversals, interpolations, manifold -- skip M2.)"""
        return self.observation(z, y)

    def encode(self, x: torch.Tensor) -> dist.Normal:
        """q(z | x, y = the classifier's guess): the style of each image."""
        return dist.Normal(*self.encoder_given(x, self.classify(x).argmax(-1)))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of p(x | y = guessed class, z = E q(z | x, y))."""
        y = self.classify(x).argmax(-1)
        return self.decode_class(self.encoder_given(x, y)[0], y).mean

    @torch.no_grad()
    def sample_prior(self, num_samples: int) -> dist.Distribution:
        """p(x | y, z) for ``num_samples`` draws: classes in turn 0, 1, ..., z ~ N(0, I)."""
        p = self.classifier[-1].weight
        y = torch.arange(num_samples, device=p.device) % self.num_classes
        return self.decode_class(p.new_empty(num_samples, self.z_dim).normal_(), y)

    @property
    def auxiliary_loss(self) -> bool:
        """Whether training adds ``alpha log q(y | x)`` to the ELBO (labels and alpha > 0):
        the loss is then not the ELBO alone."""
        return self.labels.numel() > 0 and self.aux_loss_multiplier > 0

    @torch.no_grad()
    def analogies(self, x: torch.Tensor) -> torch.Tensor:
        """Kingma et al.'s figure: the style of each image ``x`` (``E q(z | x, y)`` at its
        guessed class) drawn as every class; ``(len(x), C, x_dim)`` means."""
        loc = self.encode(x).loc  # (B, z_dim)
        y = torch.arange(self.num_classes, device=x.device)
        return self.decode_class(loc.unsqueeze(1), y).mean  # (B, C, x_dim)


def choose_labels(y: torch.Tensor, num_labels: int, seed: int) -> torch.Tensor:
    """The positions of ``num_labels`` images of ``y`` whose labels are kept, balanced per
    class (``num_labels // C`` each, the remainder to classes drawn at random) and drawn by
    ``seed`` (:func:`pyro_vae.seeds.label_choice`); sorted."""
    classes = int(y.max()) + 1
    per_class = torch.bincount(y, minlength=classes)
    if num_labels > len(y):
        raise ConfigError(f"{{data.labels}} is {num_labels}, but the training set has "
                          f"{len(y)} images; ask for at most that many")
    generator = torch.Generator().manual_seed(seeds.label_choice(seed))
    counts = torch.full((classes,), num_labels // classes)
    counts[torch.randperm(classes, generator=generator)[: num_labels % classes]] += 1
    short = (counts > per_class).nonzero().flatten().tolist()
    if short:
        raise ConfigError(f"{{data.labels}} {num_labels} asks for {int(counts.max())} images "
                          f"of class {short[0]}, which has {int(per_class[short[0]])}; ask "
                          "for fewer labels")
    chosen = []
    for c in range(classes):
        members = (y == c).nonzero().flatten()
        chosen.append(members[torch.randperm(len(members), generator=generator)[: counts[c]]])
    return torch.cat(chosen).sort().values


def partial_labels(y: torch.Tensor, num_labels: int | None, seed: int) -> torch.Tensor:
    """``y`` with every label not chosen by :func:`choose_labels` set to -1 (``None``: all
    kept)."""
    if num_labels is None:
        return y.clone()
    kept = torch.full_like(y, -1)
    chosen = choose_labels(y, num_labels, seed)
    kept[chosen] = y[chosen]
    return kept

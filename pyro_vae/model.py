"""The variational autoencoder as a Pyro model and guide (Kingma & Welling, 2014).

Generative model, for each image ``n`` in the batch::

    z_n ~ Normal(0, I)                    # (z_dim,)
    x_n ~ likelihood(decoder(z_n))        # (x_dim,), pixels independent given z_n

Amortized guide::

    z_n ~ Normal(loc(x_n), diag(scale(x_n))^2)     # reparameterized: loc + scale * eps

Both run inside the plate ``"data"`` at dim -1 (:func:`data_plate`); an outer particle
plate at dim -2 (vectorized ELBO particles, importance samples) broadcasts through
unchanged. With ``num_data=N`` it is ``pyro.plate("data", N, subsample=index)`` over the
batch's indices into the data set, so Pyro scales the log densities by ``N / B`` and a
minibatch gives an unbiased estimate of the full-data ELBO.

The only module that calls ``pyro.sample``. The networks are plain ``nn.Module`` s, not
in Pyro's global parameter store, so several VAEs live side by side in one notebook.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from .errors import ConfigError
from .flows import InverseAutoregressiveFlow
from .likelihoods import Likelihood, get_likelihood
from .networks import Encoder, Network, get_network
from .priors import VampPrior


class VAE(nn.Module):
    """Variational autoencoder with a swappable likelihood.

    ``likelihood`` and ``network`` (what builds ``encoder`` and ``decoder``: ``mlp``,
    ``conv``) are registered names or objects; ``hidden_dims`` are the encoder's hidden
    sizes (the decoder mirrors them); ``activation`` is ``relu`` (the PyTorch example),
    ``softplus`` (Pyro's), ``tanh`` or ``elu``; ``likelihood_options`` go to the
    likelihood's builder, e.g. ``{"scale": 0.05}``.
    """

    stochastic_layers = 1

    def __init__(
        self,
        likelihood: Likelihood | str = "bernoulli",
        x_dim: int = 784,
        z_dim: int = 20,
        hidden_dims: Sequence[int] = (400,),
        activation: str = "relu",
        likelihood_options: dict | None = None,
        network: Network | str = "mlp",
        prior: str = "standard",
        pseudo_inputs: int = 500,
        guide: str = "gaussian",
        flows: int = 2,
        flow_hidden: int = 320,
    ):
        super().__init__()
        if isinstance(likelihood, str):
            likelihood = get_likelihood(likelihood)
        if isinstance(network, str):
            network = get_network(network)
        self.likelihood = likelihood
        self.likelihood_options = dict(likelihood_options or {})
        likelihood.check_options(self.likelihood_options)
        self.x_dim, self.z_dim = x_dim, z_dim
        self.encoder, self.decoder = network.build(x_dim, z_dim, tuple(hidden_dims), activation,
                                                   likelihood.num_params)
        self.prior_name, self.guide_name = prior, guide
        self.vamp = self.flow = None
        if prior == "vamp":
            self.vamp = VampPrior(pseudo_inputs, x_dim)
            # the protocol's optional pseudo_inputs() -> (K, x_dim): the figure of them
            self.pseudo_inputs = self.vamp.pseudo_inputs
        elif prior != "standard":
            raise ConfigError(f"unknown prior {prior!r}; {{model.prior}} is standard or vamp")
        if guide == "iaf":
            if not all(hasattr(self.encoder, a) for a in ("features", "gaussian", "feature_dim")):
                raise ConfigError(f"{{model.guide=iaf}} conditions the flow on the encoder's "
                                  f"features, which the {network.name} network's encoder does "
                                  "not give (features, gaussian, feature_dim); use "
                                  "{model.network=mlp} or conv")
            if z_dim < 2:
                raise ConfigError("{model.guide=iaf} needs {model.z_dim} of at least 2")
            self.flow = InverseAutoregressiveFlow(z_dim, self.encoder.feature_dim, flows,
                                                  flow_hidden)
        elif guide != "gaussian":
            raise ConfigError(f"unknown guide {guide!r}; {{model.guide}} is gaussian or iaf")

    def model(self, x: torch.Tensor, num_data: int | None = None,
              kl_weight: torch.Tensor | None = None, index: torch.Tensor | None = None
              ) -> None:
        """p(z) p(x | z) for a batch ``x`` of shape ``(B, x_dim)``.

        ``num_data``, ``index``: see :func:`data_plate`. ``kl_weight`` (a positive tensor)
        scales the latent site in model and guide, so the ELBO's KL term is weighted
        (beta-VAE, KL warm-up).
        """
        with data_plate(x, num_data, index):
            with weighted(kl_weight):
                z = pyro.sample("z", self.prior(x.shape[0], x))  # (..., B, z_dim)
            pyro.sample("x", self.observation(z).to_event(1), obs=x)

    def prior(self, batch: int, like: torch.Tensor | None = None) -> dist.Distribution:
        """p(z), batch shape ``(batch,)``, event shape ``(z_dim,)``: N(0, I) or the
        VampPrior (:mod:`pyro_vae.priors`). ``like``: a tensor on the device and of the
        dtype wanted (the parameters' by default)."""
        if self.vamp is not None:
            return self.vamp.distribution(self.encoder).expand([batch])
        like = next(self.parameters()) if like is None else like
        # device tensors, not Python floats: nothing is copied from the host per step,
        # which CUDA-graph capture requires
        standard = dist.Normal(like.new_zeros(()), like.new_ones(()))
        return standard.expand([batch, self.z_dim]).to_event(1)

    def guide(self, x: torch.Tensor, num_data: int | None = None,
              kl_weight: torch.Tensor | None = None, index: torch.Tensor | None = None
              ) -> None:
        """q(z | x) for a batch ``x`` of shape ``(B, x_dim)``: :meth:`posterior`."""
        with data_plate(x, num_data, index), weighted(kl_weight):
            pyro.sample("z", self.posterior(x))

    def posterior(self, x: torch.Tensor) -> dist.Distribution:
        """q(z | x), batch shape ``(B,)``, event shape ``(z_dim,)``: N(loc(x),
        diag(scale(x))^2), followed by the flow (:mod:`pyro_vae.flows`) with the iaf guide."""
        if self.flow is None:
            return dist.Normal(*self.encoder(x)).to_event(1)
        h = self.encoder.features(x)
        return self.flow.distribution(dist.Normal(*self.encoder.gaussian(h)).to_event(1), h)

    @staticmethod
    def gaussian_guide(x: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor,
                       num_data: int | None = None, kl_weight: torch.Tensor | None = None,
                       index: torch.Tensor | None = None) -> None:
        """A diagonal Gaussian guide with given per-image ``loc`` and ``scale`` ``(B, z_dim)``.

        The amortized guide passes the encoder's outputs; diagnostics pass per-image
        parameters optimized on their own (the "optimal" Gaussian q* of Cremer et al.).
        """
        with data_plate(x, num_data, index), weighted(kl_weight):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    @staticmethod
    def full_covariance_guide(x: torch.Tensor, loc: torch.Tensor, scale_tril: torch.Tensor
                              ) -> None:
        """A Gaussian with full covariance per image (``loc`` (B, z), ``scale_tril``
        (B, z, z)): an importance-sampling proposal fitted to reference posterior draws."""
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", dist.MultivariateNormal(loc, scale_tril=scale_tril))

    def observation(self, z: torch.Tensor) -> dist.Distribution:
        """p(x | z) of the lowest latent layer ``z``, batch shape ``(..., x_dim)``."""
        return self.likelihood.distribution(self.decoder(z), **self.likelihood_options)

    def decode(self, z: torch.Tensor) -> dist.Distribution:
        """p(x | z), batch shape ``(..., x_dim)`` for ``z`` of shape ``(..., z_dim)``."""
        return self.observation(z)

    def encode(self, x: torch.Tensor) -> dist.Normal:
        """q(z | x), batch shape ``(..., z_dim)``, for the pictures. With the iaf guide, a
        Normal at the flow's image of the base mean (a point estimate) with the base's
        scale; :meth:`posterior` is the guide itself."""
        if self.flow is None:
            return dist.Normal(*self.encoder(x))
        h = self.encoder.features(x)
        loc, scale = self.encoder.gaussian(h)
        flow = self.flow.distribution(dist.Normal(loc, scale).to_event(1), h)
        return dist.Normal(self.flow.push(flow, loc), scale)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of p(x | z = posterior mean of q(z | x)): what reconstructions show."""
        return self.decode(self.encode(x).loc).mean

    @torch.no_grad()
    def sample_prior(self, num_samples: int) -> dist.Distribution:
        """p(x | z) for ``num_samples`` draws ``z ~ p(z)``."""
        if self.vamp is not None:
            return self.decode(self.prior(num_samples).sample())
        p = next(self.parameters())
        return self.decode(p.new_empty(num_samples, self.z_dim).normal_())


@contextlib.contextmanager
def evaluating(module: nn.Module, frozen: bool = False):
    """``module`` in eval mode for the block (and with ``frozen``, its parameters without
    gradients); both restored afterwards, however the block ends."""
    was_training = module.training
    flags = [p.requires_grad for p in module.parameters()]
    module.eval()
    if frozen:
        module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)
        module.train(was_training)


def data_plate(x: torch.Tensor, num_data: int | None = None,
               index: torch.Tensor | None = None) -> pyro.plate:
    """The plate over the images of the batch ``x`` ``(B, ...)``, at dim -1.

    With ``num_data = N`` it stands for all ``N`` images of the data set: ``index`` (the
    batch's positions in it, as :class:`~pyro_vae.data.DeviceBatches` draws them) is its
    subsample, and Pyro scales every site inside by ``N / B``. Without ``index`` Pyro draws
    a random subsample of indices itself (an ``O(N)`` permutation per call).
    """
    if num_data is None:
        return pyro.plate("data", x.shape[0], dim=-1)
    return pyro.plate("data", num_data, subsample=index,
                      subsample_size=None if index is not None else x.shape[0], dim=-1)


def weighted(kl_weight: torch.Tensor | None):
    """Scale the latent sites inside by ``kl_weight`` (nothing if ``None``): KL warm-up
    and beta, for any model that follows :mod:`pyro_vae.models`' protocol."""
    return contextlib.nullcontext() if kl_weight is None else poutine.scale(scale=kl_weight)


class TwoLayerVAE(VAE):
    """A VAE with two stochastic layers (Burda, Grosse & Salakhutdinov, 2015)::

        model:  z2 ~ N(0, I)              (z_dim)
                z1 | z2 ~ N(mu(z2), diag(sigma(z2))^2)   (z1_dim)
                x | z1 ~ likelihood(decoder(z1))
        guide:  z1 | x ~ N(...(x)),  z2 | z1 ~ N(...(z1))

    ``encoder`` / ``decoder`` connect x and z1 (any registered network, ``hidden_dims``);
    ``encoder_top`` / ``decoder_top`` connect z1 and z2 (MLPs, ``top_hidden_dims``). The
    ELBO, the IWAE bound and the importance-sampled log p(x) work over the traces as they
    are; pictures (``encode``, ``decode``) pass the means through the lower layer:
    ``encode(x)`` is q(z2 | z1 = E[z1 | x]) and ``decode(z2)`` is p(x | z1 = E[z1 | z2]).
    """

    stochastic_layers = 2
    posterior = None  # q(z2 | x) integrates over z1: no one distribution (no active units)

    def __init__(self, likelihood: Likelihood | str = "bernoulli", x_dim: int = 784,
                 z_dim: int = 50, hidden_dims: Sequence[int] = (100, 100),
                 activation: str = "tanh", likelihood_options: dict | None = None,
                 network: Network | str = "mlp", z1_dim: int = 100,
                 top_hidden_dims: Sequence[int] = (50, 50)):
        super().__init__(likelihood, x_dim, z1_dim, hidden_dims, activation,
                         likelihood_options, network)
        self.z1_dim, self.z_dim = z1_dim, z_dim
        self.encoder_top = Encoder(z1_dim, tuple(top_hidden_dims), z_dim, activation)
        self.decoder_top = Encoder(z_dim, tuple(reversed(top_hidden_dims)), z1_dim, activation)

    def model(self, x: torch.Tensor, num_data: int | None = None,
              kl_weight: torch.Tensor | None = None, index: torch.Tensor | None = None
              ) -> None:
        batch = x.shape[0]
        with data_plate(x, num_data, index):
            prior = dist.Normal(x.new_zeros(()), x.new_ones(())).expand([batch, self.z_dim])
            with weighted(kl_weight):
                z2 = pyro.sample("z2", prior.to_event(1))
                loc, z_scale = self.decoder_top(z2)
                z1 = pyro.sample("z1", dist.Normal(loc, z_scale).to_event(1))
            pyro.sample("x", self.observation(z1).to_event(1), obs=x)

    def guide(self, x: torch.Tensor, num_data: int | None = None,
              kl_weight: torch.Tensor | None = None, index: torch.Tensor | None = None
              ) -> None:
        with data_plate(x, num_data, index), weighted(kl_weight):
            loc1, scale1 = self.encoder(x)
            z1 = pyro.sample("z1", dist.Normal(loc1, scale1).to_event(1))
            loc2, scale2 = self.encoder_top(z1)
            pyro.sample("z2", dist.Normal(loc2, scale2).to_event(1))

    def decode(self, z: torch.Tensor) -> dist.Distribution:
        """p(x | z1 = E[z1 | z2]) for top-layer latents ``z`` ``(..., z_dim)``."""
        return self.observation(self.decoder_top(z)[0])

    def encode(self, x: torch.Tensor) -> dist.Normal:
        """q(z2 | z1 = E[z1 | x]), batch shape ``(..., z_dim)``."""
        return dist.Normal(*self.encoder_top(self.encoder(x)[0]))

"""Models by name: any Pyro model and guide that pyro-vae trains, evaluates and draws.

**The protocol.** A model is an ``nn.Module`` with two Pyro programs over a batch ``x``
of shape ``(B, x_dim)``::

    model(x, num_data=None, kl_weight=None, index=None)
    guide(x, num_data=None, kl_weight=None, index=None)

- the images are observed at the sample site ``"x"``, and every per-image site sits in
  :func:`~pyro_vae.model.data_plate` ``(x, num_data, index)`` (the plate ``"data"`` at
  dim -1): a minibatch is scaled by ``N / B``, and ``index`` holds its positions in the
  training set (a semi-supervised model looks its labels up there);
- ``kl_weight`` (a 0-dim tensor, or ``None``) scales the latent sites of model and guide
  (:func:`~pyro_vae.model.weighted`): KL warm-up and beta;
- the attributes ``x_dim``, ``z_dim`` (the continuous latent that pictures show) and
  ``likelihood`` (the :class:`~pyro_vae.likelihoods.Likelihood` that scores the pixels);
- discrete latents: guide sites marked ``infer={"enumerate": "parallel"}`` and the class
  attribute ``enumerated = True``. Training then uses the sync-free ``TraceEnum_ELBO`` and
  evaluation sums them out exactly (:mod:`pyro_vae.estimators`) instead of sampling them;
  ``enumerated_values`` (how many values per image, e.g. the classes) sizes its chunks.

Optional methods, each turning on what uses it:

- ``encode(x) -> Normal``, ``decode(z) -> Distribution``, ``reconstruct(x)``,
  ``sample_prior(n) -> Distribution``: the pictures (``plot``, ``sample``, TensorBoard);
- ``classify(x) -> logits (B, C)``: training reports the test accuracy of its argmax each
  epoch, ``evaluate`` reports it too, ``plot`` draws a confusion matrix;
- ``set_labels(labels)`` (``labels``: ``(N,)`` class per training image, -1 where
  unknown): the model learns from labels; ``DataConfig.labels`` keeps that many.

A model is registered by name with its *builder*, ``build(config: ModelConfig,
likelihood: Likelihood) -> nn.Module``, and the numeric options it accepts
(``ModelConfig.model_options``, ``--model-option KEY=VALUE``) with their defaults::

    from pyro_vae import register_model

    @register_model("mine", options={"width": 64})
    def build(config, likelihood, width):
        return MyModel(config.x_dim, config.z_dim, likelihood, int(width))

The registry's rules (``--import MODULE``, entry points ``pyro_vae.models``, runs that name
the module that registered their model) are those of :mod:`pyro_vae.registry`. Built in:
``vae`` (Kingma & Welling; two stochastic layers with ``ModelConfig.stochastic_layers``;
the VampPrior with ``ModelConfig.prior``, an IAF guide with ``ModelConfig.guide``) and
``m2`` (:mod:`pyro_vae.semisupervised`). A model offers a prior or guide other than the
standard ones by setting ``prior_name`` / ``guide_name`` to the setting's value.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from .config import ModelConfig
from .errors import ConfigError
from .likelihoods import Likelihood
from .model import VAE, TwoLayerVAE
from .networks import get_network
from .registry import Registry
from .semisupervised import M2

__all__ = ["ModelKind", "available_models", "build_model", "get_model", "model_module",
           "register_model"]


@dataclass(frozen=True)
class ModelKind:
    """A named builder of models (see the module docstring)."""

    name: str
    build: Callable[..., nn.Module]
    options: dict[str, float] = field(default_factory=dict)
    description: str = ""

    def summary(self) -> str:
        """What ``pyro-vae models`` shows of it: name, description, options."""
        options = ", ".join(f"{k}={v:g}" for k, v in self.options.items()) or "none"
        return f"{self.name}\n  {self.description}\n  options: {options}"

    def check_options(self, options: dict) -> dict[str, float]:
        """The builder's options: the defaults updated with ``options``; an unknown name is
        a :class:`ConfigError` naming the known ones."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            known = ", ".join(f"{k}={v:g}" for k, v in self.options.items()) or "none"
            raise ConfigError(f"model '{self.name}' has no option {', '.join(unknown)} "
                              f"({{model.model_options}}); its options are: {known}")
        return {**self.options, **options}


_REGISTRY: Registry[ModelKind] = Registry("model", "model.name")


def register_model(name: str, *, options: dict[str, float] | None = None,
                   overwrite: bool = False):
    """Decorator registering ``build(config, likelihood, **options) -> nn.Module`` under
    ``name``; ``options`` are its numeric settings with their defaults. The same rules as
    :func:`~pyro_vae.likelihoods.register_likelihood` (define it in a module to use its
    runs from other processes)."""

    def decorator(build):
        description = " ".join((inspect.getdoc(build) or "").split("\n\n")[0].split())
        _REGISTRY.add(name, ModelKind(name, build, dict(options or {}), description), build,
                      overwrite=overwrite)
        return build

    return decorator


available_models, get_model, model_module = _REGISTRY.names, _REGISTRY.get, _REGISTRY.module_of


def build_model(config: ModelConfig, likelihood: Likelihood) -> nn.Module:
    """The model ``config`` names, built by its registered builder."""
    kind = get_model(config.name, config.model_module)
    model = kind.build(config, likelihood, **kind.check_options(config.model_options))
    for method in ("model", "guide"):
        if not callable(getattr(model, method, None)):
            raise ConfigError(f"model '{config.name}' built a {type(model).__name__} without "
                              f"a {method}() method; see pyro_vae.models for the protocol")
    for setting, default in (("prior", "standard"), ("guide", "gaussian")):
        chosen = getattr(config, setting)
        if getattr(model, f"{setting}_name", default) != chosen:
            raise ConfigError(f"model '{config.name}' has no {setting} '{chosen}' (the vae "
                              f"model with one stochastic layer has); leave "
                              f"{{model.{setting}={default}}}")
    return model


@register_model("vae")
def vae(config: ModelConfig, likelihood: Likelihood) -> VAE:
    """Kingma & Welling's VAE: z ~ N(0, I), x ~ likelihood(decoder(z)); two stochastic
    layers (Burda et al.) with stochastic_layers 2."""
    common = dict(x_dim=config.x_dim, z_dim=config.z_dim, hidden_dims=config.hidden_dims,
                  activation=config.activation, likelihood_options=config.likelihood_options,
                  network=get_network(config.network, config.network_module))
    if config.stochastic_layers == 2:
        return TwoLayerVAE(likelihood, z1_dim=config.z1_dim,
                           top_hidden_dims=config.top_hidden_dims, **common)
    return VAE(likelihood, prior=config.prior, pseudo_inputs=config.pseudo_inputs,
               guide=config.guide, flows=config.flows, flow_hidden=config.flow_hidden,
               **common)


@register_model("m2", options={"aux_loss_multiplier": 46.0, "classes": 10.0})
def m2(config: ModelConfig, likelihood: Likelihood, aux_loss_multiplier: float,
       classes: float) -> M2:
    """Semi-supervised VAE M2 (Kingma et al., 2014): y summed out by enumeration on
    unlabelled images; alpha log q(y | x) on labelled ones (aux_loss_multiplier)."""
    if config.stochastic_layers != 1:
        raise ConfigError("model m2 has one stochastic layer; leave {model.stochastic_layers=1}")
    if aux_loss_multiplier < 0 or classes != int(classes) or classes < 2:
        raise ConfigError("{model.model_options} of m2: aux_loss_multiplier must be >= 0 and "
                          f"classes a whole number >= 2, got {aux_loss_multiplier:g}, "
                          f"{classes:g}")
    return M2(likelihood, config.x_dim, config.z_dim, config.hidden_dims, config.activation,
              int(classes), aux_loss_multiplier, config.likelihood_options)

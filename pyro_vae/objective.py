"""The training loss: Pyro's ELBO of the VAE's model and guide, as an ``nn.Module``.

Pyro documents ``elbo(model, guide)`` -- an :class:`~pyro.infer.elbo.ELBOModule` whose
``forward`` is the differentiable loss -- as the way to train with torch optimizers, DDP
and Lightning. :class:`Objective` is that module for a :class:`~pyro_vae.model.VAE`: our
model and guide are two methods of one ``nn.Module`` (so several VAEs can live side by
side without Pyro's global parameter store), and the objective holds that module, so its
``parameters()`` and ``state_dict()`` are the VAE's and DDP can wrap it.

The ELBOs are Pyro's ``Trace_ELBO`` and ``TraceMeanField_ELBO`` with one change: their
``differentiable_loss`` never synchronises with the host. Pyro's versions read every site's
log-density sum and the loss back to Python (``torch_item``) and test the loss for NaN on
the host (``warn_if_nan``); here the loss stays a device tensor with the same value and
gradient. With Pyro's validation switched off (:mod:`pyro_vae.runner.trainer` does that
after validating a batch shape once) a training step then makes no host sync at all.
"""

from __future__ import annotations

import torch
from pyro.distributions.kl import kl_divergence
from pyro.distributions.util import is_identically_zero, scale_and_mask
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.elbo import ELBOModule
from pyro.infer.trace_elbo import _compute_log_r
from pyro.infer.trace_mean_field_elbo import check_fully_reparametrized
from pyro.infer.util import is_validation_enabled
from torch import nn

from .config import TrainConfig

__all__ = ["Objective", "SyncFreeTraceMeanField_ELBO", "SyncFreeTrace_ELBO", "make_elbo"]


class _SyncFree:
    """``differentiable_loss`` over the subclass's particles, without host syncs."""

    def differentiable_loss(self, model, guide, *args, **kwargs):
        loss = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            loss = loss + self._surrogate_loss_particle(model_trace, guide_trace) / \
                self.num_particles
        return loss


class SyncFreeTrace_ELBO(_SyncFree, Trace_ELBO):
    """:class:`~pyro.infer.Trace_ELBO` whose ``differentiable_loss`` makes no host sync.

    Same estimator, value and gradient: the sum over sites of ``log p`` minus ``log q``,
    with the score-function surrogate for guide sites that are not reparameterized
    (Ranganath et al., 2014). Where every guide site is reparameterized (the VAE's guide)
    the surrogate *is* the ELBO estimate, and it is returned as it is.
    """

    def _surrogate_loss_particle(self, model_trace, guide_trace) -> torch.Tensor:
        elbo, surrogate, log_r = 0.0, 0.0, None
        for site in model_trace.nodes.values():
            if site["type"] == "sample":
                elbo = elbo + site["log_prob_sum"]
                surrogate = surrogate + site["log_prob_sum"]
        score_function = False
        for site in guide_trace.nodes.values():
            if site["type"] != "sample":
                continue
            _, score_function_term, entropy_term = site["score_parts"]
            elbo = elbo - site["log_prob_sum"]
            if not is_identically_zero(entropy_term):
                surrogate = surrogate - entropy_term.sum()
            if not is_identically_zero(score_function_term):
                score_function = True
                if log_r is None:
                    log_r = _compute_log_r(model_trace, guide_trace)
                surrogate = surrogate + (
                    log_r.sum_to(site["cond_indep_stack"]) * score_function_term).sum()
        if not score_function:
            return -surrogate
        # the value of the ELBO, the gradient of the surrogate
        return -elbo.detach() - (surrogate - surrogate.detach())


class SyncFreeTraceMeanField_ELBO(_SyncFree, TraceMeanField_ELBO):
    """:class:`~pyro.infer.TraceMeanField_ELBO` (analytic KL where torch has it) whose
    ``differentiable_loss`` makes no host sync; the same estimator, value and gradient."""

    def _surrogate_loss_particle(self, model_trace, guide_trace) -> torch.Tensor:
        # TraceMeanField_ELBO._differentiable_loss_particle without its torch_item
        elbo = 0.0
        for name, model_site in model_trace.nodes.items():
            if model_site["type"] != "sample":
                continue
            if model_site["is_observed"]:
                elbo = elbo + model_site["log_prob_sum"]
                continue
            guide_site = guide_trace.nodes[name]
            if is_validation_enabled():
                check_fully_reparametrized(guide_site)
            try:
                kl_qp = kl_divergence(guide_site["fn"], model_site["fn"])
                kl_qp = scale_and_mask(kl_qp, scale=guide_site["scale"], mask=guide_site["mask"])
                if torch.is_tensor(kl_qp):
                    elbo = elbo - kl_qp.sum()
                else:
                    elbo = elbo - kl_qp * torch.Size(guide_site["fn"].batch_shape).numel()
            except NotImplementedError:
                entropy_term = guide_site["score_parts"].entropy_term
                elbo = elbo + model_site["log_prob_sum"] - entropy_term.sum()
        for name, guide_site in guide_trace.nodes.items():
            if guide_site["type"] == "sample" and name not in model_trace.nodes:
                if is_validation_enabled():
                    check_fully_reparametrized(guide_site)
                elbo = elbo - guide_site["score_parts"].entropy_term.sum()
        return -elbo


_ELBOS = {"trace": SyncFreeTrace_ELBO, "meanfield": SyncFreeTraceMeanField_ELBO}


def make_elbo(config: TrainConfig):
    """The sync-free Pyro ELBO named by ``config.elbo``, with its particles."""
    return _ELBOS[config.elbo](
        num_particles=config.num_particles,
        vectorize_particles=config.num_particles > 1,
        max_plate_nesting=1,
    )


class Objective(ELBOModule):
    """``forward(x)``: the negative ELBO of a VAE's model and guide on the batch ``x``.

    With ``num_data = N`` the batch's log densities are scaled by ``N / B``: an unbiased
    estimate of the loss of the whole data set, as ``pyro.infer.SVI`` on a subsampled
    plate gives. ``guide`` defaults to the VAE's amortized guide; pass another (with its
    parameters in ``extra``) to fit, e.g., a per-image Gaussian against the frozen decoder.
    """

    def __init__(self, vae: nn.Module, elbo, num_data: int | None = None, guide=None,
                 extra: nn.Module | None = None):
        super().__init__(vae.model, guide or vae.guide, elbo)
        self.vae, self.extra, self.num_data = vae, extra, num_data

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kwargs = {} if self.num_data is None else {"num_data": self.num_data}
        return self.elbo.differentiable_loss(self.model, self.guide, x, **kwargs)

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
gradient. With Pyro's validation switched off (:mod:`pyro_vae.runner.step` does that
after validating a batch shape once) a training step then makes no host sync at all.
"""

from __future__ import annotations

import math

import torch
from opt_einsum import shared_intermediates
from pyro import poutine
from pyro.distributions import Independent, Normal
from pyro.distributions.kl import kl_divergence
from pyro.distributions.util import is_identically_zero, scale_and_mask
from pyro.infer import Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO
from pyro.infer.elbo import ELBOModule
from pyro.infer.trace_elbo import _compute_log_r
from pyro.infer.trace_mean_field_elbo import check_fully_reparametrized
from pyro.infer.traceenum_elbo import _compute_model_factors
from pyro.infer.util import Dice, MarginalRing, is_validation_enabled
from pyro.ops import packed
from pyro.ops.contract import contract_tensor_tree
from pyro.ops.einsum.adjoint import require_backward
from pyro.ops.rings import SampleRing
from pyro.poutine.util import site_is_subsample
from torch import nn

from .config import TrainConfig
from .errors import ConfigError
from .estimators import LogWeights, log_mean_exp

__all__ = ["IWAE_ELBO", "Objective", "SyncFreeTraceEnum_ELBO", "SyncFreeTraceMeanField_ELBO",
           "SyncFreeTrace_ELBO", "kl_weight", "learning_rate", "make_elbo"]


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


class SyncFreeTraceEnum_ELBO(TraceEnum_ELBO):
    """:class:`~pyro.infer.TraceEnum_ELBO` (discrete latents summed out by enumeration)
    whose ``differentiable_loss`` makes no host sync; the same estimator, value and gradient.

    Pyro's version tests the loss for NaN on the host, and its Dice expectation reads back
    whether any enumerated value has probability zero (``mask.all()``) to drop those terms
    with a data-dependent ``masked_select``. Here such terms are zeroed in place with
    ``where`` (``0 * cost`` where the probability is 0, even for an infinite cost), which
    keeps every shape static: the step traces into a graph and a CUDA graph captures it.
    """

    def differentiable_loss(self, model, guide, *args, **kwargs):
        elbo = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            elbo = elbo + _dice_elbo(model_trace, guide_trace)
        return -elbo / self.num_particles


def _dice_elbo(model_trace, guide_trace) -> torch.Tensor:
    """``pyro.infer.traceenum_elbo._compute_dice_elbo`` with :class:`_StaticDice`."""
    marginal_costs, log_factors, ordering, sum_dims, scale = _compute_model_factors(
        model_trace, guide_trace)
    if log_factors:
        dim_to_size = {}
        for terms in log_factors.values():
            for term in terms:
                dim_to_size.update(zip(term._pyro_dims, term.shape))
        with shared_intermediates() as cache:
            ring = SampleRing(cache=cache, dim_to_size=dim_to_size)
            log_factors = contract_tensor_tree(log_factors, sum_dims, ring=ring)
        for t, terms in log_factors.items():
            marginal_costs.setdefault(t, []).extend(
                packed.scale_and_mask(term, scale=scale) for term in terms)
    for name, site in guide_trace.nodes.items():
        if site["type"] == "sample":
            marginal_costs.setdefault(ordering[name], []).append(
                packed.neg(site["packed"]["log_prob"]))
    return _StaticDice(guide_trace, ordering).compute_expectation(marginal_costs)


class _StaticDice(Dice):
    """Pyro's :class:`~pyro.infer.util.Dice` with static shapes: terms of probability 0
    are zeroed with ``where``, not dropped with ``masked_select`` after a host read."""

    def compute_expectation(self, costs):
        with shared_intermediates() as cache:
            ring = MarginalRing(cache=cache)
            expected_cost = 0.0
            for ordinal, cost_terms in costs.items():
                log_factors = self._get_log_factors(ordinal)
                scale = math.exp(sum(x for x in log_factors if not torch.is_tensor(x)))
                log_factors = [x for x in log_factors if torch.is_tensor(x)]
                queries = {frozenset(cost._pyro_dims): None for cost in cost_terms}
                for log_factor in log_factors:
                    key = frozenset(log_factor._pyro_dims)
                    if queries.get(key, False) is None:
                        queries[key] = log_factor
                for cost in cost_terms:
                    key = frozenset(cost._pyro_dims)
                    if queries[key] is None:
                        query = torch.zeros_like(cost)
                        query._pyro_dims = cost._pyro_dims
                        log_factors.append(query)
                        queries[key] = query
                sum_dims = set().union(*(x._pyro_dims for x in log_factors)) - ordinal
                for query in queries.values():
                    require_backward(query)
                root = ring.sumproduct(log_factors, sum_dims)
                root._pyro_backward()
                probs = {key: query._pyro_backward_result.exp()
                         for key, query in queries.items()}
                for cost in cost_terms:
                    key = frozenset(cost._pyro_dims)
                    prob = probs[key]
                    prob._pyro_dims = queries[key]._pyro_dims
                    cost, prob = packed.broadcast_all(cost, prob)
                    cost = torch.where(prob > 0, cost, 0.0)
                    expected_cost = expected_cost + scale * torch.tensordot(
                        prob, cost, dims=prob.dim())
        return expected_cost


def _latent_sites(trace) -> list[str]:
    return [name for name, site in trace.nodes.items() if site["type"] == "sample"
            and not site_is_subsample(site) and not site["is_observed"]]


class IWAE_ELBO(Trace_ELBO):
    r"""The importance-weighted bound of Burda, Grosse & Salakhutdinov (2015), per image.

    .. math:: \mathcal{L}_K(x) = \log \frac{1}{K} \sum_{k=1}^K
              \frac{p(x, z_k)}{q(z_k \mid x)}, \qquad z_k \sim q(z \mid x)

    computed over Pyro traces of model and guide with ``K = num_particles`` vectorized
    particles: each image's log weight is the sum of its sites' log densities (any number
    of latent sites), the log-mean-exp is taken over the particles *of each image*, and
    the bounds are summed over the batch (scaled by ``N / B`` like the ELBO). ``K = 1`` is
    the ELBO. Pyro's ``RenyiELBO(alpha=0)`` is the same bound (it sums log weights over
    dependent plates only, so each image keeps its own), but it has no
    ``differentiable_loss``, reads its value back with ``.item()``, takes the log-mean-exp
    of *scaled* log densities when the data plate is subsampled, and has no DReG.

    ``dreg=True``: the doubly reparameterized gradient of Tucker et al. (2019). The
    decoder gets the usual IWAE gradient ``sum_k w_k grad log w_k``; the encoder gets
    ``sum_k w_k^2 d log w_k / d z_k  d z_k / d phi`` with the guide's density evaluated at
    stopped parameters, which removes the score-function term whose variance grows with
    ``K``. It is written as a surrogate whose gradient is that estimator and whose value
    is the bound; it costs one more decoder pass (the model replayed on ``stop(z)``), and
    it stops the parameters of each guide site's distribution, which is DReG exactly for
    guides whose sites' parameters depend on ``x`` only.
    """

    def __init__(self, num_particles: int = 1, dreg: bool = False, max_plate_nesting: int = 1):
        super().__init__(num_particles=num_particles, vectorize_particles=True,
                         max_plate_nesting=max_plate_nesting)
        self.dreg = dreg

    def log_weights(self, model, guide, *args, **kwargs):
        """``(LogWeights (K, B), model_trace, guide_trace)`` for one vectorized draw."""
        model_trace, guide_trace = self._get_vectorized_trace(model, guide, args, kwargs)
        x_sites = [s for s in model_trace.nodes.values() if s["type"] == "sample"
                   and s["is_observed"] and not site_is_subsample(s)]
        shape = (self.num_particles, *x_sites[0]["fn"].batch_shape[-1:])
        return LogWeights.of(model_trace, guide_trace, shape), model_trace, guide_trace

    def differentiable_loss(self, model, guide, *args, **kwargs):
        terms, model_trace, guide_trace = self.log_weights(model, guide, *args, **kwargs)
        log_w = terms.log_weight  # (K, B)
        # N / B of the data plate, read off an observed site: latent sites may also carry
        # a KL weight, which the IWAE bound does not have
        scale = next(site["scale"] for site in model_trace.nodes.values()
                     if site["type"] == "sample" and site["is_observed"])
        bound = log_mean_exp(log_w).sum()
        if not self.dreg:
            return -scale * bound
        weights = torch.softmax(log_w.detach(), 0)  # normalized importance weights (K, B)
        log_q_stopped = sum(_detached(guide_trace.nodes[n]["fn"]).log_prob(
            guide_trace.nodes[n]["value"]) for n in _latent_sites(guide_trace))
        log_p = log_w + terms.log_guide
        log_q_stopped = log_q_stopped.reshape(log_w.shape)
        log_p_stopped_z = self._log_joint_at_stopped_z(model, guide_trace, args, kwargs)
        log_p_stopped_z = log_p_stopped_z.reshape(log_w.shape)
        surrogate = (weights**2 * (log_p - log_q_stopped - log_p_stopped_z)
                     + weights * log_p_stopped_z).sum()
        return -scale * (bound.detach() + surrogate - surrogate.detach())

    def _log_joint_at_stopped_z(self, model, guide_trace, args, kwargs) -> torch.Tensor:
        """``log p(x, stop(z_k))`` ``(K, B)``: the model replayed on detached latents."""
        stopped = guide_trace.copy()
        for name in _latent_sites(guide_trace):
            stopped.nodes[name] = dict(guide_trace.nodes[name],
                                       value=guide_trace.nodes[name]["value"].detach())
        trace = poutine.trace(poutine.replay(self._vectorized_num_particles(model),
                                             trace=stopped)).get_trace(*args, **kwargs)
        trace.compute_log_prob()
        return sum(site["unscaled_log_prob"] for site in trace.nodes.values()
                   if site["type"] == "sample" and not site_is_subsample(site))


def _detached(fn):
    """The distribution ``fn`` with its parameters detached (Normal, possibly wrapped in
    ``Independent`` / ``expand``)."""
    if isinstance(fn, Independent):
        return Independent(_detached(fn.base_dist), fn.reinterpreted_batch_ndims)
    if isinstance(fn, Normal):
        return Normal(fn.loc.detach(), fn.scale.detach())
    raise NotImplementedError(f"DReG needs Normal guide sites, got {type(fn).__name__}")


_ELBOS = {"trace": SyncFreeTrace_ELBO, "meanfield": SyncFreeTraceMeanField_ELBO}


def make_elbo(config: TrainConfig, enumerated: bool = False):
    """The objective of ``config``: the sync-free Pyro ELBO named by ``config.elbo`` with
    its particles, or the IWAE bound (``config.objective = "iwae"``, ``K`` particles,
    DReG with ``config.dreg``). ``enumerated``: the guide has discrete sites marked for
    parallel enumeration, summed out exactly by the sync-free ``TraceEnum_ELBO``."""
    if enumerated:
        if config.objective != "elbo" or config.elbo != "trace":
            raise ConfigError("this model sums its discrete latents out by enumeration "
                              "(TraceEnum_ELBO), which has no IWAE or analytic-KL form; "
                              "set {train.objective=elbo} and {train.elbo=trace}")
        return SyncFreeTraceEnum_ELBO(num_particles=config.num_particles,
                                      vectorize_particles=config.num_particles > 1,
                                      max_plate_nesting=1)
    if config.objective == "iwae":
        return IWAE_ELBO(num_particles=config.num_particles, dreg=config.dreg)
    return _ELBOS[config.elbo](
        num_particles=config.num_particles,
        vectorize_particles=config.num_particles > 1,
        max_plate_nesting=1,
    )


BURDA_STAGES = 8  # i = 0..7: 3^i epochs at 1e-3 * 10^(-i/7), 3,280 epochs in all


def learning_rate(config: TrainConfig, epoch: int) -> float:
    """The learning rate of epoch ``epoch`` (1, 2, ...): ``config.lr``, or under the
    ``burda`` schedule ``config.lr * 10^(-i/7)`` in stage ``i``, which lasts ``3^i``
    epochs (Burda et al., 2015); after the last stage the last rate stays."""
    if config.lr_schedule == "constant":
        return config.lr
    end = 0
    for stage in range(BURDA_STAGES):
        end += 3**stage
        if epoch <= end:
            break
    return config.lr * 10 ** (-stage / 7)


def kl_weight(config: TrainConfig, epoch: int) -> float:
    """The weight of the KL term in epoch ``epoch`` (1, 2, ...): ``beta`` (Higgins et al.,
    2017) times a linear warm-up ``min(1, epoch / kl_warmup)`` (Sønderby et al., 2016).
    Never 0, so Pyro's scale stays a valid positive factor."""
    warmup = min(1.0, epoch / config.kl_warmup) if config.kl_warmup > 0 else 1.0
    return config.beta * warmup


class Objective(ELBOModule):
    """``forward(x, index)``: the negative ELBO of a VAE's model and guide on the batch ``x``.

    With ``num_data = N`` the batch is a subsample of ``N`` images (at positions
    ``index``): its log densities are scaled by ``N / B``, an unbiased estimate of the loss
    of the whole data set, as ``pyro.infer.SVI`` on a subsampled plate gives. ``guide``
    defaults to the VAE's amortized guide; pass another (with its parameters in
    ``extra``) to fit, e.g., a per-image Gaussian against the frozen decoder.
    """

    def __init__(self, vae: nn.Module, elbo, num_data: int | None = None, guide=None,
                 extra: nn.Module | None = None, weighted_kl: bool = False):
        super().__init__(vae.model, guide or vae.guide, elbo)
        self.vae, self.extra, self.num_data = vae, extra, num_data
        self.weighted_kl = weighted_kl
        # the KL weight as a device tensor: set between epochs (set_kl_weight) without
        # retracing the step, since traced and CUDA-graph steps read it as an input
        self.register_buffer("kl_weight", torch.ones(()), persistent=False)

    def set_kl_weight(self, weight: float) -> None:
        """Weight the KL term (the latent sites of model and guide) by ``weight > 0``."""
        if not self.weighted_kl:
            raise ValueError("this objective was built without weighted_kl=True")
        self.kl_weight.fill_(weight)

    def forward(self, x: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """The loss on the batch ``x``; ``index``: its positions in the data set (the
        subsample of the ``"data"`` plate, :func:`~pyro_vae.model.data_plate`)."""
        kwargs = {}
        if self.num_data is not None:
            kwargs.update(num_data=self.num_data, index=index)
        if self.weighted_kl:
            kwargs["kl_weight"] = self.kl_weight
        return self.elbo.differentiable_loss(self.model, self.guide, x, **kwargs)

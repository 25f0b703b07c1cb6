"""The one training step, and epochs of it.

:meth:`Trainer.step` is the only place in pyro-vae that differentiates a loss: forward
(the objective's negative ELBO), backward, optimizer step, and a check that the loss and
the gradients are finite. Training, the diagnostics' per-image fits, the benchmarks and
the tests all call it. It reads nothing back from the device, in three ways of running:

``eager``
    Pyro traces model and guide every step; the ELBO is the sync-free one of
    :mod:`pyro_vae.objective`.
``traced`` (CPU, ``fast=True``)
    The loss and its gradient are traced once per batch shape into an aten graph
    (``torch.fx.experimental.proxy_tensor.make_fx``: what Pyro's Python computes, without
    the Python) and that graph is replayed; Adam is the fused kernel where torch has it.
``cuda-graph`` (CUDA, ``fast=True``)
    The whole step -- forward, backward, Adam (``capturable=True``) and the finite check
    -- is captured in a CUDA graph once per batch shape and replayed. Random numbers come
    from the CUDA generator's Philox offsets, which every replay advances, so each step
    draws fresh noise and the generator state in a checkpoint resumes the stream.

Validation: the first batch of every shape is first run eagerly with Pyro's validation
on (distribution arguments and supports, site shapes, NaN checks), under a forked RNG and
without an update, so a bad model fails loudly before anything is traced; the steps
themselves run with validation off, since they replay an identical, validated
computation. Non-finite losses or gradients are still detected on the device in every
step (``finite``) and acted on once per epoch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import pyro
import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from ..data import DeviceBatches
from ..errors import ConfigError
from ..estimators import elbo_terms
from ..progress import Progress
from .state import EpochProgress

log = logging.getLogger(__name__)

WARMUP_STEPS = 3  # eager steps on a side stream before a CUDA graph is captured


class Diverged(Exception):
    """A non-finite loss or gradient at ``step`` (0-based) of an epoch."""

    def __init__(self, step: int):
        super().__init__(f"non-finite loss or gradient at step {step + 1}")
        self.step = step


def _adam(params, lr: float, device: torch.device, capturable: bool, eps: float = 1e-8
          ) -> torch.optim.Adam:
    """Adam with the fastest implementation torch has for ``device`` (same update rule)."""
    if capturable:
        try:
            return torch.optim.Adam(params, lr=lr, eps=eps, capturable=True, fused=True)
        except (RuntimeError, ValueError):  # torch without a capturable fused Adam
            return torch.optim.Adam(params, lr=lr, eps=eps, capturable=True)
    try:
        return torch.optim.Adam(params, lr=lr, eps=eps, fused=True)
    except (RuntimeError, ValueError):  # torch without a fused Adam for this device
        return torch.optim.Adam(params, lr=lr, eps=eps)


class Trainer:
    """Minimizes ``objective(x)`` (any ``nn.Module`` whose forward returns a scalar loss)
    with Adam over its parameters that require gradients.

    Parameters
    ----------
    objective:
        The loss module, e.g. :class:`~pyro_vae.objective.Objective`.
    lr:
        Adam's learning rate.
    fast:
        Replay the step as a traced graph (CPU) or a CUDA graph (CUDA); ``False`` runs
        it eagerly. Off by itself under DDP (``module`` given) and ``nan_policy="skip"``.
    nan_policy:
        ``"stop"``: every step updates; :meth:`fit_epoch` raises :class:`Diverged` at the
        end of an epoch that met a non-finite loss or gradient. ``"skip"``: such steps
        make no update (one host sync per step to decide) and are counted.
    module:
        What to call for the loss in eager steps, if not ``objective`` itself (the
        objective wrapped in ``DistributedDataParallel``).
    eps:
        Adam's epsilon (Burda et al. use 1e-4).
    """

    def __init__(self, objective: nn.Module, lr: float, *, fast: bool = True,
                 nan_policy: str = "stop", module: nn.Module | None = None,
                 eps: float = 1e-8):
        self.objective, self.module = objective, module or objective
        self.nan_policy = nan_policy
        self.params = [p for p in objective.parameters() if p.requires_grad]
        self.device = self.params[0].device
        fast = fast and module is None and nan_policy == "stop"
        if fast and self.device.type == "cuda":
            self.mode = "cuda-graph"
        elif fast and self.device.type == "cpu":
            self.mode = "traced"
        else:
            self.mode = "eager"
        self.optimizer = _adam(self.params, lr, self.device, self.mode == "cuda-graph", eps)
        self.skipped_steps = 0
        self._validated: set[tuple] = set()
        self._replays: dict[tuple, Callable] = {}

    def set_lr(self, lr: float) -> None:
        """Use learning rate ``lr`` from the next step on (a schedule, between epochs)."""
        changed = False
        for group in self.optimizer.param_groups:
            changed |= group["lr"] != lr
            group["lr"] = lr
        if changed and self.mode == "cuda-graph":
            self._replays.clear()  # captured with the old rate: capture again

    # -- the step ------------------------------------------------------------------------

    def step(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimization step on the batch ``x``.

        Returns ``(loss, finite)``, 0-dim tensors on the device (no host sync): the loss
        before the update, and whether it and every gradient were finite. Under CUDA
        graphs they are the graph's outputs, overwritten by the next step.
        """
        key = (tuple(x.shape), x.dtype)
        if key not in self._validated:
            self.validate(x)
            self._validated.add(key)
        with pyro.validation_enabled(False):
            if self.mode == "traced":
                return self._traced_step(key, x)
            if self.mode == "cuda-graph":
                return self._graph_step(key, x)
            loss, finite = self._forward_backward(x)
            if self.nan_policy == "skip" and not bool(finite):  # the one accepted host sync
                self.skipped_steps += 1
                return loss, finite
            self.optimizer.step()
            return loss, finite

    def validate(self, x: torch.Tensor) -> None:
        """Run the loss on ``x`` eagerly with Pyro's validation on; change nothing.

        The RNG is forked, so the step that follows draws the same noise. Raises what
        Pyro or torch.distributions raise for invalid parameters, values or shapes.
        """
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), pyro.validation_enabled(True), \
                torch.no_grad():
            self.module(x)

    def _forward_backward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.module(x)
        loss.backward()
        return loss.detach(), self._finite(loss, [p.grad for p in self.params])

    @staticmethod
    def _finite(loss: torch.Tensor, grads) -> torch.Tensor:
        # a non-finite value anywhere in the loss or the gradients makes this non-finite
        grads = [g for g in grads if g is not None]
        total = loss.detach()
        if grads:
            total = total + torch.stack(torch._foreach_norm(grads)).sum()
        return torch.isfinite(total)

    # -- CPU: replay the traced loss-and-gradient graph ------------------------------------

    def _traced_step(self, key, x):
        replay = self._replays.get(key) or self._trace(key, x)
        with torch.no_grad():  # the graph holds the backward pass: nothing to record
            loss, *grads = replay(*self._state_values(), x)
        for p, g in zip(self.params, grads):
            p.grad = g
        finite = self._finite(loss, grads)
        self.optimizer.step()
        return loss, finite

    def _state_values(self) -> list[torch.Tensor]:
        return [t for _, t in self._named_state()]

    def _named_state(self) -> list[tuple[str, torch.Tensor]]:
        return [*self.objective.named_parameters(), *self.objective.named_buffers()]

    def _trace(self, key, x):
        """Trace ``(state..., x) -> (loss, *gradients)`` into an aten graph."""
        named = self._named_state()
        names = [n for n, _ in named]
        trainable = [t.requires_grad for _, t in named]

        def loss_and_grads(*args):
            *values, xb = args
            leaves = [v.detach().requires_grad_() if t else v
                      for v, t in zip(values, trainable)]
            state = dict(zip(names, leaves))
            loss = torch.func.functional_call(self.objective, state, (xb,))
            grads = torch.autograd.grad(loss, [v for v, t in zip(leaves, trainable) if t])
            return (loss.detach(), *grads)

        start = time.perf_counter()
        try:
            with torch.random.fork_rng(devices=[]), torch.enable_grad():
                graph = make_fx(loss_and_grads, tracing_mode="fake")(*self._state_values(), x)
        except Exception as e:  # noqa: BLE001 - whatever stops tracing, the fix is the same
            reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise ConfigError(
                f"the training step of this model cannot be traced into a graph ({reason}); "
                "a likelihood or network whose Python branches on tensor values needs "
                "TrainConfig.fast_step = False") from None
        log.debug("traced the step for batch shape %s: %d nodes in %.2f s", key[0],
                  len(graph.graph.nodes), time.perf_counter() - start)
        self._replays[key] = graph
        return graph

    # -- CUDA: replay the whole step as a CUDA graph ---------------------------------------

    def _graph_step(self, key, x):
        entry = self._replays.get(key)
        if entry is None:
            try:
                entry = self._capture(key, x)
            except RuntimeError as e:  # an operation that a CUDA graph cannot hold
                reason = " ".join(str(e).split())[:200]
                log.warning("the training step could not be captured in a CUDA graph (%s); "
                            "training goes on with eager steps (TrainConfig.fast_step = "
                            "False skips the attempt)", reason)
                self.mode = "eager"
                self.optimizer.zero_grad(set_to_none=True)
                loss, finite = self._forward_backward(x)
                self.optimizer.step()
                return loss, finite
        static_x, graph, outputs = entry
        static_x.copy_(x)
        graph.replay()
        return outputs

    def _capture(self, key, x):
        """Warm up on a side stream, restore every state it touched, capture the step."""
        static_x = x.clone()
        params = [p.detach().clone() for p in self.params]
        optimizer = {id(t): t.clone() for s in self.optimizer.state.values()
                     for t in s.values() if torch.is_tensor(t)}
        rng = torch.cuda.get_rng_state(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self._forward_backward(static_x)
                self.optimizer.step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        # undo the warm-up: parameters, optimizer state (fresh state is zeros), RNG
        with torch.no_grad():
            for p, saved in zip(self.params, params):
                p.copy_(saved)
            for s in self.optimizer.state.values():
                for t in s.values():
                    if torch.is_tensor(t):
                        t.copy_(optimizer[id(t)]) if id(t) in optimizer else t.zero_()
        torch.cuda.set_rng_state(rng, self.device)
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss, finite = self._forward_backward(static_x)
            self.optimizer.step()
        entry = (static_x, graph, (loss, finite))
        self._replays[key] = entry
        return entry

    # -- checkpoints -----------------------------------------------------------------------

    def load_state_dict(self, optimizer_state: dict) -> None:
        """Load the optimizer's state (replaces its tensors: captured graphs are redone)."""
        self.optimizer.load_state_dict(optimizer_state)
        if self.mode == "cuda-graph":
            self._replays.clear()

    # -- epochs ----------------------------------------------------------------------------

    def fit_epoch(self, batches: DeviceBatches, progress: EpochProgress, *,
                  should_stop: Callable[[], bool] = lambda: False,
                  bar: Progress | None = None) -> EpochProgress:
        """Train on the epoch's batches from ``progress.step`` on; return the new progress.

        Stops early (between two steps) when ``should_stop()`` turns true. Raises
        :class:`Diverged` at the end under ``nan_policy="stop"`` if any step met a
        non-finite value. Reads one value back from the device, at the end: the first
        non-finite step (the epoch's sums are left on the device for the caller).
        """
        device = batches.x.device
        loss_sum = progress.loss_sum if progress.loss_sum is not None else \
            torch.zeros((), device=device)
        first_bad = torch.full((), -1, dtype=torch.long, device=device)
        step, skipped_before = progress.step, self.skipped_steps
        self.objective.train()
        start = time.perf_counter()
        for index in batches.indices(progress.perm, step):
            xb = batches.gather(index)
            try:
                loss, finite = self.step(xb)
            except ValueError as e:  # validation met non-finite or invalid parameters
                if "invalid values" not in str(e) and "NaN" not in str(e):
                    raise
                bad = int(first_bad)
                raise Diverged(bad if bad >= 0 else step) from None
            if self.nan_policy == "stop":
                first_bad = torch.where((first_bad < 0) & ~finite, step, first_bad)
            else:  # a skipped step adds nothing
                loss = torch.where(finite, loss, 0.0)
            # the loss is scaled to N images: B / N of it is the batch's sum of -ELBO
            loss_sum = loss_sum + loss * (xb.shape[0] / len(batches.x))
            step += 1
            if bar is not None:
                bar.update()
            if should_stop():
                break
        seconds = progress.seconds + time.perf_counter() - start
        bad = int(first_bad)  # the epoch's one read of the device
        if bad >= 0:
            raise Diverged(bad)
        return EpochProgress(progress.perm, step, loss_sum, seconds,
                             progress.skipped_steps + self.skipped_steps - skipped_before)

    @torch.no_grad()
    def evaluate_epoch(self, vae: nn.Module, test_x: torch.Tensor, batch_size: int,
                       seed: int) -> torch.Tensor:
        """Sums over ``test_x`` of the one-sample ELBO, log-likelihood term and KL, ``(3,)``.

        Runs with Pyro's validation off: the test images were checked against the
        likelihood's support when loaded and the parameters are finite (checked per step).
        """
        with pyro.validation_enabled(False):
            terms = elbo_terms(vae, test_x, batch_size, seed=seed)
        return torch.stack([terms.elbo.sum(), terms.log_likelihood.sum(), terms.kl.sum()])


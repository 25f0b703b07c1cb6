"""The one training step: the loss and its gradients, Adam, and a finite check.

:func:`loss_and_grads` is the pure core, ``(state..., x, index) -> (loss, *gradients)``.
:class:`Trainer` runs it with Adam in one of three modes, none of which reads anything
back from the device: ``eager`` (Pyro traces model and guide every step; DDP's forward
under torchrun), ``traced`` (CPU: the whole step -- loss, gradients, finite check and
Adam's update -- traced once per batch shape into an aten graph with ``make_fx``, what
Pyro's and the optimizer's Python compute, without the Python, and replayed; its matrix
products through oneDNN (:mod:`~pyro_vae.onednn`); with ``compile``, that graph compiled
by Inductor into fused kernels) and
``cuda-graph`` (the whole step, Adam included, captured once per batch shape and
replayed; the Philox offsets advance with every replay, so each step draws fresh noise).

The learning rate is a device tensor, so a schedule never retraces or recaptures.
``nan_policy="skip"`` is a variant of the update, not of the mode: a non-finite step keeps
the previous parameters and Adam state, selected on the device (optax's
``apply_if_finite``, NumPyro's ``stable_update``). The first batch of every shape is run
once eagerly with Pyro's validation on, under a forked RNG and without an update, so a bad
model fails loudly before anything is traced.
"""

from __future__ import annotations

import copy
import time

import pyro
import torch
from torch import fx, nn
from torch.fx.experimental.proxy_tensor import make_fx

from ..errors import ConfigError, get_logger
from ..onednn import use_onednn
from .compiling import compile_graph, use_inductor_cache

log = get_logger(__name__)

# the largest difference (relative to each output's largest value) between the traced
# step's loss and gradients with oneDNN's products and with torch's BLAS that is rounding
ONEDNN_TOLERANCE = 1e-3
WARMUP_STEPS = 3  # eager steps on a side stream before a CUDA graph is captured

class Diverged(Exception):
    """A non-finite loss or gradient, at ``step`` (0-based) of an epoch where known."""

    def __init__(self, step: int | None = None):
        super().__init__("non-finite loss or gradient" + (f" at step {step + 1}"
                                                          if step is not None else ""))
        self.step = step


def loss_and_grads(objective: nn.Module, names: list[str], trainable: list[bool], *args):
    """``(loss, *gradients)`` of ``objective(x, index)`` at the parameters and buffers
    ``values`` (``args = (*values, x, index)``, in the order of ``names``); gradients of
    the ``trainable`` ones."""
    *values, x, index = args
    leaves = [v.detach().requires_grad_() if t else v for v, t in zip(values, trainable)]
    loss = torch.func.functional_call(objective, dict(zip(names, leaves)), (x, index))
    grads = torch.autograd.grad(loss, [v for v, t in zip(leaves, trainable) if t])
    return (loss.detach(), *grads)


def finite(loss: torch.Tensor, grads) -> torch.Tensor:
    """A 0-dim bool tensor: the loss and every gradient are finite.

    Exactly when every gradient's smallest and largest entries are finite: a NaN
    propagates through both, and neither can overflow (a norm's squares overflow float32
    from entries of 1e19 on, which made an earlier check call such a step non-finite).
    """
    extremes = [m for g in grads if g is not None for m in torch.aminmax(g)]
    return torch.isfinite(torch.stack([loss.detach(), *extremes])).all()


def adam_in_graph(params, grads, exp_avgs, exp_avg_sqs, steps, lr, *, beta1: float,
                  beta2: float, eps: float, fused: bool):
    """Adam's update of ``params`` and its state in place, as a traced graph holds it.

    ``fused``: torch's fused CPU kernel, as ``torch.optim.Adam(fused=True).step()`` calls
    it (the same bits); else the same rule as elementwise tensor arithmetic, which Inductor
    fuses into one loop per parameter. Returns ``None`` or, unfused, the 2-vector
    ``(lr / (1 - beta1^t), 1 / sqrt(1 - beta2^t))``: the caller returns it from the graph
    so that Inductor computes it once, not once per vector of every parameter's loop.
    """
    if fused:
        torch._foreach_add_(steps, 1)
        torch._fused_adam_(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False,
                           lr=lr, beta1=beta1, beta2=beta2, weight_decay=0.0, eps=eps,
                           maximize=False)
        return None
    step = steps[0] + 1  # Adam steps every parameter together: one count for all
    scale = torch.stack([lr / (1 - beta1 ** step), (1 - beta2 ** step).rsqrt()])
    for p, g, m, v, t in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        t.copy_(step)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        p.sub_(scale[0] * m / (v.sqrt() * scale[1] + eps))
    return scale


_VIEWS = (torch.ops.aten.alias.default, torch.ops.aten.view.default,
          torch.ops.aten.expand.default, torch.ops.aten.t.default)


def _same_layout(a, b) -> bool:
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) \
        and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride() \
        and a.storage_offset() == b.storage_offset()


def drop_identity_views(graph: fx.GraphModule) -> int:
    """Replace, in place, the views of ``graph`` that give their input's own layout -- an
    alias, a view or expand to the same shape and strides, a transpose of a transpose --
    by that input, and drop views nobody uses; return how many nodes went. Values and
    memory are the same (a view shares its input's storage); a replayed graph makes one
    Python call per node, and at batch 128 these were 44 of the step's 271 nodes and
    about 7% of its time (``python -m scripts.compiled_step`` measures the step)."""
    count = 0
    for node in list(graph.graph.nodes):
        if node.op != "call_function" or node.target not in _VIEWS \
                or not isinstance(node.args[0], fx.Node):
            continue
        source = node.args[0]
        if node.target is torch.ops.aten.t.default and source.op == "call_function" \
                and source.target is torch.ops.aten.t.default:
            source = source.args[0]
        elif not _same_layout(node.meta.get("val"), source.meta.get("val")):
            continue
        node.replace_all_uses_with(source)
        graph.graph.erase_node(node)
        count += 1
    for node in reversed(list(graph.graph.nodes)):
        if node.op == "call_function" and node.target in _VIEWS and not node.users:
            graph.graph.erase_node(node)
            count += 1
    if count:
        graph.graph.lint()
        graph.recompile()
    return count


def _adam(params, lr: torch.Tensor, eps: float, beta1: float, capturable: bool
          ) -> torch.optim.Adam:
    """Adam with the fastest implementation torch has for the device (same update rule)."""
    options = dict(lr=lr, eps=eps, betas=(beta1, 0.999), capturable=capturable)
    try:
        return torch.optim.Adam(params, fused=True, **options)
    except (RuntimeError, ValueError):  # no fused Adam for this device or torch
        log.info("no fused Adam here; using torch's single-tensor Adam")
        return torch.optim.Adam(params, foreach=False, **options)


class Trainer:
    """Minimizes ``objective(x, index)`` (an ``nn.Module`` whose forward is a scalar loss,
    e.g. :class:`~pyro_vae.objective.Objective`) with Adam (``lr``, ``eps``, ``beta1``) over
    its parameters that require gradients.

    ``fast``: replay the step as a traced graph (CPU) or a CUDA graph; eager otherwise, and
    under DDP (``module``: the objective wrapped in ``DistributedDataParallel``, whose hooks
    average the gradients). ``nan_policy``: ``"stop"`` -- every step updates and the caller
    acts on ``finite``; ``"skip"`` -- a non-finite step changes no state. ``onednn``: the
    traced step's matrix products through oneDNN where it gives the same loss and
    gradients (:mod:`~pyro_vae.onednn`); ``False`` keeps torch's BLAS. ``compile``: the
    traced step compiled by Inductor (CPU); ``compile_batch``: only for batches of that
    many images, the others replay the traced graph (``None``: every batch shape).
    """

    def __init__(self, objective: nn.Module, lr: float, *, fast: bool = True,
                 nan_policy: str = "stop", module: nn.Module | None = None,
                 eps: float = 1e-8, beta1: float = 0.9, compile: bool = False,
                 compile_batch: int | None = None, onednn: bool = True):
        self.objective, self.module = objective, module or objective
        self.skip_nonfinite = nan_policy == "skip"
        self.params = [p for p in objective.parameters() if p.requires_grad]
        self.device = self.params[0].device
        self.mode = {"cuda": "cuda-graph", "cpu": "traced"}.get(self.device.type, "eager") \
            if fast and module is None else "eager"
        if fast and self.mode == "eager":
            log.info("eager training steps: %s", "DDP averages gradients in its own hooks"
                     if module is not None else f"no fast step on {self.device.type}")
        # the traced graph compiled by Inductor (CPU): each batch shape compiles once, or
        # only that of batches of compile_batch images (an epoch's last, smaller batch
        # would take seconds to compile for one step)
        self.compile = compile and self.mode == "traced"
        self.compile_batch = compile_batch
        self.compile_seconds = 0.0
        self.onednn = onednn and self.mode == "traced"
        self.lr = torch.tensor(float(lr), device=self.device)
        self.optimizer = _adam(self.params, self.lr, eps, beta1, self.mode == "cuda-graph")
        self._validated: set[tuple] = set()
        self._replays: dict[tuple, object] = {}
        self._inputs: list[torch.Tensor] | None = None  # the traced step's state inputs

    def set_lr(self, lr: float) -> None:
        """Use learning rate ``lr`` from the next step on (a device tensor: no retracing)."""
        self.lr.fill_(lr)

    def load_state_dict(self, optimizer_state: dict) -> None:
        """Load the optimizer's state; the learning rate stays this trainer's tensor."""
        self.optimizer.load_state_dict(optimizer_state)
        self.lr.fill_(float(self.optimizer.param_groups[0]["lr"]))
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        self._replays.clear()  # captured graphs hold the old state tensors
        self._inputs = None

    def step(self, x: torch.Tensor, index: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimization step on the batch ``x`` (at positions ``index`` of the data).

        Returns ``(loss, finite)``, 0-dim tensors on the device (no host sync): the loss
        before the update, and whether it and every gradient were finite. Under CUDA
        graphs they are the graph's outputs, overwritten by the next step.
        """
        key = (tuple(x.shape), x.dtype, index is None)
        # the layout the step was traced (and compiled) for
        x, index = x.contiguous(), None if index is None else index.contiguous()
        if key not in self._validated:
            self.validate(x, index)
        with pyro.validation_enabled(False):
            if self.mode == "traced":
                replay = self._replays.get(key)
                if replay is None:
                    replay = self._trace(key, x, index)
                with torch.no_grad():  # the graph holds the backward pass and the update
                    loss, ok, *_ = replay(*self._step_inputs(), x, index)
                return loss, ok
            if self.mode == "cuda-graph":
                return self._graph_step(key, x, index)
            return self._update(*self._forward_backward(x, index))

    def validate(self, x: torch.Tensor, index: torch.Tensor | None = None) -> None:
        """Run the loss on ``x`` eagerly with Pyro's validation on, under a forked RNG;
        change nothing but remember the batch shape as validated. Raises :class:`Diverged`
        if the parameters are not finite, else what Pyro or torch.distributions raise."""
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), pyro.validation_enabled(True), \
                    torch.no_grad():
                self.module(x, index)
        except (ValueError, RuntimeError):
            if not all(bool(torch.isfinite(p).all()) for p in self.params):
                raise Diverged() from None
            raise
        self._validated.add((tuple(x.shape), x.dtype, index is None))

    def _forward_backward(self, x, index=None):
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.module(x, index)
        loss.backward()
        return loss.detach(), [p.grad for p in self.params]

    def _update(self, loss, grads):
        """Adam on ``grads``; under ``skip``, a non-finite step changes no state."""
        ok = finite(loss, grads)
        if self.skip_nonfinite:
            grads = [g if g is None else torch.where(ok, g, 0.0) for g in grads]
            saved = [t.clone() for t in self._optimized()]
        for p, g in zip(self.params, grads):
            p.grad = g
        self.optimizer.step()
        if self.skip_nonfinite:
            with torch.no_grad():
                for t, old in zip(self._optimized(), saved):
                    t.copy_(torch.where(ok, t, old))
        return loss, ok

    def _optimized(self) -> list[torch.Tensor]:
        """Parameters and Adam's state tensors, created now if Adam has not stepped yet."""
        if not self.optimizer.state:
            # a step on zero gradients creates the state; with step reset to 0 it is
            # exactly Adam's fresh state, and the parameters move by lr * 0 / (0 + eps)
            for p in self.params:
                p.grad = torch.zeros_like(p)
            self.optimizer.step()
            for s in self.optimizer.state.values():
                s["step"].zero_()
        return [*self.params, *(t for p in self.params
                                for t in self.optimizer.state[p].values() if torch.is_tensor(t))]

    def _state(self, named: bool = False) -> list:
        state = [*self.objective.named_parameters(), *self.objective.named_buffers()]
        return state if named else [t for _, t in state]

    def _step_inputs(self) -> list[torch.Tensor]:
        """The traced step's state: parameters and buffers (in the order of
        :meth:`_state`), Adam's first and second moments and step counts (one per
        parameter, in the order of ``self.params``), the learning rate."""
        if self._inputs is None:
            self._optimized()  # Adam's state exists before it is traced
            state = [self.optimizer.state[p] for p in self.params]
            self._inputs = [*self._state(), *(s["exp_avg"] for s in state),
                            *(s["exp_avg_sq"] for s in state), *(s["step"] for s in state),
                            self.lr]
        return self._inputs

    def _compiles(self, x: torch.Tensor) -> bool:
        return self.compile and self.compile_batch in (None, x.shape[0])

    def _trace(self, key, x, index):
        """Trace the whole step for this batch shape into an aten graph
        ``(*state, x, index) -> (loss, finite, *gradients[, Adam's scale])`` that updates
        the parameters and Adam's state in place; its products through oneDNN and, with
        ``compile``, compiled by Inductor."""
        named = self._state(named=True)
        names, trainable = [n for n, _ in named], [t.requires_grad for _, t in named]
        group = self.optimizer.param_groups[0]
        compiling = self._compiles(x)
        options = dict(beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"],
                       fused=bool(group.get("fused")) and not compiling)
        n_state, n = len(named), len(self.params)

        def fn(*args):
            values, adam, (lr, x, index) = args[:n_state], args[n_state:-3], args[-3:]
            loss, *grads = loss_and_grads(self.objective, names, trainable, *values, x, index)
            ok = finite(loss, grads)
            params = [v for v, t in zip(values, trainable) if t]
            moments, squares, counts = list(adam[:n]), list(adam[n:2 * n]), list(adam[2 * n:])
            with torch.no_grad():
                if self.skip_nonfinite:  # a non-finite step changes no state
                    saved = [t.clone() for t in (*params, *adam)]
                    used = [torch.where(ok, g, 0.0) for g in grads]
                else:
                    used = grads
                scale = adam_in_graph(params, used, moments, squares, counts, lr, **options)
                if self.skip_nonfinite:
                    for t, old in zip((*params, *adam), saved):
                        t.copy_(torch.where(ok, t, old))
            return (loss, ok, *grads) + (() if scale is None else (scale,))

        start = time.perf_counter()
        try:
            with torch.random.fork_rng(devices=[]), torch.enable_grad():
                graph = make_fx(fn, tracing_mode="fake")(*self._step_inputs(), x, index)
        except Exception as e:  # noqa: BLE001 - whatever stops tracing, the fix is the same
            reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise ConfigError(
                f"the training step of this model cannot be traced into a graph ({reason}); "
                "a likelihood or network whose Python branches on tensor values needs "
                "{train.fast_step=False}") from None
        dropped = drop_identity_views(graph)
        log.debug("traced the step for batch shape %s: %d nodes (%d views dropped) in %.2f s",
                  key[0], len(graph.graph.nodes), dropped, time.perf_counter() - start)
        if self.onednn:
            graph = self._with_onednn(key, graph, x, index)
        if self._compiles(x):
            compiled = self._compiled(key, graph, x, index)
            if compiled is None:  # not compiled: traced again with the fused Adam kernel
                return self._trace(key, x, index)
            graph = compiled
        self._replays[key] = graph
        return graph

    def _scratch(self) -> list[torch.Tensor]:
        """A copy of the traced step's state (the step updates its state in place)."""
        with torch.no_grad():
            return [t.clone().requires_grad_(t.requires_grad) for t in self._step_inputs()]

    def _scratch_run(self, graph, x, index):
        """``graph``'s outputs on a copy of the state, under a forked RNG: the trainer's
        state and noise stream stay as they were."""
        scratch = self._scratch()
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            return graph(*scratch, x, index)

    def _with_onednn(self, key, graph, x, index):
        """``graph`` with its products through oneDNN, if that gives its loss and gradients
        on this batch to float32 rounding (both run under the same forked RNG); else
        ``graph``, with one logged line."""
        rewritten = fx.GraphModule(graph, copy.deepcopy(graph.graph))
        count = use_onednn(rewritten, for_inductor=self._compiles(x))
        if not count:
            return graph
        drop_identity_views(rewritten)  # oneDNN's weight is often a transpose of one
        n = 2 + len(self.params)  # loss, finite and the gradients
        try:
            outputs = [[a for i, a in enumerate(self._scratch_run(g, x, index)[:n]) if i != 1]
                       for g in (graph, rewritten)]
        except RuntimeError as e:
            log.warning("oneDNN's matrix products failed (%s); the step keeps torch's BLAS",
                        " ".join(str(e).split())[:160])
            return graph
        if not all(bool(torch.isfinite(a).all()) for a in outputs[0]):
            log.debug("batch shape %s: a non-finite loss or gradient; nothing to compare "
                      "oneDNN's products with, the step keeps torch's BLAS", key[0])
            return graph
        worst = max(float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))
                    for a, b in zip(*outputs))
        if not worst <= ONEDNN_TOLERANCE:
            log.warning("oneDNN's matrix products differ from torch's BLAS by %.1e (relative) "
                        "on this batch; the step keeps torch's BLAS", worst)
            return graph
        log.debug("batch shape %s: %d matrix products through oneDNN (%.1e from BLAS)",
                  key[0], count, worst)
        return rewritten

    def _compiled(self, key, graph, x, index):
        """``graph`` compiled by Inductor (:func:`~pyro_vae.runner.compiling.compile_graph`:
        nothing checked at a call; :meth:`step` keys graphs by batch shape and hands them
        contiguous batches and the same state tensors), run once on a copy of the state;
        ``None``, with one logged line, where compilation fails."""
        cache = use_inductor_cache()
        start = time.perf_counter()
        try:
            compiled = compile_graph(graph, [*self._step_inputs(), x, index])
            self._scratch_run(compiled, x, index)
        except Exception as e:  # noqa: BLE001 - any compiler failure: the traced step works
            reason = " ".join(str(e).split())[:160] or type(e).__name__
            log.warning("the training step could not be compiled (%s); training goes on with "
                        "the traced step", reason)
            self.compile = False
            return None
        seconds = time.perf_counter() - start
        self.compile_seconds += seconds
        log.info("compiled the training step for batch shape %s in %.1f s (cache: %s)",
                 key[0], seconds, cache)
        return compiled

    def _graph_step(self, key, x, index):
        entry = self._replays.get(key)
        if entry is None:
            try:
                entry = self._capture(key, x, index)
            except RuntimeError as e:  # an operation that a CUDA graph cannot hold
                log.warning("the training step could not be captured in a CUDA graph (%s); "
                            "training goes on with eager steps ({train.fast_step=False} "
                            "skips the attempt)", " ".join(str(e).split())[:200])
                self.mode = "eager"
                return self._update(*self._forward_backward(x, index))
        inputs, graph, outputs = entry
        for static, given in zip(inputs, (x, index)):
            if static is not None:
                static.copy_(given)
        graph.replay()
        return outputs

    def _capture(self, key, x, index):
        """Warm up on a side stream, restore every state it touched, capture the step."""
        inputs = (x.clone(), None if index is None else index.clone())
        saved = [t.detach().clone() for t in self._optimized()]
        rng = torch.cuda.get_rng_state(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self._update(*self._forward_backward(*inputs))
        torch.cuda.current_stream(self.device).wait_stream(side)
        with torch.no_grad():  # undo the warm-up: parameters, Adam state, RNG
            for t, old in zip(self._optimized(), saved):
                t.copy_(old)
        torch.cuda.set_rng_state(rng, self.device)
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self._update(*self._forward_backward(*inputs))
        self._replays[key] = entry = (inputs, graph, outputs)
        return entry

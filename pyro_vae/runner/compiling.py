"""When the CPU's training step is compiled by Inductor, and where its kernels are kept.

Compiling the traced step (:class:`~pyro_vae.runner.step.Trainer` with ``compile``) makes
each step faster but costs seconds once: 7-14 s with an empty cache, about 1.2 s in a new
process when Inductor's cache already holds the step and its gather (docs/benchmarks.md,
"Compiled step (Inductor), cpu" and "The compiled step is the default"). By default
(``compile_step`` None, "auto") a run compiles when it plans enough images to pay that
back: :data:`AUTO_COMPILE_IMAGES` cold, :data:`WARM_COMPILE_IMAGES` where an earlier run
of the same step compiled into the same cache. That memory is a small JSON file beside
Inductor's cache: signatures of configurations (the settings that shape the step,
torch's and pyro-vae's versions), never code. The choice is made once, when a run
starts, and recorded in its ``config.json``: a resumed run keeps it, so it resumes
exactly. A compiled step comes with a compiled gather (:func:`compile_gather`): the
batch's rows and their dynamic binarization in one kernel, the eager gather's bits.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import fx
from torch.fx.experimental.proxy_tensor import make_fx

from ..config import RunConfig
from ..data.batching import DeviceBatches, binarized_rows
from ..errors import get_logger
from ..onednn import lower_for_inductor

log = get_logger(__name__)

# the images (epochs x training images) from which compiling pays back with an empty
# cache: compiling took 7-14 s, and saved 5-8 us an image at batch 128-1024 on the
# project's 2-core CPU (docs/benchmarks.md, "Compiled step (Inductor), cpu")
AUTO_COMPILE_IMAGES = 2_000_000
# ... and with the step in the cache (about 1.2 s in a new process): 500,000 images save
# 2.5-4 s; a default run, 10 epochs of MNIST, plans 600,000
WARM_COMPILE_IMAGES = 500_000
# settings that do not change the traced step: how long a run is, its noise, its rate
# (a device tensor), what it writes; every other setting is part of the signature
_OUTSIDE_THE_STEP = {"epochs", "seed", "lr", "lr_schedule", "compile_step", "device",
                     "eval_batch_size", "tensorboard"}
_MEMORY = "pyro-vae-compiled-steps.json"
# the compiled code's wrapper (the calls of its kernels, its buffers) in C++ rather than
# Python: 3% off the step at batch 128 for half a second more of compiling (13.7 against
# 13.2 s with an empty cache, 1.4 against 1.2 s from the cache)
CPP_WRAPPER = True
# part of Inductor's cache key for code whose oneDNN products are direct calls (Inductor's
# keys hold its settings but not its lowerings)
_LOWERED_TAG = "pyro-vae:onednn-lowered"


def inductor_cache() -> Path:
    """Where Inductor keeps compiled kernels: ``TORCHINDUCTOR_CACHE_DIR``, which
    :func:`use_inductor_cache` sets where it is unset, or pyro-vae's folder in the user's
    cache (``~/.cache/pyro-vae/inductor``)."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pyro-vae" \
        / "inductor"


def use_inductor_cache() -> Path:
    """Point ``TORCHINDUCTOR_CACHE_DIR`` at :func:`inductor_cache` unless it is set, and
    return it. Called when a run starts: importing Dynamo (torchvision does, and so does
    tracing) sets the variable to torch's own default, ``/tmp/torchinductor_<user>``."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(inductor_cache()))
    return inductor_cache()


def step_signature(config: RunConfig) -> str:
    """A hash of what shapes a run's training step: the model, the data's binarization,
    the training settings but those in ``_OUTSIDE_THE_STEP``, torch's and pyro-vae's
    versions, how Inductor is asked to compile (what keys its cache)."""
    train = {k: v for k, v in dataclasses.asdict(config.train).items()
             if k not in _OUTSIDE_THE_STEP}
    try:
        version = metadata.version("pyro-vae")
    except metadata.PackageNotFoundError:  # run from a source tree
        version = "source"
    text = json.dumps({"model": dataclasses.asdict(config.model), "train": train,
                       "binarize": config.data.binarize, "torch": torch.__version__,
                       "pyro_vae": version, "inductor": [CPP_WRAPPER, _LOWERED_TAG]},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _remembered() -> set[str]:
    try:
        return set(json.loads((inductor_cache() / _MEMORY).read_text()))
    except (OSError, ValueError, TypeError):  # none yet, or unreadable: nothing known
        return set()


def remember_compiled(config: RunConfig) -> None:
    """Note that the step of ``config`` compiled into the current cache."""
    known = _remembered() | {step_signature(config)}
    path = inductor_cache() / _MEMORY
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = path.with_name(path.name + f".{os.getpid()}.tmp")
        scratch.write_text(json.dumps(sorted(known)))
        scratch.replace(path)
    except OSError as e:  # a cache that cannot be written only costs a later run time
        log.debug("could not note the compiled step in %s (%s)", path, e)


def compile_step(config: RunConfig, num_train: int, device: torch.device) -> bool:
    """``{train.compile_step}`` in effect: the setting, or for ``auto`` (``None``) whether
    compiling the CPU's fast step pays back on this run (see the module's text)."""
    if config.train.compile_step is not None:
        return config.train.compile_step
    if device.type != "cpu" or not config.train.fast_step:
        return False
    planned = config.train.epochs * num_train
    cached = step_signature(config) in _remembered()
    needed = WARM_COMPILE_IMAGES if cached else AUTO_COMPILE_IMAGES
    chosen = planned >= needed
    log.info("the training step is %s: %s images planned, and by default it compiles from "
             "%s, as an earlier run %s this step", "compiled" if chosen else "traced",
             f"{planned:,}", f"{needed:,}", "compiled" if cached else "never compiled")
    return chosen


def compile_graph(graph: fx.GraphModule, inputs: Sequence[torch.Tensor | None]
                  ) -> Callable[..., Any]:
    """``graph``, an aten graph, compiled by Inductor for the shapes, strides and dtypes
    of ``inputs`` (``None`` where the graph takes no tensor); random draws through aten
    (``fallback_random``: the traced graph's noise stream); its wrapper, the code that
    calls the kernels, in C++ (:data:`CPP_WRAPPER`); oneDNN's products called directly
    (:func:`~pyro_vae.onednn.lower_for_inductor`).

    Called without Dynamo: nothing is checked at a call (Dynamo's frame, cache lookup,
    guards and per-call option patches took about 0.2 ms a step at batch 128, a tenth of
    it), so the caller keys what it compiles by shape and hands over inputs of the same
    layout, as the traced step does (a graph per batch shape)."""
    import torch._inductor  # a second of imports: only where a run compiles

    tag = _LOWERED_TAG if lower_for_inductor() else ""
    keep = [i for i, v in enumerate(inputs) if v is not None]
    if len(keep) < len(inputs):  # an input traced as None: no placeholder takes it
        graph = fx.GraphModule(graph, copy.deepcopy(graph.graph))
        placeholders = [n for n in graph.graph.nodes if n.op == "placeholder"]
        for i in sorted(set(range(len(inputs))) - set(keep), reverse=True):
            graph.graph.erase_node(placeholders[i])
        graph.recompile()
    options = {"fallback_random": True, "cpp_wrapper": CPP_WRAPPER}
    # a graph without autograd (the step computes its own gradients): an inference
    # graph, to be called under no_grad
    with torch.no_grad(), torch.compiler.config.patch(cache_key_tag=tag):
        compiled = torch._inductor.compile(graph, [inputs[i] for i in keep], options=options)
    if len(keep) == len(inputs):
        return compiled
    return lambda *args: compiled(*(args[i] for i in keep))


def compile_gather(batches: DeviceBatches, batch_size: int) -> float:
    """Have ``batches`` gather and binarize its batches of ``batch_size`` images with
    :func:`~pyro_vae.data.batching.binarized_rows` compiled (one fused kernel: a sixth to
    a ninth of the eager time on the CPU), checked to give the eager function's bits;
    return the seconds it took. Without dynamic binarization, off the CPU, or where
    Inductor fails (one logged line), the gather stays eager."""
    if not batches.dynamic or batches.x.device.type != "cpu" or len(batches.x) < batch_size:
        return 0.0
    use_inductor_cache()
    start = time.perf_counter()
    index = torch.arange(batch_size, device=batches.x.device)
    key = torch.tensor([0x1234567, -0x7654321], dtype=torch.int32, device=batches.x.device)
    try:
        whole = functools.partial(binarized_rows, block=batch_size * batches.x[0].numel())
        inputs = (batches.x, index, key)
        rows = compile_graph(make_fx(whole, tracing_mode="fake")(*inputs), inputs)
        same = torch.equal(rows(*inputs), binarized_rows(*inputs))
    except Exception as e:  # noqa: BLE001 - any compiler failure: the eager gather works
        same, reason = False, " ".join(str(e).split())[:160] or type(e).__name__
    else:
        reason = "its draws differ from the eager gather's"
    if not same:
        log.warning("the batch gather could not be compiled (%s); it stays eager", reason)
        batches.use_rows(binarized_rows, batch_size)  # not tried again
        return 0.0
    batches.use_rows(rows, batch_size)
    seconds = time.perf_counter() - start
    log.info("compiled the gather of batches of %d images in %.1f s", batch_size, seconds)
    return seconds

"""Time per epoch of the semi-supervised M2: Pyro's own training loop against pyro-vae's.

The contenders, side by side in one run on the same images and the same networks (z 50,
one hidden layer of 500, softplus, batch 200, N labelled images out of 50,000):

- **Pyro's loop**, as examples/vae/ss_vae_M2.py runs it: ``SVI`` with ``TraceEnum_ELBO``
  on ``config_enumerate(guide)`` (one-hot ``y``, the encoder and decoder fed
  ``[x, y]`` / ``[z, y]``), and a second ``SVI`` with ``Trace_ELBO`` for the auxiliary
  loss; unlabelled batches get the first step, labelled ones (every ``50,000 / N``-th
  batch) both. ``SVI.step`` reads each loss back to the host.
- **pyro-vae, eager**: :class:`~pyro_vae.runner.step.Trainer` with ``fast=False``: Pyro
  traces model and guide every step (the sync-free ``TraceEnum_ELBO``).
- **pyro-vae, traced**: the default: the enumerated step replayed as a traced graph.

Each contender runs ``--steps`` steps after a warm-up (tracing included there), timed as
a median over ``--repeats`` blocks, and is scaled to one epoch (250 steps); then its host
reads per step are counted (``item``, ``bool``, ... as ``scripts.benchmark`` counts them).
Writes a section of docs/benchmarks.md:

    python -m scripts.benchmark_ss_vae --data-dir MNIST_DIR
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import pyro_vae
from pyro_vae.data import load_dataset
from pyro_vae.objective import Objective, SyncFreeTraceEnum_ELBO
from pyro_vae.runner.step import Trainer
from pyro_vae.semisupervised import choose_labels, partial_labels
from scripts._docs import machine_description, update_section
from scripts.benchmark import HostReads
from scripts.pyro_ss_vae_loop import PyroLoop

ROOT = Path(__file__).resolve().parents[1]
EPOCH_STEPS = 250  # 50,000 training images in batches of 200


def pyro_loop(x, y, labels: int):
    """``step()`` runs the next batch of Pyro's schedule (:mod:`scripts.pyro_ss_vae_loop`)."""
    loop = PyroLoop(x, y, choose_labels(y, labels, seed=0))
    one_hot = F.one_hot(y, 10).float()
    state = {"i": 0}

    def step():
        i = state["i"] = state["i"] + 1
        start = (i * 200) % (len(x) - 200)
        xs = torch.bernoulli(x[start : start + 200])
        loop.step(xs, one_hot[start : start + 200] if i % loop.period == 1 else None)

    return step


def ours(x, y, labels: int, fast: bool):
    config = pyro_vae.RunConfig.read(ROOT / "configs" / "ss-vae" / "m2.json").model
    config.x_dim = x.shape[1]
    m2 = pyro_vae.build_vae(pyro_vae.RunConfig(model=config))
    m2.set_labels(partial_labels(y, labels, seed=0))
    trainer = Trainer(Objective(m2, SyncFreeTraceEnum_ELBO(max_plate_nesting=1), len(x)),
                      4.2e-4, fast=fast, beta1=0.95)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    state = {"i": 0}

    def step():
        i = state["i"] = state["i"] + 1
        index = perm[(i * 200) % (len(x) - 200) :][:200]
        trainer.step(torch.bernoulli(x.index_select(0, index)), index)

    return step


def time_steps(step, steps: int, repeats: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        step()
    blocks = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        blocks.append((time.perf_counter() - start) / steps)
    return statistics.median(blocks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, help="folder with the MNIST IDX files")
    parser.add_argument("--dataset", default="mnist", help="mnist-sample: a quick check")
    parser.add_argument("--labels", type=int, default=100)
    parser.add_argument("--steps", type=int, default=25, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    data = load_dataset(pyro_vae.DataConfig(dataset=args.dataset, data_dir=args.data_dir and
                                            str(args.data_dir), download=False))
    kept = 50_000 if len(data.train_x) > 50_000 else len(data.train_x)  # the last 10,000
    x, y = data.train_x[:kept], data.train_y[:kept]  # validate in Pyro's split
    contenders = [("Pyro's ss_vae_M2 loop (SVI, TraceEnum_ELBO + aux Trace_ELBO)",
                   pyro_loop(x, y, args.labels)),
                  ("pyro-vae M2, eager steps", ours(x, y, args.labels, fast=False)),
                  ("pyro-vae M2, traced step (default)", ours(x, y, args.labels, fast=True))]
    rows, base = [], None
    for name, step in contenders:
        seconds = time_steps(step, args.steps, args.repeats)
        with HostReads() as reads:  # item, bool, tolist, ... on tensors
            for _ in range(args.steps):
                step()
        base = base or seconds
        rows.append(f"| {name} | {1000 * seconds:.1f} ms | {seconds * EPOCH_STEPS:.1f} s | "
                    f"{seconds / base:.2f}x | {reads.count / args.steps:g} |")
        print(rows[-1], flush=True)
    body = (f"Command: `python -m scripts.benchmark_ss_vae --data-dir MNIST_DIR`. Machine: "
            f"{machine_description()}. M2 with Pyro's example settings (z 50, hidden 500, "
            f"batch 200, {args.labels} labels); median over {args.repeats} blocks of "
            f"{args.steps} steps after a warm-up, scaled to one epoch of {EPOCH_STEPS} "
            "steps (evaluation not included).\n\n"
            "| contender | per step | per epoch | vs Pyro's loop | host reads per step |\n"
            "|---|---|---|---|---|\n"
            + "\n".join(rows))
    update_section(args.doc, "Semi-supervised M2: pyro-vae against Pyro's own loop", body)


if __name__ == "__main__":
    main()

"""What PyroModule would cost pyro-vae's step: the same VAE as plain ``nn.Module`` s and
converted to ``PyroModule`` s (``pyro.nn.module.to_pyro_module_``, with
``pyro.settings.set(module_local_params=True)``, Pyro's route to models side by side),
each trained by the Trainer eagerly and with the traced step, side by side in one run.

    python -m scripts.pyromodule_overhead [--steps 200] [--batch-size 128]

Prints medians of per-step wall time (ms) and their ratios (docs/architecture.md).
"""

from __future__ import annotations

import argparse
import statistics
import time

import pyro
import torch
from pyro.nn.module import to_pyro_module_

from pyro_vae import VAE, Objective, SyncFreeTrace_ELBO, Trainer


def step_times(vae: VAE, fast: bool, x: torch.Tensor, steps: int) -> list[float]:
    objective = Objective(vae, SyncFreeTrace_ELBO(max_plate_nesting=1), num_data=60_000)
    trainer = Trainer(objective, 1e-3, fast=fast)
    index = torch.arange(len(x))
    for _ in range(5):  # validation, tracing, warm caches
        trainer.step(x, index)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.step(x, index)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    x = torch.bernoulli(torch.full((args.batch_size, 784), 0.3))
    rows = {}
    for fast in (False, True):
        for kind in ("nn.Module", "PyroModule"):
            torch.manual_seed(0)
            vae = VAE()
            if kind == "PyroModule":
                with pyro.settings.context(module_local_params=True):
                    to_pyro_module_(vae.encoder)
                    to_pyro_module_(vae.decoder)
                    rows[(kind, fast)] = step_times(vae, fast, x, args.steps)
            else:
                rows[(kind, fast)] = step_times(vae, fast, x, args.steps)
    print(f"batch {args.batch_size}, {args.steps} steps, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    for fast in (False, True):
        plain, pyro_module = (statistics.median(rows[(k, fast)]) * 1e3
                              for k in ("nn.Module", "PyroModule"))
        print(f"{'traced' if fast else 'eager':6s} step: nn.Module {plain:.2f} ms, "
              f"PyroModule {pyro_module:.2f} ms, ratio {pyro_module / plain:.2f}")


if __name__ == "__main__":
    main()

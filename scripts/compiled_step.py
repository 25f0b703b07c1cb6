"""Would Inductor make the CPU step faster? The Trainer's traced step against the same
step compiled by Inductor (``--compile-step``), side by side in one process.

For each batch size: two Trainers of the 784-400-20 VAE's ELBO on the same parameters, one
replaying the traced step (loss, gradients, finite check and Adam's update in one aten
graph, its matrix products through oneDNN), one with that graph compiled by Inductor
(``fallback_random``, so both draw the same noise) -- compiled cold (an empty cache) and
warm (the FX-graph cache filled, as a second run would find it). Both then take steps in
alternating rounds and the median time per step is kept. Loss and gradients of the two
graphs are compared on the same state and noise (they agree to float32 rounding: Inductor
fuses and reorders the arithmetic around the matrix products). Writes the "Compiled step
(Inductor), cpu" section of docs/benchmarks.md:

    python -m scripts.compiled_step [--batch-sizes 128 1024] [--calls 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pyro_vae import VAE, Objective, SyncFreeTrace_ELBO, Trainer
from scripts._docs import machine_description, update_section

ROOT = Path(__file__).resolve().parents[1]


def trainer(compile: bool) -> Trainer:
    torch.manual_seed(0)  # the same parameters for every trainer
    objective = Objective(VAE("bernoulli"), SyncFreeTrace_ELBO(max_plate_nesting=1),
                          num_data=60_000)
    return Trainer(objective, 1e-3, compile=compile)


def same_state(source: Trainer, target: Trainer) -> None:
    """Copy parameters and Adam's state of ``source`` into ``target``'s tensors."""
    with torch.no_grad():
        for a, b in zip(source._step_inputs(), target._step_inputs()):
            b.copy_(a)


def per_step_ms(t: Trainer, x, index, calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        t.step(x, index)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure(batch: int, calls: int, rounds: int) -> dict:
    x = (torch.rand(batch, 784) > 0.5).float()
    index = torch.arange(batch)
    key = (tuple(x.shape), x.dtype, False)
    traced = trainer(False)
    traced.step(x, index)  # validates, traces
    cold = trainer(True)
    cold.step(x, index)  # compiles with an empty cache
    compiled = trainer(True)
    compiled.step(x, index)  # compiles again: the cache filled by the cold one
    assert compiled.compile, "Inductor could not compile the step here"
    same_state(traced, compiled)
    outputs = []
    for t in (traced, compiled):
        torch.manual_seed(1)
        outputs.append(t._scratch_run(t._replays[key], x, index))
    (a_loss, _, *a_grads), (b_loss, _, *b_grads) = outputs
    grad_diff = max(float((p - q).abs().max() / p.abs().max().clamp(min=1e-30))
                    for p, q in zip(a_grads, b_grads[:len(a_grads)]))
    steps_traced, steps_compiled = [], []
    for _ in range(rounds):  # alternating, so drifts of the machine hit both
        steps_traced.append(per_step_ms(traced, x, index, calls))
        steps_compiled.append(per_step_ms(compiled, x, index, calls))
    return {"batch": batch, "nodes": len(traced._replays[key].graph.nodes),
            "cold_s": cold.compile_seconds, "warm_s": compiled.compile_seconds,
            "traced_ms": statistics.median(steps_traced),
            "compiled_ms": statistics.median(steps_compiled),
            "loss_rel_diff": float((a_loss - b_loss).abs() / a_loss.abs()),
            "grad_rel_diff": grad_diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # cold means cold
        rows = []
        for batch in args.batch_sizes:
            r = measure(batch, args.calls, args.rounds)
            print(r, flush=True)
            rows.append(f"| {batch} | {r['nodes']} | {r['traced_ms']:.2f} | "
                        f"{r['compiled_ms']:.2f} | {r['traced_ms'] / r['compiled_ms']:.2f}x | "
                        f"{r['cold_s']:.1f} / {r['warm_s']:.1f} | "
                        f"{r['loss_rel_diff']:.1e} / {r['grad_rel_diff']:.1e} |")
    body = "\n".join([
        f"`python -m scripts.compiled_step` on {machine_description()}, quiet: the "
        "Trainer's step (loss, gradients, finite check and Adam's update in one traced "
        "graph) replayed as it is and compiled by Inductor, medians of "
        f"{args.rounds} alternating rounds of {args.calls} steps on one batch; compile time "
        "cold (empty cache) and warm (cache filled).", "",
        "| batch | graph nodes | traced ms | Inductor ms | speed-up | compile s, cold / warm | "
        "relative difference of the loss / of the gradients (largest) |",
        "|---|---|---|---|---|---|---|", *rows])
    update_section(args.doc, "Compiled step (Inductor), cpu", body)
    print(f"wrote {args.doc}")


if __name__ == "__main__":
    main()

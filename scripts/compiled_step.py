"""Would Inductor make the CPU step faster? The traced step's graph against the same graph
compiled by ``torch.compile`` (Inductor), side by side in one process.

For each batch size: the graph that pyro-vae's fast step replays (loss and gradients of the
784-400-20 VAE's ELBO, traced with ``make_fx``, its matrix products through oneDNN as the
Trainer rewrites them) is compiled with Inductor
(``fallback_random``, so both draw the same noise), cold (an empty cache) and warm (the
FX-graph cache filled, as a second run would find it); then both are replayed in
alternating rounds and the median time per call is kept. Loss and gradients of the two are
compared on the same noise (they agree to float32 rounding: Inductor fuses and reorders
the arithmetic around the matrix products). Writes the "Compiled step (Inductor), cpu" section of
docs/benchmarks.md:

    python -m scripts.compiled_step [--batch-sizes 128 1024] [--calls 200]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pyro_vae import VAE, Objective, SyncFreeTrace_ELBO, Trainer
from pyro_vae.onednn import use_onednn
from scripts._docs import machine_description, update_section

ROOT = Path(__file__).resolve().parents[1]


def traced_graph(batch: int):
    torch.manual_seed(0)
    objective = Objective(VAE("bernoulli"), SyncFreeTrace_ELBO(max_plate_nesting=1),
                          num_data=60_000)
    trainer = Trainer(objective, 1e-3, onednn=False)
    x = (torch.rand(batch, 784) > 0.5).float()
    index = torch.arange(batch)
    trainer.step(x, index)  # validates, traces
    graph = trainer._replays[(tuple(x.shape), x.dtype, False)]
    return graph, [*trainer._state(), x, index]


def with_onednn(graph, for_inductor: bool):
    """The graph with its products through oneDNN, as the Trainer rewrites it."""
    rewritten = torch.fx.GraphModule(graph, copy.deepcopy(graph.graph))
    use_onednn(rewritten, for_inductor=for_inductor)
    return rewritten


def compile_graph(graph, inputs):
    import torch._dynamo
    import torch._inductor.config as inductor

    inductor.fallback_random = True  # aten's RNG: the same noise as the traced graph
    torch._dynamo.reset()
    compiled = torch.compile(graph, backend="inductor", dynamic=False)
    start = time.perf_counter()
    with torch.no_grad():
        compiled(*inputs)
    return compiled, time.perf_counter() - start


def per_call_ms(fn, inputs, calls: int) -> float:
    times = []
    with torch.no_grad():
        for _ in range(calls):
            start = time.perf_counter()
            fn(*inputs)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure(batch: int, calls: int, rounds: int) -> dict:
    blas, inputs = traced_graph(batch)
    graph, for_inductor = with_onednn(blas, False), with_onednn(blas, True)
    _, cold = compile_graph(for_inductor, inputs)
    compiled, warm = compile_graph(for_inductor, inputs)  # the cache filled by the cold one
    torch.manual_seed(1)
    with torch.no_grad():
        a = graph(*inputs)
    torch.manual_seed(1)
    with torch.no_grad():
        b = compiled(*inputs)
    grad_diff = max(float((p - q).abs().max() / p.abs().max().clamp(min=1e-30))
                    for p, q in zip(a[1:], b[1:]))
    traced, fused = [], []
    for _ in range(rounds):  # alternating, so drifts of the machine hit both
        traced.append(per_call_ms(graph, inputs, calls))
        fused.append(per_call_ms(compiled, inputs, calls))
    return {"batch": batch, "nodes": len(graph.graph.nodes), "cold_s": cold, "warm_s": warm,
            "traced_ms": statistics.median(traced), "compiled_ms": statistics.median(fused),
            "loss_rel_diff": float((a[0] - b[0]).abs() / a[0].abs()),
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
        f"`python -m scripts.compiled_step` on {machine_description()}, quiet: the fast step's "
        f"traced graph (loss and gradients, no Adam) replayed as it is and compiled by "
        f"Inductor, medians of {args.rounds} alternating rounds of {args.calls} calls; "
        "compile time cold (empty cache) and warm (cache filled).", "",
        "| batch | graph nodes | traced ms | Inductor ms | speed-up | compile s, cold / warm | "
        "relative difference of the loss / of the gradients (largest) |",
        "|---|---|---|---|---|---|---|", *rows])
    update_section(args.doc, "Compiled step (Inductor), cpu", body)
    print(f"wrote {args.doc}")


if __name__ == "__main__":
    main()

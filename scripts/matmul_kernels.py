"""torch's BLAS against oneDNN for each matrix product of the training step, side by side.

Traces the fast step of the 784-400-20 VAE (the graph the Trainer replays, with torch's
BLAS products), then for every ``mm`` / ``addmm`` in it times the product as the graph
has it (``aten``, the BLAS torch was built with) and as :mod:`pyro_vae.onednn`
rewrites it (oneDNN's linear kernel), on operands of the graph's shapes and strides,
alternating, median of rounds. Writes the section "Matrix products (cpu)" of
docs/benchmarks.md:

    python -m scripts.matmul_kernels [--batch-sizes 128 1024] [--calls 50] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from pyro_vae import VAE, Objective, SyncFreeTrace_ELBO, Trainer
from pyro_vae.onednn import _linear_args
from scripts._docs import machine_description, update_section

aten = torch.ops.aten
ROOT = Path(__file__).resolve().parents[1]


def traced_graph(batch: int):
    """The Trainer's traced step for the 784-400-20 VAE, its products left to the BLAS."""
    torch.manual_seed(0)
    objective = Objective(VAE("bernoulli"), SyncFreeTrace_ELBO(max_plate_nesting=1),
                          num_data=60_000)
    trainer = Trainer(objective, 1e-3, onednn=False)
    x = (torch.rand(batch, 784) > 0.5).float()
    trainer.step(x, torch.arange(batch))  # validates, traces
    return trainer._replays[(tuple(x.shape), x.dtype, False)]


def operand(node) -> torch.Tensor:
    """A random tensor with the shape and strides that ``node`` has in the graph."""
    meta = node.meta["val"]
    storage = torch.randn(meta.untyped_storage().nbytes() // meta.element_size())
    return storage.as_strided(meta.shape, meta.stride(), meta.storage_offset())


def per_call_us(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def products(batch: int) -> list[dict]:
    graph = traced_graph(batch)
    found = []
    for node in graph.graph.nodes:
        if node.op != "call_function" or node.target not in (aten.mm.default,
                                                              aten.addmm.default):
            continue
        bias, a, b = node.args if node.target == aten.addmm.default else (None, *node.args)
        a, b, bias = (None if n is None else operand(n) for n in (a, b, bias))
        found.append({"a": a, "b": b, "bias": bias, "op": node.target.__name__,
                      "rewritten": _linear_args(node) is not None})
    return found


def measure(p: dict, calls: int, rounds: int) -> dict:
    a, b, bias = p["a"], p["b"], p["bias"]
    blas = (lambda: torch.addmm(bias, a, b)) if bias is not None else (lambda: a @ b)
    w = b.t()
    onednn = lambda: torch.ops.mkldnn._linear_pointwise(a, w, bias, "none", [], "")  # noqa: E731
    torch.testing.assert_close(onednn(), blas(), rtol=1e-4, atol=1e-4)
    times = {"blas": [], "onednn": []}
    for _ in range(rounds):
        for name, fn in (("blas", blas), ("onednn", onednn)):
            fn()
            times[name].append(per_call_us(fn, calls))
    m, k = a.shape
    n = b.shape[1]
    flops = 2 * m * k * n
    blas_us, onednn_us = (statistics.median(times[k]) for k in ("blas", "onednn"))
    return {"shape": f"({m}, {k}) @ ({k}, {n})", "transposed": not a.is_contiguous(),
            "rewritten": p["rewritten"],
            "op": p["op"], "blas_us": blas_us, "onednn_us": onednn_us,
            "blas_gflops": flops / blas_us / 1e3, "onednn_gflops": flops / onednn_us / 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    lines = [f"`python -m scripts.matmul_kernels --batch-sizes "
             f"{' '.join(map(str, args.batch_sizes))} --calls {args.calls} --rounds "
             f"{args.rounds}` on a {machine_description()}, quiet: every matrix product of "
             "the traced step, on operands of the graph's shapes and strides, as torch's "
             "BLAS computes it and as oneDNN's linear kernel does (the rewrite of "
             "`pyro_vae/onednn.py`); median microseconds per call over alternating "
             "rounds. *A transposed*: the left operand is a transposed view (a weight's "
             "gradient), which oneDNN copies first. *Step uses*: the kernel the Trainer "
             "keeps for that product (a rule on shapes only).", "",
             "| batch | product | A transposed | BLAS us | oneDNN us | BLAS GFLOP/s | "
             "oneDNN GFLOP/s | oneDNN speed-up | step uses |",
             "|---:|---|---|---:|---:|---:|---:|---:|---|"]
    for batch in args.batch_sizes:
        rows = [measure(p, args.calls, args.rounds) for p in products(batch)]
        for r in rows:
            lines.append(f"| {batch} | `{r['op']}` {r['shape']} | "
                         f"{'yes' if r['transposed'] else 'no'} | {r['blas_us']:.0f} | "
                         f"{r['onednn_us']:.0f} | {r['blas_gflops']:.0f} | "
                         f"{r['onednn_gflops']:.0f} | {r['blas_us'] / r['onednn_us']:.2f}x | "
                         f"{'oneDNN' if r['rewritten'] else 'BLAS'} |")
        blas = sum(r["blas_us"] for r in rows)
        chosen = sum(r["onednn_us"] if r["rewritten"] else r["blas_us"] for r in rows)
        lines.append(f"| {batch} | **all {len(rows)} products of a step** | | {blas:.0f} | "
                     f"{chosen:.0f} (as the step uses them) | | | {blas / chosen:.2f}x | |")
    body = "\n".join(lines)
    print(body)
    update_section(args.doc, "Matrix products (cpu)", body)


if __name__ == "__main__":
    main()

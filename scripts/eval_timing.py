"""Wall time of the importance-sampled log-likelihood on the 10,000-image MNIST test set.

Loads a trained run (by default the one `make run` writes: 784-400-20, Bernoulli), reads
the real MNIST test set from IDX files, binarizes it once with a fixed seed, and times
``importance_log_likelihood`` with K samples per image. Records the result in the
"Importance-sampled evaluation" section of docs/benchmarks.md.

    python -m scripts.eval_timing --run runs/quickstart --data-dir ../shared/data/mnist-t10k
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from pyro_vae import load_run
from pyro_vae.data import binarize, read_idx_split
from pyro_vae.estimators import elbo_terms, importance_log_likelihood
from scripts._docs import machine_description, update_section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, default=Path("runs/quickstart"))
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data/mnist-t10k"))
    parser.add_argument("--iwae-samples", type=int, default=5000)
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--json", type=Path, default=Path("docs/results/eval_timing.json"))
    parser.add_argument("--doc", type=Path, default=Path("docs/benchmarks.md"))
    args = parser.parse_args()

    run = load_run(args.run)
    x, _ = read_idx_split(args.data_dir, "test")
    x = binarize(x[: args.images], seed=1)
    vae = run.vae
    k, n = args.iwae_samples, len(x)
    start = time.perf_counter()
    log_px = importance_log_likelihood(vae, x, k, args.batch_size, progress=True)
    seconds = time.perf_counter() - start
    elbo = elbo_terms(vae, x).elbo
    hidden = list(run.config.model.hidden_dims)
    # decoder multiply-adds per sample: z -> hidden layers -> x_dim outputs
    sizes = [vae.z_dim, *reversed(hidden), vae.x_dim * vae.likelihood.num_params]
    flops = 2 * n * k * sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
    result = {
        "run": str(args.run), "network": f"784-{'-'.join(map(str, hidden))}-{vae.z_dim}",
        "likelihood": vae.likelihood.name, "images": n, "iwae_samples": k,
        "seconds": seconds, "samples_per_second": n * k / seconds,
        "decoder_gflop_per_second": flops / seconds / 1e9,
        "log_px": log_px.mean().item(), "log_px_se": (log_px.std() / math.sqrt(n)).item(),
        "elbo": elbo.mean().item(), "machine": machine_description(),
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=2))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    body = f"""Command: `python -m scripts.eval_timing --run {args.run} --data-dir {args.data_dir}`.
Machine: {result['machine']}.

| what | value |
|---|---|
| model | {result['network']}, {result['likelihood']}, from `make run` (10 epochs, mnist-sample) |
| data | the real MNIST test set, {n:,} images, binarized once (seed 1) |
| importance samples per image | {k:,} |
| wall time | {seconds:.0f} s ({seconds / 60:.1f} min) |
| throughput | {result['samples_per_second']:,.0f} samples/s; decoder matmuls \
{result['decoder_gflop_per_second']:.0f} GFLOP/s |
| test log p(x), K={k:,} | {result['log_px']:.2f} ± {result['log_px_se']:.2f} nats |
| test ELBO | {result['elbo']:.2f} nats |
"""
    update_section(args.doc, "Importance-sampled evaluation", body)


if __name__ == "__main__":
    main()

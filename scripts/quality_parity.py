"""Test ELBO of pyro-vae against the plain-PyTorch reference, same network and settings.

Both train the PyTorch example's network (784-400-20, ReLU) with Adam 1e-3 and batch 128
on the same device-resident batches of mnist-sample (dynamically binarized; the test set
binarized once with a fixed seed), for several seeds, and report the test ELBO after
each epoch's training. Writes JSON and the "Quality parity" section of docs/benchmarks.md.

    python -m scripts.quality_parity [--epochs 10] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import pyro
import torch

from pyro_vae import RunConfig, train
from pyro_vae.data import DeviceBatches
from pyro_vae.runner.resolve import resolve
from scripts._docs import machine_description, update_section
from scripts.reference import ReferenceVAE, reference_test_elbo, train_reference_epoch


def reference_run(config: RunConfig, seed: int) -> float:
    pyro.set_rng_seed(seed)
    splits = resolve(config, torch.device("cpu"))
    train_x, test_x = splits.train_x, splits.test_x
    vae = ReferenceVAE()
    optimizer = torch.optim.Adam(vae.parameters(), lr=config.train.lr)
    batches = DeviceBatches(train_x, config.train.batch_size, dynamic=True)
    for epoch in range(1, config.train.epochs + 1):
        train_reference_epoch(vae, optimizer, batches, epoch)
    return reference_test_elbo(vae, test_x, seed=seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", type=Path, default=Path("docs/results/quality_parity.json"))
    parser.add_argument("--doc", type=Path, default=Path("docs/benchmarks.md"))
    args = parser.parse_args()

    rows = []
    for seed in args.seeds:
        row = {"seed": seed}
        for elbo in ("trace", "meanfield"):
            config = RunConfig()
            config.data.dataset = "mnist-sample"
            config.train.epochs, config.train.seed, config.train.elbo = args.epochs, seed, elbo
            config.train.device = "cpu"
            run = train(config, progress=False)
            row[f"pyro_{elbo}"] = run.metrics[-1]["test_elbo"]
        config = RunConfig()
        config.data.dataset, config.train.epochs = "mnist-sample", args.epochs
        row["reference"] = reference_run(config, seed)
        rows.append(row)
        print(json.dumps(row), flush=True)

    med = {k: statistics.median(r[k] for r in rows) for k in ("pyro_trace", "pyro_meanfield",
                                                              "reference")}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"epochs": args.epochs, "rows": rows, "median": med},
                                    indent=2) + "\n")
    lines = [
        f"Command: `python -m scripts.quality_parity --epochs {args.epochs} --seeds "
        f"{' '.join(map(str, args.seeds))}`. Machine: {machine_description()}.",
        "",
        f"Test ELBO (nats per image, higher is better) after {args.epochs} epochs on "
        "mnist-sample (4,500 / 500 digits, dynamically binarized), 784-400-20 ReLU, "
        "Adam 1e-3, batch 128; one-sample ELBO on the fixed-seed binarized test set.",
        "",
        "| seed | pyro-vae Trace_ELBO | pyro-vae TraceMeanField_ELBO | plain PyTorch reference |",
        "|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['pyro_trace']:.2f} | {r['pyro_meanfield']:.2f} | "
                     f"{r['reference']:.2f} |")
    lines.append(f"| median | {med['pyro_trace']:.2f} | {med['pyro_meanfield']:.2f} | "
                 f"{med['reference']:.2f} |")
    update_section(args.doc, "Quality parity", "\n".join(lines))


if __name__ == "__main__":
    main()

"""Reproduce Burda, Grosse & Salakhutdinov (2015), Table 1 (MNIST), at a chosen budget.

Their protocol, from the configs in configs/burda/: dynamically binarized MNIST, tanh
networks (784-200-200-50; two stochastic layers 784-100-100-100-50-50-50), batch 20, Adam
with eps 1e-4, learning rate 1e-3 * 10^(-i/7) for 3^i epochs, i = 0..7 (3,280 epochs).
``--stages S`` runs the first S stages ((3^S - 1) / 2 epochs); each row is then evaluated
by importance sampling with K = 5,000. Writes the runs to runs/burda/ (a later call with
more stages resumes them) and a section of docs/reproduction.md:

    python -m scripts.reproduce_burda --stages 2 --data-dir MNIST_DIR --test-limit 1000
    python -m scripts.reproduce_burda --stages 8 --device cuda        # the full protocol
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pyro_vae
from pyro_vae.runner.resolve import resolve_device
from scripts._docs import machine_description, update_section

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "burda"
# Table 1 of Burda et al. (2015), MNIST, test negative log-likelihood in nats
PAPER = {"vae-k1": ("VAE, k = 1, one stochastic layer", 86.76),
         "iwae-k5": ("IWAE, k = 5, one stochastic layer", 85.54),
         "iwae-k50": ("IWAE, k = 50, one stochastic layer", 84.78),
         "two-layer-iwae-k50": ("IWAE, k = 50, two stochastic layers", 82.90)}


def epochs_for(stages: int) -> int:
    return (3**stages - 1) // 2


def run_row(name: str, args) -> dict:
    config = pyro_vae.RunConfig.read(CONFIGS / f"{name}.json")
    config.train.epochs = epochs_for(args.stages)
    config.train.device = args.device
    config.data.data_dir = str(args.data_dir) if args.data_dir else None
    config.data.test_limit = args.test_limit
    out = args.runs / name
    if (out / "checkpoint.pt").exists():
        run = pyro_vae.train(resume=out, epochs=config.train.epochs, progress=False)
    else:
        run = pyro_vae.train(config, out, progress=False)
    kept = pyro_vae.read_evaluations(run).get("test", {}).get(str(args.iwae_samples))
    if kept is not None and kept["epoch"] == run.epoch and kept["num_images"] == (
            args.test_limit or 10_000):
        result = kept  # this row was evaluated at this budget already: not again
    else:
        result = pyro_vae.evaluate(run, iwae_samples=args.iwae_samples,
                                   batch_size=args.batch_size, progress=None)
    return {"result": result, "train_seconds": sum(r["seconds"] for r in run.metrics),
            "eval_seconds": result["seconds"], "epochs": run.epoch,
            "test_elbo": run.metrics[-1]["test_elbo"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=2, help="learning-rate stages (1..8)")
    parser.add_argument("--rows", nargs="*", default=list(PAPER), choices=list(PAPER))
    parser.add_argument("--data-dir", type=Path, help="folder with the MNIST IDX files")
    parser.add_argument("--test-limit", type=int, help="evaluate the first N test images")
    parser.add_argument("--iwae-samples", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=20, help="evaluation batch")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "burda")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "reproduction.md")
    args = parser.parse_args()
    if not 1 <= args.stages <= 8:
        parser.error("--stages must be between 1 and 8")
    rows = []
    for name in args.rows:
        print(f"{name}: {epochs_for(args.stages)} epochs ...", flush=True)
        measured = run_row(name, args)
        r = measured["result"]
        what, paper = PAPER[name]
        rows.append(f"| {what} | {paper:.2f} | {-r['log_px']:.2f} ± {r['log_px_se']:.2f} | "
                    f"{-measured['test_elbo']:.2f} | {measured['epochs']} | "
                    f"{measured['train_seconds'] / 60:.1f} min | "
                    f"{measured['eval_seconds'] / 60:.1f} min |")
        print(rows[-1], flush=True)
        write_doc(args, rows)  # after every row: a long run leaves what it measured


def write_doc(args, rows: list[str]) -> None:
    device = str(resolve_device(args.device))
    images = f"the first {args.test_limit:,}" if args.test_limit else "all 10,000"
    command = " ".join(["python -m scripts.reproduce_burda", f"--stages {args.stages}",
                        *(["--data-dir MNIST_DIR"] if args.data_dir else []),
                        *([f"--test-limit {args.test_limit}"] if args.test_limit else []),
                        *([f"--device {args.device}"] if args.device != "auto" else [])])
    body = (f"Command: `{command}`. Machine: {machine_description(device)}. "
            f"{epochs_for(args.stages)} of the protocol's 3,280 epochs ({args.stages} of 8 "
            f"learning-rate stages); test NLL = -log p(x) with K = {args.iwae_samples:,} "
            f"importance samples on {images} test images (± standard error over images); "
            "lower is better.\n\n"
            "| row | paper NLL | ours NLL | ours -ELBO (test) | epochs | training | "
            "evaluation |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows))
    update_section(args.doc, f"Budget: {args.stages} stages on {device}", body)


if __name__ == "__main__":
    main()

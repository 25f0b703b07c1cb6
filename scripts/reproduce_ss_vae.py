"""Reproduce Pyro's ss-vae table (Kingma et al. 2014, M2) at a chosen budget.

For each label count N (100, 600, 1000, 3000) and each label draw (seed): train M2 with
Pyro's example settings (configs/ss-vae/m2.json: z 50, one hidden layer of 500, softplus,
Adam lr 0.00042 with beta1 0.95, batch 200, alpha 46, 10,000 validation images held out)
on MNIST with N labels, and train the supervised-only baseline -- the same classifier
network on the N labelled images alone -- on the same draw. Each reports the test accuracy
at its epoch of best validation accuracy (Pyro's protocol). The runs go to runs/ss-vae/ (a
later call with more --epochs resumes them, so the budget can be spent in parts); the
table, with Pyro's and Kingma's numbers beside ours, goes to docs/semi-supervised.md:

    python -m scripts.reproduce_ss_vae --epochs 10 --draws 2 --data-dir MNIST_DIR
    python -m scripts.reproduce_ss_vae --epochs 50 --draws 5 --data-dir MNIST_DIR  # full

Label draws can run side by side (``--seeds 0`` and ``--seeds 1`` in two processes, one
torch thread each on a 2-core machine): each adds its rows to the same table.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import shutil
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import pyro_vae
from pyro_vae.networks import mlp
from pyro_vae.runner.resolve import resolve_device
from pyro_vae.semisupervised import choose_labels
from scripts._docs import machine_description, update_section

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "ss-vae" / "m2.json"
LABELS = (100, 600, 1000, 3000)
# Pyro's ss-vae tutorial, Table 1, the "third variant" (enumeration + auxiliary loss):
# mean test accuracy and its 95% bound over runs; its supervised-only baseline; Kingma et
# al. (2014), M2, N = 100 (11.97% error)
PYRO = {100: (0.9319, 0.0060), 600: (0.9437, 0.0070), 1000: (0.9487, 0.0038),
        3000: (0.9582, 0.0012)}
PYRO_BASELINE = {100: 0.7712, 600: 0.8716, 1000: 0.8863, 3000: 0.9108}
KINGMA = {100: 0.8803}
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262}  # Student's t quantiles, by degrees of freedom


def train_m2(labels: int, seed: int, args) -> pyro_vae.Run:
    out = args.runs / f"labels{labels}-seed{seed}"
    if (out / "checkpoint.pt").exists():
        return pyro_vae.train(resume=out, epochs=args.epochs, progress=False)
    config = pyro_vae.RunConfig.read(CONFIG)
    config.data.labels, config.train.seed = labels, seed
    config.data.dataset, config.data.validation = args.dataset, args.validation
    config.data.data_dir = str(args.data_dir) if args.data_dir else None
    config.train.epochs, config.train.device = args.epochs, args.device
    return pyro_vae.train(config, out, force=True, progress=False)


def best_validation(metrics: list[dict]) -> dict:
    """The epoch with the best validation accuracy (the first of ties)."""
    return max(metrics, key=lambda r: (r["validation_accuracy"], -r["epoch"]))


def supervised_baseline(run: pyro_vae.Run, steps: int, seed: int) -> dict:
    """M2's classifier network trained on the run's labelled images alone (cross-entropy,
    the run's optimizer settings and batch size, dynamic binarization as M2 sees them);
    test accuracy at the best validation accuracy, checked every 50 steps."""
    data, config = run.data, run.config
    chosen = choose_labels(data.train_y, config.data.labels, seed)
    x, y = data.train_x[chosen], data.train_y[chosen]
    torch.manual_seed(seed)
    hidden = list(config.model.hidden_dims)
    net = nn.Sequential(mlp([x.shape[1], *hidden], config.model.activation),
                        nn.Linear(hidden[-1], 10))
    adam = torch.optim.Adam(net.parameters(), lr=config.train.lr,
                            betas=(config.train.adam_beta1, 0.999))
    batch = min(config.train.batch_size, len(x))

    def accuracy(images, labels) -> float:
        with torch.no_grad():
            return (net(images).argmax(-1) == labels).float().mean().item()

    best = (-1.0, 0.0, 0)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        pick = torch.randint(len(x), (batch,))
        loss = nn.functional.cross_entropy(net(torch.bernoulli(x[pick])), y[pick])
        adam.zero_grad()
        loss.backward()
        adam.step()
        if step % 50 == 0:
            valid = accuracy(data.valid_x, data.valid_y)
            if valid > best[0]:
                best = (valid, accuracy(data.test_x, data.test_y), step)
    return {"validation_accuracy": best[0], "test_accuracy": best[1], "step": best[2],
            "seconds": time.perf_counter() - start}


def interval(values: list[float]) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.4f} (one draw)"
    half = T_975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return f"{mean:.4f} ({half:.4f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=50, help="M2 epochs per run (Pyro: 50)")
    parser.add_argument("--draws", type=int, default=3, help="label draws (seeds) per N")
    parser.add_argument("--seeds", type=int, nargs="*",
                        help="these label draws only (default: 0 .. draws-1); calls with "
                             "other seeds may run at the same time and add to one table")
    parser.add_argument("--labels", type=int, nargs="*", default=list(LABELS))
    parser.add_argument("--baseline-steps", type=int, default=3000,
                        help="steps of the supervised-only baseline")
    parser.add_argument("--data-dir", type=Path, help="folder with the MNIST IDX files")
    parser.add_argument("--dataset", default="mnist", help="mnist-sample: a quick check")
    parser.add_argument("--validation", type=int, default=10_000,
                        help="training images held out for validation (Pyro: 10,000)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "ss-vae")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "semi-supervised.md")
    parser.add_argument("--table-only", action="store_true",
                        help="rewrite the table and figures from what earlier calls measured")
    args = parser.parse_args()
    if args.table_only:
        table_only(args)
        figures(args)
        return
    for labels in args.labels:
        for seed in args.seeds if args.seeds is not None else range(args.draws):
            print(f"N = {labels}, label draw {seed}: {args.epochs} epochs ...", flush=True)
            run = train_m2(labels, seed, args)
            if run.interrupted:  # Ctrl-C or SIGTERM: the run is saved; so is the table
                raise SystemExit(f"stopped; run the same command again to resume {run.path}")
            best = best_validation(run.metrics)
            baseline = supervised_baseline(run, args.baseline_steps, seed)
            entry = {
                "seed": seed, "epochs": run.epoch, "best_epoch": best["epoch"],
                "test_accuracy": best["test_accuracy"],
                "validation_accuracy": best["validation_accuracy"],
                "final_test_accuracy": run.metrics[-1]["test_accuracy"],
                "test_elbo": run.metrics[-1]["test_elbo"],
                "seconds": sum(r["seconds"] for r in run.metrics),
                "seconds_per_epoch": statistics.median(r["seconds"] for r in run.metrics),
                "baseline": baseline}
            print(json.dumps(entry), flush=True)
            record(args, labels, entry)  # after every run: a long job leaves what it measured
    figures(args)


def _results_file(args) -> Path:
    return args.doc.parent / "results" / "ss_vae.json"


def record(args, labels: int, entry: dict) -> None:
    """Add one run to the results of this budget (replacing an earlier measurement of the
    same N and seed) and rewrite the table; calls running at once take turns (a lock)."""
    path = _results_file(args)
    path.parent.mkdir(parents=True, exist_ok=True)
    args.runs.mkdir(parents=True, exist_ok=True)
    with open(args.runs / ".results.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = {}
        if path.exists():
            data = json.loads(path.read_text())
            if data.get("epochs") == args.epochs:
                results = {int(k): v for k, v in data["results"].items()}
        runs = [r for r in results.get(labels, []) if r["seed"] != entry["seed"]]
        results[labels] = sorted([*runs, entry], key=lambda r: r["seed"])
        write_doc(args, results)


def write_doc(args, results: dict, machine: str | None = None) -> None:
    """The table of ``results``, measured on ``machine`` (default: this one, now)."""
    device = str(resolve_device(args.device))
    machine = machine or machine_description(device)
    rows = []
    for labels, runs in sorted(results.items()):
        pyro_mean, pyro_bound = PYRO[labels]
        kingma = f"{KINGMA[labels]:.4f}" if labels in KINGMA else ""
        epochs = sorted({r["epochs"] for r in runs})
        rows.append(
            f"| {labels} | {pyro_mean:.4f} ({pyro_bound:.4f}) | {kingma} | "
            f"{interval([r['test_accuracy'] for r in runs])} | "
            f"{PYRO_BASELINE[labels]:.4f} | "
            f"{interval([r['baseline']['test_accuracy'] for r in runs])} | "
            f"{len(runs)} | {', '.join(map(str, epochs))} | "
            f"{statistics.median(r['seconds_per_epoch'] for r in runs):.1f} s |")
    command = " ".join(["python -m scripts.reproduce_ss_vae", f"--epochs {args.epochs}",
                        f"--draws {1 + max(r['seed'] for runs in results.values() for r in runs)}",
                        *([f"--dataset {args.dataset}"] if args.dataset != "mnist" else []),
                        *(["--data-dir MNIST_DIR"] if args.data_dir else []),
                        *([f"--device {args.device}"] if args.device != "auto" else [])])
    body = (
        f"Command: `{command}`. Machine: {machine}. Each row: test "
        "accuracy (of 10,000) at the epoch of best validation accuracy, mean over the label "
        "draws (seeds 0, 1, ...; the draws column) with the half-width of its 95% t-interval "
        "in parentheses; Pyro's column is its tutorial's mean over five draws with its 95% "
        "bound. "
        f"**{args.epochs} of Pyro's 50 epochs.**\n\n"
        "| labels | Pyro's ss-vae tutorial | Kingma et al. M2 | ours, M2 | Pyro "
        "supervised-only | ours, supervised-only | draws | epochs | time per epoch |\n"
        "|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows))
    update_section(args.doc, f"Measured: {args.epochs} epochs on {device}", body)
    _results_file(args).write_text(json.dumps({"epochs": args.epochs, "device": device,
                                "machine": machine,
                                "results": {str(k): v for k, v in results.items()}},
                               indent=1) + "\n")


def figures(args) -> None:
    """The figures of the first draw of the fewest and the most labels, copied to
    docs/figures/ss_vae_N_*.png."""
    folder = args.doc.parent / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    for labels in sorted({min(args.labels), max(args.labels)}):
        run = args.runs / f"labels{labels}-seed{min(args.seeds or [0])}"
        if not (run / "checkpoint.pt").exists():
            continue
        for path in pyro_vae.write_figures(run, ("accuracy", "confusion", "conditional")):
            shutil.copy(path, folder / f"ss_vae_{labels}_{path.name}")


def table_only(args) -> None:
    """Rewrite the table from docs/results/ss_vae.json, training nothing."""
    data = json.loads(_results_file(args).read_text())
    args.epochs = data["epochs"]
    write_doc(args, {int(k): v for k, v in data["results"].items()}, data["machine"])


if __name__ == "__main__":
    main()

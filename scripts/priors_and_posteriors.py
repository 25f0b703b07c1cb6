"""Standard prior vs VampPrior, Gaussian guide vs IAF guide, on full MNIST, at a chosen budget.

Four rows, the same network and budget for each (dynamically binarized MNIST, a 784-300-300
MLP with 40 latent dimensions as the VampPrior paper's one-layer model, batch 100, Adam
5e-4, linear KL warm-up over the first tenth of the epochs, 500 pseudo-inputs, 2 IAF
steps): each row trains, then is evaluated on the test set (ELBO, its KL, importance-
sampled log p(x) with K = 5,000, active units) and calibrated (simulation-based
calibration of its guide: pyro-vae calibrate). Writes the runs to runs/priors/ (a later
call with more epochs resumes them) and the table of docs/priors-and-posteriors.md:

    python -m scripts.priors_and_posteriors --epochs 40 --data-dir MNIST_DIR
    python -m scripts.priors_and_posteriors --epochs 2000 --device cuda   # the paper's budget
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pyro_vae
from pyro_vae import plots
from pyro_vae.estimators import fixed_noise
from pyro_vae.latents import active_units
from pyro_vae.runner.resolve import resolve_device
from scripts._docs import machine_description, update_section

ROOT = Path(__file__).resolve().parents[1]
# (prior, guide) of each row; the papers' negative test log-likelihoods where they give one
ROWS = {"standard": ("standard", "gaussian"), "vamp": ("vamp", "gaussian"),
        "iaf": ("standard", "iaf"), "vamp-iaf": ("vamp", "iaf")}
WHAT = {"standard": "N(0, I) prior, Gaussian guide", "vamp": "VampPrior (K = 500), Gaussian guide",
        "iaf": "N(0, I) prior, IAF guide (2 steps)", "vamp-iaf": "VampPrior, IAF guide"}
PAPER = {"standard": "88.56 (VampPrior paper, Table 1)", "vamp": "85.57 (VampPrior paper)",
         "iaf": "--", "vamp-iaf": "--"}


def config_for(name: str, args) -> pyro_vae.RunConfig:
    config = pyro_vae.RunConfig()
    config.data.dataset, config.data.binarize = args.dataset, "dynamic"
    config.data.data_dir = str(args.data_dir) if args.data_dir else None
    config.data.train_limit, config.data.test_limit = args.train_limit, args.test_limit
    config.model.hidden_dims, config.model.z_dim = (300, 300), 40
    config.model.prior, config.model.guide = ROWS[name]
    config.model.pseudo_inputs, config.model.flows = 500, 2
    config.train.batch_size, config.train.lr = 100, 5e-4
    config.train.epochs, config.train.kl_warmup = args.epochs, max(1, args.epochs // 10)
    config.train.device = args.device
    return config


def run_row(name: str, args) -> dict:
    out = args.runs / name
    if (out / "checkpoint.pt").exists():
        run = pyro_vae.train(resume=out, epochs=args.epochs, progress=False)
    else:
        run = pyro_vae.train(config_for(name, args), out, progress=False)
    kept = pyro_vae.read_evaluations(run).get("test", {}).get(str(args.iwae_samples))
    if kept is not None and kept["epoch"] == run.epoch and kept["num_images"] == len(
            run.data.test_x):
        result = kept  # this row was evaluated at this budget already
    else:
        result = pyro_vae.evaluate(run, iwae_samples=args.iwae_samples, progress=None)
    with fixed_noise(0, run.device):  # recomputed: cheap, and the current estimator's
        active = active_units(run.vae, run.data.test_x)
    started = time.perf_counter()
    calibration = pyro_vae.calibrate(run, simulations=args.simulations, draws=100)
    calibration_seconds = time.perf_counter() - started
    figures = {f"calibration_{name}": plots.calibration_ecdf(calibration, about=name)}
    if name == "vamp":
        figures["vamp_pseudo_inputs"] = plots.pseudo_input_grid(run.vae.pseudo_inputs(),
                                                                about=name)
    plots.save_figures(figures, args.figures)
    return {"result": result, "epochs": run.epoch, "calibration": calibration,
            "active_units": active,
            "seconds": sum(r["seconds"] for r in run.metrics) + result["seconds"],
            "calibration_seconds": calibration_seconds,
            # the fastest epoch: robust to other work sharing the machine for a while
            "seconds_per_epoch": min(r["seconds"] for r in run.metrics)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--data-dir", type=Path, help="folder with the MNIST IDX files")
    parser.add_argument("--dataset", default="mnist", help="mnist-sample: a quick check only")
    parser.add_argument("--train-limit", type=int, help="train on the first N images only")
    parser.add_argument("--test-limit", type=int, help="evaluate the first N test images")
    parser.add_argument("--iwae-samples", type=int, default=5000)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "priors")
    parser.add_argument("--simulations", type=int, default=1000, help="of the SBC check")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "priors-and-posteriors.md")
    parser.add_argument("--figures", type=Path, default=ROOT / "docs" / "figures")
    args = parser.parse_args()
    lines = ["| prior, guide | test ELBO | KL | log p(x), K = 5,000 | active units | "
             "SBC: coordinates in band | paper's -log p(x) | fastest epoch, s |",
             "|---|---|---|---|---|---|---|---|"]
    epochs, sbc_seconds, total = set(), {}, 0.0
    for name in args.rows:
        print(f"{name}: {args.epochs} epochs, then K = {args.iwae_samples} ...", flush=True)
        row = run_row(name, args)
        r = row["result"]
        epochs.add(row["epochs"])
        c = row["calibration"]
        sbc_seconds[name] = row["calibration_seconds"]
        total += row["seconds"]
        lines.append(f"| {WHAT[name]} | {r['elbo']:.2f} | {r['kl']:.2f} | "
                     f"{r['log_px']:.2f} ± {r['log_px_se']:.2f} | {row['active_units']} / 40 | "
                     f"{int(c.in_band[:-1].sum())} / 40 | {PAPER[name]} | "
                     f"{row['seconds_per_epoch']:.1f} |")
        print(lines[-1], flush=True)
    device = resolve_device(args.device).type
    body = "\n".join([
        f"`python -m scripts.priors_and_posteriors --epochs {args.epochs}` on "
        f"{machine_description(device)}; {', '.join(map(str, sorted(epochs)))} epochs per row "
        f"(the papers train until early stopping, up to 2,000 epochs: these rows are "
        f"{args.epochs} epochs into that budget); training and evaluation took "
        f"{total / 60:.0f} min in all (the runs' own records). "
        f"Nats per test image ({args.dataset}, {args.test_limit or 'all'} test images, "
        "dynamically binarized, evaluated on one fixed "
        "binarization); ± is the standard error over images; the paper's column is "
        "Tomczak & Welling (2018), Table 1, one-layer MLP, after their full budget. "
        f"SBC: `pyro-vae calibrate` with {args.simulations} simulations x 100 guide draws; "
        "a coordinate is in band when the ECDF of its ranks stays inside the simultaneous "
        "band (figures: docs/figures/calibration_*.png); it took "
        + ", ".join(f"{v:.1f} s ({k})" for k, v in sbc_seconds.items()) + ".",
        "", *lines])
    update_section(args.doc, "Full MNIST: four rows", body)
    print(f"wrote {args.doc}")


if __name__ == "__main__":
    main()

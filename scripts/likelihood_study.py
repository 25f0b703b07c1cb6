"""The likelihood study: is a Bernoulli on gray-scale pixels valid? Measure it.

Trains the same network (784-400-20, ReLU, Adam 1e-3, batch 128) with six observation
models and evaluates each on the test set:

- Bernoulli on gray-scale pixels ("relaxed", the PyTorch example; not normalized),
- Bernoulli on dynamically binarized pixels (a probability mass function),
- continuous Bernoulli, Normal with a learned per-pixel scale, Normal with a fixed scale,
  and Beta (densities on gray-scale pixels).

For each: the test ELBO, the importance-sampled log-likelihood where the likelihood is a
normalized density or mass function of the data it scores, the log-normalizer the relaxed
Bernoulli leaves out, latent quality (k-nearest-neighbour accuracy of test posterior
means among training posterior means), reconstructions and prior samples (means and
draws). Writes JSON, figures and the measured sections of docs/likelihoods.md.

    python -m scripts.likelihood_study                                  # offline, mnist-sample
    python -m scripts.likelihood_study --dataset fashion-mnist \\
        --data-dir /usr/share/datasets/fashion-mnist --epochs 10
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from pyro_vae import RunConfig, evaluate_run, load_run, train
from pyro_vae.plots import labelled_rows, save_figures
from scripts._docs import machine_description, update_section
from scripts.study import knn_accuracy, missing_log_normalizer

VARIANTS = [  # key, likelihood, binarize, label
    ("bernoulli-gray", "bernoulli", "none", "Bernoulli, gray (relaxed)"),
    ("bernoulli-binarized", "bernoulli", "dynamic", "Bernoulli, binarized pixels"),
    ("continuous-bernoulli", "continuous-bernoulli", "none", "continuous Bernoulli"),
    ("normal", "normal", "none", "Normal, learned scale"),
    ("normal-fixed", "normal-fixed", "none", "Normal, fixed scale 0.1"),
    ("beta", "beta", "none", "Beta"),
]


def run_variant(args, key, likelihood, binarize):
    path = args.runs / key
    if (path / "checkpoint.pt").exists() and load_run(path).epoch >= args.epochs:
        return load_run(path)
    config = RunConfig()
    config.data.dataset, config.data.data_dir = args.dataset, args.data_dir
    config.data.test_limit, config.data.train_limit = args.test_limit, args.train_limit
    config.model.likelihood, config.data.binarize = likelihood, binarize
    config.train.epochs, config.train.seed = args.epochs, args.seed
    return train(config, path, force=True, progress=False)


def study(args):
    results, recon_rows, sample_rows = [], [], []
    for key, likelihood, binarize, label in VARIANTS:
        print(f"{label}: training", file=sys.stderr, flush=True)
        run = run_variant(args, key, likelihood, binarize)
        with torch.no_grad():
            row, recon, samples = measure(args, run, key, binarize, label)
        results.append(row)
        recon_rows.extend(recon if recon_rows else [("input (gray-scale)", samples[0])] + recon)
        sample_rows.extend(samples[1:])
        print(json.dumps(row), file=sys.stderr, flush=True)
    figures = {
        f"likelihoods_reconstructions_{args.dataset}": labelled_rows(
            recon_rows, title="Reconstructions: mean of p(x | z = E_q[z]) per likelihood"),
        f"likelihoods_samples_{args.dataset}": labelled_rows(
            sample_rows, title="Prior samples per likelihood: mean of p(x | z), and draws"),
    }
    paths = save_figures(figures, args.figures, dpi=90)
    return results, paths


def measure(args, run, key, binarize, label):
    """Numbers and picture rows of one trained variant."""
    vae = run.vae
    data, train_x, test_x = run.data.data, run.data.train_x, run.data.test_x
    ev = evaluate_run(run, "test", args.iwae_samples, progress=False)
    lik = vae.likelihood  # every density is of the pixel values themselves (Beta: Jacobian in)
    missing = missing_log_normalizer(vae, test_x)
    train_z = vae.encode(train_x[: args.knn_train]).loc
    knn = knn_accuracy(train_z, data.train_y[: args.knn_train], vae.encode(test_x).loc,
                       data.test_y)
    row = {
        "key": key, "label": label, "likelihood": lik.name, "binarize": binarize,
        "normalized": lik.normalized, "scores": "binary pixels" if lik.binary else
        "gray-scale pixels", "test_elbo": ev["elbo"], "test_elbo_se": ev["elbo_se"],
        "log_px": ev["log_px"] if lik.normalized else None,
        "log_px_se": ev["log_px_se"] if lik.normalized else None,
        "missing_log_normalizer": None if missing is None else missing.mean().item(),
        "knn_accuracy": knn, "epochs": run.epoch,
        "final_train_elbo": run.metrics[-1]["train_elbo"],
    }
    if missing is not None:
        row["elbo_plus_missing"] = row["test_elbo"] + row["missing_log_normalizer"]
    shown = test_x[:10]
    recon = [("input (binarized)", shown)] if binarize != "none" else []
    recon.append((label, vae.reconstruct(shown)))
    torch.manual_seed(args.seed)
    d = vae.sample_prior(10)
    samples = [data.test_x[:10], (f"{label}: mean", d.mean)]
    try:
        samples.append((f"{label}: draws", d.sample()))
    except NotImplementedError:
        samples.append((f"{label}: no draws", None))
    return row, recon, samples


def table(results, k) -> str:
    lines = [
        "| likelihood | scores | normalized | test ELBO | log p(x), K=" + f"{k:,}" +
        " | missing log-normalizer | ELBO + missing | kNN accuracy |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        log_px = f"{r['log_px']:.1f} ± {r['log_px_se']:.1f}" if r["log_px"] is not None else \
            "— (not a likelihood)"
        missing = f"{r['missing_log_normalizer']:.1f}" if r["missing_log_normalizer"] is not None \
            else "0"
        plus = f"{r['elbo_plus_missing']:.1f}" if "elbo_plus_missing" in r else ""
        lines.append(f"| {r['label']} | {r['scores']} | {'yes' if r['normalized'] else 'no'} | "
                     f"{r['test_elbo']:.1f} ± {r['test_elbo_se']:.1f} | {log_px} | {missing} | "
                     f"{plus} | {100 * r['knn_accuracy']:.1f}% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="mnist-sample",
                        choices=("mnist-sample", "mnist", "fashion-mnist"))
    parser.add_argument("--data-dir")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--iwae-samples", type=int, default=1000)
    parser.add_argument("--test-limit", type=int, help="evaluate on the first N test images")
    parser.add_argument("--train-limit", type=int, help="train on the first N images (tests)")
    parser.add_argument("--knn-train", type=int, default=10000,
                        help="training images used as neighbours for the kNN accuracy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=Path, default=None)
    parser.add_argument("--figures", type=Path, default=Path("docs/figures"))
    parser.add_argument("--doc", type=Path, default=Path("docs/likelihoods.md"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    args.runs = args.runs or Path("runs/likelihood-study") / args.dataset
    results, paths = study(args)
    result = {"dataset": args.dataset, "epochs": args.epochs, "iwae_samples": args.iwae_samples,
              "machine": machine_description(), "rows": results}
    json_path = args.json or Path(f"docs/results/likelihood_study_{args.dataset}.json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    command = " ".join(["python -m scripts.likelihood_study", *sys.argv[1:]])
    figures = "\n\n".join(f"![{p.stem}](figures/{p.name})" for p in paths)
    body = (f"Command: `{command}`. Machine: {result['machine']}. Network 784-400-20 ReLU, "
            f"Adam 1e-3, batch 128, {args.epochs} epochs, seed {args.seed}; nats per image "
            f"on the test set (± standard error over images); kNN: 5 nearest neighbours of "
            f"test posterior means among {args.knn_train:,} training posterior means.\n\n"
            f"{table(results, args.iwae_samples)}\n\n{figures}")
    if args.doc.exists():
        update_section(args.doc, f"Measured: {args.dataset}", body)
    print(table(results, args.iwae_samples))


if __name__ == "__main__":
    main()

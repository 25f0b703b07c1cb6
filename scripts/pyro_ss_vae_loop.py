"""Pyro's own ss-vae training loop, re-created on pyro-vae's data: the same-budget reference.

What examples/vae/ss_vae_M2.py runs: the M2 of Pyro's example (one-hot ``y`` concatenated
to the inputs of the encoder and the decoder, one hidden layer of 500, softplus, z 50),
``SVI`` with ``TraceEnum_ELBO`` on ``config_enumerate(guide)``, and a second ``SVI`` with
``Trace_ELBO`` for the auxiliary loss (multiplier 46), sharing one Adam (lr 0.00042, beta1
0.95). Each epoch shuffles the unlabelled images into batches of 200; labelled batches come
every ``50,000 / N``-th batch (Pyro's rule) and get both steps.

The data are pyro-vae's for the same settings and seed (configs/ss-vae/m2.json): the same
labelled images (``choose_labels``), dynamic binarization of the training images, the same
fixed binarization of the test and validation images. So its accuracy per epoch stands
beside ``scripts.reproduce_ss_vae``'s at equal epochs:

    python -m scripts.pyro_ss_vae_loop --labels 100 --epochs 50 --data-dir MNIST_DIR
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO, config_enumerate
from pyro.optim import Adam
from torch import nn

import pyro_vae
from pyro_vae.runner.resolve import resolve
from pyro_vae.semisupervised import choose_labels
from scripts._docs import machine_description, update_section

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "ss-vae" / "m2.json"


class PyroExampleM2(nn.Module):
    """The M2 of Pyro's example: one-hot y concatenated to the networks' inputs."""

    def __init__(self, z_dim=50, hidden=500, classes=10, x_dim=784, alpha=46.0):
        super().__init__()
        self.z_dim, self.classes, self.alpha = z_dim, classes, alpha
        self.encoder_y = nn.Sequential(nn.Linear(x_dim, hidden), nn.Softplus(),
                                       nn.Linear(hidden, classes))
        self.encoder_z = nn.Sequential(nn.Linear(x_dim + classes, hidden), nn.Softplus(),
                                       nn.Linear(hidden, 2 * z_dim))
        self.decoder = nn.Sequential(nn.Linear(z_dim + classes, hidden), nn.Softplus(),
                                     nn.Linear(hidden, x_dim))

    @staticmethod
    def _cat(a, b):
        shape = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
        return torch.cat([a.expand(*shape, -1), b.expand(*shape, -1)], -1)

    def model(self, xs, ys=None):
        pyro.module("ss_vae", self)
        with pyro.plate("data", xs.shape[0]):
            zs = pyro.sample("z", dist.Normal(xs.new_zeros(self.z_dim), 1.0)
                             .expand([xs.shape[0], self.z_dim]).to_event(1))
            prior = xs.new_full((xs.shape[0], self.classes), 1.0 / self.classes)
            ys = pyro.sample("y", dist.OneHotCategorical(prior), obs=ys)
            logits = self.decoder(self._cat(zs, ys))
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=xs)

    def guide(self, xs, ys=None):
        with pyro.plate("data", xs.shape[0]):
            if ys is None:
                ys = pyro.sample("y", dist.OneHotCategorical(logits=self.encoder_y(xs)))
            loc, raw = self.encoder_z(self._cat(xs, ys)).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, F.softplus(raw) + 1e-6).to_event(1))

    def model_classify(self, xs, ys=None):
        pyro.module("ss_vae", self)
        with pyro.plate("data", xs.shape[0]):
            if ys is not None:
                with pyro.poutine.scale(scale=self.alpha):
                    pyro.sample("y_aux", dist.OneHotCategorical(logits=self.encoder_y(xs)),
                                obs=ys)

    def guide_classify(self, xs, ys=None):
        pass


class PyroLoop:
    """The example's two ``SVI`` objects over one Adam, and its batch schedule."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, labelled: torch.Tensor,
                 batch_size: int = 200):
        pyro.clear_param_store()
        self.m2 = PyroExampleM2()
        optimizer = Adam({"lr": 4.2e-4, "betas": (0.95, 0.999)})
        self.basic = SVI(self.m2.model, config_enumerate(self.m2.guide, "parallel"),
                         optimizer, loss=TraceEnum_ELBO(max_plate_nesting=1))
        self.aux = SVI(self.m2.model_classify, self.m2.guide_classify, optimizer,
                       loss=Trace_ELBO())
        mask = torch.zeros(len(x), dtype=torch.bool)
        mask[labelled] = True
        self.sup_x, self.sup_y = x[mask], F.one_hot(y[mask], 10).float()
        self.unsup_x, self.batch_size = x[~mask], batch_size
        self.period = max(1, len(x) // max(1, len(labelled)))

    def step(self, xs: torch.Tensor, ys: torch.Tensor | None = None) -> None:
        self.basic.step(xs, ys)
        if ys is not None:
            self.aux.step(xs, ys)

    def epoch(self) -> None:
        """One epoch: every unlabelled batch, and the labelled ones at Pyro's positions."""
        b = self.batch_size
        unsup = self.unsup_x[torch.randperm(len(self.unsup_x))].split(b)
        order = torch.randperm(len(self.sup_x))
        sup = list(zip(self.sup_x[order].split(b), self.sup_y[order].split(b)))
        sup_iter, unsup_iter = iter(sup), iter(unsup)
        done_sup = 0
        for i in range(len(sup) + len(unsup)):
            # Pyro's rule: a labelled batch every period-th batch, from batch 1 on
            if (i % self.period == 1 or i >= len(unsup) + done_sup) and done_sup < len(sup):
                xs, ys = next(sup_iter)
                self.step(torch.bernoulli(xs), ys)
                done_sup += 1
            else:
                self.step(torch.bernoulli(next(unsup_iter)))

    @torch.no_grad()
    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return (self.m2.encoder_y(x).argmax(-1) == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0, help="the label draw (as ours)")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--data-dir", type=Path, help="folder with the MNIST IDX files")
    parser.add_argument("--dataset", default="mnist", help="mnist-sample: a quick check")
    parser.add_argument("--validation", type=int, default=10_000)
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "semi-supervised.md")
    args = parser.parse_args()
    config = pyro_vae.RunConfig.read(CONFIG)
    config.data.dataset, config.data.validation = args.dataset, args.validation
    config.data.data_dir = str(args.data_dir) if args.data_dir else None
    data = resolve(config, torch.device("cpu"))
    labelled = choose_labels(data.train_y, args.labels, args.seed)
    torch.manual_seed(args.seed)
    loop = PyroLoop(data.train_x, data.train_y, labelled)
    history, start = [], time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        began = time.perf_counter()
        loop.epoch()
        history.append({"epoch": epoch, "seconds": time.perf_counter() - began,
                        "test_accuracy": loop.accuracy(data.test_x, data.test_y),
                        "validation_accuracy": loop.accuracy(data.valid_x, data.valid_y)})
        print(json.dumps(history[-1]), flush=True)
    best = max(history, key=lambda r: (r["validation_accuracy"], -r["epoch"]))
    result = {"labels": args.labels, "seed": args.seed, "epochs": args.epochs,
              "best_epoch": best["epoch"], "test_accuracy": best["test_accuracy"],
              "final_test_accuracy": history[-1]["test_accuracy"],
              "seconds": time.perf_counter() - start, "history": history}
    path = args.doc.parent / "results" / f"ss_vae_pyro_loop_{args.labels}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    curve = ", ".join(f"{r['test_accuracy']:.3f}" for r in history[:: max(1, len(history) // 10)])
    update_section(args.doc, f"Pyro's own loop, {args.labels} labels, {args.epochs} epochs", (
        f"Command: `python -m scripts.pyro_ss_vae_loop --labels {args.labels} --seed "
        f"{args.seed} --epochs {args.epochs}"
        f"{' --data-dir MNIST_DIR' if args.data_dir else ''}`. Machine: "
        f"{machine_description()}. Pyro's example loop (two `SVI`s, Pyro's batch schedule) "
        "on the same images, labels and binarization as our run with this seed: test "
        f"accuracy {best['test_accuracy']:.4f} at its best validation epoch "
        f"({best['epoch']}), {history[-1]['test_accuracy']:.4f} after the last; "
        f"{result['seconds'] / args.epochs:.1f} s per epoch. Test accuracy every "
        f"{max(1, len(history) // 10)} epoch(s): {curve}."))


if __name__ == "__main__":
    main()

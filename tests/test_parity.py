"""Quality parity with the PyTorch example's hand-written VAE (see docs/benchmarks.md)."""

import pyro
import pytest
import torch

from pyro_vae import RunConfig, train
from pyro_vae.data import DeviceBatches
from pyro_vae.runner.resolve import resolve
from scripts.reference import ReferenceVAE, reference_test_elbo, train_reference_epoch

EPOCHS = 10


def config(elbo: str) -> RunConfig:
    c = RunConfig()  # the PyTorch example's 784-400-20 ReLU network, Adam 1e-3, batch 128
    c.data.dataset, c.train.device = "mnist-sample", "cpu"
    c.train.epochs, c.train.elbo = EPOCHS, elbo
    return c


def reference_elbo() -> float:
    pyro.set_rng_seed(0)
    splits = resolve(config("trace"), torch.device("cpu"))
    train_x, test_x = splits.train_x, splits.test_x
    vae = ReferenceVAE()
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    batches = DeviceBatches(train_x, 128, dynamic=True)
    for epoch in range(1, EPOCHS + 1):
        train_reference_epoch(vae, optimizer, batches, epoch)
    return reference_test_elbo(vae, test_x)


@pytest.mark.slow
def test_test_elbo_after_10_epochs_matches_the_plain_pytorch_loop():
    reference = reference_elbo()
    meanfield = train(config("meanfield"), progress=False).metrics[-1]["test_elbo"]
    trace = train(config("trace"), progress=False).metrics[-1]["test_elbo"]
    # Over seeds 0-2 (scripts/quality_parity.py, docs/benchmarks.md) each loop's test ELBO
    # spreads by 1.4-2 nats; medians: reference -133.41, meanfield -133.74, Trace_ELBO
    # -134.42. With the analytic KL, as the reference uses, pyro-vae is as good within a
    # nat (on this seed, 1.4 nats better):
    assert meanfield > reference - 1.0
    # Trace_ELBO's Monte-Carlo KL adds gradient noise: a nat behind in the median, and
    # above -137 nats, the worst of any loop over seeds 0-2 with a 1.3-nat margin.
    assert trace > reference - 2.5
    assert trace > -137.0

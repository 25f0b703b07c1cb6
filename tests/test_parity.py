"""Quality parity with the PyTorch example's hand-written VAE (see docs/benchmarks.md)."""

import statistics

import pytest

from pyro_vae import RunConfig, train
from scripts.quality_parity import reference_run

EPOCHS = 10
SEEDS = (0, 1, 2)


def config(elbo: str, seed: int) -> RunConfig:
    c = RunConfig()  # the PyTorch example's 784-400-20 ReLU network, Adam 1e-3, batch 128
    c.data.dataset, c.train.device = "mnist-sample", "cpu"
    c.train.epochs, c.train.elbo, c.train.seed = EPOCHS, elbo, seed
    return c


def median_elbo(elbo: str) -> float:
    return statistics.median(train(config(elbo, seed), progress=False).metrics[-1]["test_elbo"]
                             for seed in SEEDS)


@pytest.mark.slow
def test_test_elbo_after_10_epochs_matches_the_plain_pytorch_loop():
    """Medians over seeds 0-2, as scripts/quality_parity.py reports them: one seed's test
    ELBO moves by 1.5-2 nats with the noise (seeds 0-10 in docs/benchmarks.md)."""
    reference = statistics.median(reference_run(config("trace", seed), seed)
                                  for seed in SEEDS)
    meanfield, trace = median_elbo("meanfield"), median_elbo("trace")
    # with the analytic KL, as the reference has it, pyro-vae is as good: over seeds 0-10
    # the two differ by -0.03 nats on average (-2.0 to +2.6 on single seeds)
    assert meanfield > reference - 1.0
    # Trace_ELBO's Monte-Carlo KL adds gradient noise: 1.5 nats behind on average over
    # seeds 0-10, never above 3.6 on a single seed
    assert trace > reference - 3.0
    assert trace > -137.0

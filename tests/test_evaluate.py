"""The importance-sampled log-likelihood against a closed form (probabilistic PCA).

With a linear decoder and a fixed Normal likelihood, p(x) = N(b, W W^T + s^2 I) exactly.
"""

import math

import pytest
import torch

from pyro_vae import elbo_terms, estimators, importance_log_likelihood, log_weights
from pyro_vae.estimators import LogWeights

from .helpers import D, S, Z, exact_log_px, linear_gaussian_vae


@pytest.fixture
def ppca():
    vae, W, b, _ = linear_gaussian_vae()
    g = torch.Generator().manual_seed(1)
    z = torch.randn(200, Z, generator=g, dtype=torch.float64)
    x = z @ W.T + b + S * torch.randn(200, D, generator=g, dtype=torch.float64)
    return vae, x, exact_log_px(x, W, b)


def test_elbo_below_estimate_below_exact(ppca):
    vae, x, exact = ppca
    elbo = elbo_terms(vae, x, seed=0).elbo
    estimate = importance_log_likelihood(vae, x, num_samples=5000, seed=0)
    # Per image, the K=5000 estimate's Monte-Carlo error here is below 0.01 nats (its
    # spread over seeds, measured); the mean over 200 images has a standard error
    # of about 0.001. The bounds hold in expectation, so allow 0.01 nats.
    assert estimate.mean() >= elbo.mean() - 0.01
    assert estimate.mean() <= exact.mean() + 0.01
    assert (estimate <= exact + 0.05).all()
    assert (exact - estimate).mean() < 0.02  # close: the guide is near the posterior


def test_estimate_approaches_exact_value_as_k_grows(ppca):
    vae, x, exact = ppca
    gap = {k: (exact - importance_log_likelihood(vae, x, num_samples=k, seed=3)).mean().item()
           for k in (1, 10, 100, 1000)}
    # measured over seeds: gap(1) ~ 0.5, gap(10) ~ 0.02, |gap(100)| < 0.012, |gap(1000)| < 0.003
    assert gap[1] > 0.3  # the ELBO (K = 1) visibly below the exact value
    assert -0.05 < gap[10] < gap[1] / 5
    assert abs(gap[100]) < 0.03 and abs(gap[1000]) < 0.01


def test_k_equal_one_is_the_elbo_in_expectation(ppca):
    vae, x, _ = ppca
    one = importance_log_likelihood(vae, x, num_samples=1, seed=5)
    elbo = elbo_terms(vae, x, seed=6).elbo
    standard_error = math.sqrt(one.var() / len(x) + elbo.var() / len(x))
    assert abs(one.mean() - elbo.mean()) < 4 * standard_error


def test_chunking_combines_the_chunks_log_weights_exactly(ppca, monkeypatch):
    # the log weights themselves come from a fixed table, so the estimate must be the
    # log-mean-exp of the table's columns to rounding, however the samples are chunked
    vae, x, _ = ppca
    monkeypatch.setattr(estimators, "CHUNK_SAMPLES", 1)  # every image in each chunk
    table = torch.randn(2000, len(x), generator=torch.Generator().manual_seed(4),
                        dtype=torch.float64) * 3
    expected = table.logsumexp(0) - math.log(2000)
    for max_elements in (10**9, 200 * D * 7, 200 * D * 1999):  # 1, 286 and 2 chunks
        served = []

        def fake(vae, xb, k, guide=None, served=served):
            start = sum(served)
            served.append(k)
            rows = table[start : start + k]
            return LogWeights(rows, torch.zeros_like(rows), torch.zeros_like(rows))

        monkeypatch.setattr(estimators, "log_weights", fake)
        got = importance_log_likelihood(vae, x, num_samples=2000, batch_size=len(x),
                                        max_elements=max_elements)
        assert len(served) == {10**9: 1, 200 * D * 7: 286, 200 * D * 1999: 2}[max_elements]
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_chunks_hold_fewer_images_to_draw_at_least_chunk_samples_each(ppca, monkeypatch):
    vae, x, _ = ppca
    shapes = []
    real = estimators.log_weights

    def spy(vae, xb, k, guide=None):
        shapes.append((k, len(xb)))
        return real(vae, xb, k, guide)

    monkeypatch.setattr(estimators, "log_weights", spy)
    importance_log_likelihood(vae, x[:40], num_samples=600, batch_size=40,
                              max_elements=estimators.CHUNK_SAMPLES * D * 10)
    assert {n for _, n in shapes} == {10}  # 10 images a chunk, not the batch's 40
    assert max(k for k, _ in shapes) == estimators.CHUNK_SAMPLES  # 128 + 128 + ... + 88
    assert sum(k for k, _ in shapes) == 600 * 4


def test_the_fast_bernoulli_gives_torch_s_estimate(monkeypatch):
    """The log p(x) of a Bernoulli VAE with pyro-vae's Bernoulli (no gradients: its fast
    log-density) and with torch's own: the same to float32 rounding, with the same noise."""
    import pyro.distributions as dist

    from pyro_vae import VAE, likelihoods

    torch.manual_seed(0)
    vae = VAE("bernoulli", x_dim=784, z_dim=8, hidden_dims=(64,))
    x = torch.rand(30, 784).bernoulli()
    ours = importance_log_likelihood(vae, x, num_samples=300, seed=2)
    monkeypatch.setattr(likelihoods, "Bernoulli", dist.Bernoulli)  # torch's log_sigmoid path
    theirs = importance_log_likelihood(vae, x, num_samples=300, seed=2)
    torch.testing.assert_close(ours, theirs, rtol=2e-6, atol=2e-4)


def test_log_weights_terms_are_the_log_densities_in_expectation(ppca):
    # E_q log q = -H[q], E_q log p(z) and E_q log p(x | z) have closed forms for a
    # Gaussian q and the linear-Gaussian decoder; 20,000 draws, 5 standard errors
    vae, x, _ = ppca
    x = x[:3]
    K = 20_000
    lw = log_weights(vae, x, num_samples=K)
    assert lw.log_weight.shape == (K, 3)
    loc, scale = vae.encoder(x)
    W, b = vae.decoder.head.weight, vae.decoder.head.bias
    var = scale.detach() ** 2
    expected = {
        "log_guide": -0.5 * torch.log(2 * math.pi * math.e * var).sum(-1),
        "log_prior": -0.5 * (Z * math.log(2 * math.pi) + (loc.detach() ** 2 + var).sum(-1)),
        "log_likelihood": -0.5 * D * math.log(2 * math.pi * S**2) - 0.5 / S**2 * (
            ((x - loc.detach() @ W.T - b) ** 2).sum(-1) + (var @ (W.T**2)).sum(-1)),
    }
    for name, value in expected.items():
        draws = getattr(lw, name)
        se = draws.std(0) / math.sqrt(K)
        assert ((draws.mean(0) - value.detach()).abs() < 5 * se + 1e-9).all(), name


def test_log_weights_build_no_autograd_graph(ppca):
    """Evaluation's log weights are numbers, not the start of a backward pass: called
    outside any no_grad block, they hold no graph (memory stays that of the values)."""
    vae, x = ppca[0], ppca[1]
    weights = log_weights(vae, x[:4], 3)
    assert not weights.log_weight.requires_grad and weights.log_weight.grad_fn is None

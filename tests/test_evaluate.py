"""The importance-sampled log-likelihood against a closed form (probabilistic PCA).

With a linear decoder and a fixed Normal likelihood, p(x) = N(b, W W^T + s^2 I) exactly.
"""

import math

import pytest
import torch

from pyro_vae import elbo_terms, importance_log_likelihood, log_weights

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


def test_chunking_gives_the_same_estimate(ppca):
    vae, x, exact = ppca
    whole = importance_log_likelihood(vae, x, num_samples=2000, seed=0, max_elements=10**9)
    chunked = importance_log_likelihood(vae, x, num_samples=2000, seed=1,
                                        max_elements=100 * D * 7)  # 7 samples per chunk
    assert chunked.shape == whole.shape == (200,)
    assert abs(whole.mean() - chunked.mean()) < 0.01  # both within ~0.003 of exact
    assert abs(chunked.mean() - exact.mean()) < 0.01


def test_log_weights_terms_are_each_a_log_density(ppca):
    vae, x, _ = ppca
    lw = log_weights(vae, x[:3], num_samples=4)
    assert lw.log_weight.shape == (4, 3)
    loc, scale = vae.encoder(x[:3])
    assert torch.isfinite(lw.log_guide).all() and (scale > 0).all()
    # the prior term of each draw is log N(z; 0, I) <= -Z/2 log(2 pi)
    assert (lw.log_prior <= -Z / 2 * math.log(2 * math.pi) + 1e-9).all()


"""Diagnostics against closed forms: a linear-Gaussian decoder has a Gaussian posterior."""

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_vae.arviz_compat import ARVIZ_MAJOR, ess, pareto_khat, rhat, summary, to_arviz
from pyro_vae.diagnostics import diagnose, inference_gaps, nuts_posterior

from .helpers import D, S, Z, exact_log_px, linear_gaussian_vae, posterior_map


def linear_vae(orthogonal: bool, seed=0, loc_noise=0.1, scale_factor=1.4, correlated=False):
    """The linear-Gaussian VAE with an encoder deliberately off the exact posterior, four
    images drawn from it, their exact posteriors and log p(x)."""
    vae, W, b, g = linear_gaussian_vae(seed, loc_noise, scale_factor, orthogonal, correlated)
    z = torch.randn(4, Z, generator=g, dtype=torch.float64)
    x = z @ W.T + b + S * torch.randn(4, D, generator=g, dtype=torch.float64)
    mean_map, post_cov = posterior_map(W)
    return vae, x, (mean_map @ (x - b).T).T, post_cov, exact_log_px(x, W, b)


def test_nuts_draws_match_the_analytic_posterior():
    vae, x, mean, cov, _ = linear_vae(orthogonal=False)
    draws, diverging = nuts_posterior(vae, x[0], num_samples=600, num_warmup=300, num_chains=2)
    flat = draws.reshape(-1, Z)
    sd = cov.diagonal().sqrt().numpy()
    # Monte-Carlo standard error of the mean is sd / sqrt(ESS); ESS > 300 here
    assert np.all(np.abs(flat.mean(0) - mean[0].numpy()) < 4 * sd / math.sqrt(300))
    assert np.allclose(flat.std(0), sd, rtol=0.15)
    assert np.corrcoef(flat.T)[0, 1] == pytest.approx(
        (cov[0, 1] / (sd[0] * sd[1])).item(), abs=0.1)
    assert diverging.sum() == 0 and rhat(draws).max() < 1.05


def test_approximation_gap_vanishes_when_the_posterior_is_in_the_guide_family():
    vae, x, _, _, exact = linear_vae(orthogonal=True)
    gaps = inference_gaps(vae, x, num_samples=4000, iwae_samples=4000, steps=400)
    # q* finds the exact diagonal posterior: ELBO(q*) = log p(x); MC error ~0.01 nats
    assert gaps["approximation_gap"].abs().max() < 0.05
    assert (gaps["log_px"] - exact).abs().max() < 0.02
    # the deliberately misplaced encoder leaves a clear amortization gap
    assert gaps["amortization_gap"].min() > 0.05


def test_both_gaps_are_non_negative_within_monte_carlo_error():
    vae, x, _, _, _ = linear_vae(orthogonal=False)
    gaps = inference_gaps(vae, x, num_samples=4000, iwae_samples=4000, steps=400)
    tolerance = 4 * gaps["elbo_se"]
    assert (gaps["approximation_gap"] > -tolerance).all()
    assert (gaps["amortization_gap"] > -tolerance).all()

def test_approximation_gap_matches_the_mean_field_kl_in_closed_form():
    # For a Gaussian posterior with precision L, the best diagonal Gaussian (reverse KL)
    # has variances 1 / L_ii and KL(q* || p) = (sum log L_ii - log det L) / 2.
    vae, x, mean, cov, exact = linear_vae(orthogonal=False, correlated=True)
    precision = torch.linalg.inv(cov)
    expected = 0.5 * (precision.diagonal().log().sum() - torch.logdet(precision))
    # reference posterior draws (what NUTS provides in diagnose), here drawn exactly
    draws = torch.distributions.MultivariateNormal(mean, cov).sample((2000,)).transpose(0, 1)
    gaps = inference_gaps(vae, x, num_samples=4000, iwae_samples=4000, steps=600,
                          posterior_draws=draws.numpy())
    assert (gaps["log_px"] - exact).abs().max() < 0.02
    assert expected > 0.3
    # tolerance: Monte-Carlo error of the ELBOs (~0.01) plus q*'s residual (~0.02)
    assert (gaps["approximation_gap"] - expected).abs().max() < 0.06


def test_pareto_khat_recovers_the_tail_index_of_pareto_weights():
    # weights w = 1 + Lomax(1 / k) have a Pareto tail of index k exactly. PSIS fits it on
    # the largest M = 3 sqrt(S) of S draws; the fit's standard deviation is about
    # (1 + k) / sqrt(M) (0.06 to 0.1 here), so 3 of them is the tolerance
    rng = np.random.default_rng(0)
    size = 20_000
    estimates = []
    for shape in (0.2, 0.6, 1.0):
        estimates.append(pareto_khat(np.log(rng.pareto(1 / shape, size=size) + 1)))
        sd = (1 + shape) / math.sqrt(3 * math.sqrt(size))
        assert estimates[-1] == pytest.approx(shape, abs=3 * sd), shape
    assert estimates == sorted(estimates)


def test_diagnose_returns_arviz_data_with_named_dimensions():
    vae, x, _, _, _ = linear_vae(orthogonal=False)
    result = diagnose(vae, x[:2], num_samples=100, num_warmup=100, num_chains=2,
                      gap_samples=500, iwae_samples=500, gap_steps=100)
    assert result.nuts_draws.shape == (2, 2, 100, Z)
    posterior = result.nuts["posterior"]
    assert dict(posterior["z"].sizes) == {"chain": 2, "draw": 100, "image": 2, "latent": Z}
    assert dict(result.guide["posterior"]["z"].sizes) == {"chain": 1, "draw": 100, "image": 2,
                                                          "latent": Z}
    row = result.per_image[0]
    for key in ("rhat_max", "ess_bulk_min", "ess_tail_min", "divergences", "k_hat", "log_px",
                "approximation_gap", "amortization_gap"):
        assert key in row
    table = summary(result.nuts)  # a row per (image, latent) component
    assert len(table) == 2 * Z and all(name.startswith("z[") for name in table.index)


def test_arviz_adapter_statistics_on_plain_arrays():
    rng = np.random.default_rng(1)
    good = rng.normal(size=(4, 500, 3))
    assert rhat(good).shape == (3,) and np.all(rhat(good) < 1.02)
    assert np.all(ess(good, "bulk") > 1000) and ess(good, "tail").shape == (3,)
    stuck = good + np.arange(4)[:, None, None]  # chains in different places
    assert np.all(rhat(stuck) > 1.5)
    data = to_arviz({"z": good}, dims={"z": ["latent"]})
    assert dict(data["posterior"]["z"].sizes) == {"chain": 4, "draw": 500, "latent": 3}


ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "tests" / "helpers" / "arviz_adapter_check.py"


def test_arviz_adapter_works_with_the_installed_arviz():
    result = subprocess.run([sys.executable, str(CHECK)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"major {ARVIZ_MAJOR}" in result.stdout


def test_arviz_adapter_works_with_arviz_1_on_python_3_12():
    python = ROOT / ".venv312" / "bin" / "python"
    if not python.exists():
        pytest.skip("no .venv312 (make test creates it where python3.12 exists)")
    result = subprocess.run([str(python), str(CHECK)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "(major 1)" in result.stdout and "Python 3.12" in result.stdout


RACING_IMPORT = """
import pathlib

replace = pathlib.Path.replace


def another_process_first(self, target):
    # the other process moves the shared temporary file into place first; ours then
    # finds nothing to move
    if self.name.endswith(".tmp") and not getattr(another_process_first, "done", False):
        another_process_first.done = True
        replace(self, target)
    return replace(self, target)


pathlib.Path.replace = another_process_first
from pyro_vae.arviz_compat import az
print("imported", az.__version__, getattr(another_process_first, "done", False))
"""


def test_arviz_imports_when_another_process_wrote_its_daily_stamp_first(tmp_path):
    """arviz 0.23's import writes a once-a-day stamp through one temporary name for every
    process; two processes importing it first on a new day race for it (seen with
    pytest's two workers). The adapter's import survives losing that race."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}  # no stamp of today yet
    result = subprocess.run([sys.executable, "-c", RACING_IMPORT], capture_output=True,
                            text=True, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("imported")
    if ARVIZ_MAJOR == 0:  # arviz 1.x writes no stamp: nothing to race for
        assert result.stdout.split()[-1] == "True"

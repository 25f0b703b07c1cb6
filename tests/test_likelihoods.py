import math

import pyro
import pyro.distributions as dist
import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from torch.distributions import constraints

from pyro_vae import VAE, ConfigError, DataError, RunConfig, available_likelihoods, get_likelihood
from pyro_vae.distributions import UnnormalizedBernoulli
from pyro_vae.likelihoods import register_likelihood
from pyro_vae.runner.resolve import likelihood_for

from .helpers import built_in_likelihoods, values_in_support


def test_the_documented_likelihoods_are_registered():
    assert {"bernoulli", "bernoulli-relaxed", "continuous-bernoulli", "normal", "normal-fixed",
            "beta"} <= set(available_likelihoods())


@pytest.mark.parametrize("name", built_in_likelihoods())
def test_distribution_has_pixel_batch_shape_and_finite_log_prob(name):
    lik = get_likelihood(name)
    g = torch.Generator().manual_seed(1)
    raw = torch.randn(3, 5, lik.num_params, 784, generator=g)  # (L, B, P, D)
    d = lik.distribution(raw)
    assert d.batch_shape == (3, 5, 784)
    x = values_in_support(name, (5, 784), g)
    log_p = d.log_prob(x)
    assert log_p.shape == (3, 5, 784)
    assert torch.isfinite(log_p).all()
    assert d.mean.shape == (3, 5, 784)


def test_bernoulli_log_prob_matches_scipy():
    logits = torch.tensor([-3.0, -0.5, 0.0, 2.0])
    x = torch.tensor([1.0, 0.0, 1.0, 0.0])
    ours = get_likelihood("bernoulli").build(logits).log_prob(x)
    p = torch.sigmoid(logits).numpy()
    expected = scipy.stats.bernoulli.logpmf(x.numpy(), p)
    torch.testing.assert_close(ours, torch.from_numpy(expected).float(), rtol=1e-5, atol=1e-6)


def test_continuous_bernoulli_matches_closed_form():
    # p(x) = C(lam) lam^x (1-lam)^(1-x), C(lam) = 2 atanh(1 - 2 lam) / (1 - 2 lam)
    lam = torch.tensor([0.1, 0.3, 0.7, 0.95], dtype=torch.float64)
    x = torch.tensor([0.2, 0.9, 0.5, 0.01], dtype=torch.float64)
    d = get_likelihood("continuous-bernoulli").build(torch.logit(lam))
    log_c = torch.log(2 * torch.atanh(1 - 2 * lam) / (1 - 2 * lam))
    expected = log_c + x * lam.log() + (1 - x) * (1 - lam).log()
    torch.testing.assert_close(d.log_prob(x), expected, rtol=1e-6, atol=1e-8)
    # its mean is not its parameter: E[x] = lam / (2 lam - 1) + 1 / (2 atanh(1 - 2 lam))
    mean = lam / (2 * lam - 1) + 1 / (2 * torch.atanh(1 - 2 * lam))
    torch.testing.assert_close(d.mean, mean, rtol=1e-6, atol=1e-8)
    assert not torch.allclose(d.mean, lam, atol=1e-2)


def test_normal_and_normal_fixed_match_scipy():
    loc, raw = torch.tensor([0.2, -1.0]), torch.tensor([0.0, -2.0])
    x = torch.tensor([0.5, 0.1])
    scale = F.softplus(raw) + 1e-3
    expected = scipy.stats.norm.logpdf(x.numpy(), loc.numpy(), scale.numpy())
    torch.testing.assert_close(get_likelihood("normal").build(loc, raw).log_prob(x),
                               torch.from_numpy(expected).float())
    fixed = get_likelihood("normal-fixed").build(loc, scale=0.05).log_prob(x)
    torch.testing.assert_close(fixed, torch.from_numpy(
        scipy.stats.norm.logpdf(x.numpy(), loc.numpy(), 0.05)).float())


def test_beta_is_a_density_of_the_pixel_itself_jacobian_included():
    # pixels 0 and 1 sit at the bin centres 1/512 and 511/512 of y = x * 255/256 + 1/512;
    # p(x) = Beta(y) * dy/dx, so log p(x) = log Beta(y) + log(255/256)
    a, b = torch.tensor([0.5, 2.0, 1.0]), torch.tensor([1.0, -1.0, 0.3])
    x = torch.tensor([0.0, 1.0, 0.4])
    y = x * 255 / 256 + 1 / 512
    ca, cb = F.softplus(a) + 1e-3, F.softplus(b) + 1e-3
    expected = scipy.stats.beta.logpdf(y.numpy(), ca.numpy(), cb.numpy()) + math.log(255 / 256)
    d = get_likelihood("beta").build(a, b)
    torch.testing.assert_close(d.log_prob(x), torch.from_numpy(expected).float(),
                               rtol=1e-5, atol=1e-5)
    # its mean is the pixel value whose image is the Beta's mean
    torch.testing.assert_close(d.mean * 255 / 256 + 1 / 512, ca / (ca + cb))
    get_likelihood("beta").check_support(torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_beta_draws_score_finite_under_validation_at_extreme_concentrations(dtype):
    # torch's Beta puts draws on exactly 0 or 1 at small concentrations (32,446 of 600,000
    # in float32 before the fix); every draw must lie in the support and score finite
    raw = torch.tensor([-12.0, -5.0, 0.0, 8.0], dtype=dtype)  # concentrations ~1e-3 .. 8
    a, b = torch.meshgrid(raw, raw, indexing="ij")
    d = get_likelihood("beta").build(a.reshape(-1), b.reshape(-1))  # 16 pairs
    draws = d.sample((62_500,))  # 10^6 draws
    assert draws.dtype == dtype
    assert bool(d.support.check(draws).all())
    with pyro.validation_enabled(True):
        log_p = d.log_prob(draws)
    assert bool(torch.isfinite(log_p).all())


def test_relaxed_bernoulli_is_minus_bce_and_misses_the_normalizer():
    logits = torch.tensor([-2.0, 0.3, 4.0], dtype=torch.float64)
    x = torch.tensor([0.25, 0.5, 0.9], dtype=torch.float64)
    relaxed = UnnormalizedBernoulli(logits=logits)
    bce = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    torch.testing.assert_close(relaxed.log_prob(x), -bce)
    cb = get_likelihood("continuous-bernoulli").build(logits)
    torch.testing.assert_close(cb.log_prob(x) - relaxed.log_prob(x), relaxed.log_normalizer())
    with pytest.raises(NotImplementedError):
        relaxed.sample()


@pytest.mark.parametrize("name, normalized", [("continuous-bernoulli", True),
                                              ("bernoulli-relaxed", False)])
def test_density_integrates_to_one_only_when_normalized(name, normalized):
    # trapezoid rule on a fine grid of [0, 1]; error ~1e-7 for these smooth densities
    grid = torch.linspace(0, 1, 20001, dtype=torch.float64)
    logits = torch.tensor([[-2.0], [0.5], [3.0]], dtype=torch.float64)
    density = get_likelihood(name).build(logits).log_prob(grid.expand(3, -1)).exp()
    mass = torch.trapezoid(density, grid, dim=-1)
    if normalized:
        torch.testing.assert_close(mass, torch.ones(3, dtype=torch.float64), atol=1e-6, rtol=0)
    else:
        assert (mass < 1 - 1e-3).all()
    assert get_likelihood(name).normalized == normalized


@pytest.mark.parametrize("binarize, expected", [("none", "bernoulli-relaxed"),
                                               ("dynamic", "bernoulli"), (None, "bernoulli")])
def test_bernoulli_on_gray_scale_data_is_relaxed(binarize, expected):
    config = RunConfig()
    config.data.binarize = binarize
    assert likelihood_for(config).name == expected
    assert likelihood_for(config).normalized == (expected == "bernoulli")


def test_support_check_rejects_gray_scale_for_bernoulli_with_the_fix():
    with pytest.raises(DataError, match="binarize"):
        get_likelihood("bernoulli").check_support(torch.tensor([0.0, 0.5, 1.0]))
    get_likelihood("bernoulli").check_support(torch.tensor([0.0, 1.0]))


def test_beta_accepts_exact_zero_and_one_through_its_documented_rule():
    get_likelihood("beta").check_support(torch.tensor([0.0, 0.3, 1.0]))
    with pytest.raises(DataError, match="outside the support"):
        get_likelihood("continuous-bernoulli").check_support(torch.tensor([-0.1, 1.2]))


def test_unknown_likelihood_lists_the_choices():
    with pytest.raises(ConfigError, match="continuous-bernoulli"):
        get_likelihood("gaussian")


def test_unknown_option_names_the_accepted_ones():
    with pytest.raises(ConfigError, match="scale"):
        get_likelihood("normal-fixed").check_options({"sigma": 0.1})
    get_likelihood("normal-fixed").check_options({"scale": 0.1})


def test_registering_a_name_twice_needs_overwrite():
    with pytest.raises(ConfigError, match="overwrite"):
        register_likelihood("bernoulli")(lambda logits: dist.Bernoulli(logits=logits))


def test_user_registered_likelihood_is_usable_by_name():
    @register_likelihood("test-laplace", num_params=2, support=constraints.real, overwrite=True)
    def laplace(loc, raw_scale):
        """Laplace with a learned scale."""
        return dist.Laplace(loc, F.softplus(raw_scale) + 1e-3)

    lik = get_likelihood("test-laplace")
    assert lik.num_params == 2 and lik.description == "Laplace with a learned scale."
    d = lik.distribution(torch.zeros(4, 2, 10))
    assert d.batch_shape == (4, 10)
    torch.testing.assert_close(d.log_prob(torch.zeros(4, 10)),
                               torch.full((4, 10), -math.log(2 * (math.log(2) + 1e-3))))


def test_a_likelihood_without_options_is_not_probed_with_dummy_inputs():
    @register_likelihood("test-shape-strict", overwrite=True)
    def strict(logits):
        if logits.shape[-1] != 16:
            raise ValueError("expects 16 pixels")
        return dist.ContinuousBernoulli(logits=logits)

    vae = VAE("test-shape-strict", x_dim=16, z_dim=2, hidden_dims=(8,))
    assert vae.decode(torch.zeros(3, 2)).batch_shape == (3, 16)

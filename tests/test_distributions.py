"""Likelihoods are exact over their whole parameter range, not only at typical values.

References are independent: mpmath at 50 digits for the continuous Bernoulli's closed
forms, quadrature in float64 for normalization, scipy for the Beta.
"""

import math

import mpmath
import pytest
import torch

from pyro_vae import get_likelihood
from pyro_vae.distributions import ContinuousBernoulli, OpenInterval

from .helpers import built_in_likelihoods

mpmath.mp.dps = 50

# every region of the formulas: 0, the series thresholds from both sides, the range where
# torch's clamped version breaks (|logit| > 16), and far beyond
LOGITS = [-100.0, -50.0, -30.0, -20.0, -16.0, -10.0, -3.0, -1.0, -0.6, -0.5, -0.4, -0.11,
          -0.1, -0.09, -1e-2, -1e-3, -1e-4, 0.0, 1e-4, 1e-3, 0.05, 0.1, 0.3, 0.5, 0.7, 1.0,
          2.0, 10.0, 16.0, 20.0, 30.0, 50.0, 100.0]


def reference(logit: float) -> dict[str, float]:
    """log C, mean and variance of the continuous Bernoulli with logit l, at 50 digits."""
    if logit == 0:
        return {"log_norm": math.log(2), "mean": 0.5, "variance": 1 / 12}
    m = mpmath.mpf(logit)
    return {
        "log_norm": float(mpmath.log(m / mpmath.tanh(m / 2))),
        "mean": float(1 / (1 - mpmath.exp(-m)) - 1 / m),
        "variance": float(1 / m**2 - 1 / (4 * mpmath.sinh(m / 2) ** 2)),
    }


# float32: to its precision; float64: to the series' truncation (the claim is float32)
@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 2e-6), (torch.float64, 1e-8)])
def test_continuous_bernoulli_matches_a_50_digit_reference(dtype, rtol):
    d = ContinuousBernoulli(logits=torch.tensor(LOGITS, dtype=dtype))
    for name, ours in [("log_norm", d._cont_bern_log_norm()), ("mean", d.mean),
                       ("variance", d.variance)]:
        expected = torch.tensor([reference(v)[name] for v in LOGITS], dtype=torch.float64)
        torch.testing.assert_close(ours.double(), expected, rtol=rtol, atol=0,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_torch_s_own_continuous_bernoulli_fails_the_same_reference():
    """What the reference catches: torch's clamped formulas at a logit of -30."""
    theirs = torch.distributions.ContinuousBernoulli(logits=torch.tensor([-30.0]))
    assert abs(theirs.mean.item() - reference(-30.0)["mean"]) > 0.02


def integral(name: str, raw: torch.Tensor, points: int = 400_001) -> torch.Tensor:
    """Total mass of ``get_likelihood(name)`` per column of decoder outputs ``raw`` (P, R)."""
    lik = get_likelihood(name)
    d = lik.distribution(raw.T[:, :, None])  # (R, P, 1) -> batch (R, 1)
    if lik.binary:
        values = torch.tensor([0.0, 1.0])
        return d.log_prob(values).double().exp().sum(-1)
    support = lik.support
    if isinstance(support, OpenInterval) or hasattr(support, "lower_bound"):
        lo, hi = float(support.lower_bound), float(support.upper_bound)
    else:  # the reals: a range many scales wide around every location
        loc = d.mean.detach().double()
        scale = d.variance.detach().double().sqrt()
        lo, hi = (loc - 40 * scale).min().item(), (loc + 40 * scale).max().item()
    grid = torch.linspace(lo, hi, points, dtype=torch.float64)
    inner = grid[1:-1] if isinstance(support, OpenInterval) else grid  # open: no ends
    density = d.log_prob(inner.float()).double().exp()
    return torch.trapezoid(density, inner, dim=-1)


# decoder outputs per likelihood: for the continuous Bernoulli the logits themselves; for
# two-parameter ones a spread of raw values (Beta: concentrations >= 1, where the density
# is bounded and quadrature converges)
RAW = {
    "bernoulli": torch.tensor([LOGITS]),
    "continuous-bernoulli": torch.tensor([LOGITS]),
    "normal": torch.tensor([[-3.0, 0.0, 0.5, 4.0], [-2.0, 0.0, 1.0, 3.0]]),
    "normal-fixed": torch.tensor([[-3.0, 0.0, 0.5, 4.0]]),
    "beta": torch.tensor([[0.6, 1.0, 3.0, 6.0], [6.0, 0.6, 1.0, 2.0]]),
}


@pytest.mark.parametrize("name", [n for n in built_in_likelihoods()
                                  if get_likelihood(n).normalized])
def test_every_normalized_likelihood_integrates_to_one(name):
    assert name in RAW, f"add decoder outputs for {name} to RAW"
    mass = integral(name, RAW[name])
    torch.testing.assert_close(mass, torch.ones_like(mass), atol=1e-4, rtol=0)


def test_the_relaxed_bernoulli_misses_exactly_its_normalizer():
    raw = torch.tensor([LOGITS])
    mass = integral("bernoulli-relaxed", raw)
    log_norm = torch.tensor([reference(v)["log_norm"] for v in LOGITS], dtype=torch.float64)
    torch.testing.assert_close(mass, torch.exp(-log_norm), rtol=1e-4, atol=0)


def test_samples_follow_the_mean_and_stay_in_the_unit_interval():
    logits = torch.tensor([-100.0, -30.0, -2.0, -1e-4, 0.0, 1e-4, 0.3, 3.0, 50.0])
    d = ContinuousBernoulli(logits=logits)
    torch.manual_seed(0)
    n = 200_000
    x = d.sample((n,))
    assert ((x >= 0) & (x <= 1)).all()
    se = (d.variance / n).sqrt()
    assert ((x.mean(0) - d.mean).abs() < 5 * se).all(), (x.mean(0), d.mean)
    assert torch.allclose(x.var(0), d.variance, rtol=0.03)


def test_cdf_and_quantile_are_inverses():
    logits = torch.tensor(LOGITS)[:, None]
    u = torch.linspace(0.01, 0.99, 9)
    d = ContinuousBernoulli(logits=logits)
    torch.testing.assert_close(d.cdf(d.icdf(u)), u.expand(len(LOGITS), -1), atol=2e-5, rtol=0)


def test_entropy_is_minus_the_expected_log_density():
    logits = torch.tensor([-30.0, -2.0, 0.0, 1e-3, 0.7, 5.0], dtype=torch.float64)
    d = ContinuousBernoulli(logits=logits[:, None])
    grid = torch.linspace(0, 1, 200_001, dtype=torch.float64)
    log_p = d.log_prob(grid)
    expected = -torch.trapezoid(log_p.exp() * log_p, grid, dim=-1)
    torch.testing.assert_close(d.entropy().squeeze(-1), expected, atol=1e-5, rtol=0)


def test_gradients_are_finite_everywhere():
    logits = torch.tensor(LOGITS, requires_grad=True)
    d = ContinuousBernoulli(logits=logits)
    x = torch.rand(len(LOGITS))
    total = (d.log_prob(x) + d.mean + d.variance + d.entropy() + d.rsample()).sum()
    (grad,) = torch.autograd.grad(total, logits)
    assert torch.isfinite(grad).all(), grad


# -- the Bernoulli's log_prob without gradients ----------------------------------------------

BERNOULLI_LOGITS = torch.cat([-torch.logspace(-8, 2, 400).flip(0), torch.tensor([0.0]),
                              torch.logspace(-8, 2, 400)])  # -100 .. -1e-8, 0, 1e-8 .. 100


def bernoulli_reference(logit: float, x: float) -> float:
    """log p(x | logit) = x l - log(1 + e^l), to 50 digits."""
    mpmath.mp.dps = 50
    lm = mpmath.mpf(logit)
    return float(x * lm - mpmath.log1p(mpmath.exp(lm)))


@pytest.mark.parametrize("grad", [False, True], ids=["evaluation", "training"])
@pytest.mark.parametrize("x", [0.0, 1.0])
def test_bernoulli_log_prob_matches_a_50_digit_reference_for_every_logit(x, grad):
    """Relative error of float32 rounding over logits from -100 to 100, where the value
    runs from -100 to -4e-44 (e^-100): nothing is lost in the tails, with or without
    gradients."""
    from pyro_vae.distributions import Bernoulli

    logits = BERNOULLI_LOGITS.clone().requires_grad_(grad)
    got = Bernoulli(logits=logits).log_prob(torch.full_like(logits, x)).detach().double()
    want = torch.tensor([bernoulli_reference(v, x) for v in BERNOULLI_LOGITS.tolist()])
    assert torch.all((got - want).abs() <= 4e-7 * want.abs() + 1e-45), \
        (got - want).abs().div(want.abs()).max()


@pytest.mark.parametrize("x", [0.0, 1.0])
def test_bernoulli_log_prob_s_derivative_is_x_minus_sigmoid_for_every_logit(x):
    """d/dl log p(x | l) = x - sigmoid(l) against mpmath from -100 to 100: float32 rounding
    down to float32's smallest normal number (torch's sigmoid flushes the subnormal tail
    beyond |l| = 87 to 0, as torch's own gradient does), exactly +-1/2 at l = 0 (where
    autograd through the formula's abs and max would give 0 or 1)."""
    from pyro_vae.distributions import Bernoulli

    logits = BERNOULLI_LOGITS.clone().requires_grad_()
    value = Bernoulli(logits=logits).log_prob(torch.full_like(logits, x))
    grad, = torch.autograd.grad(value.sum(), logits)
    mpmath.mp.dps = 50
    want = torch.tensor([float(x - 1 / (1 + mpmath.exp(-mpmath.mpf(v))))
                         for v in BERNOULLI_LOGITS.tolist()], dtype=torch.float64)
    tiny = torch.finfo(torch.float32).tiny
    assert torch.all((grad.double() - want).abs() <= 4e-7 * want.abs() + tiny)
    assert grad[BERNOULLI_LOGITS == 0].item() == x - 0.5


def test_bernoulli_log_prob_agrees_with_torch_s_in_value_and_first_two_derivatives():
    from pyro_vae.distributions import Bernoulli

    logits = (torch.randn(2, 50, dtype=torch.float64) * 10).requires_grad_()
    x = torch.randint(0, 2, (50,)).double()  # broadcast over the first dimension
    ours = Bernoulli(logits=logits).log_prob(x)
    theirs = torch.distributions.Bernoulli(logits=logits).log_prob(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(ours.sum(), logits, create_graph=True),
                    torch.autograd.grad(theirs.sum(), logits, create_graph=True)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        second = [torch.autograd.grad(g.sum(), logits)[0] for g in (a, b)]
        torch.testing.assert_close(*second, rtol=1e-12, atol=1e-12)


def test_bernoulli_log_prob_of_a_value_that_requires_gradients_is_torch_s_own():
    from pyro_vae.distributions import Bernoulli

    logits = torch.randn(20)
    x = torch.randint(0, 2, (20,)).float().requires_grad_()
    ours = Bernoulli(logits=logits, validate_args=False).log_prob(x)
    assert torch.equal(ours, torch.distributions.Bernoulli(logits=logits).log_prob(x))
    assert torch.autograd.grad(ours.sum(), x)[0].shape == x.shape

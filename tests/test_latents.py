"""Traversals and interpolations in latent space, against their definitions."""

import pytest
import torch

from pyro_vae import VAE
from pyro_vae.latents import (
    active_units,
    interpolations,
    kl_per_dimension,
    prior_quantiles,
    slerp,
    traversals,
)


@pytest.fixture
def vae():
    torch.manual_seed(0)
    return VAE(z_dim=4, hidden_dims=(16,)).eval()


def test_kl_per_dimension_is_the_closed_form_kl_averaged_over_images(vae):
    x = torch.rand(30, 784)
    q = vae.encode(x)
    expected = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).mean(0)
    torch.testing.assert_close(kl_per_dimension(vae, x), expected)


def test_prior_quantiles_are_standard_normal_quantiles():
    values = prior_quantiles(3, 0.05, 0.95)
    torch.testing.assert_close(values, torch.tensor([-1.6449, 0.0, 1.6449]), atol=1e-4,
                               rtol=0)


def test_a_traversal_changes_one_latent_dimension_only(vae):
    x = torch.rand(784)
    values = torch.tensor([-1.0, 0.5])
    images = traversals(vae, x, [2, 0], values)
    assert images.shape == (2, 2, 784)
    base = vae.encode(x[None]).loc[0]
    z = base.clone()
    z[0] = 0.5  # row 1 varies dimension 0; column 1 is the value 0.5
    torch.testing.assert_close(images[1, 1], vae.decode(z).mean)


def test_slerp_keeps_the_ends_and_interpolates_angle_and_norm():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    path = slerp(a, b, torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(path[0], a)
    torch.testing.assert_close(path[2], b)
    torch.testing.assert_close(path[1].norm(), torch.tensor(1.5))  # norms: linearly
    assert torch.atan2(path[1, 1], path[1, 0]).item() == pytest.approx(torch.pi / 4)
    parallel = slerp(a, 3 * a, torch.tensor([0.5]))  # no angle: the straight line
    torch.testing.assert_close(parallel[0], 2 * a)


@pytest.mark.parametrize("kind", ["linear", "spherical"])
def test_interpolations_start_and_end_at_the_reconstructions(vae, kind):
    x = torch.rand(4, 784)
    paths = interpolations(vae, x[:2], x[2:], steps=5, kind=kind)
    assert paths.shape == (2, 5, 784)
    torch.testing.assert_close(paths[:, 0], vae.reconstruct(x[:2]))
    torch.testing.assert_close(paths[:, -1], vae.reconstruct(x[2:]))
    with pytest.raises(ValueError, match="linear, spherical"):
        interpolations(vae, x[:2], x[2:], kind="cubic")


class _Posterior(torch.nn.Module):
    """q(z | x) whose mean moves with x in the first ``moving`` of 4 dimensions only (the
    others: N(0, 1) for every image); ``flow`` wraps it in a transform with no closed-form
    mean, so the Monte Carlo path is taken."""

    def __init__(self, moving: int, flow: bool):
        super().__init__()
        self.moving, self.flow = moving, flow

    def posterior(self, x):
        loc = torch.zeros(len(x), 4)
        loc[:, : self.moving] = 3 * x[:, : self.moving]
        q = torch.distributions.Independent(torch.distributions.Normal(loc, 1.0), 1)
        if self.flow:  # z -> z + 1: still a Gaussian, but not one that knows its mean
            transform = torch.distributions.AffineTransform(1.0, 1.0, event_dim=1)
            q = torch.distributions.TransformedDistribution(q, [transform])
        return q


@pytest.mark.parametrize("flow", [False, True], ids=["closed-form", "monte-carlo"])
def test_active_units_count_the_dimensions_whose_posterior_mean_moves_with_the_image(flow):
    torch.manual_seed(0)
    x = torch.rand(300, 784)
    for moving in (0, 1, 3):
        assert active_units(_Posterior(moving, flow), x) == moving

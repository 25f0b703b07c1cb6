"""Simulation-based calibration: the simultaneous band's coverage, and the check itself on
probabilistic PCA, whose posterior is known exactly: the exact guide passes, a guide with
its scale shrunk or inflated fails with the rank shape that says which."""

import json
import subprocess
import sys

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyro_vae import train
from pyro_vae.calibration import calibrate_model, ecdf_points, simultaneous_band
from pyro_vae.model import data_plate

from .helpers import tiny_config


class PPCA(nn.Module):
    """z ~ N(0, I_2), x | z ~ N(W z, 0.5^2 I_5) with orthogonal columns of W, so that the
    posterior is the diagonal Gaussian N((x W) / (c + s^2), s^2 / (c + s^2)), c = |W_d|^2.
    ``guide_scale`` multiplies the exact posterior's standard deviation."""

    x_dim, z_dim, noise = 5, 2, 0.5

    def __init__(self, guide_scale: float = 1.0):
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(5, 2, generator=torch.Generator().manual_seed(0)))
        self.register_buffer("w", q * torch.tensor([2.0, 0.7]))
        self.anchor = nn.Parameter(torch.zeros(()))  # a parameter: where the model lives
        self.guide_scale = guide_scale

    def model(self, x, num_data=None, kl_weight=None, index=None):
        with data_plate(x, num_data, index):
            prior = dist.Normal(x.new_zeros(()), x.new_ones(())).expand([x.shape[0], 2])
            z = pyro.sample("z", prior.to_event(1))
            pyro.sample("x", dist.Normal(z @ self.w.T, self.noise).to_event(1), obs=x)

    def guide(self, x, num_data=None, kl_weight=None, index=None):
        c = (self.w**2).sum(0) + self.noise**2
        loc, scale = (x @ self.w) / c, self.noise / c.sqrt() * self.guide_scale
        with data_plate(x, num_data, index):
            pyro.sample("z", dist.Normal(loc, scale.expand_as(loc)).to_event(1))


def test_the_simultaneous_band_holds_a_whole_uniform_ecdf_95_percent_of_the_time():
    n = 200
    points, lower, upper = simultaneous_band(n, 0.05, seed=1)
    assert np.all(lower <= points) and np.all(points <= upper)
    rng = np.random.default_rng(2)
    ecdf = (np.sort(rng.random((1000, n)), 1)[:, :, None] <= points).mean(1)
    inside = ((ecdf >= lower) & (ecdf <= upper)).all(1).mean()
    assert 0.93 <= inside <= 0.97, inside  # 1,000 samples: 0.95 +- 0.014 at 2 s.e.
    # far narrower pointwise intervals would hold it much less often: the band is wider
    pointwise = (np.abs(ecdf - points) <= 1.96 * np.sqrt(points * (1 - points) / n)).all(1)
    assert pointwise.mean() < 0.6
    assert len(ecdf_points(1000)) == 99 and len(ecdf_points(10)) == 9


# the checks below at level 0.001: an exact posterior then fails 1 time in 1,000 by design
STRICT = 0.001


def test_exact_posterior_passes_calibration():
    result = calibrate_model(PPCA(1.0), num_simulations=1000, draws=100, seed=0, alpha=STRICT)
    assert result.passed, result.table()
    assert result.names == ["z[0]", "z[1]", "||z||"]
    assert all(result.shape_of(j) == "flat" for j in range(3))


def test_an_exact_posterior_fails_at_about_the_stated_level():
    """At alpha = 0.05 a calibrated guide is rejected 5% of the time: over 40 seeds, 0 to 6
    rejections (Binomial(40, 0.05) is above 6 with probability 0.003)."""
    rejected = sum(not calibrate_model(PPCA(1.0), 200, 20, seed=seed).passed
                   for seed in range(40))
    assert rejected <= 6


@pytest.mark.parametrize("scale, shape", [(0.6, "U-shaped"), (1.6, "hump")],
                         ids=["shrunk", "inflated"])
def test_mis_scaled_guide_fails_calibration_with_the_telltale_rank_shape(scale, shape):
    result = calibrate_model(PPCA(scale), num_simulations=1000, draws=100, seed=0,
                             alpha=STRICT)
    assert not result.passed and not result.ranks_uniform
    assert [result.shape_of(j) for j in range(2)] == [shape, shape]
    assert not result.moments_match  # the data-averaged posterior is not the prior either
    assert "calibrated: no" in result.table()


def test_calibration_repeats_with_its_seed_and_refuses_enumerated_models():
    a = calibrate_model(PPCA(1.0), 200, 20, seed=3)
    b = calibrate_model(PPCA(1.0), 200, 20, seed=3)
    assert np.array_equal(a.pit, b.pit)
    from pyro_vae.errors import ConfigError

    model = PPCA()
    model.enumerated = True
    with pytest.raises(ConfigError, match="discrete"):
        calibrate_model(model, 200, 20)
    with pytest.raises(ConfigError, match="simulations"):
        calibrate_model(PPCA(), 1, 20)


def test_calibrate_command_writes_its_json_and_figure(tmp_path):
    train(tiny_config(epochs=1), tmp_path / "run", progress=False)
    result = subprocess.run([sys.executable, "-m", "pyro_vae", "calibrate", str(tmp_path / "run"),
                             "--simulations", "200", "--draws", "30", "--quiet"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "calibrated:" in result.stdout and "||z||" in result.stdout
    saved = json.loads((tmp_path / "run" / "calibration.json").read_text())
    assert saved["simulations"] == 200 and saved["settings"]["draws"] == 30
    assert len(saved["per_coordinate"]) == 4 + 1
    assert saved["aggregate_posterior_on_data"]["images"] == 200
    assert (tmp_path / "run" / "figures" / "calibration.png").stat().st_size > 10_000


def test_the_calibration_figure_shows_the_first_coordinates_and_the_norm_when_there_are_many():
    from pyro_vae.calibration import Calibration, simultaneous_band
    from pyro_vae.plots import calibration_ecdf

    n, names = 50, [f"z[{i}]" for i in range(40)] + ["||z||"]
    pit = np.random.default_rng(0).random((n, len(names)))
    result = Calibration(names, pit, 10, np.ones(41), np.ones(41, bool),
                         simultaneous_band(n, 0.05), np.zeros(40), np.zeros(40))
    fig = calibration_ecdf(result, max_panels=24)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert len(titles) == 24 and titles[0].startswith("z[0]") and titles[-1].startswith("||z||")
    assert "(24 of 41 shown)" in fig._suptitle.get_text()

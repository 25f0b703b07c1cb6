"""ArviZ export: a run's guide draws (and NUTS draws, after diagnose) as ArviZ data that
round-trips on both ArviZ generations: arviz 0.x here, arviz 1.x in .venv312."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_vae import ConfigError, to_inference_data, train
from pyro_vae.arviz_compat import az, summary
from pyro_vae.commands import diagnose_run
from pyro_vae.config import ModelConfig
from pyro_vae.estimators import fixed_noise, guide_draws
from pyro_vae.export import guide_arrays, nuts_arrays
from pyro_vae.likelihoods import get_likelihood
from pyro_vae.models import build_model

from .helpers import tiny_config

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "tests" / "helpers" / "arviz_export_check.py"


@pytest.fixture(scope="module")
def diagnosed(tmp_path_factory):
    """A tiny trained run, diagnosed on two test images (NUTS draws kept)."""
    path = tmp_path_factory.mktemp("export") / "run"
    train(tiny_config(epochs=1), path, progress=False)
    diagnose_run(path, images=2, num_samples=40, warmup=40, chains=2, iwae_samples=100)
    return path


def test_guide_draws_round_trip_through_arviz_with_named_dimensions(diagnosed):
    data = to_inference_data(diagnosed, images=3, num_samples=200, seed=5)
    z = data["posterior"]["z"]
    assert dict(z.sizes) == {"chain": 1, "draw": 200, "image": 3, "latent": 4}
    from pyro_vae import load_run

    run = load_run(diagnosed)
    with fixed_noise(5, run.device):
        expected = guide_draws(run.vae, run.data.test_x[:3], 200)["z"]
    assert np.array_equal(z.values[0], expected.numpy())  # the same seed, the same draws
    assert len(summary(data, kind="stats")) == 3 * 4
    assert az.plot_posterior(data, var_names=["z"], coords={"image": [0], "latent": [0, 1]}) \
        is not None


def test_nuts_draws_that_diagnose_kept_come_back_with_their_chains(diagnosed):
    nuts = to_inference_data(diagnosed, images=2, source="nuts")
    assert dict(nuts["posterior"]["z"].sizes) == {"chain": 2, "draw": 40, "image": 2,
                                                   "latent": 4}
    with np.load(diagnosed / "diagnostics_draws.npz", allow_pickle=False) as kept:
        assert np.array_equal(nuts["posterior"]["z"].values, kept["z"].transpose(1, 2, 0, 3))
    assert nuts["sample_stats"]["diverging"].shape == (2, 40)
    guide = to_inference_data(diagnosed, images=2, num_samples=100)
    assert az.plot_forest([guide, nuts], model_names=["guide", "NUTS"], var_names=["z"]) \
        is not None
    with pytest.raises(ConfigError, match="at most"):
        to_inference_data(diagnosed, images=3, source="nuts")


def test_export_refuses_what_it_cannot_give_in_one_line(tmp_path, diagnosed):
    train(tiny_config(epochs=1), tmp_path / "fresh", progress=False)
    with pytest.raises(ConfigError, match="diagnose on it first"):
        to_inference_data(tmp_path / "fresh", source="nuts")
    with pytest.raises(ConfigError, match="source"):
        to_inference_data(diagnosed, source="mcmc")
    with pytest.raises(ConfigError, match=r"\(B, 784\)"):
        to_inference_data(diagnosed, images=torch.zeros(2, 10))


def test_every_latent_site_of_any_model_is_exported():
    """M2: the class y (drawn, one-hot) and z, each with its own dimension."""
    config = ModelConfig(name="m2", z_dim=3, hidden_dims=(16,))
    model = build_model(config, get_likelihood("bernoulli"))
    arrays = guide_arrays(model, torch.rand(2, 784).round(), num_samples=7)
    assert set(arrays["posterior"]) == {"y", "z"}
    assert arrays["posterior"]["z"].shape == (1, 7, 2, 3)
    assert arrays["dims"]["y"] == ["image", "y_dim"]


def _write_cases(folder: Path, diagnosed: Path) -> None:
    from pyro_vae import load_run

    run = load_run(diagnosed)
    for name, arrays in [("guide", guide_arrays(run.vae, run.data.test_x[:3], 100)),
                         ("nuts", nuts_arrays(diagnosed, 2))]:
        flat = {f"{group}.{k}": v for group in ("posterior", "sample_stats")
                for k, v in (arrays.get(group) or {}).items()}
        np.savez(folder / f"{name}.npz", **flat)
        (folder / f"{name}.json").write_text(json.dumps(
            {"dims": arrays["dims"], "coords": {k: v.tolist() for k, v in
                                                arrays["coords"].items()}}))


def test_export_round_trips_with_the_installed_arviz(tmp_path, diagnosed):
    _write_cases(tmp_path, diagnosed)
    result = subprocess.run([sys.executable, str(CHECK), str(tmp_path)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("values unchanged") == 2


def test_export_round_trips_with_arviz_1_on_python_3_12(tmp_path, diagnosed):
    python = ROOT / ".venv312" / "bin" / "python"
    if not python.exists():
        pytest.skip("no .venv312 (make test creates it where python3.12 exists)")
    _write_cases(tmp_path, diagnosed)
    result = subprocess.run([str(python), str(CHECK), str(tmp_path)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("(major 1) on Python 3.12") == 2

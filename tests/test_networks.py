"""Networks by name (mlp, conv, a user's own) and the two-stochastic-layer VAE."""

import json
import math
import subprocess
import sys
import textwrap

import pyro.poutine as poutine
import pytest
import torch
from pyro.poutine.util import site_is_subsample

import pyro_vae
from pyro_vae import VAE, TwoLayerVAE
from pyro_vae.estimators import elbo_terms, fixed_noise, importance_log_likelihood
from pyro_vae.objective import IWAE_ELBO, Objective, SyncFreeTrace_ELBO

from .helpers import (
    built_in_likelihoods,
    built_in_networks,
    comparable,
    tiny_config,
    values_in_support,
)


@pytest.mark.parametrize("likelihood", built_in_likelihoods())
@pytest.mark.parametrize("network", built_in_networks())
def test_every_network_works_with_every_likelihood(network, likelihood):
    torch.manual_seed(0)
    vae = VAE(likelihood, z_dim=4, hidden_dims=(32,), network=network)
    x = values_in_support(likelihood, (6, 784), torch.Generator().manual_seed(0))
    trace = poutine.trace(vae.model).get_trace(x)
    assert trace.nodes["x"]["fn"].batch_shape == (6,)
    loss = Objective(vae, SyncFreeTrace_ELBO(num_particles=3, vectorize_particles=True,
                                             max_plate_nesting=1))(x)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in vae.parameters())


def test_the_conv_network_needs_square_images():
    with pytest.raises(pyro_vae.ConfigError, match="square images"):
        VAE(x_dim=700, network="conv")


def test_an_unknown_network_lists_the_known_ones():
    with pytest.raises(pyro_vae.ConfigError, match="must be one of: conv, mlp"):
        VAE(network="resnet")


@pytest.fixture
def two_layers():
    torch.manual_seed(0)
    return TwoLayerVAE(z_dim=3, z1_dim=5, hidden_dims=(16,), top_hidden_dims=(8,)).eval()


def test_two_layers_trace_z2_then_z1_then_x(two_layers):
    x = torch.bernoulli(torch.rand(4, 784))
    model = poutine.trace(two_layers.model).get_trace(x)
    guide = poutine.trace(two_layers.guide).get_trace(x)
    def sites(trace):
        return [n for n, s in trace.nodes.items()
                if s["type"] == "sample" and not site_is_subsample(s)]
    assert sites(model) == ["z2", "z1", "x"]
    assert sites(guide) == ["z1", "z2"]


def test_two_layer_estimators_sum_every_latent_site(two_layers):
    """The importance weights are log p(x|z1) + log p(z1|z2) + log p(z2) - log q(z1|x)
    - log q(z2|z1), computed by hand here with the same noise."""
    vae, x = two_layers, torch.bernoulli(torch.rand(4, 784))
    with fixed_noise(0, x.device):
        terms = elbo_terms(vae, x, seed=None)
    with fixed_noise(0, x.device), torch.no_grad():
        loc1, s1 = vae.encoder(x)
        z1 = loc1 + s1 * torch.randn_like(loc1)
        loc2, s2 = vae.encoder_top(z1)
        z2 = loc2 + s2 * torch.randn_like(loc2)
        normal = torch.distributions.Normal
        log_q = normal(loc1, s1).log_prob(z1).sum(-1) + normal(loc2, s2).log_prob(z2).sum(-1)
        ploc, pscale = vae.decoder_top(z2)
        log_p = (normal(0.0, 1.0).log_prob(z2).sum(-1) + normal(ploc, pscale).log_prob(z1).sum(-1)
                 + vae.observation(z1).log_prob(x).sum(-1))
    torch.testing.assert_close(terms.elbo, log_p - log_q, rtol=1e-5, atol=1e-3)


def test_two_layer_iwae_with_one_particle_is_the_elbo(two_layers):
    x = torch.bernoulli(torch.rand(4, 784))
    with fixed_noise(1, x.device):
        iwae = Objective(two_layers, IWAE_ELBO(num_particles=1))(x)
    with fixed_noise(1, x.device):
        elbo = Objective(two_layers, SyncFreeTrace_ELBO(max_plate_nesting=1))(x)
    torch.testing.assert_close(iwae, elbo)
    log_px = importance_log_likelihood(two_layers, x, 50)
    assert log_px.shape == (4,) and torch.isfinite(log_px).all()


def two_layer_config(**train):
    config = tiny_config(**train)
    config.model.stochastic_layers, config.model.z1_dim = 2, 6
    config.model.top_hidden_dims = (8,)
    return config


@pytest.mark.parametrize("make", [
    lambda: two_layer_config(objective="iwae", num_particles=3),
    lambda: tiny_config(),
], ids=["two-layers-iwae", "conv"])
def test_training_resumes_exactly_and_evaluate_plot_sample_work(tmp_path, make):
    config = make()
    if config.model.stochastic_layers == 1:
        config.model.network = "conv"
    config.train.epochs = 2
    straight = pyro_vae.train(config, tmp_path / "a", progress=False)
    config.train.epochs = 1
    pyro_vae.train(config, tmp_path / "b", progress=False)
    resumed = pyro_vae.train(resume=tmp_path / "b", epochs=2, progress=False)
    assert comparable(straight.metrics) == comparable(resumed.metrics)
    result = pyro_vae.evaluate(tmp_path / "a", iwae_samples=20)
    # the K = 20 estimate is not below the one-sample ELBO beyond Monte-Carlo error
    assert math.isfinite(result["log_px"])
    assert result["log_px"] >= result["elbo"] - 3 * result["gap_se"]
    written = pyro_vae.write_figures(tmp_path / "a")
    assert {p.stem for p in written} >= {"reconstructions", "samples", "curves", "latent",
                                          "traversals", "interpolations"}
    figure = pyro_vae.sample(tmp_path / "a", 9, out=tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG" and figure.axes


def test_diagnose_says_it_covers_one_layer(tmp_path):
    pyro_vae.train(two_layer_config(epochs=1), tmp_path / "r", progress=False)
    with pytest.raises(pyro_vae.ConfigError, match="one latent layer"):
        pyro_vae.diagnose_run(tmp_path / "r")


@pytest.mark.slow
def test_a_users_network_module_works_in_fresh_processes(tmp_path):
    (tmp_path / "mynets.py").write_text(textwrap.dedent('''
        from pyro_vae import register_network
        from pyro_vae.networks import Decoder, Encoder

        @register_network("deep-test")
        def deep(x_dim, z_dim, hidden_dims, activation, num_params):
            """Three hidden layers of 32."""
            return (Encoder(x_dim, (32, 32, 32), z_dim, activation),
                    Decoder(z_dim, (32, 32, 32), x_dim, num_params, activation))
    '''))
    run = tmp_path / "run"
    args = ["--dataset", "mnist-sample", "--train-limit", "128", "--test-limit", "20",
            "--epochs", "1", "--quiet"]
    done = subprocess.run([sys.executable, "-m", "pyro_vae", "train", "--import", "mynets",
                           "--network", "deep-test", *args, "--out", str(run)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads((run / "config.json").read_text())["model"]["network_module"] == "mynets"
    missing = subprocess.run([sys.executable, "-m", "pyro_vae", "evaluate", str(run)],
                             cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "; --import mynets" in missing.stderr
    done = subprocess.run([sys.executable, "-m", "pyro_vae", "evaluate", str(run), "--import",
                           "mynets", "--iwae-samples", "3"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr

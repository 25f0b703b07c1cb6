"""The research objectives: the IWAE bound, DReG, and the KL weight (beta, warm-up),
checked against the estimators of pyro_vae.estimators and closed forms."""

import math

import pytest
import torch

import pyro_vae
from pyro_vae import VAE, Objective, RunConfig
from pyro_vae.estimators import fixed_noise, log_weights
from pyro_vae.objective import IWAE_ELBO, SyncFreeTrace_ELBO, kl_weight, learning_rate
from pyro_vae.runner.state import load_state

from .helpers import exact_log_px, linear_gaussian_vae, tiny_config


@pytest.fixture
def small():
    torch.manual_seed(0)
    vae = VAE(z_dim=3, hidden_dims=(16,))
    return vae, torch.bernoulli(torch.rand(5, 784))


def grads(vae, loss):
    vae.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in vae.named_parameters()}


@pytest.mark.parametrize("dreg", [False, True])
def test_the_iwae_loss_is_the_importance_sampled_bound_with_the_same_noise(small, dreg):
    vae, x = small
    with fixed_noise(1, x.device):
        loss = Objective(vae, IWAE_ELBO(num_particles=7, dreg=dreg))(x)
    with fixed_noise(1, x.device):
        log_w = log_weights(vae, x, 7).log_weight  # (K, B), the evaluation code
    expected = -(log_w.logsumexp(0) - math.log(7)).sum()
    torch.testing.assert_close(loss, expected)


def test_with_one_particle_the_iwae_bound_is_the_elbo_value_and_gradient(small):
    vae, x = small
    with fixed_noise(2, x.device):
        iwae = Objective(vae, IWAE_ELBO(num_particles=1), num_data=50)(x)
    g_iwae = grads(vae, iwae)
    with fixed_noise(2, x.device):
        elbo = Objective(vae, SyncFreeTrace_ELBO(max_plate_nesting=1), num_data=50)(x)
    g_elbo = grads(vae, elbo)
    torch.testing.assert_close(iwae, elbo)
    for name in g_elbo:
        torch.testing.assert_close(g_iwae[name], g_elbo[name])


def test_on_ppca_the_bound_rises_toward_the_exact_log_likelihood_with_k():
    vae, W, b, g = linear_gaussian_vae(loc_noise=0.3, scale_factor=2.0)
    x = (W @ torch.randn(2, 20, generator=g, dtype=torch.float64)).T + b
    exact = exact_log_px(x, W, b).sum()
    bounds = {}
    for k in (1, 10, 100):
        torch.manual_seed(0)
        draws = torch.stack([-Objective(vae, IWAE_ELBO(num_particles=k))(x).detach()
                             for _ in range(200)])
        bounds[k] = (draws.mean(), draws.std() / math.sqrt(len(draws)))
    means = [bounds[k][0] for k in (1, 10, 100)]
    assert means[0] < means[1] < means[2]
    assert means[2] <= exact + 3 * bounds[100][1]
    assert exact - means[2] < 0.2 * (exact - means[0])  # most of the gap closed at K = 100


def draw_gradients(vae, x, dreg, k, draws):
    out = []
    for _ in range(draws):
        g = grads(vae, Objective(vae, IWAE_ELBO(num_particles=k, dreg=dreg))(x))
        out.append(torch.cat([g[n].reshape(-1) for n in sorted(g)]))
    return torch.stack(out)


def test_dreg_gives_the_decoder_exactly_the_iwae_gradient(small):
    vae, x = small
    vae, x = vae.double(), x.double()
    gradients = {}
    for dreg in (False, True):
        with fixed_noise(3, x.device):
            gradients[dreg] = grads(vae, Objective(vae, IWAE_ELBO(num_particles=9,
                                                                  dreg=dreg))(x))
    for name in gradients[True]:
        if name.startswith("decoder"):
            torch.testing.assert_close(gradients[True][name], gradients[False][name])


def encoder_mask(vae) -> torch.Tensor:
    """Which entries of ``draw_gradients``' flat vectors belong to the encoder."""
    named = dict(vae.named_parameters())
    return torch.cat([torch.full((named[n].numel(),), n.startswith("encoder"))
                      for n in sorted(named)])


@pytest.mark.slow
def test_dreg_has_the_iwae_gradient_in_expectation():
    """Tucker et al. (2019): the same expectation. On a correlated PPCA posterior with an
    encoder well off it, every gradient component's mean agrees within 4.5 standard errors
    of the difference (2,000 draws each at K = 32; a wrong estimator is off by far more)."""
    vae, W, b, g = linear_gaussian_vae(loc_noise=0.3, scale_factor=1.3)
    x = (W @ torch.randn(2, 4, generator=g, dtype=torch.float64)).T + b
    torch.manual_seed(0)
    iwae = draw_gradients(vae, x, dreg=False, k=32, draws=2000)
    dreg = draw_gradients(vae, x, dreg=True, k=32, draws=2000)
    se = (iwae.var(0) / len(iwae) + dreg.var(0) / len(dreg)).sqrt()
    z = (iwae.mean(0) - dreg.mean(0)).abs() / se.clamp_min(1e-12)
    assert z.max() < 4.5, z.max()


def test_dreg_has_far_less_encoder_variance_near_the_posterior_at_large_k():
    """Where q is close to the exact posterior (a diagonal one: orthogonal PPCA), the
    IWAE encoder gradient keeps its score-function noise while DReG's vanishes with the
    log-weights' slope. Measured: total encoder variance 20.5 (IWAE) against 0.0003 (DReG)
    at K = 64; asserted: below a tenth."""
    vae, W, b, g = linear_gaussian_vae(loc_noise=0.05, scale_factor=1.1, orthogonal=True)
    x = (W @ torch.randn(2, 4, generator=g, dtype=torch.float64)).T + b
    torch.manual_seed(0)
    iwae = draw_gradients(vae, x, dreg=False, k=64, draws=200)
    dreg = draw_gradients(vae, x, dreg=True, k=64, draws=200)
    encoder = encoder_mask(vae)
    assert dreg[:, encoder].var(0).sum() < 0.1 * iwae[:, encoder].var(0).sum()


def test_the_kl_weight_scales_the_kl_term_exactly(small):
    vae, x = small
    objective = Objective(vae, SyncFreeTrace_ELBO(max_plate_nesting=1), weighted_kl=True)
    objective.set_kl_weight(0.25)
    with fixed_noise(4, x.device):
        loss = objective(x)
    with fixed_noise(4, x.device):
        w = log_weights(vae, x, 1)
    expected = -(w.log_likelihood + 0.25 * (w.log_prior - w.log_guide)).sum()
    torch.testing.assert_close(loss, expected)


def test_warm_up_is_linear_over_its_epochs_times_beta():
    config = RunConfig().train
    config.kl_warmup, config.beta = 4, 2.0
    assert [kl_weight(config, e) for e in range(1, 7)] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    config.kl_warmup, config.beta = 0, 1.0
    assert kl_weight(config, 1) == 1.0


@pytest.mark.parametrize("settings, message", [
    ({"dreg": True}, "TrainConfig.dreg is a gradient of the IWAE bound"),
    ({"objective": "iwae", "beta": 2.0}, "use them with TrainConfig.objective = 'elbo'"),
    ({"objective": "iwae", "elbo": "meanfield"}, "has no IWAE counterpart"),
    ({"objective": "vimco"}, "TrainConfig.objective must be one of elbo, iwae"),
    ({"beta": 0.0}, "TrainConfig.beta must be a positive finite number"),
    ({"kl_warmup": -1}, "TrainConfig.kl_warmup must be a whole number"),
])
def test_bad_objective_settings_are_one_line_errors(settings, message):
    config = tiny_config(**settings)
    with pytest.raises(pyro_vae.ConfigError, match=message):
        config.validate()


def test_training_with_iwae_and_dreg_reports_the_true_elbo_and_the_bound(tmp_path):
    run = pyro_vae.train(tiny_config(objective="iwae", num_particles=4, dreg=True),
                         tmp_path / "iwae", progress=False)
    last = run.metrics[-1]
    assert last["train_elbo"] is None and last["train_objective"] < 0
    assert last["test_iwae"] >= last["test_elbo"] - 1.0  # the K = 4 bound is tighter
    resumed = pyro_vae.train(resume=tmp_path / "iwae", epochs=3, progress=False)
    assert resumed.metrics[-1]["epoch"] == 3


def test_kl_warm_up_resumes_exactly(tmp_path):
    from .helpers import comparable
    straight = pyro_vae.train(tiny_config(kl_warmup=3, epochs=3), tmp_path / "a",
                              progress=False)
    pyro_vae.train(tiny_config(kl_warmup=3, epochs=1), tmp_path / "b", progress=False)
    resumed = pyro_vae.train(resume=tmp_path / "b", epochs=3, progress=False)
    assert comparable(straight.metrics) == comparable(resumed.metrics)
    assert [r.get("kl_weight") for r in straight.metrics] == [1 / 3, 2 / 3, None]


def test_the_burda_schedule_has_eight_stages_of_3_to_the_i_epochs():
    config = RunConfig().train
    config.lr_schedule = "burda"
    rates = [learning_rate(config, e) for e in range(1, 3281)]
    stages = sorted(set(rates), reverse=True)
    assert len(stages) == 8
    assert [rates.count(r) for r in stages] == [3**i for i in range(8)]
    assert stages[-1] == pytest.approx(1e-3 * 10 ** (-1)) and stages[0] == 1e-3
    assert learning_rate(config, 5000) == stages[-1]  # past the protocol: the last rate
    config.lr_schedule = "constant"
    assert learning_rate(config, 99) == config.lr


def test_a_scheduled_run_resumes_exactly_and_uses_adams_eps(tmp_path):
    from .helpers import comparable
    straight = pyro_vae.train(tiny_config(lr_schedule="burda", adam_eps=1e-4, epochs=3),
                              tmp_path / "a", progress=False)
    pyro_vae.train(tiny_config(lr_schedule="burda", adam_eps=1e-4, epochs=1), tmp_path / "b",
                   progress=False)
    resumed = pyro_vae.train(resume=tmp_path / "b", epochs=3, progress=False)
    assert comparable(straight.metrics) == comparable(resumed.metrics)
    for run in ("a", "b"):  # what Adam ran with: the schedule's rate of epoch 3, eps 1e-4
        groups = load_state(tmp_path / run / "checkpoint.pt").optimizer["param_groups"]
        assert all(g["eps"] == 1e-4 for g in groups)
        assert all(float(g["lr"]) == pytest.approx(1e-3 * 10 ** (-1 / 7)) for g in groups)

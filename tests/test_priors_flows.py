"""The VampPrior and the IAF guide: densities against references, the traced step against
the eager one, exact resume, and the commands on runs that use them."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_vae import VAE, ConfigError, Objective, SyncFreeTrace_ELBO, Trainer, load_run, train
from pyro_vae.commands import diagnose_run, evaluate, sample, write_figures
from pyro_vae.flows import InverseAutoregressiveFlow
from pyro_vae.priors import GaussianMixture, VampPrior

from .helpers import comparable, steps_agree, tiny_config

VARIANTS = [("vamp", "gaussian"), ("standard", "iaf"), ("vamp", "iaf")]
IDS = ["vamp", "iaf", "vamp+iaf"]


def reference_mixture(logits, loc, scale):
    return dist.MixtureSameFamily(dist.Categorical(logits=logits),
                                  dist.Normal(loc, scale).to_event(1))


def test_gaussian_mixture_density_equals_torchs_mixture_over_the_whole_range():
    g = torch.Generator().manual_seed(0)
    K, D = 7, 5
    logits = torch.randn(K, generator=g, dtype=torch.float64)
    loc = 10 * torch.randn(K, D, generator=g, dtype=torch.float64)
    scale = torch.logspace(-3, 1, K * D, dtype=torch.float64)[torch.randperm(K * D, generator=g)]
    scale = scale.reshape(K, D)
    far = 100 * torch.randn(200, D, generator=g, dtype=torch.float64)  # far from everything
    near = loc[torch.arange(200) % K] + 1e-3 * torch.randn(200, D, generator=g,
                                                           dtype=torch.float64)
    z = torch.cat([far, near])
    ours = GaussianMixture(logits, loc, scale).log_prob(z)
    torch.testing.assert_close(ours, reference_mixture(logits, loc, scale).log_prob(z),
                               rtol=1e-8, atol=1e-6)
    # float32 parameters and values: the float64 expansion keeps float32's own accuracy,
    # also at a narrow component far from the origin (scale 1e-3, |loc| ~ 10)
    ours32 = GaussianMixture(logits.float(), loc.float(), scale.float()).log_prob(near.float())
    exact = reference_mixture(logits, loc.float().double(), scale.float().double()).log_prob(
        near.float().double())
    torch.testing.assert_close(ours32.double(), exact, rtol=1e-6, atol=1e-3)


def test_gaussian_mixture_shapes_expand_and_moments():
    g = torch.Generator().manual_seed(1)
    logits, loc, scale = torch.randn(3, generator=g), torch.randn(3, 2, generator=g), \
        torch.rand(3, 2, generator=g) + 0.2
    d = GaussianMixture(logits, loc, scale).expand([4])
    assert d.batch_shape == (4,) and d.event_shape == (2,)
    assert d.log_prob(torch.zeros(6, 4, 2)).shape == (6, 4)
    assert d.log_prob(torch.zeros(4, 2)).shape == (4,)
    torch.manual_seed(0)
    draws = d.sample((50_000,))
    assert draws.shape == (50_000, 4, 2)
    se = (d.variance / 200_000).sqrt()
    assert torch.all((draws.mean((0, 1)) - d.mean[0]).abs() < 5 * se[0])
    torch.testing.assert_close(draws.var((0, 1)), d.variance[0], rtol=0.03, atol=0)


def test_vamp_prior_density_is_the_mixture_of_the_encoders_gaussians_at_the_pseudo_inputs():
    torch.manual_seed(0)
    vae = VAE("bernoulli", x_dim=16, z_dim=3, hidden_dims=(8,), prior="vamp", pseudo_inputs=4)
    u = vae.pseudo_inputs()
    assert u.shape == (4, 16) and bool(((u >= 0) & (u <= 1)).all())
    z = torch.randn(10, 3)
    by_hand = []
    for k in range(4):  # (1/K) sum_k N(z; mu(u_k), sigma(u_k)), one component at a time
        loc, scale = vae.encoder(u[k])
        by_hand.append(dist.Normal(loc, scale).log_prob(z).sum(-1))
    expected = torch.logsumexp(torch.stack(by_hand), 0) - math.log(4)
    torch.testing.assert_close(vae.prior(10).log_prob(z), expected, rtol=1e-6, atol=1e-5)


def test_vamp_prior_gradients_reach_the_pseudo_inputs_and_the_encoder():
    torch.manual_seed(0)
    prior = VampPrior(5, 16)
    prior.weight.data.uniform_(0.2, 0.8)  # inside hardtanh's linear part
    encoder = VAE("bernoulli", x_dim=16, z_dim=3, hidden_dims=(8,)).encoder
    prior.distribution(encoder).log_prob(torch.randn(7, 3)).sum().backward()
    assert prior.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())


def flow_and_context(steps=2):
    torch.manual_seed(0)
    flow = InverseAutoregressiveFlow(4, 6, steps=steps, hidden=16)
    for p in flow.parameters():  # away from the identity-like start, so the test can fail
        p.data.normal_(0, 0.5)
    return flow, torch.randn(3, 6)


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_flow_log_density_has_the_log_determinant_of_autograds_jacobian(steps):
    flow, context = flow_and_context(steps)
    loc, scale = torch.randn(3, 4), torch.rand(3, 4) + 0.5
    base = dist.Normal(loc, scale).to_event(1)
    q = flow.distribution(base, context)
    z0 = base.sample()
    z = flow.push(q, z0)
    for b in range(3):
        def one(v, b=b):
            return flow.push(flow.distribution(dist.Normal(loc[b], scale[b]).to_event(1),
                                               context[b]), v)
        jacobian = torch.autograd.functional.jacobian(one, z0[b])
        expected = base.log_prob(z0)[b] - torch.linalg.slogdet(jacobian)[1]
        torch.testing.assert_close(q.log_prob(z)[b], expected, rtol=1e-5, atol=1e-5)
    # the Jacobian is triangular in the flow's order: autoregressive, as it must be
    assert torch.autograd.functional.jacobian(
        lambda v: flow.push(flow.distribution(dist.Normal(loc[0], scale[0]).to_event(1),
                                              context[0]), v), z0[0]).det().abs() > 0


def test_flow_log_density_of_its_own_draws_equals_that_of_the_same_points_inverted():
    flow, context = flow_and_context(2)
    base = dist.Normal(torch.zeros(3, 4), torch.ones(3, 4)).to_event(1)
    q = flow.distribution(base, context)
    z = q.sample((5,))  # (5, 3, 4): the cache holds the draws' inputs
    cached = q.log_prob(z)
    inverted = flow.distribution(base, context).log_prob(z.clone())  # a fresh object: inverts
    torch.testing.assert_close(cached, inverted, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("prior, guide", VARIANTS, ids=IDS)
def test_traced_steps_equal_eager_steps_for_the_vamp_prior_and_the_flow(prior, guide):
    torch.manual_seed(0)

    def build():
        return VAE("bernoulli", x_dim=16, z_dim=3, hidden_dims=(8,), prior=prior,
                   guide=guide, pseudo_inputs=5, flows=2, flow_hidden=8)

    a, b = build(), build()
    b.load_state_dict(a.state_dict())
    trainers = [Trainer(Objective(v, SyncFreeTrace_ELBO(max_plate_nesting=1), num_data=64),
                        1e-2, fast=fast) for v, fast in ((a, True), (b, False))]
    assert trainers[0].mode == "traced"
    x = (torch.rand(8, 16, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    index = torch.arange(8) * 3
    steps_agree(trainers, x, index, rtol=1e-6, atol=1e-5)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def variant_config(prior, guide, **train_settings):
    config = tiny_config(**train_settings)
    config.model.prior, config.model.guide = prior, guide
    config.model.pseudo_inputs, config.model.flow_hidden = 20, 16
    return config


@pytest.mark.parametrize("prior, guide", VARIANTS, ids=IDS)
def test_vamp_and_iaf_runs_resume_exactly_and_evaluate_plot_sample(tmp_path, prior, guide):
    straight = train(variant_config(prior, guide, epochs=3), tmp_path / "a", progress=False)
    train(variant_config(prior, guide, epochs=2), tmp_path / "b", progress=False)
    resumed = train(resume=tmp_path / "b", epochs=3, progress=False)
    assert comparable(resumed.metrics) == comparable(straight.metrics)
    run = load_run(tmp_path / "b")
    assert (run.vae.prior_name, run.vae.guide_name) == (prior, guide)
    result = evaluate(run, iwae_samples=20, write=False)
    assert math.isfinite(result["log_px"]) and result["log_px"] >= result["elbo"] - 1.0
    written = {p.stem for p in write_figures(run)}
    assert ("pseudo_inputs" in written) == (prior == "vamp")
    assert sample(run, 4) is not None


def test_other_models_and_dreg_refuse_the_new_prior_and_guide_in_one_line():
    config = tiny_config()
    config.model.name, config.model.prior = "m2", "vamp"
    with pytest.raises(ConfigError, match="no prior 'vamp'"):
        train(config, progress=False)
    config = variant_config("standard", "iaf", objective="iwae",
                            num_particles=2, dreg=True)
    with pytest.raises(ConfigError, match="dreg"):
        train(config, progress=False)
    with pytest.raises(ConfigError, match="z_dim"):
        VAE("bernoulli", z_dim=1, guide="iaf")
    pyro.clear_param_store()


def test_diagnose_reports_khat_and_gaps_for_the_vamp_prior_with_a_flow_guide(tmp_path):
    train(variant_config("vamp", "iaf", epochs=1), tmp_path / "run", progress=False)
    result = diagnose_run(tmp_path / "run", images=1, num_samples=40, warmup=40, chains=2,
                          iwae_samples=200)
    row = result.per_image[0]
    assert all(math.isfinite(row[k]) for k in ("k_hat", "log_px", "approximation_gap",
                                               "amortization_gap", "elbo_amortized"))
    # the gaps add up to log p(x) minus the amortized flow's own ELBO
    assert row["approximation_gap"] + row["amortization_gap"] == pytest.approx(
        row["log_px"] - row["elbo_amortized"], abs=1e-4)
    assert result.guide_draws.shape == (1, 40, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (not run on a GPU here)")
@pytest.mark.parametrize("prior, guide", VARIANTS, ids=IDS)
def test_cuda_graph_training_of_vamp_and_iaf_matches_eager_and_resumes_exactly(
        tmp_path, prior, guide):
    graph = train(variant_config(prior, guide, epochs=2, device="cuda"), tmp_path / "g",
                  progress=False)
    eager = train(variant_config(prior, guide, epochs=2, device="cuda", fast_step=False),
                  progress=False)
    for a, b in zip(graph.metrics, eager.metrics):
        for key in ("train_elbo", "test_elbo", "test_kl"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
    train(variant_config(prior, guide, epochs=1, device="cuda"), tmp_path / "r", progress=False)
    resumed = train(resume=tmp_path / "r", epochs=2, progress=False)
    assert comparable(resumed.metrics) == comparable(graph.metrics)

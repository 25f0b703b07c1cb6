import pyro
import pyro.optim
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO

from pyro_vae import VAE, get_likelihood

from .helpers import built_in_likelihoods, values_in_support


def small_vae(likelihood="bernoulli", **kw):
    return VAE(likelihood, x_dim=16, z_dim=3, hidden_dims=(8,), **kw)


def test_model_and_guide_trace_structure():
    vae = small_vae()
    x = torch.bernoulli(torch.full((5, 16), 0.5))
    guide_trace = poutine.trace(vae.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x)
    sample_sites = [n for n, s in model_trace.nodes.items() if s["type"] == "sample"]
    assert sample_sites == ["data", "z", "x"]  # the plate, the latent, the observation
    z, obs = model_trace.nodes["z"], model_trace.nodes["x"]
    assert z["value"].shape == (5, 3) and z["fn"].event_shape == (3,)
    assert obs["is_observed"] and obs["fn"].event_shape == (16,) and obs["fn"].batch_shape == (5,)
    assert [f.name for f in z["cond_indep_stack"]] == ["data"]
    assert z["cond_indep_stack"][0].dim == -1
    guide_z = guide_trace.nodes["z"]
    assert guide_z["fn"].has_rsample  # reparameterized: loc + scale * eps
    assert guide_z["value"].requires_grad
    assert torch.equal(z["value"], guide_z["value"])


def test_prior_is_standard_normal():
    vae = small_vae()
    trace = poutine.trace(vae.model).get_trace(torch.zeros(4, 16))
    prior = trace.nodes["z"]["fn"].base_dist
    assert torch.equal(prior.loc, torch.zeros(4, 3)) and torch.equal(prior.scale, torch.ones(4, 3))


def test_num_data_scales_log_density_to_the_full_data_set():
    vae = small_vae()
    x = torch.bernoulli(torch.full((4, 16), 0.5))
    trace = poutine.trace(vae.model).get_trace(x, num_data=100)
    assert trace.nodes["x"]["scale"] == pytest.approx(25.0)
    assert trace.nodes["z"]["scale"] == pytest.approx(25.0)


def test_the_batch_indices_are_the_data_plates_subsample_and_draw_nothing():
    vae = small_vae()
    x = torch.bernoulli(torch.full((4, 16), 0.5))
    index = torch.tensor([7, 3, 99, 0])
    state = torch.get_rng_state()
    trace = poutine.trace(poutine.block(vae.model, hide=["z"])).get_trace(
        x, num_data=100, index=index)
    assert torch.equal(trace.nodes["data"]["value"], index)
    assert trace.nodes["x"]["scale"] == pytest.approx(25.0)
    # only the prior's draw of z used the RNG: the plate drew no permutation of 100
    after = torch.get_rng_state()
    torch.set_rng_state(state)
    torch.normal(torch.zeros(4, 3), torch.ones(4, 3))
    assert torch.equal(torch.get_rng_state(), after)


@pytest.mark.parametrize("num_particles", [1, 4])
def test_vectorized_particles_broadcast_through_the_model(num_particles):
    vae = small_vae()
    x = torch.bernoulli(torch.full((6, 16), 0.5))
    elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=num_particles > 1,
                      max_plate_nesting=1)
    loss = elbo.differentiable_loss(vae.model, vae.guide, x)
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in vae.parameters())


@pytest.mark.parametrize("name", built_in_likelihoods())
def test_elbo_is_finite_and_svi_decreases_it_on_a_fixed_batch(name):
    vae = small_vae(name)
    x = values_in_support(name, (32, 16), torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-2)
    elbo = Trace_ELBO()

    def loss_estimate():  # average over 200 draws: the one-sample loss is noisy
        with torch.no_grad():
            return sum(elbo.loss(vae.model, vae.guide, x) for _ in range(200)) / 200

    before = loss_estimate()
    for _ in range(150):
        loss = elbo.differentiable_loss(vae.model, vae.guide, x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = loss_estimate()
    assert torch.isfinite(torch.tensor(before)) and after < before


def test_meanfield_elbo_uses_the_analytic_kl():
    vae = small_vae()
    x = torch.bernoulli(torch.full((8, 16), 0.5))
    mc = torch.stack([Trace_ELBO().differentiable_loss(vae.model, vae.guide, x).detach()
                      for _ in range(2000)])
    analytic = torch.stack([TraceMeanField_ELBO().differentiable_loss(vae.model, vae.guide, x)
                            .detach() for _ in range(2000)])
    # same expectation (4 standard errors), strictly smaller variance
    se = (mc.var() / 2000 + analytic.var() / 2000).sqrt()
    assert abs(mc.mean() - analytic.mean()) < 4 * se
    assert analytic.var() < mc.var()


def test_works_with_pyro_svi_and_the_param_store():
    vae = small_vae()
    x = torch.bernoulli(torch.full((16, 16), 0.5))

    def model(x):
        pyro.module("decoder", vae.decoder)
        vae.model(x)

    def guide(x):
        pyro.module("encoder", vae.encoder)
        vae.guide(x)

    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    before = [p.detach().clone() for p in vae.parameters()]
    losses = [svi.step(x) for _ in range(20)]
    assert all(torch.isfinite(torch.tensor(losses)))
    store = pyro.get_param_store()
    expected = {f"decoder$$${n}" for n, _ in vae.decoder.named_parameters()} | \
        {f"encoder$$${n}" for n, _ in vae.encoder.named_parameters()}
    assert set(store.keys()) == expected
    # the store holds the networks' own tensors, which SVI's Adam has moved
    assert all(store[f"decoder$$${n}"] is p for n, p in vae.decoder.named_parameters())
    assert all(not torch.equal(b, p) for b, p in zip(before, vae.parameters()))


def test_reconstruction_and_prior_samples_are_likelihood_means():
    # the continuous Bernoulli's mean 1 / (1 - e^-l) - 1 / l (in float64), not its
    # parameter sigmoid(l): the two differ, and pictures must show the mean
    vae = small_vae("continuous-bernoulli").double()
    x = torch.rand(5, 16, dtype=torch.float64)
    rec = vae.reconstruct(x)
    with torch.no_grad():
        logits = vae.decoder(vae.encoder(x)[0])[..., 0, :]
    expected = 1 / (1 - torch.exp(-logits)) - 1 / logits
    torch.testing.assert_close(rec, expected)
    assert (rec - torch.sigmoid(logits)).abs().max() > 1e-3
    assert ((rec >= 0) & (rec <= 1)).all()
    assert vae.sample_prior(7).batch_shape == (7, 16)


def test_decoder_outputs_one_block_per_likelihood_parameter():
    assert small_vae("beta").decoder(torch.zeros(2, 3)).shape == (2, 2, 16)
    assert small_vae("bernoulli").decoder(torch.zeros(2, 3)).shape == (2, 1, 16)
    assert get_likelihood("normal").num_params == 2

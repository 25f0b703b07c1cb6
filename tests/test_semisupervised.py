"""The semi-supervised M2 and enumerated discrete latents: the loss against Kingma et al.'s
equations term by term, the sync-free TraceEnum_ELBO against Pyro's, the enumerated ELBO and
log p(x) against closed forms, the traced step against the eager one, label choice."""

import json
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO
from torch import nn

import pyro_vae
from pyro_vae import M2, Objective, SyncFreeTraceEnum_ELBO, Trainer, estimators, get_likelihood
from pyro_vae.estimators import elbo_terms, importance_log_likelihood, log_weights
from pyro_vae.model import data_plate
from pyro_vae.semisupervised import choose_labels, partial_labels

from .test_trainer import HostReads

N, B, C = 40, 8, 3  # training images, batch, classes


def small_m2(alpha=5.0, labelled=True):
    torch.manual_seed(0)
    m = M2(get_likelihood("bernoulli"), x_dim=6, z_dim=2, hidden_dims=(5,),
           activation="tanh", num_classes=C, aux_loss_multiplier=alpha).double()
    if labelled:  # images 0, 3, 6, ... labelled with classes 0, 1, 2, 0, ...
        labels = torch.full((N,), -1)
        labels[::3] = torch.arange(len(labels[::3])) % C
        m.set_labels(labels)
    return m


def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.bernoulli(torch.full((B, 6), 0.4, dtype=torch.float64), generator=g)
    return x, torch.arange(B)  # images 0..7: 0, 3 and 6 labelled


def test_m2_loss_is_kingma_et_al_eq_6_to_9_term_by_term():
    """-loss = N/B [sum_labelled L(x, y) + sum_unlabelled U(x) + alpha sum_labelled log q(y|x)]
    with L (eq. 6), U (eq. 7) and the J^alpha of eq. 9, over the guide's own draws of z."""
    m, (x, index) = small_m2(), batch()
    pyro.set_rng_seed(3)
    loss = SyncFreeTraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(
        m.model, m.guide, x, N, None, index)
    pyro.set_rng_seed(3)  # the same draws: the guide runs first, with the same enumeration
    trace = poutine.trace(poutine.enum(m.guide, first_available_dim=-2)).get_trace(
        x, N, None, index)
    z = trace.nodes["z"]["value"]  # (C, B, z_dim): one draw per class and image
    ys = torch.arange(C).unsqueeze(-1)  # (C, 1)
    loc, scale = m.encoder_given(x, ys)
    log_L = (m.observation(z, ys).log_prob(x).sum(-1)  # (C, B): L(x, y) at each y
             + math.log(1 / C) + dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
             - dist.Normal(loc, scale).log_prob(z).sum(-1))
    log_q = m.classify(x).log_softmax(-1)  # (B, C)
    known = m.labels[index]
    total = 0.0
    for b in range(B):
        if known[b] >= 0:
            y = int(known[b])
            total += log_L[y, b] + m.aux_loss_multiplier * log_q[b, y]
        else:
            q = log_q[b].exp()
            total += (q * (log_L[:, b] - log_q[b])).sum()
    torch.testing.assert_close(loss, -(N / B) * total)


@pytest.mark.parametrize("labelled", [True, False], ids=["labelled", "unlabelled"])
def test_sync_free_trace_enum_elbo_equals_pyros_value_and_gradient(labelled):
    """Labelled images put probability 0 on every class but theirs: Pyro drops those terms
    with masked_select after a host read, ours zeroes them in place; same numbers."""
    m, (x, index) = small_m2(labelled=labelled), batch()
    results = []
    for elbo in (TraceEnum_ELBO(max_plate_nesting=1), SyncFreeTraceEnum_ELBO(max_plate_nesting=1)):
        pyro.set_rng_seed(5)
        loss = elbo.differentiable_loss(m.model, m.guide, x, N, None, index)
        results.append((loss.detach(), torch.autograd.grad(loss, list(m.parameters()))))
    (expected, expected_grads), (value, grads) = results
    torch.testing.assert_close(value, expected)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)
        assert torch.isfinite(g).all()


class LinearGaussianMixture(nn.Module):
    """y ~ Cat(pi), z ~ N(0, I_2), x | y, z ~ N(W z + b_y, s^2 I_3): p(x | y) is
    N(b_y, W W^T + s^2 I) and q(z | x, y) below is the exact posterior p(z | x, y).
    The guide's q(y | x) is any fixed table of logits."""

    enumerated = True
    x_dim, z_dim, enumerated_values = 3, 2, 4

    def __init__(self, q_logits):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.pi = torch.softmax(torch.randn(4, generator=g, dtype=torch.float64), 0)
        self.W = torch.randn(3, 2, generator=g, dtype=torch.float64)
        self.b = 2 * torch.randn(4, 3, generator=g, dtype=torch.float64)
        self.s = 0.7
        self.q_logits = q_logits
        self.likelihood = get_likelihood("normal-fixed")
        precision = torch.eye(2, dtype=torch.float64) + self.W.T @ self.W / self.s**2
        self.post_cov = torch.linalg.inv(precision)

    def marginal(self, y):  # p(x | y)
        cov = self.W @ self.W.T + self.s**2 * torch.eye(3, dtype=torch.float64)
        return dist.MultivariateNormal(self.b[y], cov)

    def model(self, x, num_data=None, kl_weight=None, index=None):
        with data_plate(x, num_data, index):
            y = pyro.sample("y", dist.Categorical(self.pi).expand([x.shape[0]]))
            z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0).expand([x.shape[0], 2])
                            .to_event(1))
            loc = z @ self.W.T + self.b[y]
            pyro.sample("x", dist.Normal(loc, self.s).to_event(1), obs=x)

    def guide(self, x, num_data=None, kl_weight=None, index=None):
        with data_plate(x, num_data, index):
            y = pyro.sample("y", dist.Categorical(logits=self.q_logits),
                            infer={"enumerate": "parallel"})
            mean = ((x - self.b[y]) @ self.W / self.s**2) @ self.post_cov  # E[z | x, y]
            pyro.sample("z", dist.MultivariateNormal(mean, self.post_cov))


def mixture_and_data(q_logits=None):
    x = torch.tensor([[0.3, -1.2, 2.0], [1.5, 0.2, -0.4], [-2.0, 1.0, 0.5]],
                     dtype=torch.float64)
    if q_logits is None:
        q_logits = torch.randn(len(x), 4, generator=torch.Generator().manual_seed(2),
                               dtype=torch.float64)
    return LinearGaussianMixture(q_logits), x


def exact_log_joint(model, x):  # log p(x, y) for every y: (4, B)
    return torch.stack([model.marginal(y).log_prob(x) + model.pi[y].log() for y in range(4)])


def test_enumerated_elbo_equals_its_closed_form_by_hand_over_y():
    """With the exact q(z | x, y), log p(x, y, z) - log q(z | x, y) = log p(x, y) for any z,
    so the enumerated ELBO is exactly sum_y q(y|x) [log p(x, y) - log q(y|x)]."""
    model, x = mixture_and_data()
    log_q = model.q_logits.log_softmax(-1).T  # (4, B)
    expected = (log_q.exp() * (exact_log_joint(model, x) - log_q)).sum(0)
    terms = elbo_terms(model, x, seed=7)
    torch.testing.assert_close(terms.elbo, expected)
    # Pyro's TraceEnum_ELBO (training) gives the same number for the batch
    loss = SyncFreeTraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(
        model.model, model.guide, x)
    torch.testing.assert_close(-loss, expected.sum())


def test_enumerated_elbo_with_the_true_q_y_is_log_px():
    model, x = mixture_and_data()
    log_joint = exact_log_joint(model, x)
    model.q_logits = (log_joint - log_joint.logsumexp(0)).T  # q(y | x) = p(y | x)
    torch.testing.assert_close(elbo_terms(model, x, seed=1).elbo, log_joint.logsumexp(0))


@pytest.mark.parametrize("num_samples", [1, 7])
def test_importance_sampled_log_px_sums_y_exactly(num_samples, monkeypatch):
    """log p(x) = logsumexp_y log p(x, y): exact for any K with the exact q(z | x, y),
    whatever q(y | x) is -- y is summed, not sampled."""
    model, x = mixture_and_data()
    # this guide's q(y | x) is a table for these three images: keep them in every chunk
    monkeypatch.setattr(estimators, "CHUNK_SAMPLES", 1)
    log_px = importance_log_likelihood(model, x, num_samples=num_samples, batch_size=3,
                                       max_elements=4 * 3 * 3 * 2)  # chunks of 2 samples
    torch.testing.assert_close(log_px, exact_log_joint(model, x).logsumexp(0))
    weights = log_weights(model, x, num_samples)
    assert weights.log_enumerated.shape == (4, num_samples, len(x))


def trainer_pair():
    a, b = small_m2(), small_m2()
    b.load_state_dict(a.state_dict())
    b.set_labels(a.labels)

    def make(m, fast):
        return Trainer(Objective(m, SyncFreeTraceEnum_ELBO(max_plate_nesting=1), num_data=N),
                       1e-2, fast=fast)

    return (a, make(a, True)), (b, make(b, False))


def test_traced_m2_steps_equal_eager_steps_and_read_nothing_back():
    (fast_m, fast), (eager_m, eager) = trainer_pair()
    assert fast.mode == "traced" and eager.mode == "eager"
    x, index = batch()
    for step in range(4):
        torch.manual_seed(step)
        loss_fast, ok = fast.step(x, index + step)
        torch.manual_seed(step)
        loss_eager, _ = eager.step(x, index + step)
        torch.testing.assert_close(loss_fast, loss_eager, rtol=1e-12, atol=1e-9)
        assert bool(ok)
    for p, q in zip(fast_m.parameters(), eager_m.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    with HostReads() as reads:
        for _ in range(3):
            fast.step(x, index)
    assert reads.calls == []


def test_labels_are_balanced_per_class_and_chosen_by_the_seed():
    y = torch.arange(1000) % 10
    chosen = choose_labels(y, 100, seed=0)
    assert torch.bincount(y[chosen], minlength=10).tolist() == [10] * 10
    assert torch.equal(chosen, choose_labels(y, 100, seed=0))
    assert not torch.equal(chosen, choose_labels(y, 100, seed=1))
    odd = torch.bincount(y[choose_labels(y, 23, seed=4)], minlength=10)
    assert odd.sum() == 23 and set(odd.tolist()) == {2, 3}
    kept = partial_labels(y, 100, seed=0)
    assert (kept >= 0).sum() == 100 and torch.equal(kept[chosen], y[chosen])


def m2_config(epochs: int):
    from .helpers import tiny_config
    config = tiny_config(epochs=epochs)
    config.model.name, config.data.labels, config.data.validation = "m2", 30, 64
    return config


def test_m2_trains_resumes_exactly_evaluates_and_draws_its_figures(tmp_path):
    from .helpers import comparable
    config = m2_config(2)
    config.train.tensorboard = True  # its pictures use the methods M2 has
    straight = pyro_vae.train(config, tmp_path / "a", progress=False)
    assert list((tmp_path / "a" / "tensorboard").glob("events.*"))
    pyro_vae.train(m2_config(1), tmp_path / "b", progress=False)
    resumed = pyro_vae.train(resume=tmp_path / "b", epochs=2, progress=False)
    assert comparable(straight.metrics) == comparable(resumed.metrics)
    last = straight.metrics[-1]
    for key in ("test_accuracy", "validation_accuracy"):
        assert 0 <= last[key] <= 1
    # the ELBO plus alpha log q(y|x) was optimized: recorded as the objective, not the ELBO
    assert last["train_elbo"] is None and last["train_objective"] < 0
    chosen = json.loads((tmp_path / "a" / "labels.json").read_text())
    assert chosen["count"] == 30 and chosen["seed"] == 0
    y = resumed.data.train_y
    assert torch.bincount(y[chosen["indices"]], minlength=10).tolist() == [3] * 10

    result = pyro_vae.evaluate(tmp_path / "a", iwae_samples=3, device="cpu")
    assert result["log_px"] >= result["elbo"] - 1.0 and 0 <= result["accuracy"] <= 1
    paths = pyro_vae.write_figures(tmp_path / "a")
    assert {p.stem for p in paths} >= {"accuracy", "confusion", "conditional",
                                       "reconstructions", "samples"}
    with pytest.raises(pyro_vae.ConfigError, match="decode"):
        pyro_vae.write_figures(tmp_path / "a", ["traversals"])
    with pytest.raises(pyro_vae.ConfigError, match="discrete latent"):
        pyro_vae.diagnose_run(tmp_path / "a", images=1)


def test_labels_and_enumeration_are_refused_where_they_do_not_apply(tmp_path):
    config = m2_config(1)
    config.model.name = "vae"
    with pytest.raises(pyro_vae.ConfigError, match="DataConfig.labels is for models that"):
        pyro_vae.train(config, tmp_path / "vae", progress=False)
    assert not (tmp_path / "vae").exists()
    config = m2_config(1)
    config.train.objective, config.train.num_particles = "iwae", 2
    with pytest.raises(pyro_vae.ConfigError, match="enumeration"):
        pyro_vae.train(config, tmp_path / "iwae", progress=False)
    assert not (tmp_path / "iwae").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the "
                    "CUDA-graph capture of the enumerated step runs where one exists)")
def test_the_enumerated_m2_step_is_captured_in_a_cuda_graph_with_no_host_sync():
    m = small_m2().float().cuda()
    m.set_labels(m.labels)
    trainer = Trainer(Objective(m, SyncFreeTraceEnum_ELBO(max_plate_nesting=1), num_data=N),
                      1e-2)
    assert trainer.mode == "cuda-graph"
    x, index = batch()
    x, index = x.float().cuda(), index.cuda()
    trainer.step(x, index)  # validation and capture
    assert trainer.mode == "cuda-graph"  # captured, not fallen back to eager steps
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(3):
            loss, ok = trainer.step(x, (index + step) % N)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert bool(ok) and torch.isfinite(loss)


def test_more_labels_than_a_class_or_the_set_holds_is_one_clear_error():
    y = torch.cat([torch.zeros(50, dtype=torch.long), torch.ones(5, dtype=torch.long)])
    with pytest.raises(pyro_vae.ConfigError, match="class 1, which has 5"):
        choose_labels(y, 20, seed=0)
    with pytest.raises(pyro_vae.ConfigError, match="has 55 images"):
        choose_labels(y, 56, seed=0)

"""The one training step: the sync-free ELBOs, eager vs traced vs CUDA-graph steps,
validation of every batch shape, and no host synchronisation inside steps."""

import copy
import json

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch._inductor
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch.fx.experimental.proxy_tensor import make_fx
from torch.overrides import TorchFunctionMode

from pyro_vae import (
    VAE,
    Objective,
    SyncFreeTrace_ELBO,
    SyncFreeTraceMeanField_ELBO,
    Trainer,
    register_likelihood,
    train,
)
from pyro_vae.data import DeviceBatches
from pyro_vae.data.batching import binarized_rows
from pyro_vae.onednn import onednn_available
from pyro_vae.runner import step as step_module
from pyro_vae.runner.compiling import compile_gather, compile_graph, step_signature
from pyro_vae.runner.state import EpochProgress
from pyro_vae.runner.step import Diverged, drop_identity_views, finite
from pyro_vae.runner.train import fit_epoch

from .helpers import (
    built_in_likelihoods,
    built_in_networks,
    comparable,
    steps_agree,
    tiny_config,
    values_in_support,
)

PAIRS = [(Trace_ELBO, SyncFreeTrace_ELBO), (TraceMeanField_ELBO, SyncFreeTraceMeanField_ELBO)]


def small_vae(likelihood="bernoulli", network="mlp"):
    return VAE(likelihood, x_dim=16, z_dim=3, hidden_dims=(8,), network=network)


def loss_and_grads(vae, elbo, x, seed, num_data=None):
    pyro.set_rng_seed(seed)
    loss = elbo.differentiable_loss(vae.model, vae.guide, x, num_data)
    grads = torch.autograd.grad(loss, list(vae.parameters()))
    return loss.detach(), grads


@pytest.mark.parametrize("pyro_elbo, ours", PAIRS, ids=["trace", "meanfield"])
@pytest.mark.parametrize("particles", [1, 3])
@pytest.mark.parametrize("name", built_in_likelihoods())
def test_sync_free_elbo_equals_pyros_value_and_gradient(name, particles, pyro_elbo, ours):
    vae = small_vae(name)
    x = values_in_support(name, (5, 16), torch.Generator().manual_seed(0))
    options = {"num_particles": particles, "vectorize_particles": particles > 1,
               "max_plate_nesting": 1}
    expected, expected_grads = loss_and_grads(vae, pyro_elbo(**options), x, 1, num_data=50)
    value, grads = loss_and_grads(vae, ours(**options), x, 1, num_data=50)
    # same draws, same terms; Pyro adds them up as Python floats: float32 rounding apart
    torch.testing.assert_close(value, expected, rtol=2e-6, atol=1e-4)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_sync_free_elbo_keeps_the_score_function_surrogate():
    """A guide site without reparameterization: value and gradient equal Pyro's."""
    logit = torch.tensor(0.3, requires_grad=True)

    def model():
        c = pyro.sample("c", dist.Bernoulli(0.4))
        pyro.sample("x", dist.Normal(2.0 * c, 1.0), obs=torch.tensor(1.5))

    def guide():
        pyro.sample("c", dist.Bernoulli(logits=logit))

    def value_and_grad(elbo):
        pyro.set_rng_seed(3)
        loss = elbo.differentiable_loss(model, guide)
        return loss.detach(), torch.autograd.grad(loss, logit)[0]

    for pyro_elbo, ours in PAIRS[:1]:
        (v, g), (ev, eg) = value_and_grad(ours()), value_and_grad(pyro_elbo())
        torch.testing.assert_close(v, ev)
        torch.testing.assert_close(g, eg)
        assert g != 0


def trainer_pair(name="bernoulli", network="mlp", nan_policy="stop", onednn=True):
    """Two identical VAEs with a fast and an eager trainer each."""
    torch.manual_seed(0)
    a, b = small_vae(name, network), small_vae(name, network)
    b.load_state_dict(a.state_dict())

    def make(vae, fast):
        objective = Objective(vae, SyncFreeTrace_ELBO(max_plate_nesting=1), num_data=64)
        return Trainer(objective, 1e-2, fast=fast, nan_policy=nan_policy, onednn=onednn)

    return (a, make(a, True)), (b, make(b, False))


@pytest.mark.parametrize("network", built_in_networks())
@pytest.mark.parametrize("name", built_in_likelihoods())
def test_traced_steps_with_torch_s_products_equal_eager_steps_bit_for_bit(name, network):
    """The traced graph is what Pyro computes eagerly, noise included, to the last bit
    (with the matrix products left to torch's BLAS, as the eager step has them)."""
    (fast_vae, fast), (eager_vae, eager) = trainer_pair(name, network, onednn=False)
    assert fast.mode == "traced" and eager.mode == "eager"
    x = values_in_support(name, (8, 16), torch.Generator().manual_seed(1))
    index = torch.arange(8) * 3  # the batch's positions in the 64 images
    for step in range(5):
        torch.manual_seed(step)
        loss_fast, finite = fast.step(x, index)
        torch.manual_seed(step)
        loss_eager, _ = eager.step(x, index)
        assert torch.equal(loss_fast, loss_eager) and bool(finite)
    for p, q in zip(fast_vae.parameters(), eager_vae.parameters()):
        assert torch.equal(p, q)


@pytest.mark.skipif(not onednn_available(), reason="this torch has no oneDNN")
@pytest.mark.parametrize("network", built_in_networks())
def test_traced_steps_with_onednn_products_agree_with_eager_steps_to_rounding(network):
    (fast_vae, fast), (eager_vae, eager) = trainer_pair("bernoulli", network)
    x = values_in_support("bernoulli", (8, 16), torch.Generator().manual_seed(1))
    steps_agree([fast, eager], x, torch.arange(8) * 3, steps=5, rtol=1e-5, atol=1e-5)
    graph = next(iter(fast._replays.values()))
    assert any(n.target == torch.ops.mkldnn._linear_pointwise.default
               for n in graph.graph.nodes)
    for p, q in zip(fast_vae.parameters(), eager_vae.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


class HostReads(TorchFunctionMode):
    """Counts the calls that copy a tensor's value to the host (a sync on a GPU)."""

    READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy",
             "nonzero", "__format__"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.READS:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("fast", [True, False], ids=["traced", "eager"])
def test_steps_after_the_first_read_nothing_back_from_the_device(fast):
    (vae, trainer), _ = trainer_pair()
    if not fast:
        trainer = Trainer(trainer.objective, 1e-2, fast=False)
    x = torch.bernoulli(torch.full((8, 16), 0.4))
    trainer.step(x)  # validates and traces this batch shape
    with HostReads() as reads:
        for _ in range(3):
            trainer.step(x)
    assert reads.calls == []


def test_the_host_read_counter_sees_pyros_own_syncs():
    """The check above can fail: Pyro's Trace_ELBO reads every site's sum back."""
    vae = small_vae()
    x = torch.bernoulli(torch.full((8, 16), 0.4))
    with HostReads() as reads:
        Trace_ELBO().differentiable_loss(vae.model, vae.guide, x)
    assert "item" in reads.calls


def test_every_new_batch_shape_is_validated_before_its_first_step():
    @register_likelihood("test-negative-scale", overwrite=True,
                         support=dist.constraints.real)
    def negative(loc):
        return dist.Normal(loc, -torch.ones_like(loc))  # invalid: validation must say so

    vae = small_vae("test-negative-scale")
    trainer = Trainer(Objective(vae, SyncFreeTrace_ELBO(max_plate_nesting=1)), 1e-2)
    before = [p.detach().clone() for p in vae.parameters()]
    with pytest.raises(ValueError, match="scale"):
        trainer.step(torch.randn(4, 16))
    assert all(torch.equal(b, p) for b, p in zip(before, vae.parameters()))  # no update


@pytest.mark.parametrize("network", built_in_networks())
@pytest.mark.parametrize("name", built_in_likelihoods())
def test_an_epoch_with_a_last_smaller_batch_trains_on_every_image(name, network):
    (vae, trainer), _ = trainer_pair(name, network)
    x = values_in_support(name, (70, 16), torch.Generator().manual_seed(2))
    batches = DeviceBatches(x, 32)
    before = [p.detach().clone() for p in vae.parameters()]
    done = fit_epoch(trainer, batches, EpochProgress(batches.permutation(1)))
    assert done.step == 3 == len(batches)  # 32 + 32 + 6, none dropped
    assert torch.isfinite(done.loss_sum) and done.skipped_steps == 0
    assert all(not torch.equal(b, p) for b, p in zip(before, vae.parameters()))


def test_a_non_finite_step_in_a_replayed_graph_is_caught_at_the_end_of_the_epoch():
    (vae, trainer), _ = trainer_pair()
    x = torch.bernoulli(torch.full((64, 16), 0.4))
    batches = DeviceBatches(x, 16)
    trainer.step(x[:16])  # traced
    with torch.no_grad():
        vae.decoder.head.bias[0] = float("nan")
    with pytest.raises(Diverged) as info:
        fit_epoch(trainer, batches, EpochProgress(batches.permutation(1)))
    assert info.value.step == 0


def test_non_finite_parameters_met_by_validation_are_divergence_not_a_model_error():
    (vae, trainer), _ = trainer_pair()
    with torch.no_grad():
        vae.decoder.head.bias[0] = float("nan")
    with pytest.raises(Diverged):  # a new batch shape is validated first: NaN logits
        trainer.step(torch.bernoulli(torch.full((5, 16), 0.4)))


@pytest.mark.parametrize("fast", [True, False], ids=["traced", "eager"])
def test_skip_policy_keeps_parameters_and_adam_state_of_a_non_finite_step(fast):
    (vae, trainer), _ = trainer_pair(nan_policy="skip")
    if not fast:
        trainer = Trainer(trainer.objective, 1e-2, fast=False, nan_policy="skip")
    assert trainer.mode == ("traced" if fast else "eager")  # skipping keeps the fast path
    x = torch.bernoulli(torch.full((8, 16), 0.4))
    trainer.step(x)
    params = [p.detach().clone() for p in vae.parameters()]
    state = [t.clone() for s in trainer.optimizer.state.values() for t in s.values()]
    bad = x.clone()
    bad[0, 0] = float("nan")  # a NaN pixel: the loss and every gradient are NaN
    loss, finite = trainer.step(bad)
    assert not bool(finite) and not torch.isfinite(loss)
    assert all(torch.equal(a, p) for a, p in zip(params, vae.parameters()))
    after = [t for s in trainer.optimizer.state.values() for t in s.values()]
    assert all(torch.equal(a, b) for a, b in zip(state, after))  # step count included
    loss, finite = trainer.step(x)
    assert bool(finite) and any(not torch.equal(a, p) for a, p in zip(params, vae.parameters()))


def test_skipping_from_the_first_step_leaves_adam_as_new():
    (vae, trainer), (ref_vae, ref) = trainer_pair(nan_policy="skip")
    x = torch.bernoulli(torch.full((8, 16), 0.4))
    trainer.validate(x)  # the shape is checked on good data; the bad batch then replays
    _, finite = trainer.step(torch.full((8, 16), float("nan")))
    assert not bool(finite)
    torch.manual_seed(1)
    trainer.step(x)
    torch.manual_seed(1)
    ref.step(x)  # an eager trainer that never met the bad batch
    for p, q in zip(vae.parameters(), ref_vae.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)


def test_a_new_learning_rate_needs_no_retracing():
    (vae, trainer), _ = trainer_pair()
    x = torch.bernoulli(torch.full((8, 16), 0.4))
    trainer.step(x)
    graphs = dict(trainer._replays)
    trainer.set_lr(0.0)  # no update at all with a zero rate
    before = [p.detach().clone() for p in vae.parameters()]
    trainer.step(x)
    assert trainer._replays == graphs
    assert all(torch.equal(b, p) for b, p in zip(before, vae.parameters()))
    assert trainer.optimizer.param_groups[0]["lr"] is trainer.lr


cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                          reason="needs a CUDA device (the CUDA-graph step and the GPU "
                                 "sync check run where one exists)")


@cuda
def test_an_epoch_on_cuda_makes_no_host_sync():
    (vae, trainer), _ = trainer_pair()
    vae.cuda()
    trainer = Trainer(Objective(vae, SyncFreeTrace_ELBO(max_plate_nesting=1), num_data=512),
                      1e-2)
    assert trainer.mode == "cuda-graph"
    x = torch.bernoulli(torch.full((512, 16), 0.4, device="cuda"))
    batches = DeviceBatches(x, 64, dynamic=True)
    for batch in batches.batches(batches.permutation(0)):
        trainer.step(batch)  # warm-up: validation and capture
    progress = EpochProgress(batches.permutation(1))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for index in batches.indices(progress.perm):
            trainer.step(batches.gather(index), index)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@cuda
def test_cuda_graph_training_matches_eager_training_and_resumes_exactly(tmp_path):
    graph = train(tiny_config(epochs=2, device="cuda"), tmp_path / "g", progress=False)
    eager = train(tiny_config(epochs=2, device="cuda", fast_step=False), progress=False)
    # the graph replays the eager step's kernels on the same Philox noise: equal up to the
    # order of cuBLAS's reductions, which may differ between captured and eager calls
    for a, b in zip(graph.metrics, eager.metrics):
        for key in ("train_elbo", "test_elbo", "test_kl"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
    train(tiny_config(epochs=1, device="cuda"), tmp_path / "r", progress=False)
    resumed = train(resume=tmp_path / "r", epochs=2, progress=False)
    assert comparable(resumed.metrics) == comparable(graph.metrics)


@pytest.mark.slow
def test_the_compiled_step_equals_the_traced_step_within_float_rounding(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch.manual_seed(0)
    a, b = small_vae(), small_vae()
    b.load_state_dict(a.state_dict())
    trainers = [Trainer(Objective(v, SyncFreeTrace_ELBO(max_plate_nesting=1), num_data=64),
                        1e-2, compile=c) for v, c in ((a, True), (b, False))]
    x = values_in_support("bernoulli", (8, 16), torch.Generator().manual_seed(1))
    index = torch.arange(8) * 3
    steps_agree(trainers, x, index, rtol=1e-5, atol=1e-4)
    assert trainers[0].compile and trainers[0].compile_seconds > 0
    assert (tmp_path / "inductor").is_dir()  # kept for the next run
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not onednn_available(), reason="this torch has no oneDNN")
def test_the_compiled_step_calls_onednn_s_kernel_not_the_operator_s_python_kernel(
        tmp_path, monkeypatch):
    """Compiled, ``pyro_vae::linear`` is a direct call of oneDNN's kernel (the lowering of
    ``lower_for_inductor``): the operator, which dispatches to Python, is never called."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    compiled = []

    def compile_graph_noted(graph, inputs):
        compiled.append(graph)
        return compile_graph(graph, inputs)

    monkeypatch.setattr(step_module, "compile_graph", compile_graph_noted)
    (vae, _), _ = trainer_pair()
    trainer = Trainer(Objective(vae, SyncFreeTrace_ELBO(max_plate_nesting=1), num_data=64),
                      1e-2, compile=True)
    x = values_in_support("bernoulli", (8, 16), torch.Generator().manual_seed(1))
    trainer.step(x, torch.arange(8))
    [graph] = compiled
    assert any(n.target == torch.ops.pyro_vae.linear.default for n in graph.graph.nodes)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        trainer.step(x, torch.arange(8))
    assert trainer.compile
    assert "pyro_vae::linear" not in {e.name for e in prof.events()}


@pytest.mark.slow
def test_a_compiled_graph_takes_none_where_it_was_traced_with_none(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))

    def f(x, index, y):
        z = x * 2 if index is None else x[index]
        return (z + y).sum(), z

    x, y = torch.rand(5, 3), torch.rand(3)
    graph = make_fx(f, tracing_mode="fake")(x, None, y)
    compiled = compile_graph(graph, [x, None, y])
    x2, y2 = torch.rand(5, 3), torch.rand(3)
    for a, b in zip(compiled(x2, None, y2), f(x2, None, y2), strict=True):
        torch.testing.assert_close(a, b)


def test_a_step_that_cannot_be_compiled_falls_back_to_the_traced_step(monkeypatch, caplog):
    def refuse(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(torch._inductor, "compile", refuse)
    (vae, _), _ = trainer_pair()
    trainer = Trainer(Objective(vae, SyncFreeTrace_ELBO(max_plate_nesting=1), num_data=64),
                      1e-2, compile=True)
    x = values_in_support("bernoulli", (8, 16), torch.Generator().manual_seed(1))
    with caplog.at_level("WARNING", logger="pyro_vae"):
        loss, finite = trainer.step(x, torch.arange(8))
    assert bool(finite) and not trainer.compile and trainer.mode == "traced"
    assert "could not be compiled (no C++ compiler here)" in caplog.text


@pytest.mark.slow
def test_a_compiled_gather_draws_the_eager_gather_s_bits(tmp_path, monkeypatch):
    """Batches of the compiled size come from one fused kernel, the last smaller one from
    the eager function; every batch is the eager gather's, bit for bit."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    x = torch.rand(50, 16)
    compiled, eager = (DeviceBatches(x, 8, dynamic=True) for _ in range(2))
    assert compile_gather(compiled, 8) > 0
    assert compiled.rows is not binarized_rows and compiled.rows_batch == 8
    perm = compiled.permutation(1)
    torch.manual_seed(3)
    fused = list(compiled.batches(perm))
    torch.manual_seed(3)
    reference = list(eager.batches(perm))
    assert [len(b) for b in fused] == [8] * 6 + [2]
    assert all(torch.equal(a, b) for a, b in zip(fused, reference, strict=True))


def test_a_gather_that_cannot_be_compiled_stays_eager(monkeypatch, caplog):
    def refuse(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(torch._inductor, "compile", refuse)
    batches = DeviceBatches(torch.rand(50, 16), 8, dynamic=True)
    with caplog.at_level("WARNING", logger="pyro_vae"):
        assert compile_gather(batches, 8) == 0.0
    assert batches.rows is binarized_rows and batches.rows_batch == 8  # not tried again
    assert "gather could not be compiled (no C++ compiler here)" in caplog.text


@pytest.mark.slow
def test_compiled_training_resumes_exactly_and_records_its_compile_time(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    straight = train(tiny_config(epochs=2, compile_step=True), tmp_path / "a", progress=False)
    assert straight.metrics[0]["compile_seconds"] > 0  # the full batches' shape, in epoch 1
    assert "compile_seconds" not in straight.metrics[1]
    memory = json.loads((tmp_path / "inductor" / "pyro-vae-compiled-steps.json").read_text())
    assert memory == [step_signature(straight.config)]  # a later run compiles sooner
    train(tiny_config(epochs=1, compile_step=True), tmp_path / "b", progress=False)
    resumed = train(resume=tmp_path / "b", epochs=2, progress=False)
    assert comparable(resumed.metrics) == comparable(straight.metrics)


@pytest.mark.slow
def test_with_a_compile_batch_only_that_batch_size_is_compiled(tmp_path, monkeypatch):
    """An epoch's last, smaller batch replays the traced graph instead of compiling."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    (vae, _), _ = trainer_pair()
    trainer = Trainer(Objective(vae, SyncFreeTrace_ELBO(max_plate_nesting=1), num_data=64),
                      1e-2, compile=True, compile_batch=8)
    full, last = (torch.bernoulli(torch.full((n, 16), 0.4)) for n in (8, 5))
    trainer.step(full, torch.arange(8))
    trainer.step(last, torch.arange(5))
    graphs = {key[0][0]: graph for key, graph in trainer._replays.items()}
    assert not isinstance(graphs[8], torch.fx.GraphModule)  # Inductor's
    assert isinstance(graphs[5], torch.fx.GraphModule)
    assert any(n.target == torch.ops.aten._fused_adam_.tensor_lr for n in graphs[5].graph.nodes)


def test_finite_is_true_exactly_when_the_loss_and_every_gradient_are_finite():
    big = torch.full((3, 2), 3e38)  # finite, though its squares (and a 2-norm) overflow
    loss, grads = torch.tensor(-2.5), [torch.ones(4), big, None]
    assert bool(finite(loss, grads))
    for bad in (float("nan"), float("inf"), -float("inf")):
        assert not bool(finite(torch.tensor(bad), grads))
        broken = big.clone()
        broken[1, 0] = bad
        assert not bool(finite(loss, [torch.ones(4), broken]))
    assert bool(finite(loss, []))


def test_identity_views_are_dropped_and_the_graph_computes_the_same_bits():
    aten = torch.ops.aten

    def f(w, x):
        a = aten.alias.default(w)
        same = w.view(w.shape)  # views that keep their input's layout
        e = x.expand(x.shape)
        tt = w.t().t()
        a.mul_(2.0)  # in place, through an alias: every view sees it
        return (tt @ e.t()).sum() + same.sum(), w.t() @ w  # w.t(): a real transpose

    w, x = torch.randn(3, 4), torch.randn(5, 4)
    graph = make_fx(f, tracing_mode="fake")(w, x)
    before = torch.fx.GraphModule(graph, copy.deepcopy(graph.graph))
    assert drop_identity_views(graph) >= 4
    targets = [n.target for n in graph.graph.nodes if n.op == "call_function"]
    assert aten.alias.default not in targets and aten.view.default not in targets
    assert aten.expand.default not in targets and targets.count(aten.t.default) == 2
    w_before, w_after = w.clone(), w.clone()
    expected, got = before(w_before, x), graph(w_after, x)
    assert torch.equal(w_before, w_after)  # the in-place product of the alias kept
    assert all(torch.equal(a, b) for a, b in zip(expected, got))

"""The CPU step's runtime: oneDNN's matrix products (pyro_vae/onednn.py) and glibc's malloc
(runner/allocator.py)."""

import logging
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from pyro_vae import onednn
from pyro_vae.onednn import NARROW, linear_products, onednn_available, use_onednn

from .test_trainer import trainer_pair

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this torch has no oneDNN")
aten = torch.ops.aten
ONEDNN = (torch.ops.pyro_vae.linear.default, torch.ops.mkldnn._linear_pointwise.default)


def products(a, b, w, bias, row_bias, wide):
    return (a @ b, torch.addmm(bias, a, b), torch.addmm(row_bias, a, b), a.t() @ wide,
            a.t() @ a, torch.nn.functional.linear(a, w, bias))


def traced(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(shape, generator=g, dtype=dtype)
            for shape in ((6, 5), (5, 4), (4, 5), (4,), (6, 1), (6, NARROW))]
    return make_fx(products, tracing_mode="fake")(*args), args


def targets(graph):
    return [n.target for n in graph.graph.nodes if n.op == "call_function"]


@needs_onednn
@pytest.mark.parametrize("for_inductor", [False, True], ids=["direct", "custom-op"])
def test_float32_products_are_rewritten_as_onednn_linear_with_the_same_values(for_inductor):
    graph, args = traced()
    want = graph(*args)
    count = use_onednn(graph, for_inductor=for_inductor)
    # a @ b, addmm with a bias over the columns, a.T @ wide, linear; not the row bias,
    # nor a.T @ a (a transposed operand and a narrow product)
    assert count == 4
    assert targets(graph).count(ONEDNN[0 if for_inductor else 1]) == 4
    assert targets(graph).count(aten.addmm.default) == 1
    assert targets(graph).count(aten.mm.default) == 1
    for got, expected in zip(graph(*args), want):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_float64_products_are_left_to_torch():
    graph, _ = traced(torch.float64)
    before = targets(graph)
    assert use_onednn(graph) == 0 and targets(graph) == before


@needs_onednn
def test_a_step_whose_onednn_products_disagree_keeps_torch_s_products(monkeypatch, caplog):
    """The check on the first batch: a rewrite that changes the gradients is not used."""
    def wrong(graph, for_inductor=False):  # doubles every matrix product
        for node in list(graph.graph.nodes):
            if node.target == aten.mm.default:
                users = list(node.users)
                with graph.graph.inserting_after(node):
                    doubled = graph.graph.call_function(aten.mul.Tensor, (node, 2.0))
                for user in users:
                    user.replace_input_with(node, doubled)
        graph.recompile()
        return 1

    monkeypatch.setattr("pyro_vae.runner.step.use_onednn", wrong)
    (fast_vae, fast), (eager_vae, eager) = trainer_pair("bernoulli", "mlp")
    x = torch.bernoulli(torch.full((8, 16), 0.4), generator=torch.Generator().manual_seed(1))
    with caplog.at_level(logging.WARNING, logger="pyro_vae"):
        for step in range(3):
            torch.manual_seed(step)
            loss_fast, _ = fast.step(x)
            torch.manual_seed(step)
            loss_eager, _ = eager.step(x)
            assert torch.equal(loss_fast, loss_eager)
    assert "differ from torch's BLAS" in caplog.text and "keeps torch's BLAS" in caplog.text
    assert all(torch.equal(p, q) for p, q in zip(fast_vae.parameters(), eager_vae.parameters()))


@needs_onednn
def test_a_step_whose_onednn_products_fail_keeps_torch_s_products(monkeypatch, caplog):
    def failing(*args):
        raise RuntimeError("no primitive for this shape")

    def rewrite(graph, for_inductor=False):  # oneDNN's calls, each failing when run
        count = use_onednn(graph, for_inductor)
        for node in graph.graph.nodes:
            if node.target in ONEDNN:
                node.target = failing
        graph.recompile()
        return count

    monkeypatch.setattr("pyro_vae.runner.step.use_onednn", rewrite)
    (_, fast), _ = trainer_pair("bernoulli", "mlp")
    with caplog.at_level(logging.WARNING, logger="pyro_vae"):
        loss, finite = fast.step(torch.bernoulli(torch.full((8, 16), 0.4)))
    assert bool(finite) and "oneDNN's matrix products failed" in caplog.text
    graph = next(iter(fast._replays.values()))
    assert failing not in targets(graph) and aten.mm.default in targets(graph)


@needs_onednn
def test_a_first_batch_with_a_non_finite_gradient_keeps_torch_s_products():
    """Nothing to compare oneDNN's products with: the BLAS graph is kept."""
    (_, fast), _ = trainer_pair("bernoulli", "mlp")
    x, index = torch.randn(8, 16), torch.arange(8)

    def step(*args):  # (*state, x, index) -> (loss, finite, a product), the loss not finite
        *_, xb, _ = args
        loss = xb.sum() / 0.0 * 0.0
        return loss, torch.isfinite(loss), xb @ xb.t()

    graph = make_fx(step, tracing_mode="fake")(*fast._step_inputs(), x, index)
    kept = fast._with_onednn((tuple(x.shape),), graph, x, index)
    assert kept is graph and aten.mm.default in targets(kept)


def test_without_onednn_nothing_is_rewritten(monkeypatch):
    monkeypatch.setattr(onednn, "onednn_available", lambda: False)
    graph, _ = traced()
    assert use_onednn(graph) == 0


@needs_onednn
def test_linear_without_gradients_runs_on_onednn_with_the_same_values(monkeypatch):
    calls = []
    kernel = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise",
                        lambda *a: calls.append(a[0].shape) or kernel(*a))
    layer = torch.nn.Linear(7, 5)
    x = torch.randn(3, 4, 7)  # leading dimensions are flattened and restored
    with torch.no_grad():
        want = [layer(x), layer(x[0, 0]), torch.nn.functional.linear(x, layer.weight)]
        with linear_products():
            got = [layer(x), layer(x[0, 0]), torch.nn.functional.linear(x, layer.weight),
                   layer(x.double().float()), layer.double()(x.double())]
    assert calls == [(12, 7), (1, 7), (12, 7), (12, 7)]  # not the float64 layer
    for g, w in zip(got, want + [want[0], want[0].double()]):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@needs_onednn
def test_linear_with_gradients_is_left_to_torch(monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise",
                        lambda *a: pytest.fail("oneDNN called with gradients on"))
    layer = torch.nn.Linear(7, 5)
    with linear_products():
        out = layer(torch.randn(3, 7))
    out.sum().backward()
    assert layer.weight.grad is not None


def test_importance_sampled_log_p_x_is_the_same_with_onednn_s_products(monkeypatch):
    """The estimate on oneDNN against the same estimate on torch's BLAS (the mode
    switched off), same seed: equal to float32 rounding."""
    from pyro_vae import VAE
    from pyro_vae.estimators import importance_log_likelihood

    torch.manual_seed(0)
    vae = VAE(x_dim=16, z_dim=2, hidden_dims=(8,))
    x = torch.bernoulli(torch.full((6, 16), 0.4))
    fast = importance_log_likelihood(vae, x, num_samples=50, seed=3)
    monkeypatch.setattr(onednn, "onednn_available", lambda: False)
    blas = importance_log_likelihood(vae, x, num_samples=50, seed=3)
    torch.testing.assert_close(fast, blas, rtol=1e-5, atol=1e-5)


# -- glibc's malloc ---------------------------------------------------------------------------

FAULTS = textwrap.dedent("""
    import resource, sys, torch
    from pyro_vae.runner.allocator import M_MMAP_THRESHOLD, _mallopt, keep_freed_memory
    # glibc's starting threshold, held fixed: every buffer above 128 KiB is mapped for
    # itself and unmapped when freed (glibc's adaptive default faults on some heap layouts
    # and not on others, so it cannot be the test's reference)
    _mallopt()(M_MMAP_THRESHOLD, 128 * 1024)
    kept = keep_freed_memory() if sys.argv[1] == "keep" else None
    def step():  # a step's intermediates: a dozen (1024, 784) buffers, then freed
        buffers = [torch.empty(1024 * 784).fill_(1.0) for _ in range(12)]
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        step()
    counts = []
    for _ in range(21):
        before = faults()
        step()
        counts.append(faults() - before)
    # the median step: a one-time event of the process (a thread's first stack pages, a
    # lazy initialization) lands in one step only
    print(kept, sorted(counts)[10])
""")


def page_faults_per_step(*args, env=None):
    result = subprocess.run([sys.executable, "-c", FAULTS, *args], capture_output=True,
                            text=True, env=env, check=True)
    kept, faults = result.stdout.split()
    return kept, float(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_kept_freed_memory_makes_a_step_s_buffers_fault_free():
    """Counted, not timed: the page faults of a step's buffers (the median step's), which
    glibc at its starting threshold returns to the kernel and maps again (thousands per
    step)."""
    _, default = page_faults_per_step("default")
    kept, faults = page_faults_per_step("keep")
    assert kept == "True" and faults < 10 and default > 1000, (faults, default)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_malloc_setting_of_the_user_s_own_is_left_as_it_is():
    import os

    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "131072"}
    kept, _ = page_faults_per_step("keep", env=env)
    assert kept == "False"

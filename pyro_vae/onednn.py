"""Float32 matrix products on the CPU through oneDNN instead of torch's BLAS.

torch's CPU ``mm``, ``addmm`` and ``linear`` call the BLAS torch was built with (MKL in the
PyPI wheels). On the project's AMD EPYC CPU that BLAS ran the VAE's products at 150-215
GFLOP/s, while oneDNN -- built into the same wheels, the kernel Inductor uses for frozen
linear layers, exposed as ``torch.ops.mkldnn._linear_pointwise`` -- ran them at 300-480
(``python -m scripts.matmul_kernels`` measures both for each product of a step). Two uses:

- training: :func:`use_onednn` rewrites a traced graph's float32 products into oneDNN
  calls; :class:`~pyro_vae.runner.step.Trainer` keeps the rewrite only where the rewritten
  graph gives the traced graph's loss and gradients to float32 rounding on the first batch,
  and says so in one logged line otherwise;
- evaluation: inside :func:`linear_products`, ``F.linear`` (every ``nn.Linear``) without
  gradients runs on oneDNN; importance-sampled ``log p(x)`` and the test ELBO use it.

``linear(a, w, bias)`` computes ``a @ w.T + bias``: ``mm(a, b)`` is ``linear(a, b.T)``, and
``addmm(bias, a, b)`` with a bias over the columns is ``linear(a, b.T, bias)``. The
transpose of ``b`` is a view; a left operand that is not contiguous (``g.T @ x``, a
weight's gradient) oneDNN copies first: still faster than the BLAS for the wide products,
3x slower for a narrow one (fewer than ``NARROW`` output columns), which stays as it is.
The rule depends on shapes only, never on timings, so every run of a model makes the same
choice and resumes bit for bit.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import fx
from torch.overrides import TorchFunctionMode

aten = torch.ops.aten
# products with fewer output columns whose left operand is transposed stay with the BLAS:
# oneDNN copies that operand first, and for (400, B) @ (B, 20), a gradient of the
# encoder's last layer, that took 3x the BLAS's time (scripts.matmul_kernels)
NARROW = 64


def onednn_available() -> bool:
    """oneDNN is built into this torch and offers its linear kernel."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn,
                                                            "_linear_pointwise")


def _float32_cpu(node) -> bool:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(value, torch.Tensor) and value.dtype == torch.float32 \
        and value.device.type == "cpu" and value.dim() == 2 and value.numel() > 0


def _linear_args(node: fx.Node):
    """``(a, b, bias)`` of a product that oneDNN's linear computes as it is, else None."""
    if node.target == aten.mm.default and len(node.args) == 2 and not node.kwargs:
        a, b = node.args
        bias = None
    elif node.target == aten.addmm.default and len(node.args) == 3 and not node.kwargs:
        bias, a, b = node.args
        shape = getattr(bias.meta.get("val"), "shape", None) if isinstance(bias, fx.Node) \
            else None
        if shape is None or tuple(shape) != (node.meta["val"].shape[1],):
            return None  # only a bias over the columns, broadcast over the rows
    else:
        return None
    if not all(_float32_cpu(n) for n in (node, a, b)):
        return None
    if not a.meta["val"].is_contiguous() and node.meta["val"].shape[1] < NARROW:
        return None  # oneDNN's copy of a transposed operand outweighs a narrow product
    return a, b, bias


# ``pyro_vae::linear(a, w, bias) = a @ w.T + bias`` by oneDNN, as an operator of its own:
# Inductor, whose lowering of oneDNN's kernel takes constant weights only, calls it as an
# external kernel (oneDNN's C++ entry point itself after lower_for_inductor) and fuses
# around it. A plain CPU kernel (no autograd: it runs inside traced steps without
# gradients), registered through torch.library: about 2 us a call over oneDNN's own,
# where ``torch.library.custom_op``'s Python wrappers took 5.
_LIBRARY = torch.library.Library("pyro_vae", "DEF")
_LIBRARY.define("linear(Tensor a, Tensor w, Tensor? bias) -> Tensor")


def linear(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``a @ w.T + bias`` by oneDNN's linear kernel (``pyro_vae::linear`` on the CPU)."""
    return torch.ops.mkldnn._linear_pointwise(a, w, bias, "none", [], "")


_LIBRARY.impl("linear", linear, "CPU")


@torch.library.register_fake("pyro_vae::linear")
def _(a, w, bias):
    return a.new_empty((a.shape[0], w.shape[0]))


_lowered = False


def lower_for_inductor() -> bool:
    """Have Inductor compile ``pyro_vae::linear`` into a direct call of oneDNN's kernel
    (the C++ entry point it has for its own frozen linear layers), instead of a call of
    the operator's Python kernel: 5-6 us less a product in torch.profiler, ten products a
    step, 3% of the compiled step at batch 128. Once per process; ``False`` where this
    torch's Inductor lacks what it takes (it then calls the Python kernel: the same
    numbers)."""
    global _lowered
    if _lowered:
        return True
    try:
        from torch._inductor import ir
        from torch._inductor.lowering import register_lowering
        from torch._inductor.mkldnn_ir import LinearUnary
    except ImportError:
        return False

    def lowering(a, w, bias):
        # the left operand contiguous, as use_onednn leaves it; the weight as it comes
        # (often a transposed view, which oneDNN reads in place: a copy would cost more)
        a = ir.ExternKernel.require_contiguous(ir.ExternKernel.realize_input(a))
        w = ir.ExternKernel.realize_input(w)
        inputs, constants = [a, w], ["none", [-1], ""]  # mkldnn_ir.LinearUnary's layout
        if bias is None:
            constants.insert(0, None)
        else:
            inputs.append(ir.ExternKernel.require_contiguous(
                ir.ExternKernel.realize_input(bias)))
        size = [a.get_size()[0], w.get_size()[0]]
        layout = ir.FixedLayout(device=a.get_device(), dtype=a.get_dtype(), size=size)
        return ir.TensorBox.create(LinearUnary(layout=layout, inputs=inputs,
                                               constant_args=constants))

    try:
        register_lowering(torch.ops.pyro_vae.linear.default)(lowering)
    except (AttributeError, TypeError, RuntimeError):
        return False
    _lowered = True
    return True


def use_onednn(graph: fx.GraphModule, for_inductor: bool = False) -> int:
    """Rewrite ``graph``'s float32 CPU ``mm`` / ``addmm`` as oneDNN linear products, in
    place; return how many were rewritten (0 without oneDNN). They call oneDNN's kernel
    directly, or, ``for_inductor``, through the operator ``pyro_vae::linear``."""
    if not onednn_available():
        return 0
    count = 0
    for node in list(graph.graph.nodes):
        args = _linear_args(node) if node.op == "call_function" else None
        if args is None:
            continue
        a, b, bias = args
        with graph.graph.inserting_before(node):
            weight = graph.graph.call_function(aten.t.default, (b,))
            if for_inductor:
                if not a.meta["val"].is_contiguous():
                    a = graph.graph.call_function(
                        aten.clone.default, (a,), {"memory_format": torch.contiguous_format})
                product = graph.graph.call_function(torch.ops.pyro_vae.linear.default,
                                                    (a, weight, bias))
            else:
                product = graph.graph.call_function(
                    torch.ops.mkldnn._linear_pointwise.default,
                    (a, weight, bias, "none", [], ""))
        product.meta = dict(node.meta)
        node.replace_all_uses_with(product)
        graph.graph.erase_node(node)
        count += 1
    if count:
        graph.graph.lint()
        graph.recompile()
    return count


class _LinearOnOneDNN(TorchFunctionMode):
    """``F.linear`` of float32 CPU tensors without gradients through oneDNN; everything
    else as it is."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and not torch.is_grad_enabled():
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if x.dtype == weight.dtype == torch.float32 and x.device.type == "cpu" \
                    and weight.device.type == "cpu" and x.dim() >= 1 and x.numel() > 0 \
                    and (bias is None or bias.dtype == torch.float32):
                flat = x.reshape(-1, x.shape[-1])
                out = torch.ops.mkldnn._linear_pointwise(flat, weight, bias, "none", [], "")
                return out.reshape(*x.shape[:-1], weight.shape[0])
        return func(*args, **kwargs)


@contextlib.contextmanager
def linear_products():
    """Within the block, ``F.linear`` without gradients (float32, CPU) runs on oneDNN:
    the same values to float32 rounding, about 1.4x faster importance sampling on the
    project's CPU (docs/benchmarks.md). A no-op without oneDNN. Every torch call in the
    block passes through the mode (about a microsecond each): meant for blocks of few,
    large operations."""
    if not onednn_available():
        yield
        return
    with _LinearOnOneDNN():
        yield

"""The fused CPU engine's plain layers: one autograd Function per layer.

:class:`FusedLayer` runs one layer (one or both directions, input projection included) through
the compiled time loops and gives autograd a hand-written backward (``csrc/lstm.cpp`` & co.
derive it): the forward keeps the gate activations and the few states that backward needs,
and no autograd graph. :func:`layer` is what the driver (``engines/driver.py``) calls per
layer; the driver stacks the layers with torch's inter-layer dropout between them. A double
backward (``create_graph=True``) recomputes the layer with the reference engine's torch ops
and differentiates that graph, so gradients of gradients work on this engine too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rnnkit.engines.cpu.build import kernels
from rnnkit.engines.cpu.ops import op_batch_sizes
from rnnkit.engines.driver import LayerCall
from rnnkit.engines.grads import (
    backward_needs_graph,
    batched_grads,
    grad_or_zeros,
    graph_grads,
    regrads,
)
from rnnkit.engines.reference import flat_layer_graph
from rnnkit.modes import MODES
from rnnkit.resets import restarts_of

__all__ = ["FusedLayer", "layer"]

_LSTM = MODES["LSTM"].code
_NAMES = {m.code: m.name for m in MODES.values()}


def _wide(weights) -> list[Tensor]:
    """A bfloat16 layer's weights (``engines/cpu/__init__.py``) in float32, as the reference
    engine's ops take them beside its float32 input; other weights as they are."""
    return [w.float() if w.dtype == torch.bfloat16 else w for w in weights]


def _reference_graph(mode: int, batch_sizes, has_bias, x, h0, c0, restart, weights):
    """The layer again on the reference engine's ops, as an autograd graph: what a double
    backward differentiates (``restart``: the directions' codes ``[D, R]``, or None; a
    bfloat16 layer's weights widened to float32 inside the graph)."""
    weights = _wide(weights)
    restarts = None if restart is None else tuple(restarts_of(codes) for codes in restart)
    return flat_layer_graph(_NAMES[mode], batch_sizes, has_bias, x, h0, c0, weights, restarts)


class FusedLayer(torch.autograd.Function):
    """One layer over all its steps: ``x`` ``[R, H_in]`` rows in time-major (or packed) order.

    ``h0`` is ``[D, N, H_out]``, ``c0`` ``[D, N, H]`` for LSTM (else None), ``restart`` the
    directions' restart codes ``[D, R]`` int8 (:mod:`rnnkit.resets`) or None, ``weights`` the
    layer's slice of ``_flat_weights``. Returns ``out`` ``[R, D*H_out]``, ``h_n``, ``c_n``
    (LSTM; else an empty placeholder) and the buffers that backward needs, which take no
    gradient. ``mode``, ``batch_sizes`` and ``has_bias`` are plain Python values kept on
    ``ctx``. A ``forward`` without ``ctx`` (``setup_context`` keeps what backward needs) and
    the ops' batching rules (``func.py``) let torch.func transform it: under ``vmap``, forward
    and backward run through those rules.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(mode, batch_sizes, has_bias, x, h0, c0, restart, *weights):
        return tuple(
            kernels().layer_forward(
                mode,
                x,
                h0,
                c0,
                list(weights),
                op_batch_sizes(batch_sizes),
                has_bias,
                True,
                restart,
            )
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        mode, batch_sizes, has_bias, x, h0, c0, restart, *weights = inputs
        out, h_n, c_n, *saved = output
        ctx.mode, ctx.batch_sizes, ctx.has_bias = mode, batch_sizes, has_bias
        ctx.n_weights = len(weights)
        ctx.save_for_backward(x, h0, c0, restart, out, *weights, *saved)
        ctx.mark_non_differentiable(*saved, *([c_n] if mode != _LSTM else []))
        # gradients of the saved buffers are never used: no zeros for them
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_out, grad_hn, grad_cn, *_):
        x, h0, c0, restart, out, *rest = ctx.saved_tensors
        weights, saved = rest[: ctx.n_weights], rest[ctx.n_weights :]
        grad_out = grad_or_zeros(grad_out, out)
        grad_hn = grad_or_zeros(grad_hn, h0)
        grad_cn = grad_or_zeros(grad_cn, c0) if ctx.mode == _LSTM else None
        grads = (grad_out, grad_hn) if grad_cn is None else (grad_out, grad_hn, grad_cn)
        need = ctx.needs_input_grad
        if batched_grads(grads):
            # a batch of gradients: torch's ops have batching rules there, the kernels none
            def recompute(x, h0, c0, *weights):
                return _reference_graph(
                    ctx.mode, ctx.batch_sizes, ctx.has_bias, x, h0, c0, restart, weights
                )

            inputs = [x, h0, c0, *weights]
            needs = (*need[3:6], *need[7:])
            return (*_nones(3), *_with_restart(regrads(recompute, grads, inputs, needs)))
        if backward_needs_graph([x, h0, c0, *weights, *grads]):
            # create_graph=True: the gradient must itself be differentiable, which the compiled
            # loops are not; recompute the layer as a graph of torch ops and differentiate that.
            grads = _double_backward(ctx, x, h0, c0, restart, weights, grads)
            return (*_nones(3), *_with_restart(grads))
        reuse_saved = _saved_die_here()
        dx, dh0, dc0, *dweights = kernels().layer_backward(
            ctx.mode, grad_out, grad_hn, grad_cn, x, h0, c0, list(weights), out, list(saved),
            op_batch_sizes(ctx.batch_sizes), ctx.has_bias, need[3], reuse_saved, restart,
        )  # fmt: skip
        dweights = [
            g.to(w.dtype) if n else None
            for g, w, n in zip(dweights, weights, need[7:], strict=True)
        ]
        return (
            None, None, None,
            dx if need[3] else None,
            dh0 if need[4] else None,
            dc0 if ctx.mode == _LSTM and need[5] else None,
            None,
            *dweights,
        )  # fmt: skip


def _saved_die_here() -> bool:
    """True when the saved buffers die with this backward call (no ``retain_graph``), as
    torch's own compiled autograd assumes (``saved_tensors_use_once``): the kernels may then
    write the gate gradients over them. Under torch.compile, and on a torch without this
    private query, it says False and the kernels allocate."""
    if torch.compiler.is_compiling():
        return False
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return keep_graph is not None and not keep_graph()


def _double_backward(ctx, x, h0, c0, restart, weights, grads):
    """Gradients as a graph (``create_graph=True``): the same layer recomputed with the
    reference engine's torch ops on the saved inputs, and differentiated by autograd. Returns
    those of ``x, h0, c0, *weights``."""
    out, h_n, c_n = _reference_graph(
        ctx.mode, ctx.batch_sizes, ctx.has_bias, x, h0, c0, restart, weights
    )
    outputs = (out, h_n) if c_n is None else (out, h_n, c_n)
    inputs = [x, h0, c0, *weights]
    need = ctx.needs_input_grad
    return graph_grads(outputs, grads, inputs, (*need[3:6], *need[7:]))


def _nones(n: int) -> tuple[None, ...]:
    return (None,) * n


def _with_restart(grads) -> tuple:
    """The gradients of ``x, h0, c0, *weights`` with None for ``restart`` (after ``c0``)."""
    grads = tuple(grads)
    return (*grads[:3], None, *grads[3:])


def layer(lc: LayerCall) -> tuple[Tensor, Tensor, Tensor | None]:
    """One plain layer under the driver: through :class:`FusedLayer` when a gradient is
    wanted, else straight to the kernels, which then keep nothing for backward."""
    mode = MODES[lc.mode].code
    x, h0 = lc.rows().contiguous(), lc.h0.contiguous()
    c0 = None if lc.c0 is None else lc.c0.contiguous()
    weights = [t for p in lc.params for t in p.to_flat()]
    has_bias = lc.params[0].b_ih is not None
    batch_sizes = list(lc.batch_sizes)
    restart = None if lc.restart is None else torch.stack([r.codes for r in lc.restart])
    tensors = [x, h0, *weights] if c0 is None else [x, h0, c0, *weights]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        out, h_n, c_n, *_ = FusedLayer.apply(
            mode, batch_sizes, has_bias, x, h0, c0, restart, *weights
        )
    else:
        out, h_n, c_n = kernels().layer_forward(
            mode, x, h0, c0, weights, op_batch_sizes(batch_sizes), has_bias, False, restart
        )
    return lc.shaped(out), h_n, c_n if mode == _LSTM else None

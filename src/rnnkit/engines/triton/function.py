"""The Triton engine's plain layers: one autograd Function per layer.

:class:`TritonLayer` runs one layer (one or both directions) through the loops of
``recurrence.py`` and gives autograd a hand-written backward: the forward keeps the gate
activations (and LSTM cell states) that backward needs, and no autograd graph. :func:`layer`
is what the driver (``engines/driver.py``) calls per layer; the driver stacks the layers with
torch's inter-layer dropout between them. A double backward
(``create_graph=True``) recomputes the layer with the reference engine's torch ops and
differentiates that graph. Resets inside a sequence reach the loops as each direction's
restart codes (``LayerCall.restart``), which the Function saves as tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rnnkit.cells import split_layer
from rnnkit.engines.driver import LayerCall
from rnnkit.engines.grads import batched_grads, graph_grads, regrads
from rnnkit.engines.reference import flat_layer_graph
from rnnkit.engines.triton import launch, recurrence
from rnnkit.engines.triton.launch import acc_dtype
from rnnkit.resets import Restarts

__all__ = ["TritonLayer", "layer"]


def layer_forward(mode, x, h0, c0, weights, plans, has_bias, train, restart=None):
    """One layer: ``x`` [R, H_in] rows, ``h0`` [D, N, H_out], ``c0`` [D, N, H] (LSTM),
    ``restart`` per direction its :class:`~rnnkit.resets.Restarts` (or None). Returns ``out``
    [R, D*H_out], ``h_n``, ``c_n`` (or None) and per direction the saved buffers."""
    D, _, H_out = h0.shape
    out = x.new_empty(x.size(0), D * H_out)
    ws = split_layer(weights, D, has_bias)
    h_n, c_n, saved = [], [], []
    for d in range(D):
        out_d = out[:, d * H_out : (d + 1) * H_out]
        c0_d = None if c0 is None else c0[d]
        r = None if restart is None else restart[d]
        h, c, keep = recurrence.forward_direction(
            mode, x, h0[d], c0_d, ws[d], plans[d], out_d, train, r
        )
        h_n.append(h)
        c_n.append(c)
        saved.append(keep)
    return out, torch.stack(h_n), None if c0 is None else torch.stack(c_n), saved


def _reference_graph(mode, batch_sizes, has_bias, x, h0, c0, weights, restart=None):
    """The layer again on the reference engine's ops, as an autograd graph."""
    out, h_n, c_n = flat_layer_graph(mode, batch_sizes, has_bias, x, h0, c0, weights, restart)
    return (out, h_n) if c_n is None else (out, h_n, c_n)


class TritonLayer(torch.autograd.Function):
    """One layer over all its steps: ``x`` ``[R, H_in]`` rows in time-major (or packed) order,
    ``h0`` ``[D, N, H_out]``, ``c0`` ``[D, N, H]`` for LSTM (else None), ``weights`` the layer's
    slice of ``_flat_weights``. Returns ``out`` ``[R, D*H_out]``, ``h_n`` and (LSTM) ``c_n``.
    ``static`` holds the plain values ``(mode, batch_sizes, plans, has_bias, steps)``, with
    ``steps`` per direction the steps of its restart codes (``Restarts.steps``) or None
    without resets; ``codes`` are the directions' restart codes (``Restarts.codes``) or
    None."""

    @staticmethod
    def forward(ctx, static, codes, x, h0, c0, *weights):
        mode, _, plans, has_bias, _ = static
        restart = _restarts(static, codes)
        out, h_n, c_n, saved = layer_forward(
            mode, x, h0, c0, weights, plans, has_bias, True, restart
        )
        ctx.static = static
        ctx.counts = (len(weights), [len(s) for s in saved])
        ctx.save_for_backward(
            x, h0, c0, out, *(codes or ()), *weights, *(t for s in saved for t in s)
        )
        return (out, h_n, c_n) if mode == "LSTM" else (out, h_n)

    @staticmethod
    def backward(ctx, grad_out, grad_hn, grad_cn=None):
        x, h0, c0, out, *rest = ctx.saved_tensors
        steps = ctx.static[4]
        n_codes = 0 if steps is None else len(steps)
        restart = _restarts(ctx.static, rest[:n_codes])
        rest = rest[n_codes:]
        n_weights, n_saved = ctx.counts
        weights = rest[:n_weights]
        grads = (grad_out, grad_hn, grad_cn)
        if batched_grads(grads):
            # a batch of gradients: torch's ops have batching rules there, the kernels none
            mode, batch_sizes, _, has_bias, _ = ctx.static

            def recompute(x, h0, c0, *weights):
                return _reference_graph(mode, batch_sizes, has_bias, x, h0, c0, weights, restart)

            inputs = [x, h0, c0, *weights]
            return (None, None, *regrads(recompute, grads, inputs, ctx.needs_input_grad[2:]))
        if torch.is_grad_enabled():
            # create_graph=True: the gradient must itself be differentiable, which the kernels
            # are not; recompute the layer as a graph of torch ops and differentiate that.
            grads = _double_backward(ctx, x, h0, c0, weights, restart, grads)
            return (None, None, *grads)
        saved, start = [], n_weights
        for n in n_saved:
            saved.append(rest[start : start + n])
            start += n
        with launch.on_device(x):
            grads = _backward(ctx, x, h0, c0, out, weights, saved, restart, grads)
        return (None, *grads)


def _restarts(static, codes) -> tuple[Restarts, ...] | None:
    """The directions' :class:`~rnnkit.resets.Restarts` of a :class:`TritonLayer`."""
    steps = static[4]
    if steps is None:
        return None
    return tuple(recurrence.restarts_of(c, s) for c, s in zip(codes, steps, strict=True))


def _backward(ctx, x, h0, c0, out, weights, saved, restart, grads):
    """The hand-written backward of :class:`TritonLayer`: per direction the reverse-time loop,
    then the weight and input gradients over all rows."""
    mode, _, plans, has_bias, _ = ctx.static
    grad_out, grad_hn, grad_cn = grads
    # the inputs after the codes: static, x, h0, c0, *weights
    need = (ctx.needs_input_grad[0], *ctx.needs_input_grad[2:])
    D, _, H_out = h0.shape
    ws = split_layer(weights, D, has_bias)
    grad_out = grad_out.contiguous()
    dx, dh0, dc0, dweights = None, [], [], []
    for d in range(D):
        cols = slice(d * H_out, (d + 1) * H_out)
        dh = grad_hn[d].clone(memory_format=torch.contiguous_format)
        dc = None
        if mode == "LSTM":
            dc = grad_cn[d].to(acc_dtype(x.dtype), copy=True)
        c0_d = None if c0 is None else c0[d]
        r = None if restart is None else restart[d]
        dG, dhs = recurrence.backward_direction(
            mode, grad_out[:, cols], dh, dc, h0[d], c0_d, ws[d], plans[d], out[:, cols],
            saved[d], r,
        )  # fmt: skip
        dx_d, grads = recurrence.weight_grads(
            mode, dG, dhs, x, h0[d], ws[d], plans[d], out[:, cols], saved[d], need[1], r
        )
        dx = dx_d if dx is None else dx.add_(dx_d)
        dh0.append(dh)
        dc0.append(None if dc is None else dc.to(x.dtype))
        dweights += grads
    dweights = [g if n else None for g, n in zip(dweights, need[4:], strict=True)]
    return (
        None,
        dx if need[1] else None,
        torch.stack(dh0) if need[2] else None,
        torch.stack(dc0) if mode == "LSTM" and need[3] else None,
        *dweights,
    )


def _double_backward(ctx, x, h0, c0, weights, restart, grads):
    """Gradients as a graph: the same layer recomputed with the reference engine's torch ops
    on the saved inputs, differentiated by autograd."""
    mode, batch_sizes, _, has_bias, _ = ctx.static
    outputs = _reference_graph(mode, batch_sizes, has_bias, x, h0, c0, weights, restart)
    inputs = [x, h0, c0, *weights]
    return graph_grads(outputs, grads[: len(outputs)], inputs, ctx.needs_input_grad[2:])


def triton_layer(mode, x, h0, c0, weights, batch_sizes, plans, has_bias, restart=None):
    """Run one layer: through :class:`TritonLayer` when a gradient is wanted, else straight
    through the loops, which then keep nothing for backward. An empty batch has nothing to
    launch: the reference's ops give it its (empty) outputs and graph."""
    x, h0 = x.contiguous(), h0.contiguous()
    c0 = None if c0 is None else c0.contiguous()
    if x.size(0) == 0:
        return _reference_graph(mode, batch_sizes, has_bias, x, h0, c0, weights, restart)
    tensors = [x, h0, *weights] if c0 is None else [x, h0, c0, *weights]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        steps = None if restart is None else tuple(r.steps for r in restart)
        codes = None if restart is None else [r.codes for r in restart]
        static = (mode, batch_sizes, plans, has_bias, steps)
        return TritonLayer.apply(static, codes, x, h0, c0, *weights)
    out, h_n, c_n, _ = layer_forward(mode, x, h0, c0, weights, plans, has_bias, False, restart)
    return (out, h_n, c_n) if mode == "LSTM" else (out, h_n)


def layer(lc: LayerCall) -> tuple[Tensor, Tensor, Tensor | None]:
    """One plain layer under the driver, on the input's CUDA device, with autocast off (a
    layer under autocast arrives cast whole, in the dtype torch's kernel runs it in)."""
    with launch.on_device(lc.x), torch.autocast(lc.x.device.type, enabled=False):
        x = lc.rows()
        plans = [lc.plan(d) for d in range(lc.D)] if x.size(0) else None
        weights = [t for p in lc.params for t in p.to_flat()]
        has_bias = lc.params[0].b_ih is not None
        out, h_n, *c_n = triton_layer(
            lc.mode, x, lc.h0, lc.c0, weights, list(lc.batch_sizes), plans, has_bias, lc.restart
        )
    return lc.shaped(out), h_n, c_n[0] if c_n else None

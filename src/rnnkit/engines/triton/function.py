"""The Triton engine's autograd layer and its driver over layers.

:class:`TritonLayer` runs one layer (one or both directions) through the per-step loops of
``recurrence.py`` and gives autograd a hand-written backward: the forward keeps the gate
activations (and LSTM cell states) that backward needs, and no autograd graph. :func:`run_rnn`
stacks the layers with torch's inter-layer dropout between them. A double backward
(``create_graph=True``) recomputes the layer with the reference engine's torch ops and
differentiates that graph.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

from rnnkit.engines.base import RNNCall, RNNResult, time_major
from rnnkit.engines.reference import run_packed_layer
from rnnkit.engines.triton import recurrence
from rnnkit.engines.triton.launch import acc_dtype
from rnnkit.engines.triton.recurrence import Plan, make_plan, split_weights
from rnnkit.functional import gather_params
from rnnkit.variants import PLAIN


def on_device(t: Tensor):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def layer_forward(mode, x, h0, c0, weights, plans, has_bias, train):
    """One layer: ``x`` [R, H_in] rows, ``h0`` [D, N, H_out], ``c0`` [D, N, H] (LSTM).
    Returns ``out`` [R, D*H_out], ``h_n``, ``c_n`` (or None) and per direction the saved
    buffers."""
    D, _, H_out = h0.shape
    out = x.new_empty(x.size(0), D * H_out)
    ws = split_weights(weights, D, has_bias)
    h_n, c_n, saved = [], [], []
    for d in range(D):
        out_d = out[:, d * H_out : (d + 1) * H_out]
        c0_d = None if c0 is None else c0[d]
        h, c, keep = recurrence.forward_direction(
            mode, x, h0[d], c0_d, ws[d], plans[d], out_d, train
        )
        h_n.append(h)
        c_n.append(c)
        saved.append(keep)
    return out, torch.stack(h_n), None if c0 is None else torch.stack(c_n), saved


def _reference_graph(mode, batch_sizes, has_bias, x, h0, c0, weights):
    """The layer again on the reference engine's ops, as an autograd graph."""
    D = h0.size(0)
    params = gather_params(mode, weights, has_bias, 1, D, PLAIN)
    states = [(h0[d], c0[d]) if mode == "LSTM" else h0[d] for d in range(D)]
    out, finals = run_packed_layer(mode, x, batch_sizes, states, params)
    if mode == "LSTM":
        return out, torch.stack([f[0] for f in finals]), torch.stack([f[1] for f in finals])
    return out, torch.stack(finals)


class TritonLayer(torch.autograd.Function):
    """One layer over all its steps: ``x`` ``[R, H_in]`` rows in time-major (or packed) order,
    ``h0`` ``[D, N, H_out]``, ``c0`` ``[D, N, H]`` for LSTM (else None), ``weights`` the layer's
    slice of ``_flat_weights``. Returns ``out`` ``[R, D*H_out]``, ``h_n`` and (LSTM) ``c_n``.
    ``static`` holds the plain values ``(mode, batch_sizes, plans, has_bias)``."""

    @staticmethod
    def forward(ctx, static, x, h0, c0, *weights):
        mode, _, plans, has_bias = static
        out, h_n, c_n, saved = layer_forward(mode, x, h0, c0, weights, plans, has_bias, True)
        ctx.static = static
        ctx.counts = (len(weights), [len(s) for s in saved])
        ctx.save_for_backward(x, h0, c0, out, *weights, *(t for s in saved for t in s))
        return (out, h_n, c_n) if mode == "LSTM" else (out, h_n)

    @staticmethod
    def backward(ctx, grad_out, grad_hn, grad_cn=None):
        x, h0, c0, out, *rest = ctx.saved_tensors
        n_weights, n_saved = ctx.counts
        weights = rest[:n_weights]
        if torch.is_grad_enabled():
            # create_graph=True: the gradient must itself be differentiable, which the kernels
            # are not; recompute the layer as a graph of torch ops and differentiate that.
            grads = _double_backward(ctx, x, h0, c0, weights, (grad_out, grad_hn, grad_cn))
            return (None, *grads)
        saved, start = [], n_weights
        for n in n_saved:
            saved.append(rest[start : start + n])
            start += n
        with on_device(x):
            return _backward(ctx, x, h0, c0, out, weights, saved, (grad_out, grad_hn, grad_cn))


def _backward(ctx, x, h0, c0, out, weights, saved, grads):
    """The hand-written backward of :class:`TritonLayer`: per direction the reverse-time loop,
    then the weight and input gradients over all rows."""
    mode, _, plans, has_bias = ctx.static
    grad_out, grad_hn, grad_cn = grads
    need = ctx.needs_input_grad
    D, _, H_out = h0.shape
    ws = split_weights(weights, D, has_bias)
    grad_out = grad_out.contiguous()
    dx, dh0, dc0, dweights = None, [], [], []
    for d in range(D):
        cols = slice(d * H_out, (d + 1) * H_out)
        dh = grad_hn[d].clone(memory_format=torch.contiguous_format)
        dc = None
        if mode == "LSTM":
            dc = grad_cn[d].to(acc_dtype(x.dtype), copy=True)
        c0_d = None if c0 is None else c0[d]
        dG, dhs = recurrence.backward_direction(
            mode, grad_out[:, cols], dh, dc, h0[d], c0_d, ws[d], plans[d], out[:, cols],
            saved[d],
        )  # fmt: skip
        dx_d, grads = recurrence.weight_grads(
            mode, dG, dhs, x, h0[d], ws[d], plans[d], out[:, cols], saved[d], need[1]
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


def _double_backward(ctx, x, h0, c0, weights, grads):
    """Gradients as a graph: the same layer recomputed with the reference engine's torch ops
    on the saved inputs, differentiated by autograd."""
    mode, batch_sizes, _, has_bias = ctx.static
    inputs = [x, h0, c0, *weights]
    wanted = [
        i for i, (t, n) in enumerate(zip(inputs, ctx.needs_input_grad[1:], strict=True))
        if n and t is not None
    ]  # fmt: skip
    outputs = _reference_graph(mode, batch_sizes, has_bias, x, h0, c0, weights)
    grads = grads[: len(outputs)]
    got = torch.autograd.grad(
        outputs, [inputs[i] for i in wanted], grads, create_graph=True, allow_unused=True
    )
    result: list[Tensor | None] = [None] * len(inputs)
    for i, g in zip(wanted, got, strict=True):
        result[i] = g
    return result


def triton_layer(mode, x, h0, c0, weights, batch_sizes, plans, has_bias):
    """Run one layer: through :class:`TritonLayer` when a gradient is wanted, else straight
    through the loops, which then keep nothing for backward. An empty batch has nothing to
    launch: the reference's ops give it its (empty) outputs and graph."""
    x, h0 = x.contiguous(), h0.contiguous()
    c0 = None if c0 is None else c0.contiguous()
    if x.size(0) == 0:
        return _reference_graph(mode, batch_sizes, has_bias, x, h0, c0, weights)
    tensors = [x, h0, *weights] if c0 is None else [x, h0, c0, *weights]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        static = (mode, batch_sizes, plans, has_bias)
        return TritonLayer.apply(static, x, h0, c0, *weights)
    out, h_n, c_n, _ = layer_forward(mode, x, h0, c0, weights, plans, has_bias, False)
    return (out, h_n, c_n) if mode == "LSTM" else (out, h_n)


def _plans(batch_sizes: list[int], D: int) -> list[Plan]:
    return [make_plan(batch_sizes, reverse=d == 1) for d in range(D)]


def run_rnn(call: RNNCall) -> RNNResult:
    """Run a stacked, possibly bidirectional, possibly packed RNN; see :class:`RNNCall`.

    Same structure as the reference driver, a layer at a time: inter-layer dropout is
    ``F.dropout`` on a tensor of the reference's shape, in the same order, so its masks match
    under one seed.
    """
    with on_device(call.input):
        return _run_layers(call)


def _run_layers(call: RNNCall) -> RNNResult:
    D = 2 if call.bidirectional else 1
    packed = call.batch_sizes is not None
    x, batch_sizes = time_major(call)
    if not packed:
        L, N = x.shape[:2]
        x = x.reshape(L * N, x.size(2))
    plans = _plans(batch_sizes, D) if x.size(0) else None
    h0_all, c0_all = call.hx if call.mode == "LSTM" else (call.hx, None)
    weights = [t for p in call.params for t in (p.w_ih, p.w_hh, p.b_ih, p.b_hh, p.w_hr)]
    weights = [t for t in weights if t is not None]
    per_layer = len(weights) // call.num_layers
    has_bias = call.params[0].b_ih is not None

    h_n, c_n = [], []
    for layer in range(call.num_layers):
        states = slice(layer * D, (layer + 1) * D)
        c0 = None if c0_all is None else c0_all[states]
        w = weights[layer * per_layer : (layer + 1) * per_layer]
        x, *final = triton_layer(call.mode, x, h0_all[states], c0, w, batch_sizes, plans, has_bias)
        h_n.append(final[0])
        c_n.extend(final[1:])
        if call.dropout != 0 and call.train and layer < call.num_layers - 1:
            shape = x.shape if packed else (L, N, x.size(1))
            x = F.dropout(x.view(shape), call.dropout, training=True).view(x.shape)

    if not packed:
        x = x.view(L, N, x.size(1))
        if call.batch_first:
            x = x.transpose(0, 1)
    h_n = torch.cat(h_n, 0)
    if call.mode == "LSTM":
        return x, h_n, torch.cat(c_n, 0)
    return x, h_n

"""The fused CPU engine's autograd layer and driver.

:class:`FusedLayer` runs one layer (one or both directions) through the compiled time loops
and gives autograd a hand-written backward (``csrc/lstm.cpp`` & co. derive it): the forward
keeps the gate activations and the few states that backward needs, and no autograd graph.
:func:`run_rnn` stacks the layers with torch's inter-layer dropout between them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rnnkit.cells import CellParams
from rnnkit.engines.base import RNNCall, RNNResult
from rnnkit.engines.cpu.build import kernels

# mode -> the integer the kernels take
MODES = {"LSTM": 0, "GRU": 1, "RNN_TANH": 2, "RNN_RELU": 3}
_LSTM = MODES["LSTM"]

DOUBLE_BACKWARD_ERROR = (
    "the 'fused' engine has no double backward (its backward is not differentiable); "
    "use engine='reference' for gradients of gradients"
)


def torch_weights(p: CellParams) -> list[Tensor]:
    """The weights of one layer and direction in ``_flat_weights`` order, absent ones left out."""
    return [t for t in (p.w_ih, p.w_hh, p.b_ih, p.b_hh, p.w_hr) if t is not None]


class FusedLayer(torch.autograd.Function):
    """One layer over all its steps: ``x`` ``[R, H_in]`` rows in time-major (or packed) order.

    ``h0`` is ``[D, N, H_out]``, ``c0`` ``[D, N, H]`` for LSTM (else None), ``weights`` the
    layer's slice of ``_flat_weights``. Returns ``out`` ``[R, D*H_out]``, ``h_n`` and (LSTM)
    ``c_n``. ``mode``, ``batch_sizes`` and ``has_bias`` are plain Python values kept on ``ctx``.
    """

    @staticmethod
    def forward(ctx, mode, batch_sizes, has_bias, x, h0, c0, *weights):
        out, h_n, c_n, *saved = kernels().layer_forward(
            mode, x, h0, c0, list(weights), batch_sizes, has_bias, True
        )
        ctx.mode, ctx.batch_sizes, ctx.has_bias = mode, batch_sizes, has_bias
        ctx.n_weights = len(weights)
        ctx.save_for_backward(x, h0, c0, out, *weights, *saved)
        return (out, h_n, c_n) if mode == _LSTM else (out, h_n)

    @staticmethod
    def backward(ctx, grad_out, grad_hn, *grad_cn):
        # Under create_graph=True autograd runs this with grad mode on, asking for a graph of
        # the backward itself, which the compiled loops cannot give.
        if torch.is_grad_enabled():
            raise RuntimeError(DOUBLE_BACKWARD_ERROR)
        x, h0, c0, out, *rest = ctx.saved_tensors
        weights, saved = rest[: ctx.n_weights], rest[ctx.n_weights :]
        need = ctx.needs_input_grad
        dx, dh0, dc0, *dweights = kernels().layer_backward(
            ctx.mode, grad_out, grad_hn, grad_cn[0] if grad_cn else None, x, h0, c0,
            list(weights), out, list(saved), ctx.batch_sizes, ctx.has_bias, need[3],
        )  # fmt: skip
        dweights = [g if n else None for g, n in zip(dweights, need[6:], strict=True)]
        return (
            None, None, None,
            dx if need[3] else None,
            dh0 if need[4] else None,
            dc0 if ctx.mode == _LSTM and need[5] else None,
            *dweights,
        )  # fmt: skip


def fused_layer(
    mode: int,
    x: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    weights: list[Tensor],
    batch_sizes: list[int],
    has_bias: bool,
) -> tuple[Tensor, ...]:
    """Launch one layer: through :class:`FusedLayer` when a gradient is wanted, else straight
    to the kernels, which then keep nothing for backward."""
    x, h0 = x.contiguous(), h0.contiguous()
    c0 = c0.contiguous() if c0 is not None else None
    tensors = [x, h0, *weights] if c0 is None else [x, h0, c0, *weights]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return FusedLayer.apply(mode, batch_sizes, has_bias, x, h0, c0, *weights)
    out, h_n, c_n = kernels().layer_forward(mode, x, h0, c0, weights, batch_sizes, has_bias, False)
    return (out, h_n, c_n) if mode == _LSTM else (out, h_n)


def run_rnn(call: RNNCall) -> RNNResult:
    """Run a stacked, possibly bidirectional, possibly packed RNN; see :class:`RNNCall`.

    Same structure as the reference driver, a layer at a time: inter-layer dropout is
    ``F.dropout`` on the same tensor in the same order, so its masks match under one seed.
    """
    mode = MODES[call.mode]
    D = 2 if call.bidirectional else 1
    x = call.input
    if call.batch_sizes is not None:
        batch_sizes = call.batch_sizes.tolist()
    else:
        if call.batch_first:
            x = x.transpose(0, 1)
        L, N = x.shape[:2]
        batch_sizes = [N] * L
        x = x.reshape(L * N, x.size(2))
    if call.mode == "LSTM":
        h0_all, c0_all = call.hx
    else:
        h0_all, c0_all = call.hx, None
    weights = [t for p in call.params for t in torch_weights(p)]
    per_layer = len(weights) // call.num_layers
    has_bias = call.params[0].b_ih is not None

    h_n, c_n = [], []
    for layer in range(call.num_layers):
        states = slice(layer * D, (layer + 1) * D)
        c0 = c0_all[states] if c0_all is not None else None
        w = weights[layer * per_layer : (layer + 1) * per_layer]
        x, *final = fused_layer(mode, x, h0_all[states], c0, w, batch_sizes, has_bias)
        h_n.append(final[0])
        c_n.extend(final[1:])
        if call.dropout != 0 and call.train and layer < call.num_layers - 1:
            x = F.dropout(x, call.dropout, training=True)

    if call.batch_sizes is None:
        x = x.view(L, N, x.size(1))
        if call.batch_first:
            x = x.transpose(0, 1)
    h_n = torch.cat(h_n, 0) if len(h_n) > 1 else h_n[0]
    if call.mode == "LSTM":
        return x, h_n, torch.cat(c_n, 0) if len(c_n) > 1 else c_n[0]
    return x, h_n

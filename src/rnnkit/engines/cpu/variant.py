"""The LSTM variants (:mod:`rnnkit.variants`) on the fused CPU engine.

The driver (``engines/driver.py``, :func:`~rnnkit.engines.driver.by_direction`) first runs the
shared :func:`rnnkit.cells.make_prepare` on torch ops for each layer and direction: the input
projection (with ``layer_norm``'s input LayerNorm and ``b_ih``) for all steps at once, and the
random masks in their fixed order, so that this engine and the reference draw the same masks
under one seed. Autograd keeps that part. :class:`VariantLSTM` then runs the recurrent part in the compiled loop of
``csrc/lstm_variant.cpp``, with its hand-written backward, and gives autograd the gradient of
the input projection, of the states and of every recurrent-side parameter.

Runs the variant fields of :data:`VARIANT_FIELDS` (every one but custom ``activations``) in
any combination, with every core option (layers, bidirectional, proj_size, packing, dropout);
the engine declares them (``engines/cpu/__init__.py``), so GRU/RNN variants, custom
activations and any field not named there run on the reference engine.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rnnkit.cells import CellParams, State
from rnnkit.engines.cpu.build import kernels
from rnnkit.engines.cpu.ops import op_batch_sizes
from rnnkit.engines.driver import DirectionCall, LayerOutput, by_direction
from rnnkit.engines.grads import (
    backward_needs_graph,
    batched_grads,
    grad_or_zeros,
    graph_grads,
    regrads,
)
from rnnkit.engines.reference import direction_graph
from rnnkit.resets import restarts_of
from rnnkit.variants import Variant

__all__ = ["VARIANT_FIELDS", "layer"]

# The variant fields the compiled loop of csrc/lstm_variant.cpp implements, for LSTM.
VARIANT_FIELDS = frozenset(
    {
        "layer_norm", "peephole", "zoneout", "recurrent_dropout", "weight_dropout",
        "forget_bias", "gate_clip", "cell_clip", "proj_clip", "coupled_input_forget",
    }
)  # fmt: skip


def _rates(variant: Variant, train: bool) -> list[float]:
    """Zoneout's eval rates (training draws masks instead), then the three clips (0: none)."""
    zh, zc = (0.0, 0.0) if train else variant.zoneout
    clips = (variant.gate_clip, variant.cell_clip, variant.proj_clip)
    return [zh, zc, *(0.0 if v is None else v for v in clips)]


# The recurrent-side tensors of one direction, in the kernels' argument order.
def _recurrent_params(p: CellParams) -> list[Tensor | None]:
    return [p.w_hh, p.b_hh, p.w_hr, p.peephole, p.ln_hh, p.ln_c_weight, p.ln_c_bias]


class VariantLSTM(torch.autograd.Function):
    """One direction of one layer: ``gx`` ``[R, 4H]`` (input projection of every row), ``h0``
    ``[N, H_out]``, ``c0`` ``[N, H]``, the recurrent-side parameters, then the masks
    (``rec_mask`` ``[N, H_out]``, ``keep_h`` ``[R, H_out]``, ``keep_c`` ``[R, H]``, each or
    None) and the restart codes ``[R]`` int8 (:mod:`rnnkit.resets`) or None. Returns ``out`` ``[R, H_out]``, ``h_n``, ``c_n`` and the buffers that backward
    needs, which take no gradient; vmaps as ``FusedLayer`` does."""

    generate_vmap_rule = True

    @staticmethod
    def forward(static, gx, h0, c0, w_hh, b_hh, w_hr, peep, ln_hh, ln_cw, ln_cb, *masks):
        variant, rates, batch_sizes, reverse = static
        params = [w_hh, b_hh, w_hr, peep, ln_hh, ln_cw, ln_cb]
        *masks, restart = masks
        return tuple(
            kernels().lstm_variant_forward(
                gx, h0, c0, *params, *masks, rates, variant.coupled_input_forget,
                op_batch_sizes(batch_sizes),
                reverse, True, restart,
            )
        )  # fmt: skip

    @staticmethod
    def setup_context(ctx, inputs, output):
        static, gx, h0, c0, *rest = inputs
        params, masks = rest[:7], rest[7:]
        out, _, _, *saved = output
        ctx.static = static
        # gx only for a double backward, which rebuilds the direction from it
        ctx.save_for_backward(gx, h0, c0, *params, *masks, out, *saved)
        ctx.mark_non_differentiable(*saved)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_out, grad_hn, grad_cn, *_):
        variant, rates, batch_sizes, reverse = ctx.static
        gx, h0, c0, *rest = ctx.saved_tensors
        params, masks, out, saved = rest[:7], rest[7:11], rest[11], rest[12:]
        grads = (
            grad_or_zeros(grad_out, out),
            grad_or_zeros(grad_hn, h0),
            grad_or_zeros(grad_cn, c0),
        )
        if batched_grads(grads):
            # a batch of gradients: torch's ops have batching rules there, the kernel none
            inputs = [gx, h0, c0, *params]
            grads = regrads(_recompute(ctx, masks), grads, inputs, ctx.needs_input_grad[1:11])
            return (None, *grads, None, None, None, None)
        if backward_needs_graph([gx, h0, c0, *params, *grads]):
            # create_graph=True: the compiled backward is no graph; differentiate the same
            # direction rebuilt from torch ops instead
            grads = _double_backward(ctx, gx, h0, c0, params, masks, grads)
            return (None, *grads, None, None, None, None)
        *masks, restart = masks
        dgx, dh0, dc0, *dparams = kernels().lstm_variant_backward(
            *grads, out, list(saved), h0, c0, *params, *masks, rates,
            variant.coupled_input_forget, op_batch_sizes(batch_sizes), reverse, restart,
        )  # fmt: skip
        need = ctx.needs_input_grad
        dparams = [g if n else None for g, n in zip(dparams, need[4:11], strict=True)]
        return (
            None,
            dgx if need[1] else None,
            dh0 if need[2] else None,
            dc0 if need[3] else None,
            *dparams,
            None, None, None, None,
        )  # fmt: skip


def _recompute(ctx, masks):
    """The direction as a function of ``(gx, h0, c0, *params)`` on the reference engine's ops,
    with the call's masks (no new random numbers): ``(out, h_n, c_n)``."""
    variant, _, batch_sizes, reverse = ctx.static
    rec_mask, keep_h, keep_c, codes = masks
    restart = None if codes is None else restarts_of(codes)

    def direction(gx, h0, c0, w_hh, b_hh, w_hr, peep, ln_hh, ln_cw, ln_cb):
        p = CellParams(None, w_hh, None, b_hh, w_hr, peep, None, ln_hh, ln_cw, ln_cb, rec_mask)  # type: ignore[arg-type]
        out, (h_n, c_n) = direction_graph(
            "LSTM", variant, (gx, keep_h, keep_c), batch_sizes, (h0, c0), p, reverse, restart
        )
        return out, h_n, c_n

    return direction


def _double_backward(ctx, gx, h0, c0, params, masks, grads):
    """Gradients as a graph: the direction recomputed by the reference engine's ops from the
    same inputs and masks, differentiated by autograd."""
    inputs = [gx, h0, c0, *params]
    outputs = _recompute(ctx, masks)(*inputs)
    return graph_grads(outputs, grads, inputs, ctx.needs_input_grad[1:11])


def _run(variant, train, gx, h0, c0, p, keep_h, keep_c, batch_sizes, reverse, restart):
    """Run one direction: through :class:`VariantLSTM` when a gradient is wanted, else
    straight to the kernel, which then keeps nothing for backward."""
    static = (variant, _rates(variant, train), batch_sizes, reverse)
    params = _recurrent_params(p)
    masks = [p.rec_mask, keep_h, keep_c, restart]
    tensors = [gx, h0, c0, *params]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return VariantLSTM.apply(static, gx, h0, c0, *params, *masks)[:3]
    out, h_n, c_n = kernels().lstm_variant_forward(
        gx, h0, c0, *params, *masks[:3], static[1], variant.coupled_input_forget,
        op_batch_sizes(batch_sizes), reverse, False, restart,
    )[:3]  # fmt: skip
    return out, h_n, c_n


def _direction(dc: DirectionCall, out: LayerOutput) -> State:
    """One prepared direction (``dc.seq`` is ``(gates_x, keep_h, keep_c)`` with the layer
    input's leading dims) on the compiled loop, its rows in time-major order."""
    lc = dc.layer
    gx, keep_h, keep_c = dc.seq_rows()
    h0, c0 = dc.state
    restart = None if dc.restart is None else dc.restart.codes
    y, h_n, c_n = _run(
        lc.variant, lc.train, gx, h0, c0, dc.params, keep_h, keep_c, list(lc.batch_sizes),
        dc.reverse, restart,
    )  # fmt: skip
    out.set(dc.d, lc.shaped(y))
    return h_n, c_n


layer = by_direction(_direction)

"""The reference engine: a time loop over the cells of ``rnnkit.cells`` on plain torch ops.

Autograd does the backward. Under the one driver (``driver.py``, which repeats
``apply_layer_stack`` and ``FullBidirectionalLayer`` of ``aten/src/ATen/native/RNN.cpp``) this
engine runs one direction at a time as ATen's ``FullLayer``, ``PackedLayer`` and
``ReversedPackedLayer`` do: the input projection of a whole direction is one GEMM, each step
adds the recurrent GEMM, and the autograd graph is built in the same order, so forward values
and every gradient equal torch's ATen path bit for bit. Every
fast engine is tested against this one. A layer that records no autograd graph (``no_grad``,
inference, nothing requiring grad) writes each step's output in place into the layer's output
(``driver.LayerOutput``) instead of keeping a list of them: the same values, in memory that does not grow with L beyond
the output and the input projection. Under a torch.func transform (``vmap``, ``grad``, ``jvp``
and what they compose into) the driver writes into no tensor: it keeps the list of step
outputs and takes the general, out-of-place step of ``rnnkit.cells`` (vmap cannot write a
batched value into an unbatched tensor), equal to ATen's to rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rnnkit.cells import CellParams, State, Step, make_prepare, make_step, split_layer
from rnnkit.engines.base import ALL_MODES, OPTIONS, CellCall, Engine, Support, transforms
from rnnkit.engines.driver import (
    DirectionCall,
    LayerCall,
    LayerOutput,
    StepPlan,
    by_direction,
)
from rnnkit.resets import INITIAL, ZERO, Restarts
from rnnkit.variants import PLAIN, Variant

__all__ = ["REFERENCE", "direction_graph", "flat_layer_graph", "layer_graph"]


def _as_output(state: State) -> Tensor:
    return state[0] if isinstance(state, tuple) else state


def _slice(state: State, start: int, end: int) -> State:
    if isinstance(state, tuple):
        return tuple(t.narrow(0, start, end - start) for t in state)  # type: ignore[return-value]
    return state.narrow(0, start, end - start)


def _concat(states: list[State]) -> State:
    if isinstance(states[0], tuple):
        return tuple(torch.cat(list(parts), 0) for parts in zip(*states, strict=False))  # type: ignore[return-value]
    return torch.cat(states, 0)  # type: ignore[arg-type]


# A direction's per-step sequence is a tensor (the input projection) or, for variants, a tuple
# of tensors and Nones with the same leading dims; these helpers slice both alike.
def _unbind(seq) -> list:
    if isinstance(seq, tuple):
        parts = [[None] * _length(seq) if t is None else t.unbind(0) for t in seq]
        return list(zip(*parts, strict=True))
    return list(seq.unbind(0))


def _length(seq: tuple) -> int:
    return next(t.size(0) for t in seq if t is not None)


def _narrow(seq, start: int, length: int):
    if isinstance(seq, tuple):
        return tuple(None if t is None else t.narrow(0, start, length) for t in seq)
    return seq.narrow(0, start, length)


def _select(seq, t: int):
    if isinstance(seq, tuple):
        return tuple(None if s is None else s.select(0, t) for s in seq)
    return seq.select(0, t)


def _restarted(state: State, r: Restarts | None, t: int, row: int, n: int, initial: State):
    """``state`` (``n`` rows) with the rows of step ``t`` (``row:row+n`` of the codes) that
    restart there: from zeros, or from their ``initial`` rows (rnnkit.resets)."""
    bits = 0 if r is None else r.at(t)
    if not bits:
        return state

    def one(s: Tensor, s0: Tensor) -> Tensor:
        if bits & ZERO:
            s = torch.where(r.zero.narrow(0, row, n), 0.0, s)
        if bits & INITIAL:
            s = torch.where(r.initial.narrow(0, row, n), s0.narrow(0, 0, n), s)
        return s

    if isinstance(state, tuple):
        return tuple(one(s, s0) for s, s0 in zip(state, initial, strict=True))
    return one(state, initial)


def _full(step: Step, dc: DirectionCall, out: LayerOutput):
    """ATen's ``FullLayer`` over a padded ``seq`` ``[L, N, *]``: the output ``[L, N, H_out]``
    (None when written into ``out``) and the final state."""
    seq, state, p, N = dc.seq, dc.state, dc.params, dc.layer.N
    L = _length(seq) if isinstance(seq, tuple) else seq.size(0)
    order = range(L - 1, -1, -1) if dc.reverse else range(L)
    if not out.in_place:
        outputs = []
        steps = _unbind(seq)
        for t in order:
            state = _restarted(state, dc.restart, t, t * N, N, dc.state)
            state = step(steps[t], state, p)
            outputs.append(_as_output(state))
        return torch.stack(outputs[::-1] if dc.reverse else outputs, 0), state
    for t in order:
        state = _restarted(state, dc.restart, t, t * N, N, dc.state)
        state = step(_select(seq, t), state, p)
        out.put(dc.d, t * N, _as_output(state))
    return None, state


def _packed(step: Step, dc: DirectionCall, out: LayerOutput):
    """ATen's ``PackedLayer`` (forward: the batch shrinks, finished rows keep their state) and
    ``ReversedPackedLayer`` (reverse: it grows from the ``h_0`` rows) over packed rows."""
    seq, plan, p = dc.seq, dc.plan, dc.params
    outputs, finished = [], []
    initial, last = dc.state, plan.bs[0] if plan.bs else 0
    state = _slice(initial, 0, last) if plan.reverse else initial
    T = len(plan.bs)
    for s, (row, batch) in enumerate(zip(plan.off, plan.bs, strict=True)):
        if plan.reverse and batch > last:
            state = _concat([state, _slice(initial, last, batch)])
        elif batch < last:
            finished.append(_slice(state, batch, last))
            state = _slice(state, 0, batch)
        last = batch
        t = T - 1 - s if plan.reverse else s
        state = _restarted(state, dc.restart, t, row, batch, initial)
        state = step(_narrow(seq, row, batch), state, p)
        if out.in_place:
            out.put(dc.d, row, _as_output(state))
        else:
            outputs.append(_as_output(state))
    if plan.reverse:
        outputs = outputs[::-1]
    else:
        finished.append(state)
        state = _concat(finished[::-1])
    return (None if out.in_place else torch.cat(outputs, 0)), state


def _direction(dc: DirectionCall, out: LayerOutput) -> State:
    lc = dc.layer
    # out of place under a torch.func transform (vmap cannot write into unbatched tensors)
    step = make_step(lc.mode, lc.variant, bool(transforms()))
    y, final = (_packed if lc.packed else _full)(step, dc, out)
    if y is not None:
        out.set(dc.d, y)
    return final


_layer = by_direction(_direction)


def layer_graph(
    mode: str,
    x: Tensor,
    batch_sizes: tuple[int, ...],
    h0: Tensor,
    c0: Tensor | None,
    params: tuple[CellParams, ...],
    restart: tuple[Restarts, ...] | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One plain layer (every direction) over time-major rows ``x`` ``[R, H_in]`` on this
    engine's ops, with the layer's ``restart`` codes (``LayerCall.restart``): its output rows,
    ``h_n`` and ``c_n``; ``batch_sizes`` as the compiled ops take them (empty: every step has
    the full batch, ``driver.step_batches``). The fast engines differentiate it for a double
    backward, since their compiled backward has no graph of its own."""
    lc = LayerCall(mode, PLAIN, False, x, tuple(batch_sizes), True, h0, c0, params, restart)
    return _layer(lc)


def flat_layer_graph(
    mode: str,
    batch_sizes,
    has_bias: bool,
    x: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    weights,
    restart: tuple[Restarts, ...] | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`layer_graph` of a layer whose weights are its slice of ``_flat_weights`` (per
    direction ``w_ih, w_hh[, b_ih, b_hh][, w_hr]``), as the fast engines' autograd Functions
    keep them."""
    params = split_layer(weights, h0.size(0), has_bias)
    return layer_graph(mode, x, tuple(batch_sizes), h0, c0, params, restart)


def direction_graph(
    mode: str,
    variant: Variant,
    seq,
    batch_sizes: tuple[int, ...],
    state: State,
    p: CellParams,
    reverse: bool,
    restart: Restarts | None = None,
) -> tuple[Tensor, State]:
    """One direction over packed rows whose prepared sequence ``seq`` (``(gates_x, keep_h,
    keep_c)`` rows), params (masks included) and ``restart`` codes are given, as an autograd
    graph: no random numbers are drawn. Returns the output rows and the final state."""
    h0 = _as_output(state)
    c0 = state[1] if isinstance(state, tuple) else None
    lc = LayerCall(
        mode, variant, True, _as_output(seq), tuple(batch_sizes), True, h0[None],
        None if c0 is None else c0[None], (p,),
    )  # fmt: skip
    out = LayerOutput(lc, in_place=False)
    plan = StepPlan.of(lc.steps(), reverse)
    final = _direction(DirectionCall(lc, 0, plan, seq, p, state, restart), out)
    return out.result(), final


def run_cell(call: CellCall) -> State:
    """One step of a cell module (``LSTMCell`` & co.) on ``[N, H_in]`` input."""
    out_of_place = bool(transforms())
    step = make_step(call.mode, call.variant, out_of_place)
    prepare = make_prepare(call.mode, call.variant, call.train, out_of_place)
    gates_x, p = prepare(call.input, call.params, call.input.size(0))
    return step(gates_x, call.hx, p)


# The variant fields this engine's step math implements (rnnkit.cells.make_step and
# make_prepare): the whole of rnnkit.variants.Variant today, named one by one so that a new
# field is refused until its math is here.
VARIANT_FIELDS = frozenset(
    {
        "layer_norm", "peephole", "zoneout", "recurrent_dropout", "weight_dropout",
        "forget_bias", "gate_clip", "cell_clip", "proj_clip", "coupled_input_forget",
        "activations",
    }
)  # fmt: skip

_EVERYTHING = Support(
    modes=ALL_MODES,
    devices=None,
    dtypes=None,
    options=frozenset(OPTIONS),
    variant_fields=VARIANT_FIELDS,
)
# Every call but a layer under torch.jit.trace, whose time loop in Python a trace would unroll
# at one sequence length; a cell is one step, which traces as it is.
_LAYERS = Support(ALL_MODES, None, None, frozenset(OPTIONS) - {"jit_trace"}, VARIANT_FIELDS)

REFERENCE = Engine(
    name="reference",
    layer=_layer,
    run_cell=run_cell,
    rnn_support=(_LAYERS,),
    cell_support=(_EVERYTHING,),
)

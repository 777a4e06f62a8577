"""The reference engine: a time loop over the cells of ``rnnkit.cells`` on plain torch ops.

Autograd does the backward. The driver repeats the structure of ATen's CPU implementation
(``FullLayer``, ``FullBidirectionalLayer``, ``PackedLayer``, ``ReversedPackedLayer`` and
``apply_layer_stack`` in ``aten/src/ATen/native/RNN.cpp``): the input projection of a whole
layer is one GEMM, each step adds the recurrent GEMM, and the autograd graph is built in the
same order, so forward values and every gradient equal torch's ATen path bit for bit. Every
fast engine is tested against this one. A call that records no autograd graph (``no_grad``,
inference, nothing requiring grad) writes each step's output in place into the layer's output
instead of keeping a list of them: the same values, in memory that does not grow with L beyond
the output and the input projection. Under a torch.func transform (``vmap``, ``grad``, ``jvp``
and what they compose into) the driver writes into no tensor: it keeps the list of step
outputs and takes the general, out-of-place step of ``rnnkit.cells`` (vmap cannot write a
batched value into an unbatched tensor), equal to ATen's to rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rnnkit.cells import CellParams, Prepare, State, Step, make_prepare, make_step
from rnnkit.engines.base import CellCall, Engine, RNNCall, RNNResult, time_major, transforms
from rnnkit.variants import PLAIN


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


# A layer's per-step sequence is a tensor (the input projection) or, for variants, a tuple of
# tensors and Nones with the same leading dims; these helpers slice both alike.
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


def _scan(step: Step, steps_x: list, state: State, p: CellParams):
    outputs = []
    for gates_x in steps_x:
        state = step(gates_x, state, p)
        outputs.append(_as_output(state))
    return outputs, state


def _select(seq, t: int):
    if isinstance(seq, tuple):
        return tuple(None if s is None else s.select(0, t) for s in seq)
    return seq.select(0, t)


class _Rows:
    """A layer's output rows ``[R, D*H_out]``, written in place as the steps run.

    For a call that records no autograd graph: the layer then holds its output and a constant
    more, whatever L, where per-step outputs kept in a list and joined at the end hold L tensor
    objects and the output twice. The rows are copies of the same steps' outputs, so the values
    are the same bits. With a graph the driver keeps ATen's list and ``torch.stack``/``cat``,
    so that the graph and every gradient bit stay ATen's.
    """

    def __init__(self, rows: int, D: int):
        self.rows, self.D = rows, D
        self.data: Tensor | None = None

    def put(self, d: int, row: int, h: Tensor) -> None:
        """Direction ``d``'s output ``h`` ``[n, H_out]`` as rows ``row:row+n``."""
        H_out = h.size(1)
        if self.data is None:
            # allocated at the first step: its dtype is the step's (autocast may lower it)
            self.data = h.new_empty(self.rows, self.D * H_out)
        rows = self.data.narrow(0, row, h.size(0))
        (rows if self.D == 1 else rows.narrow(1, d * H_out, H_out)).copy_(h)


def _full_layer(
    step: Step,
    prepare: Prepare,
    x: Tensor,
    state: State,
    p: CellParams,
    rows: _Rows | None = None,
    d: int = 0,
    reverse: bool = False,
):
    """One direction over a padded sequence ``x`` ``[L, N, H_in]``: its output ``[L, N,
    H_out]`` (None when written into ``rows``) and final state."""
    seq, p = prepare(x, p, x.size(1))
    if rows is None:
        steps = _unbind(seq)
        outputs, state = _scan(step, steps[::-1] if reverse else steps, state, p)
        return torch.stack(outputs[::-1] if reverse else outputs, 0), state
    L, N = x.shape[:2]
    for t in reversed(range(L)) if reverse else range(L):
        state = step(_select(seq, t), state, p)
        rows.put(d, t * N, _as_output(state))
    return None, state


def _full_bidirectional_layer(step: Step, prepare: Prepare, x: Tensor, states, ps, rows=None):
    fw_out, fw_state = _full_layer(step, prepare, x, states[0], ps[0], rows, 0)
    rev_out, rev_state = _full_layer(step, prepare, x, states[1], ps[1], rows, 1, reverse=True)
    out = None if rows is not None else torch.cat([fw_out, rev_out], fw_out.dim() - 1)
    return out, (fw_state, rev_state)


def _packed_layer(
    step: Step,
    prepare: Prepare,
    data: Tensor,
    batch_sizes: list[int],
    state: State,
    p,
    rows: _Rows | None = None,
    d: int = 0,
):
    """One direction over packed ``data`` ``[sum(batch_sizes), H_in]``: the batch shrinks."""
    seq, p = prepare(data, p, batch_sizes[0])
    outputs, finished = [], []
    offset, last = 0, batch_sizes[0]
    for batch in batch_sizes:
        gates_x = _narrow(seq, offset, batch)
        if batch < last:
            # Sequences that ended keep their final state; the rest go on.
            finished.append(_slice(state, batch, last))
            state = _slice(state, 0, batch)
        last = batch
        state = step(gates_x, state, p)
        if rows is None:
            outputs.append(_as_output(state))
        else:
            rows.put(d, offset, _as_output(state))
        offset += batch
    finished.append(state)
    out = torch.cat(outputs, 0) if rows is None else None
    return out, _concat(finished[::-1])


def _reversed_packed_layer(
    step: Step,
    prepare: Prepare,
    data: Tensor,
    batch_sizes: list[int],
    state: State,
    p,
    rows: _Rows | None = None,
    d: int = 0,
):
    """The reverse direction over packed data: the batch grows as time runs backwards."""
    seq, p = prepare(data, p, batch_sizes[0])
    outputs = []
    offset, last = data.size(0), batch_sizes[-1]
    initial = state
    state = _slice(initial, 0, last)
    for batch in reversed(batch_sizes):
        if batch > last:
            state = _concat([state, _slice(initial, last, batch)])
        offset -= batch
        gates_x = _narrow(seq, offset, batch)
        last = batch
        state = step(gates_x, state, p)
        if rows is None:
            outputs.append(_as_output(state))
        else:
            rows.put(d, offset, _as_output(state))
    out = torch.cat(outputs[::-1], 0) if rows is None else None
    return out, state


def _packed_bidirectional_layer(
    step: Step, prepare: Prepare, data, batch_sizes, states, ps, rows=None
):
    fw_out, fw_state = _packed_layer(step, prepare, data, batch_sizes, states[0], ps[0], rows, 0)
    rev_out, rev_state = _reversed_packed_layer(
        step, prepare, data, batch_sizes, states[1], ps[1], rows, 1
    )
    out = None if rows is not None else torch.cat([fw_out, rev_out], -1)
    return out, (fw_state, rev_state)


def _cell_math(mode: str, variant, train: bool) -> tuple[Step, Prepare]:
    """The step and prepare functions of a call: out of place under a torch.func transform."""
    out_of_place = bool(transforms())
    return (
        make_step(mode, variant, out_of_place),
        make_prepare(mode, variant, train, out_of_place),
    )


def _records_graph(call: RNNCall) -> bool:
    if transforms():
        # the same graph-style path: a list of step outputs, no preallocated rows
        return True
    if not torch.is_grad_enabled():
        return False
    hx = call.hx if isinstance(call.hx, tuple) else (call.hx,)
    tensors = [call.input, *hx, *(t for p in call.params for t in p if t is not None)]
    return any(t.requires_grad for t in tensors)


def run_rnn(call: RNNCall) -> RNNResult:
    """Run a stacked, possibly bidirectional, possibly packed RNN; see :class:`RNNCall`."""
    step, prepare = _cell_math(call.mode, call.variant, call.train)
    hx = call.hx
    if call.mode == "LSTM":
        states: list[State] = list(zip(hx[0].unbind(0), hx[1].unbind(0), strict=False))
    else:
        states = list(hx.unbind(0))
    D = 2 if call.bidirectional else 1
    packed = call.batch_sizes is not None
    x = call.input
    if packed:
        batch_sizes = call.batch_sizes.tolist()
    elif call.batch_first:
        x = x.transpose(0, 1)

    graph = _records_graph(call)
    finals: list[State] = []
    for layer in range(call.num_layers):
        ps = call.params[layer * D : (layer + 1) * D]
        layer_states = states[layer * D : (layer + 1) * D]
        # [R, H_in] packed or [L, N, H_in]: the output takes its leading dims
        lead = x.shape[:-1]
        rows = None if graph else _Rows(lead.numel(), D)
        if packed and D == 2:
            out, final = _packed_bidirectional_layer(
                step, prepare, x, batch_sizes, layer_states, ps, rows
            )
        elif packed:
            out, final = _packed_layer(step, prepare, x, batch_sizes, layer_states[0], ps[0], rows)
        elif D == 2:
            out, final = _full_bidirectional_layer(step, prepare, x, layer_states, ps, rows)
        else:
            out, final = _full_layer(step, prepare, x, layer_states[0], ps[0], rows)
        x = out if rows is None else rows.data.view(*lead, rows.data.size(-1))
        finals.extend(final if D == 2 else [final])
        if call.dropout != 0 and call.train and layer < call.num_layers - 1:
            x = F.dropout(x, call.dropout, training=True)

    if call.batch_first and not packed:
        x = x.transpose(0, 1)
    if call.mode == "LSTM":
        return x, torch.stack([s[0] for s in finals], 0), torch.stack([s[1] for s in finals], 0)
    return x, torch.stack(finals, 0)


def run_packed_layer(mode: str, data: Tensor, batch_sizes: list[int], states, params):
    """One plain layer (one or two directions) over packed rows; padded input is the packing
    with equal batch sizes. Returns the output rows and the final state of each direction.
    Other engines use it to build an autograd graph of a layer, e.g. for double backward."""
    step, prepare = _cell_math(mode, PLAIN, False)
    if len(params) == 2:
        out, finals = _packed_bidirectional_layer(step, prepare, data, batch_sizes, states, params)
        return out, list(finals)
    out, final = _packed_layer(step, prepare, data, batch_sizes, states[0], params[0])
    return out, [final]


def run_prepared_direction(mode: str, variant, seq, batch_sizes: list[int], state, p, reverse):
    """One direction over packed rows whose per-step sequence ``seq`` (what ``prepare``
    returns: the input projection, or for variants ``(gates_x, keep_h, keep_c)``) and params
    (masks included) are given: no random numbers are drawn. Returns the output rows and the
    final state. Other engines rebuild a direction with it as a graph, e.g. for double
    backward."""
    step = make_step(mode, variant, bool(transforms()))
    data = seq[0] if isinstance(seq, tuple) else seq
    layer = _reversed_packed_layer if reverse else _packed_layer
    return layer(step, lambda x, params, N: (seq, params), data, batch_sizes, state, p)


def run_variant_lstm(call: RNNCall, direction) -> RNNResult:
    """A stacked, possibly bidirectional, possibly packed LSTM with ``call.variant`` whose
    directions another engine runs: ``direction(gx, h0, c0, p, keep_h, keep_c, batch_sizes,
    reverse)`` gets one direction's prepared rows (``gx`` ``[R, 4H]``, zoneout's keep masks
    ``[R, *]`` or None) and returns its output rows, ``h_n`` and ``c_n``.

    The layer structure, the order of the random draws (each direction's masks, then the
    inter-layer dropout) and the tensor shapes they are drawn in are this engine's, so the
    masks match under one seed.
    """
    prepare = make_prepare(call.mode, call.variant, call.train, bool(transforms()))
    D = 2 if call.bidirectional else 1
    packed = call.batch_sizes is not None
    x, batch_sizes = time_major(call)
    N = batch_sizes[0] if packed else x.size(1)
    h0_all, c0_all = call.hx
    h_n, c_n = [], []
    for layer in range(call.num_layers):
        outs = []
        for d in range(D):
            k = layer * D + d
            (gx, keep_h, keep_c), p = prepare(x, call.params[k], N)
            H = p.w_hh.size(0) // 4
            gx = gx.reshape(-1, 4 * H)
            keep_h = keep_h.reshape(gx.size(0), -1) if keep_h is not None else None
            keep_c = keep_c.reshape(gx.size(0), H) if keep_c is not None else None
            out, h, c = direction(gx, h0_all[k], c0_all[k], p, keep_h, keep_c, batch_sizes, d == 1)
            outs.append(out)
            h_n.append(h)
            c_n.append(c)
        out = torch.cat(outs, 1) if D == 2 else outs[0]
        x = out if packed else out.view(*x.shape[:2], out.size(1))
        if call.dropout != 0 and call.train and layer < call.num_layers - 1:
            x = F.dropout(x, call.dropout, training=True)
    if call.batch_first and not packed:
        x = x.transpose(0, 1)
    return x, torch.stack(h_n, 0), torch.stack(c_n, 0)


def run_cell(call: CellCall) -> State:
    """One step of a cell module (``LSTMCell`` & co.) on ``[N, H_in]`` input."""
    step, prepare = _cell_math(call.mode, call.variant, call.train)
    gates_x, p = prepare(call.input, call.params, call.input.size(0))
    return step(gates_x, call.hx, p)


REFERENCE = Engine(
    name="reference",
    run_rnn=run_rnn,
    run_cell=run_cell,
    rnn_unsupported=lambda call: None,
    cell_unsupported=lambda call: None,
)

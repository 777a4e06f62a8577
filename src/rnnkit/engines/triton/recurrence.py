"""The time loops of one layer (one or both directions), forward and backward.

Where the persistent kernels take a direction (``persistent.takes``), one launch runs its whole
loop. Otherwise, per step a torch GEMM (cuBLAS on a GPU) on the rows of the active batch and
one pointwise kernel (``launch.py``). Everything that does not feed the next step runs once over all steps:
the input projection ``x W_ih^T`` before the forward loop; ``dW_ih``, ``dW_hh``, ``dX``, the
bias gradients (and ``dW_hr``) after the backward loop, as one GEMM or sum each.

Buffers hold one row per (step, batch element) in the input's row order. A direction keeps its
state in one ``[N, *]`` buffer whose row ``j`` is batch element ``j``: forward in time the batch
shrinks (sequences end and their rows keep the final state), in reverse it grows (sequences
start from their ``h_0`` rows), so the buffer ends as ``h_n``.

Resets inside a sequence (:mod:`rnnkit.resets`, a direction's :class:`~rnnkit.resets.Restarts`)
are a per-row select in the loops: before a step where some row restarts, a kernel sets those
rows of the state to zeros or to their initial state; after the step back, a kernel stops the
gradient of that state there (adding it to the initial state's where the row restarted from
it); the kernels and the ``dW_hh`` GEMM read the previous state of a restarted row as what the
step started from. The persistent kernels select inside their loop.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rnnkit.cells import CellParams
from rnnkit.engines.driver import StepPlan
from rnnkit.engines.triton import launch, persistent
from rnnkit.modes import MODES
from rnnkit.resets import Restarts, restarts_of

__all__ = [
    "backward_direction",
    "batch_rows",
    "forward_direction",
    "prev_states",
    "restarting",
    "restarts_at",
    "restarts_of",
    "weight_grads",
]


def batch_rows(plan: StepPlan, device) -> Tensor:
    """Each row's batch element."""
    index = torch.empty(plan.rows, dtype=torch.int64)
    for o, b in zip(plan.off, plan.bs, strict=True):
        index[o : o + b] = torch.arange(b)
    return index.to(device)


def _prev_rows(plan: StepPlan, device, restart: Restarts | None) -> Tensor:
    """For each row, its previous state's row in ``cat([states, initial, zeros])``: ``rows +
    j`` is the initial state's row ``j``, ``rows + N`` the zero row of a restart from zeros."""
    index = torch.empty(plan.rows, dtype=torch.int64)
    for s, (o, b) in enumerate(zip(plan.off, plan.bs, strict=True)):
        o_prev, b_prev = plan.prev(s)
        j = torch.arange(b)
        index[o : o + b] = torch.where(j < b_prev, o_prev + j, plan.rows + j)
    index = index.to(device)
    if restart is not None:
        index = torch.where(restart.initial[:, 0], plan.rows + batch_rows(plan, device), index)
        index = torch.where(restart.zero[:, 0], plan.rows + plan.N, index)
    return index


def prev_states(
    plan: StepPlan, states: Tensor, initial: Tensor, restart: Restarts | None = None
) -> Tensor:
    """The state each row's step started from, ``[R, *]``: ``states`` ``[R, *]`` is the state
    after every row, ``initial`` ``[N, *]`` the direction's initial state."""
    parts = [states, initial]
    if restart is not None:
        parts.append(initial.new_zeros(1, initial.size(1)))
    return torch.cat(parts).index_select(0, _prev_rows(plan, states.device, restart))


def restarts_at(restart: Restarts | None, plan: StepPlan, s: int) -> Tensor | None:
    """The restart codes ``[b]`` of step ``s``'s rows (in the plan's order), or None where no
    row restarts there."""
    if restart is None or not restart.at(len(plan.bs) - 1 - s if plan.reverse else s):
        return None
    return restart.codes[plan.off[s] : plan.off[s] + plan.bs[s]]


def restarting(restart: Restarts | None, plan: StepPlan) -> Restarts | None:
    """``restart``, or None where no row restarts at any step."""
    if restart is None or not any(restart.at(t) for t in range(len(plan.bs))):
        return None
    return restart


def _codes(restart: Restarts | None, plan: StepPlan) -> Tensor | None:
    """All the codes ``[R]`` for a persistent launch, or None where no row restarts."""
    restart = restarting(restart, plan)
    return None if restart is None else restart.codes


def _linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return x @ w.t() if b is None else torch.addmm(b, x, w.t())


def forward_direction(
    mode, x, h0, c0, w: CellParams, plan: StepPlan, out_d, train: bool, restart=None
):
    """One direction: ``x`` [R, H_in], ``h0`` [N, H_out], ``c0`` [N, H] (LSTM), ``out_d``
    [R, H_out] (a column slice of the layer output) receives h_t; ``restart`` the
    direction's :class:`~rnnkit.resets.Restarts` or None. Returns ``h_n``, ``c_n`` (LSTM,
    else None) and what backward needs (nothing unless ``train``)."""
    acc = launch.acc_dtype(x.dtype)
    G = MODES[mode].gates
    H = w.w_hh.size(0) // G
    N = plan.N
    w_hh_t = w.w_hh.t()
    h = h0.clone(memory_format=torch.contiguous_format)
    saved: list[Tensor] = []
    if mode == "LSTM":
        bias = None if w.b_ih is None else w.b_ih + w.b_hh
        gates = _linear(x, w.w_ih, bias)  # [R, 4H]; activations after the loop when train
        c = c0.to(acc, copy=True, memory_format=torch.contiguous_format)
        cs = x.new_empty(plan.rows, H, dtype=acc) if train else None
        if persistent.takes(mode, x, N, H, w.w_hr is not None, plan.uniform):
            h_n = torch.empty_like(h)
            steps = len(plan.bs)
            codes = _codes(restart, plan)
            persistent.forward(
                mode, gates, w.w_hh, None, h, c, cs, out_d, h_n, codes, steps, plan.reverse
            )
            return h_n, c.to(x.dtype), [gates, cs] if train else []
        rs = None if w.w_hr is None else x.new_empty(plan.rows if train else N, H)
        for s, (o, b) in enumerate(zip(plan.off, plan.bs, strict=True)):
            codes = restarts_at(restart, plan, s)
            if codes is not None:
                launch.restart_forward(codes, h, h0, c, c0, b)
            pre = gates[o : o + b].addmm_(h[:b], w_hh_t)
            cs_s = None if cs is None else cs[o : o + b]
            if rs is None:
                launch.lstm_forward(pre, c, cs_s, h, out_d[o : o + b], b, H)
            else:
                r = rs[o : o + b] if train else rs[:b]
                launch.lstm_forward(pre, c, cs_s, r, None, b, H)
                torch.mm(r, w.w_hr.t(), out=h[:b])
                out_d[o : o + b] = h[:b]
        if train:
            saved = [gates, cs] + ([] if rs is None else [rs])
        return h, c.to(x.dtype), saved
    if mode == "GRU":
        gx = _linear(x, w.w_ih, w.b_ih)  # [R, 3H]
        if persistent.takes(mode, x, N, H, False, plan.uniform):
            h_n = torch.empty_like(h)
            ws = x.new_empty(plan.rows, 4 * H) if train else None
            steps = len(plan.bs)
            codes = _codes(restart, plan)
            persistent.forward(
                mode, gx, w.w_hh, w.b_hh, h, None, ws, out_d, h_n, codes, steps, plan.reverse
            )
            return h_n, None, [ws] if train else []
        hw = x.new_empty(N, 3 * H)
        # the state in the compute dtype, and its copy in the layer's dtype for the GEMM
        h_acc = h if acc == x.dtype else h.to(acc)
        hio = None if h_acc is h else h
        ws = x.new_empty(plan.rows, 4 * H) if train else None
        for s, (o, b) in enumerate(zip(plan.off, plan.bs, strict=True)):
            codes = restarts_at(restart, plan, s)
            if codes is not None:
                launch.restart_forward(codes, h_acc, h0, hio, None if hio is None else h0, b)
            if w.b_hh is None:
                torch.mm(h[:b], w_hh_t, out=hw[:b])
            else:
                torch.addmm(w.b_hh, h[:b], w_hh_t, out=hw[:b])
            ws_s = None if ws is None else ws[o : o + b]
            launch.gru_forward(gx[o : o + b], hw, h_acc, hio, out_d[o : o + b], ws_s, b, H)
        return h_acc.to(x.dtype), None, [ws] if train else []
    bias = None if w.b_ih is None else w.b_ih + w.b_hh
    gates = _linear(x, w.w_ih, bias)  # [R, H]
    if persistent.takes(mode, x, N, H, False, plan.uniform):
        h_n = torch.empty_like(h)
        steps = len(plan.bs)
        codes = _codes(restart, plan)
        persistent.forward(
            mode, gates, w.w_hh, None, h, None, None, out_d, h_n, codes, steps, plan.reverse
        )
        return h_n, None, []
    for s, (o, b) in enumerate(zip(plan.off, plan.bs, strict=True)):
        codes = restarts_at(restart, plan, s)
        if codes is not None:
            launch.restart_forward(codes, h, h0, None, None, b)
        pre = gates[o : o + b].addmm_(h[:b], w_hh_t)
        launch.rnn_forward(pre, h, out_d[o : o + b], b, H, mode == "RNN_RELU")
    return h, None, []


def backward_direction(
    mode, gout_d, dh, dc, h0, c0, w: CellParams, plan: StepPlan, out_d, saved, restart=None
):
    """The reverse-time loop of one direction. ``gout_d`` [R, H_out] is the output's
    gradient, ``dh`` [N, H_out] (and ``dc`` [N, H] in the compute dtype) hold the final
    state's gradient on entry and the initial state's on exit; ``restart`` is the forward's.
    Returns ``dG``, the gradient of every row's pre-activations, and with a projection
    ``dhs`` = dL/dh_t of every row."""
    G = MODES[mode].gates
    H = w.w_hh.size(0) // G
    R = plan.rows
    dhs = None
    if persistent.takes(mode, gout_d, plan.N, H, w.w_hr is not None, plan.uniform):
        # the saved buffers are the per-step forward's, whichever forward ran
        dG = gout_d.new_empty(R, (4 if G > 1 else 1) * H)
        act, cs, s0 = None, None, None
        if mode == "LSTM":
            act, cs, s0 = saved[0], saved[1], c0
        elif mode == "GRU":
            act, s0 = saved[0], h0
        s0 = None if s0 is None else s0.contiguous()
        codes = _codes(restart, plan)
        persistent.backward(
            mode, act, cs, s0, out_d, gout_d, w.w_hh, dh, dc, dG, codes, len(plan.bs),
            plan.reverse,
        )  # fmt: skip
        # dh_0 gets dG W_hh of the rows that read h_0 (GRU: added to its direct part; with
        # restarts, to what the rows that restart from h_0 gave it)
        rows = slice(plan.off[0], plan.off[0] + plan.N)
        first = dG[rows, : G * H]
        if codes is not None:
            dh.addmm_(torch.where(restart.zero[rows], 0.0, first), w.w_hh)
        elif mode == "GRU":
            dh.addmm_(first, w.w_hh)
        else:
            torch.mm(first, w.w_hh, out=dh)
        return dG, None
    # the gradient that reaches the initial state through the rows that restart from it
    dh0 = None if restart is None else torch.zeros_like(dh)
    dc0 = None if restart is None or dc is None else torch.zeros_like(dc)
    dG = gout_d.new_empty(R, (4 if G > 1 else 1) * H)
    if mode == "LSTM":
        act, cs = saved[:2]
        if w.w_hr is not None:
            dhs = gout_d.new_empty(R, w.w_hr.size(0))
            dr = gout_d.new_empty(plan.N, H)
    for s in reversed(range(len(plan.bs))):
        o, b = plan.off[s], plan.bs[s]
        o_prev, b_prev = plan.prev(s)
        rows = slice(o, o + b)
        codes = restarts_at(restart, plan, s)
        if mode == "LSTM":
            if dhs is None:
                src, go = dh, gout_d[rows]
            else:
                torch.add(dh[:b], gout_d[rows], out=dhs[rows])
                src, go = torch.mm(dhs[rows], w.w_hr, out=dr[:b]), None
            launch.lstm_backward(
                act[rows], cs[rows], cs[o_prev:], c0, src, go, dc, dG[rows], codes, b, b_prev, H
            )
            torch.mm(dG[rows], w.w_hh, out=dh[:b])
        elif mode == "GRU":
            launch.gru_backward(
                saved[0][rows], out_d[o_prev:], h0, dh, gout_d[rows], dG[rows], codes, b,
                b_prev, H,
            )  # fmt: skip
            dh[:b].addmm_(dG[rows, : 3 * H], w.w_hh)
        else:
            launch.rnn_backward(out_d[rows], dh, gout_d[rows], dG[rows], b, H, mode == "RNN_RELU")
            torch.mm(dG[rows], w.w_hh, out=dh[:b])
        if codes is not None:
            launch.restart_backward(codes, dh, dh0, dc, dc0, b)
    if dh0 is not None:
        dh.add_(dh0)
    if dc0 is not None:
        dc.add_(dc0)
    return dG, dhs


def _grad_w_hh(plan: StepPlan, dG: Tensor, out_d: Tensor, h0: Tensor, restart) -> Tensor:
    """dW_hh = sum over rows of dG^T h_prev. Padded input: the previous states are the
    output shifted by one step and h0, two GEMMs on views; packed, or with restarts (whose
    rows read zeros or h0): gathered rows, one GEMM."""
    if not plan.uniform or restart is not None:
        return dG.t() @ prev_states(plan, out_d, h0, restart)
    N, R = plan.N, plan.rows
    first = plan.off[0]  # the rows that read h0: the first time step, or the last in reverse
    dw = dG[first : first + N].t() @ h0
    if R > N:
        if first == 0:
            dw.addmm_(dG[N:].t(), out_d[: R - N])
        else:
            dw.addmm_(dG[: R - N].t(), out_d[N:])
    return dw


def weight_grads(
    mode, dG, dhs, x, h0, w: CellParams, plan: StepPlan, out_d, saved, need_dx: bool, restart=None
):
    """One direction's contribution to dX (or None) and the gradients of its weights in
    ``_flat_weights`` order, each one GEMM (or sum) over all rows."""
    H = w.w_hh.size(0) // MODES[mode].gates
    acc = launch.acc_dtype(dG.dtype)
    if mode == "GRU":
        # input side: dA_r | dA_z | dA_n; hidden side: dA_r | dA_z | dA_n r
        d_in = [dG[:, : 2 * H], dG[:, 3 * H :]]
        w_in = [w.w_ih[: 2 * H], w.w_ih[2 * H :]]
        dx = None
        if need_dx:
            dx = (d_in[0] @ w_in[0]).addmm_(d_in[1], w_in[1])
        dw_ih = torch.cat([d_in[0].t() @ x, d_in[1].t() @ x])
        d_hid = dG[:, : 3 * H]
        sums = dG.sum(0, dtype=acc).to(dG.dtype)
        biases = [torch.cat([sums[: 2 * H], sums[3 * H :]]), sums[: 3 * H]]
    else:
        dx = dG @ w.w_ih if need_dx else None
        dw_ih = dG.t() @ x
        d_hid = dG
        sums = dG.sum(0, dtype=acc).to(dG.dtype)
        biases = [sums, sums.clone()]
    grads = [dw_ih, _grad_w_hh(plan, d_hid, out_d, h0, restarting(restart, plan))]
    if w.b_ih is not None:
        grads += biases
    if w.w_hr is not None:
        grads.append(dhs.t() @ saved[2])  # dW_hr = sum over rows of dh_t^T r_t
    return dx, grads

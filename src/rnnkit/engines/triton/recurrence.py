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
"""

from __future__ import annotations

import torch
from torch import Tensor

from rnnkit.cells import CellParams
from rnnkit.engines.driver import StepPlan
from rnnkit.engines.triton import launch, persistent
from rnnkit.modes import MODES

__all__ = ["backward_direction", "forward_direction", "prev_rows", "weight_grads"]


def prev_rows(plan: StepPlan, device) -> Tensor:
    """For each row, its previous state's row in ``cat([out, h0])`` (``rows + j``: h0)."""
    index = torch.empty(plan.rows, dtype=torch.int64)
    for s, (o, b) in enumerate(zip(plan.off, plan.bs, strict=True)):
        o_prev, b_prev = plan.prev(s)
        j = torch.arange(b)
        index[o : o + b] = torch.where(j < b_prev, o_prev + j, plan.rows + j)
    return index.to(device)


def _linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return x @ w.t() if b is None else torch.addmm(b, x, w.t())


def forward_direction(mode, x, h0, c0, w: CellParams, plan: StepPlan, out_d, train: bool):
    """One direction: ``x`` [R, H_in], ``h0`` [N, H_out], ``c0`` [N, H] (LSTM), ``out_d``
    [R, H_out] (a column slice of the layer output) receives h_t. Returns ``h_n``, ``c_n``
    (LSTM, else None) and what backward needs (nothing unless ``train``)."""
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
            persistent.forward(mode, gates, w.w_hh, None, h, c, cs, out_d, h_n, steps, plan.reverse)
            return h_n, c.to(x.dtype), [gates, cs] if train else []
        rs = None if w.w_hr is None else x.new_empty(plan.rows if train else N, H)
        for o, b in zip(plan.off, plan.bs, strict=True):
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
            persistent.forward(
                mode, gx, w.w_hh, w.b_hh, h, None, ws, out_d, h_n, steps, plan.reverse
            )
            return h_n, None, [ws] if train else []
        hw = x.new_empty(N, 3 * H)
        # the state in the compute dtype, and its copy in the layer's dtype for the GEMM
        h_acc = h if acc == x.dtype else h.to(acc)
        hio = None if h_acc is h else h
        ws = x.new_empty(plan.rows, 4 * H) if train else None
        for o, b in zip(plan.off, plan.bs, strict=True):
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
        persistent.forward(
            mode, gates, w.w_hh, None, h, None, None, out_d, h_n, steps, plan.reverse
        )
        return h_n, None, []
    for o, b in zip(plan.off, plan.bs, strict=True):
        pre = gates[o : o + b].addmm_(h[:b], w_hh_t)
        launch.rnn_forward(pre, h, out_d[o : o + b], b, H, mode == "RNN_RELU")
    return h, None, []


def backward_direction(mode, gout_d, dh, dc, h0, c0, w: CellParams, plan: StepPlan, out_d, saved):
    """The reverse-time loop of one direction. ``gout_d`` [R, H_out] is the output's
    gradient, ``dh`` [N, H_out] (and ``dc`` [N, H] in the compute dtype) hold the final
    state's gradient on entry and the initial state's on exit. Returns ``dG``, the gradient
    of every row's pre-activations, and with a projection ``dhs`` = dL/dh_t of every row."""
    G = MODES[mode].gates
    H = w.w_hh.size(0) // G
    R = plan.rows
    dhs = None
    steps = reversed(range(len(plan.bs)))
    if persistent.takes(mode, gout_d, plan.N, H, w.w_hr is not None, plan.uniform):
        # the saved buffers are the per-step forward's, whichever forward ran
        dG = gout_d.new_empty(R, (4 if G > 1 else 1) * H)
        act, cs, s0 = None, None, None
        if mode == "LSTM":
            act, cs, s0 = saved[0], saved[1], c0
        elif mode == "GRU":
            act, s0 = saved[0], h0
        s0 = None if s0 is None else s0.contiguous()
        persistent.backward(
            mode, act, cs, s0, out_d, gout_d, w.w_hh, dh, dc, dG, len(plan.bs), plan.reverse
        )
        # dh_0 gets dG W_hh of the rows that read h_0 (GRU: added to its direct part)
        first = dG[plan.off[0] : plan.off[0] + plan.N, : G * H]
        if mode == "GRU":
            dh.addmm_(first, w.w_hh)
        else:
            torch.mm(first, w.w_hh, out=dh)
        return dG, None
    if mode == "LSTM":
        act, cs = saved[:2]
        dG = gout_d.new_empty(R, 4 * H)
        if w.w_hr is not None:
            dhs = gout_d.new_empty(R, w.w_hr.size(0))
            dr = gout_d.new_empty(plan.N, H)
        for s in steps:
            o, b = plan.off[s], plan.bs[s]
            o_prev, b_prev = plan.prev(s)
            rows = slice(o, o + b)
            if dhs is None:
                src, go = dh, gout_d[rows]
            else:
                torch.add(dh[:b], gout_d[rows], out=dhs[rows])
                src, go = torch.mm(dhs[rows], w.w_hr, out=dr[:b]), None
            launch.lstm_backward(
                act[rows], cs[rows], cs[o_prev:], c0, src, go, dc, dG[rows], b, b_prev, H
            )
            torch.mm(dG[rows], w.w_hh, out=dh[:b])
        return dG, dhs
    if mode == "GRU":
        (ws,) = saved
        dG = gout_d.new_empty(R, 4 * H)
        for s in steps:
            o, b = plan.off[s], plan.bs[s]
            o_prev, b_prev = plan.prev(s)
            rows = slice(o, o + b)
            launch.gru_backward(
                ws[rows], out_d[o_prev:], h0, dh, gout_d[rows], dG[rows], b, b_prev, H
            )
            dh[:b].addmm_(dG[rows, : 3 * H], w.w_hh)
        return dG, None
    dG = gout_d.new_empty(R, H)
    for s in steps:
        o, b = plan.off[s], plan.bs[s]
        rows = slice(o, o + b)
        launch.rnn_backward(out_d[rows], dh, gout_d[rows], dG[rows], b, H, mode == "RNN_RELU")
        torch.mm(dG[rows], w.w_hh, out=dh[:b])
    return dG, None


def _grad_w_hh(plan: StepPlan, dG: Tensor, out_d: Tensor, h0: Tensor) -> Tensor:
    """dW_hh = sum over rows of dG^T h_prev. Padded input: the previous states are the
    output shifted by one step and h0, two GEMMs on views; packed: gathered rows, one GEMM."""
    if not plan.uniform:
        prev = torch.cat([out_d, h0]).index_select(0, prev_rows(plan, dG.device))
        return dG.t() @ prev
    N, R = plan.N, plan.rows
    first = plan.off[0]  # the rows that read h0: the first time step, or the last in reverse
    dw = dG[first : first + N].t() @ h0
    if R > N:
        if first == 0:
            dw.addmm_(dG[N:].t(), out_d[: R - N])
        else:
            dw.addmm_(dG[: R - N].t(), out_d[N:])
    return dw


def weight_grads(mode, dG, dhs, x, h0, w: CellParams, plan: StepPlan, out_d, saved, need_dx: bool):
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
    grads = [dw_ih, _grad_w_hh(plan, d_hid, out_d, h0)]
    if w.b_ih is not None:
        grads += biases
    if w.w_hr is not None:
        grads.append(dhs.t() @ saved[2])  # dW_hr = sum over rows of dh_t^T r_t
    return dx, grads

"""The persistent kernels: a direction's whole time loop in one launch, ``W_hh`` kept on chip.

The per-step engine (``recurrence.py``) launches a GEMM and a pointwise kernel every step; at
small batch and hidden sizes those launches, not the arithmetic, set the time. Here one launch
runs every step of one direction of an LSTM, GRU or Elman RNN without projection on a padded
(or equal-length packed) batch, forward and backward.

The grid is ``[batch tiles, unit tiles]``. A program owns the rows ``BLOCK_N`` and units
``BLOCK_H`` of its tile: it loads its slice of ``W_hh`` once, before the loop, and keeps it
(registers, or shared memory where the compiler puts it), keeps its part of the LSTM cell state
in registers, and per step reads the whole previous ``h`` of its rows (every unit tile wrote a
part) from global memory. The unit tiles of one batch tile meet at a barrier after each step:
an atomic counter per batch tile, release on arrival and acquire while waiting, which needs all
programs resident at once; the launcher keeps the grid within the GPU's multiprocessors.
Backward holds the columns of ``W_hh`` of its units and runs the steps in reverse, writing the
gate gradients ``dG`` of every row, from which ``recurrence.weight_grads`` takes the weight and
input gradients as one GEMM each, as for the per-step engine.

Triton's interpreter runs a launch's programs one after another, so a program waiting for
another would wait forever; interpreted, one unit tile covers all units and the counter is
never waited on. The buffers saved for backward are the per-step engine's, so either backward
runs after either forward.

Resets inside a sequence (``RESET``) select inside the loop: each step reads its rows' restart
codes and starts them from the previous state, zeros or the initial state, and backward stops
the gradient of the state a restarted row started from (sending it to the initial state's
where the row restarted from it).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from rnnkit.engines.triton import kernels, launch
from rnnkit.engines.triton.kernels import COMPILED, sigmoid, tanh
from rnnkit.modes import MODES
from rnnkit.resets import CARRY, INITIAL, ZERO

# the mode codes of rnnkit.modes, as constants the kernels compare MODE against
_LSTM = tl.constexpr(MODES["LSTM"].code)
_GRU = tl.constexpr(MODES["GRU"].code)
_RNN_TANH = tl.constexpr(MODES["RNN_TANH"].code)
# the restart codes of rnnkit.resets
_CARRY = tl.constexpr(CARRY)
_ZERO = tl.constexpr(ZERO)
_INITIAL = tl.constexpr(INITIAL)
# The largest hidden size whose whole previous h a program reads into one dot operand, and
# the most elements of W_hh a program keeps (starting points for tuning on a GPU).
MAX_H = 256
_W_TILE = 16384


@triton.jit
def _step_barrier(p_sync, target, TILES_H: tl.constexpr):
    """Every program of this batch tile has stored its part of this step (``target`` arrivals
    in all): from here on, their stores are visible to this program's loads."""
    tl.debug_barrier()
    if TILES_H > 1:
        arrived = tl.atomic_add(p_sync, 1, sem="release", scope="gpu") + 1
        while arrived < target:
            arrived = tl.atomic_add(p_sync, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _dot(a, b, ACC: tl.constexpr):
    # full-precision float32 products, as cuBLAS's default (no TF32). The interpreter's dot
    # gets half-precision operands wrong; their products are exact in float32 anyway.
    if not COMPILED:
        a = a.to(ACC)
        b = b.to(ACC)
    return tl.dot(a, b, input_precision="ieee", out_dtype=ACC)


@triton.jit
def _program_tile(N, H, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's rows (int64, ``[BLOCK_N, 1]``) and units (``[BLOCK_H]``), all units
    (``[BLOCK_K]``), the masks of its ``[rows, units]`` tile and of ``[rows, all units]``, and
    its tile's offsets in an ``[N, H]`` state."""
    o_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    o_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    o_k = tl.arange(0, BLOCK_K)
    rows = o_n.to(tl.int64)[:, None]
    m_n = o_n[:, None] < N
    return (
        rows,
        o_h,
        o_k,
        m_n & (o_h[None, :] < H),
        m_n & (o_k[None, :] < H),
        rows * H + o_h[None, :],
    )


@triton.jit
def _w_slice(p_w, o_k, o_h, H, gate, ROWS_K: tl.constexpr):
    """Gate ``gate``'s block of ``W_hh`` [G*H, H] for this program's units, ``[BLOCK_K,
    BLOCK_H]``: ``W_g^T`` (rows of the units, forward) or ``W_g`` (columns, backward)."""
    m_w = (o_k[:, None] < H) & (o_h[None, :] < H)
    if ROWS_K:
        p = p_w + (gate * H + o_k[:, None]).to(tl.int64) * H + o_h[None, :]
    else:
        p = p_w + (gate * H + o_h[None, :]).to(tl.int64) * H + o_k[:, None]
    return tl.load(p, mask=m_w, other=0.0)


@triton.jit
def persistent_forward_kernel(
    p_gx,  # [R, G*H] x W_ih^T + biases per row (GRU: b_ih only); LSTM: activations on exit
    p_w,  # [G*H, H] W_hh
    p_bhh,  # [G*H] GRU: b_hh (HAS_BHH)
    p_h0,  # [N, H]
    p_c,  # [N, H] LSTM: c_0 on entry, c_n on exit (ACC)
    p_keep,  # saved when SAVE: LSTM c_t [R, H]; GRU r|z|n|h_n [R, 4H]
    p_out,  # [R, *] h_t of every row (row stride s_out)
    p_hn,  # [N, H] h_n
    p_codes,  # [R] int8 restart codes of every row (RESET)
    p_sync,  # [batch tiles] int32 zeros
    N,
    H,
    steps,
    s_out,
    ACC: tl.constexpr,
    MODE: tl.constexpr,
    G: tl.constexpr,  # gate blocks of MODE
    HAS_BHH: tl.constexpr,
    SAVE: tl.constexpr,
    RESET: tl.constexpr,
    REVERSE: tl.constexpr,
    TILES_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # LSTM: i, f, o = sigmoid(.), g = tanh(.), c_t = f c_{t-1} + i g, h_t = o tanh(c_t);
    # RNN: h_t = tanh(.) or relu(.), (.) = x_t W_ih^T + b + h_{t-1} W_hh^T;
    # GRU: r, z = sigmoid(x_r + h_r), sigmoid(x_z + h_z), n = tanh(x_n + r h_n),
    #      h_t = (h_{t-1} - n) z + n, with h_* = h_{t-1} W_h*^T + b_h*
    # With RESET, a row's h_{t-1} (and c_{t-1}) is first selected by its code: itself, zeros,
    # or h_0 (c_0, which p_c holds until the end).
    rows, o_h, o_k, mask, m_prev, o_s = _program_tile(N, H, BLOCK_N, BLOCK_H, BLOCK_K)
    # this program's W_hh^T columns per gate, [BLOCK_K, BLOCK_H], for the whole loop
    w_0 = _w_slice(p_w, o_k, o_h, H, 0, False)
    if G > 1:
        w_1 = _w_slice(p_w, o_k, o_h, H, 1, False)
        w_2 = _w_slice(p_w, o_k, o_h, H, 2, False)
    if G == 4:
        w_3 = _w_slice(p_w, o_k, o_h, H, 3, False)
        b_c = tl.load(p_c + o_s, mask=mask, other=0.0).to(ACC)
    if MODE == _GRU:
        b_h = tl.load(p_h0 + o_s, mask=mask, other=0.0).to(ACC)  # the state, in ACC
        if HAS_BHH:
            m_b = o_h[None, :] < H
            b_br = tl.load(p_bhh + o_h[None, :], mask=m_b, other=0.0).to(ACC)
            b_bz = tl.load(p_bhh + H + o_h[None, :], mask=m_b, other=0.0).to(ACC)
            b_bn = tl.load(p_bhh + 2 * H + o_h[None, :], mask=m_b, other=0.0).to(ACC)
    else:
        b_h = tl.full([BLOCK_N, BLOCK_H], 0.0, ACC)
    p_sync += tl.program_id(0)
    for s in range(steps):
        t = steps - 1 - s if REVERSE else s
        t_prev = t + 1 if REVERSE else t - 1
        # h_{t-1} of this tile's rows, all units: h_0, or what every unit tile stored last step
        first = (rows * 0 + s) == 0  # the step that reads h_0, as a [BLOCK_N, 1] mask
        from_h0 = first
        from_prev = ~first
        if RESET:
            code = tl.load(p_codes + t * N + rows, mask=rows < N, other=0)
            from_h0 = (first & (code == _CARRY)) | (code == _INITIAL)
            from_prev = from_prev & (code == _CARRY)
            initial = mask & (code == _INITIAL)
            if MODE == _LSTM:
                b_c0 = tl.load(p_c + o_s, mask=initial, other=0.0).to(ACC)
                b_c = tl.where(code == _CARRY, b_c, b_c0)
            if MODE == _GRU:
                b_h0 = tl.load(p_h0 + o_s, mask=initial, other=0.0).to(ACC)
                b_h = tl.where(code == _CARRY, b_h, b_h0)
        prev = tl.load(p_h0 + rows * H + o_k[None, :], mask=m_prev & from_h0, other=0.0)
        p_prev = p_out + (t_prev * N + rows) * s_out + o_k[None, :]
        prev += tl.load(p_prev, mask=m_prev & from_prev, other=0.0, cache_modifier=".cg")
        p_g = p_gx + (t * N + rows) * G * H + o_h[None, :]
        x_0 = tl.load(p_g, mask=mask, other=0.0).to(ACC)
        if MODE == _LSTM:
            b_i = sigmoid(_dot(prev, w_0, ACC) + x_0)
            b_f = sigmoid(_dot(prev, w_1, ACC) + tl.load(p_g + H, mask=mask, other=0.0).to(ACC))
            b_g = tanh(_dot(prev, w_2, ACC) + tl.load(p_g + 2 * H, mask=mask, other=0.0).to(ACC))
            b_o = sigmoid(_dot(prev, w_3, ACC) + tl.load(p_g + 3 * H, mask=mask, other=0.0).to(ACC))
            b_c = b_f * b_c + b_i * b_g
            b_h = b_o * tanh(b_c)
            if SAVE:
                ty = p_gx.dtype.element_ty
                tl.store(p_keep + (t * N + rows) * H + o_h[None, :], b_c.to(ty), mask=mask)
                tl.store(p_g, b_i.to(ty), mask=mask)
                tl.store(p_g + H, b_f.to(ty), mask=mask)
                tl.store(p_g + 2 * H, b_g.to(ty), mask=mask)
                tl.store(p_g + 3 * H, b_o.to(ty), mask=mask)
        elif MODE == _GRU:
            h_r = _dot(prev, w_0, ACC)
            h_z = _dot(prev, w_1, ACC)
            h_n = _dot(prev, w_2, ACC)
            if HAS_BHH:
                h_r += b_br
                h_z += b_bz
                h_n += b_bn
            b_r = sigmoid(h_r + x_0)
            b_z = sigmoid(h_z + tl.load(p_g + H, mask=mask, other=0.0).to(ACC))
            b_n = tanh(tl.load(p_g + 2 * H, mask=mask, other=0.0).to(ACC) + h_n * b_r)
            b_h = (b_h - b_n) * b_z + b_n
            if SAVE:
                ty = p_keep.dtype.element_ty
                p_w4 = p_keep + (t * N + rows) * 4 * H + o_h[None, :]
                tl.store(p_w4, b_r.to(ty), mask=mask)
                tl.store(p_w4 + H, b_z.to(ty), mask=mask)
                tl.store(p_w4 + 2 * H, b_n.to(ty), mask=mask)
                tl.store(p_w4 + 3 * H, h_n.to(ty), mask=mask)
        elif MODE == _RNN_TANH:
            b_h = tanh(_dot(prev, w_0, ACC) + x_0)
        else:
            b_h = tl.maximum(_dot(prev, w_0, ACC) + x_0, 0.0, propagate_nan=tl.PropagateNan.ALL)
        tl.store(
            p_out + (t * N + rows) * s_out + o_h[None, :],
            b_h.to(p_out.dtype.element_ty),
            mask=mask,
        )
        _step_barrier(p_sync, (s + 1) * TILES_H, TILES_H)
    tl.store(p_hn + o_s, b_h.to(p_hn.dtype.element_ty), mask=mask)
    if MODE == _LSTM:
        tl.store(p_c + o_s, b_c.to(p_c.dtype.element_ty), mask=mask)


@triton.jit
def persistent_backward_kernel(
    p_act,  # saved per row: LSTM activations i|f|g|o [R, 4H]; GRU r|z|n|h_n [R, 4H]
    p_cs,  # [R, H] LSTM: saved c_t
    p_s0,  # [N, H] LSTM: c_0; GRU: h_0
    p_out,  # [R, *] h_t of every row (row stride s_out)
    p_go,  # [R, *] dL/dh_t from the output rows (row stride s_go)
    p_w,  # [G*H, H] W_hh
    p_dh,  # [N, H] dL/dh_n; GRU: on exit dh_1 z_1, dh_0's direct part
    p_dc,  # [N, H] LSTM: dL/dc_n on entry, dL/dc_0 on exit (ACC)
    p_dG,  # [R, GS*H] gradient of every row's pre-activations (GRU: see kernels.py)
    p_codes,  # [R] int8 restart codes of every row (RESET)
    p_sync,  # [batch tiles] int32 zeros
    N,
    H,
    steps,
    s_out,
    s_go,
    ACC: tl.constexpr,
    MODE: tl.constexpr,
    G: tl.constexpr,  # gate blocks of MODE
    RESET: tl.constexpr,
    REVERSE: tl.constexpr,
    TILES_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # dh_t = dL/dh_t (output row) + dG_{t+1}[:, :G*H] W_hh (+ GRU's direct dh_{t+1} z_{t+1}),
    # then the per-step kernels' formulas (kernels.py) for dG_t. dh_0's GEMM part,
    # dG_1[:, :G*H] W_hh, is left to the caller.
    # With RESET, where step t+1 restarted a row, the gradient of the state it started from
    # stops there: the row's dh_t gets no part of step t+1 (and dc_t none), which goes to
    # dh_0 (dc_0) where the row restarted from the initial state; on exit p_dh holds that
    # part of dh_0 (GRU: with its direct part).
    GS: tl.constexpr = 1 if G == 1 else 4  # dG's row width in units of H
    rows, o_h, o_k, mask, m_next, o_s = _program_tile(N, H, BLOCK_N, BLOCK_H, BLOCK_K)
    # this program's columns of W_hh per gate, [BLOCK_K, BLOCK_H]: dh[:, units] = dG_g W_g
    w_0 = _w_slice(p_w, o_k, o_h, H, 0, True)
    if G > 1:
        w_1 = _w_slice(p_w, o_k, o_h, H, 1, True)
        w_2 = _w_slice(p_w, o_k, o_h, H, 2, True)
    if G == 4:
        w_3 = _w_slice(p_w, o_k, o_h, H, 3, True)
        b_dc = tl.load(p_dc + o_s, mask=mask, other=0.0).to(ACC)
    if MODE == _GRU:
        b_dd = tl.full([BLOCK_N, BLOCK_H], 0.0, ACC)  # dh_{t+1} z_{t+1}
    if RESET:
        b_dh0 = tl.full([BLOCK_N, BLOCK_H], 0.0, ACC)
        if MODE == _LSTM:
            b_dc0 = tl.full([BLOCK_N, BLOCK_H], 0.0, ACC)
    p_sync += tl.program_id(0)
    ty = p_dG.dtype.element_ty
    for s in range(steps):
        # processing order: backward in the direction's time
        t = s if REVERSE else steps - 1 - s
        t_next = t - 1 if REVERSE else t + 1
        t_prev = t + 1 if REVERSE else t - 1
        b_dh = tl.load(p_go + (t * N + rows) * s_go + o_h[None, :], mask=mask).to(ACC)
        if s == 0:
            b_dh += tl.load(p_dh + o_s, mask=mask).to(ACC)
        else:
            # dL/d(the state step t+1 started from), added to the output rows' part after
            p_n = p_dG + (t_next * N + rows) * GS * H + o_k[None, :]
            b_in = _dot(tl.load(p_n, mask=m_next, other=0.0, cache_modifier=".cg"), w_0, ACC)
            if G > 1:
                b_in += _dot(
                    tl.load(p_n + H, mask=m_next, other=0.0, cache_modifier=".cg"), w_1, ACC
                )
                b_in += _dot(
                    tl.load(p_n + 2 * H, mask=m_next, other=0.0, cache_modifier=".cg"), w_2, ACC
                )
            if G == 4:
                b_in += _dot(
                    tl.load(p_n + 3 * H, mask=m_next, other=0.0, cache_modifier=".cg"), w_3, ACC
                )
            if MODE == _GRU:
                b_in += b_dd
            if RESET:
                code_next = tl.load(p_codes + t_next * N + rows, mask=rows < N, other=0)
                b_dh0 += tl.where(code_next == _INITIAL, b_in, 0.0)
                b_in = tl.where(code_next == _CARRY, b_in, 0.0)
            b_dh += b_in
        p_d = p_dG + (t * N + rows) * GS * H + o_h[None, :]
        last = (rows * 0 + s) == steps - 1  # the step that reads the initial state
        from_s0 = last
        from_prev = ~last
        if RESET:
            # the state this step started from: the previous one, zeros or the initial one
            code = tl.load(p_codes + t * N + rows, mask=rows < N, other=0)
            from_s0 = (last & (code == _CARRY)) | (code == _INITIAL)
            from_prev = from_prev & (code == _CARRY)
        if MODE == _LSTM:
            p_a = p_act + (t * N + rows) * 4 * H + o_h[None, :]
            b_i = tl.load(p_a, mask=mask).to(ACC)
            b_f = tl.load(p_a + H, mask=mask).to(ACC)
            b_g = tl.load(p_a + 2 * H, mask=mask).to(ACC)
            b_o = tl.load(p_a + 3 * H, mask=mask).to(ACC)
            b_tc = tanh(tl.load(p_cs + (t * N + rows) * H + o_h[None, :], mask=mask).to(ACC))
            b_cp = tl.load(p_s0 + o_s, mask=mask & from_s0, other=0.0).to(ACC)
            p_cp = p_cs + (t_prev * N + rows) * H + o_h[None, :]
            b_cp += tl.load(p_cp, mask=mask & from_prev, other=0.0).to(ACC)
            b_dc = b_dc + b_dh * b_o * (1.0 - b_tc * b_tc)
            tl.store(p_d, (b_dc * b_g * b_i * (1.0 - b_i)).to(ty), mask=mask)
            tl.store(p_d + H, (b_dc * b_cp * b_f * (1.0 - b_f)).to(ty), mask=mask)
            tl.store(p_d + 2 * H, (b_dc * b_i * (1.0 - b_g * b_g)).to(ty), mask=mask)
            tl.store(p_d + 3 * H, (b_dh * b_tc * b_o * (1.0 - b_o)).to(ty), mask=mask)
            b_dc = b_dc * b_f
            if RESET:
                b_dc0 += tl.where(code == _INITIAL, b_dc, 0.0)
                b_dc = tl.where(code == _CARRY, b_dc, 0.0)
        elif MODE == _GRU:
            p_a = p_act + (t * N + rows) * 4 * H + o_h[None, :]
            b_r = tl.load(p_a, mask=mask).to(ACC)
            b_z = tl.load(p_a + H, mask=mask).to(ACC)
            b_n = tl.load(p_a + 2 * H, mask=mask).to(ACC)
            b_hn = tl.load(p_a + 3 * H, mask=mask).to(ACC)
            b_hp = tl.load(p_s0 + o_s, mask=mask & from_s0, other=0.0).to(ACC)
            p_hp = p_out + (t_prev * N + rows) * s_out + o_h[None, :]
            b_hp += tl.load(p_hp, mask=mask & from_prev, other=0.0).to(ACC)
            b_dan = b_dh * (1.0 - b_z) * (1.0 - b_n * b_n)
            tl.store(p_d, (b_dan * b_hn * b_r * (1.0 - b_r)).to(ty), mask=mask)
            tl.store(p_d + H, (b_dh * (b_hp - b_n) * b_z * (1.0 - b_z)).to(ty), mask=mask)
            tl.store(p_d + 2 * H, (b_dan * b_r).to(ty), mask=mask)
            tl.store(p_d + 3 * H, b_dan.to(ty), mask=mask)
            b_dd = b_dh * b_z
        else:
            b_h = tl.load(p_out + (t * N + rows) * s_out + o_h[None, :], mask=mask).to(ACC)
            if MODE == _RNN_TANH:
                b_d = b_dh * (1.0 - b_h * b_h)
            else:
                b_d = tl.where(b_h <= 0, 0.0, b_dh)  # NaN passes, as in torch
            tl.store(p_d, b_d.to(ty), mask=mask)
        _step_barrier(p_sync, (s + 1) * TILES_H, TILES_H)
    if MODE == _LSTM:
        if RESET:
            b_dc += b_dc0
        tl.store(p_dc + o_s, b_dc.to(p_dc.dtype.element_ty), mask=mask)
    if RESET:
        if MODE == _GRU:
            # the first step's direct part, unless that step started from zeros
            t_first = steps - 1 if REVERSE else 0
            code_first = tl.load(p_codes + t_first * N + rows, mask=rows < N, other=0)
            b_dh0 += tl.where(code_first == _ZERO, 0.0, b_dd)
        tl.store(p_dh + o_s, b_dh0.to(p_dh.dtype.element_ty), mask=mask)
    elif MODE == _GRU:
        tl.store(p_dh + o_s, b_dd.to(p_dh.dtype.element_ty), mask=mask)


def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 1 << 30
    return torch.cuda.get_device_properties(device).multi_processor_count


def tiling(mode: str, N: int, H: int, device: torch.device) -> dict | None:
    """Block sizes and grid of a persistent launch, or None where it does not fit: ``H`` over
    :data:`MAX_H`, or more programs than multiprocessors to keep them all resident."""
    if H > MAX_H:
        return None
    G = MODES[mode].gates
    block_k = max(16, triton.next_power_of_2(H))
    if kernels.INTERPRETED:
        block_h = block_k  # one unit tile: an interpreted program never waits
    else:
        block_h = max(16, min(block_k, triton.next_power_of_2(_W_TILE // (G * block_k))))
    block_n = max(16, min(64, triton.next_power_of_2(N)))
    grid = (triton.cdiv(N, block_n), triton.cdiv(H, block_h))
    if grid[0] * grid[1] > _multiprocessors(device):
        return None
    return dict(grid=grid, BLOCK_N=block_n, BLOCK_H=block_h, BLOCK_K=block_k)


def takes(mode: str, x: Tensor, N: int, H: int, has_proj: bool, uniform: bool) -> bool:
    """Whether the persistent kernels run this direction. ``RNNKIT_TRITON_PERSISTENT=0``
    turns them off (the per-step kernels run everything), ``=1`` uses them wherever they
    fit, as does the default."""
    if os.environ.get("RNNKIT_TRITON_PERSISTENT", "1") == "0":
        return False
    if has_proj or not uniform or N == 0:
        return False
    return tiling(mode, N, H, x.device) is not None


def forward(mode, gx, w_hh, b_hh, h0, c, keep, out_d, h_n, codes, steps, reverse: bool) -> None:
    """One direction in one launch: ``gx`` [R, G*H] pre-activations from the input side
    (LSTM activations on exit when saving), ``b_hh`` GRU's hidden bias or None, ``h0`` [N, H]
    contiguous, ``c`` [N, H] (LSTM, compute dtype) c_0 on entry and c_n on exit, ``keep`` what
    backward needs (LSTM c_t [R, H], GRU [R, 4H]) or None, ``out_d`` [R, *] receives h_t,
    ``h_n`` [N, H]; ``codes`` [R] the rows' restart codes (rnnkit.resets) or None."""
    N, H = h0.shape
    t = tiling(mode, N, H, gx.device)
    grid = t.pop("grid")
    sync = torch.zeros(grid[0], dtype=torch.int32, device=gx.device)
    persistent_forward_kernel[grid](
        gx, w_hh, b_hh, h0, c, keep, out_d, h_n, codes, sync, N, H, steps, out_d.stride(0),
        ACC=launch.acc_tl(h_n if c is None else c), MODE=MODES[mode].code, G=MODES[mode].gates,
        HAS_BHH=b_hh is not None, SAVE=keep is not None, RESET=codes is not None,
        REVERSE=reverse, TILES_H=grid[1], enable_fp_fusion=True, **t,
    )  # fmt: skip


def backward(
    mode, act, cs, s0, out_d, gout_d, w_hh, dh, dc, dG, codes, steps, reverse: bool
) -> None:
    """One direction back in one launch: ``act``/``cs`` the saved buffers, ``s0`` the initial
    state the first step read (LSTM c_0, GRU h_0), ``dh`` [N, H] dL/dh_n (GRU: its direct part
    of dh_0 on exit), ``dc`` [N, H] (LSTM) dL/dc_n on entry and dL/dc_0 on exit; writes ``dG``
    of every row; ``codes`` [R] the forward's restart codes or None. dh_0 still lacks
    ``dG[first rows, :G*H] W_hh`` (with ``codes``, of the first rows that did not restart from
    zeros, and ``dh`` then holds the rest of dh_0 for every mode)."""
    N, H = dh.shape
    t = tiling(mode, N, H, dG.device)
    grid = t.pop("grid")
    sync = torch.zeros(grid[0], dtype=torch.int32, device=dG.device)
    persistent_backward_kernel[grid](
        act, cs, s0, out_d, gout_d, w_hh, dh, dc, dG, codes, sync, N, H, steps,
        out_d.stride(0), gout_d.stride(0), ACC=launch.acc_tl(dh if dc is None else dc),
        MODE=MODES[mode].code, G=MODES[mode].gates, RESET=codes is not None, REVERSE=reverse,
        TILES_H=grid[1], enable_fp_fusion=True, **t,
    )  # fmt: skip

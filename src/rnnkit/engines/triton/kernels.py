"""Triton kernels of the per-step engine: the pointwise part of one time step of one direction.

Layout (as the fused CPU engine's): one row per (time step, batch element) in the order of the
padded or packed input; the rows of a step are contiguous, and gate blocks sit side by side in
a row as in torch's weights (LSTM i|f|g|o, GRU r|z|n). A kernel covers the ``b`` active rows
of one step, one ``[BLOCK_N, BLOCK_H]`` tile of (row, unit) per program. The recurrent GEMM
``h_{t-1} W_hh^T`` runs before the forward kernel and ``dG W_hh`` after the backward kernel,
both in torch (cuBLAS on a GPU).

Loads are cast to ``ACC`` (float32, or float64 for float64 layers), all pointwise math and the
running state (LSTM ``c`` and ``dc``, GRU ``h``) stay in it, and stores cast to the
destination's dtype: half-precision layers keep state and pointwise math in float32.

Resets inside a sequence (:mod:`rnnkit.resets`) come as one int8 restart code per row
(``CARRY``, ``ZERO``, ``INITIAL``): :func:`restart_forward_kernel` selects the carried state of
a step's rows before the step's GEMM, :func:`restart_backward_kernel` cuts the gradient of that
state after the step back, and the backward kernels that read the previous state read zeros or
the initial state for the rows that restart (``RESET``).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

from rnnkit.resets import CARRY, INITIAL

# the restart codes of rnnkit.resets, as constants the kernels compare codes against
_CARRY = tl.constexpr(CARRY)
_INITIAL = tl.constexpr(INITIAL)


@triton.jit
def _probe():
    pass


# Kernels decorated under TRITON_INTERPRET=1 run in Triton's interpreter (on CPU tensors too):
# Triton reads the variable when it decorates a kernel, i.e. when this module is first imported.
INTERPRETED = not isinstance(_probe, triton.runtime.JITFunction)
COMPILED = tl.constexpr(not INTERPRETED)


@triton.jit
def sigmoid(x):
    # e = exp(-|x|) lies in (0, 1]: no overflow at any |x|, full precision for x < 0
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def tanh(x):
    if COMPILED:
        t = libdevice.tanh(x)
    else:
        # Triton's interpreter has no libdevice: tanh|x| = -m / (2 + m) with
        # m = expm1(-2|x|) in [-1, 0], in float64 so that float32 gets a correctly rounded
        # tanh as torch's. Near 0, u - 1 with u = exp(-2|x|) cancels; Kahan's
        # expm1(y) = (u - 1) y / log(u) keeps the relative precision there (u > 1/4; below,
        # u - 1 is exact enough, and u may be subnormal, which the log would not forgive)
        y = -2.0 * tl.abs(x.to(tl.float64))
        u = tl.exp(y)
        near = (u > 0.25) & (u < 1.0)
        v = tl.where(near, u, 0.5)
        m = tl.where(near, (v - 1.0) * y / tl.log(v), tl.where(u == 1.0, y, u - 1.0))
        t = -m / (2.0 + m)
        t = tl.where(x < 0, -t, t).to(x.dtype)
    return t


@triton.jit
def tile(b, H, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rows (int64, ``[BLOCK_N, 1]``), units (``[1, BLOCK_H]``) and mask of this program."""
    o_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    o_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (o_n[:, None] < b) & (o_h[None, :] < H)
    return o_n.to(tl.int64)[:, None], o_h[None, :], mask


@triton.jit
def prev_source(p_codes, o_n, b, b_prev, RESET: tl.constexpr):
    """Where each row's previous state comes from: the previous step's rows (``o_n <
    b_prev``) or the initial state's (the rest, and with ``RESET`` the rows that restart from
    it); a row that restarts from zeros reads neither."""
    from_prev = o_n < b_prev
    from_init = o_n >= b_prev
    if RESET:
        code = tl.load(p_codes + o_n, mask=o_n < b, other=0)
        from_prev = from_prev & (code == _CARRY)
        from_init = (from_init & (code == _CARRY)) | (code == _INITIAL)
    return from_prev, from_init


@triton.jit
def restart_forward_kernel(
    p_codes,  # [b] int8 restart codes of this step's rows
    p_a,  # [N, *] a state (row stride s_a): rows restarted in place
    p_a0,  # [N, *] its initial state (row stride s_a0)
    p_b,  # [N, *] a second state (TWO)
    p_b0,  # [N, *] its initial state (TWO)
    b,
    W,  # max(W_a, W_b)
    W_a,
    W_b,
    s_a,
    s_a0,
    s_b,
    s_b0,
    TWO: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # s = s (CARRY), 0 (ZERO) or s_0 (INITIAL): a select, so that a NaN does not cross a reset
    o_n, o_h, mask = tile(b, W, BLOCK_N, BLOCK_H)
    code = tl.load(p_codes + o_n, mask=o_n < b, other=0)
    restart = mask & (code != _CARRY)
    initial = code == _INITIAL
    m_a = restart & (o_h < W_a)
    b_a0 = tl.load(p_a0 + o_n * s_a0 + o_h, mask=m_a & initial, other=0.0)
    tl.store(p_a + o_n * s_a + o_h, b_a0.to(p_a.dtype.element_ty), mask=m_a)
    if TWO:
        m_b = restart & (o_h < W_b)
        b_b0 = tl.load(p_b0 + o_n * s_b0 + o_h, mask=m_b & initial, other=0.0)
        tl.store(p_b + o_n * s_b + o_h, b_b0.to(p_b.dtype.element_ty), mask=m_b)


@triton.jit
def restart_backward_kernel(
    p_codes,  # [b] int8 restart codes of this step's rows
    p_da,  # [N, *] dL/d(state entering the step): zeroed where the row restarts
    p_da0,  # [N, *] dL/d(initial state), gathered: += p_da where the row restarts from it
    p_db,  # [N, *] a second state's (TWO)
    p_db0,  # [N, *] (TWO)
    b,
    W,  # max(W_a, W_b)
    W_a,
    W_b,
    TWO: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # s_in = s_prev (CARRY), 0 (ZERO) or s_0 (INITIAL): ds_prev = ds_in [CARRY],
    # ds_0 += ds_in [INITIAL]
    o_n, o_h, mask = tile(b, W, BLOCK_N, BLOCK_H)
    code = tl.load(p_codes + o_n, mask=o_n < b, other=0)
    restart = mask & (code != _CARRY)
    m_a = restart & (o_h < W_a)
    m_a0 = m_a & (code == _INITIAL)
    b_da = tl.load(p_da + o_n * W_a + o_h, mask=m_a0, other=0.0)
    b_da0 = tl.load(p_da0 + o_n * W_a + o_h, mask=m_a0, other=0.0)
    tl.store(p_da0 + o_n * W_a + o_h, b_da0 + b_da, mask=m_a0)
    tl.store(p_da + o_n * W_a + o_h, tl.full([BLOCK_N, BLOCK_H], 0.0, b_da.dtype), mask=m_a)
    if TWO:
        m_b = restart & (o_h < W_b)
        m_b0 = m_b & (code == _INITIAL)
        b_db = tl.load(p_db + o_n * W_b + o_h, mask=m_b0, other=0.0)
        b_db0 = tl.load(p_db0 + o_n * W_b + o_h, mask=m_b0, other=0.0)
        tl.store(p_db0 + o_n * W_b + o_h, b_db0 + b_db, mask=m_b0)
        tl.store(p_db + o_n * W_b + o_h, tl.full([BLOCK_N, BLOCK_H], 0.0, b_db.dtype), mask=m_b)


@triton.jit
def lstm_forward_kernel(
    p_gates,  # [b, 4H] pre-activations; the activations i|f|g|o on exit when SAVE
    p_c,  # [N, H] c_{t-1} on entry, c_t on exit (ACC)
    p_cs,  # [b, H] this step's rows of the saved c_t (SAVE)
    p_h,  # [b, *] h_t, or r_t = o * tanh(c_t) with a projection
    p_out,  # [b, *] a second copy of h_t: the output rows (OUT)
    b,
    H,
    s_h,
    s_out,
    ACC: tl.constexpr,
    SAVE: tl.constexpr,
    OUT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # i, f, o = sigmoid(.), g = tanh(.);  c_t = f c_{t-1} + i g;  h_t = o tanh(c_t)
    o_n, o_h, mask = tile(b, H, BLOCK_N, BLOCK_H)
    p_g = p_gates + o_n * 4 * H + o_h
    b_i = sigmoid(tl.load(p_g, mask=mask).to(ACC))
    b_f = sigmoid(tl.load(p_g + H, mask=mask).to(ACC))
    b_g = tanh(tl.load(p_g + 2 * H, mask=mask).to(ACC))
    b_o = sigmoid(tl.load(p_g + 3 * H, mask=mask).to(ACC))
    o_c = o_n * H + o_h
    b_c = b_f * tl.load(p_c + o_c, mask=mask) + b_i * b_g
    tl.store(p_c + o_c, b_c, mask=mask)
    b_h = b_o * tanh(b_c)
    tl.store(p_h + o_n * s_h + o_h, b_h.to(p_h.dtype.element_ty), mask=mask)
    if OUT:
        tl.store(p_out + o_n * s_out + o_h, b_h.to(p_out.dtype.element_ty), mask=mask)
    if SAVE:
        ty = p_gates.dtype.element_ty
        tl.store(p_cs + o_c, b_c.to(p_cs.dtype.element_ty), mask=mask)
        tl.store(p_g, b_i.to(ty), mask=mask)
        tl.store(p_g + H, b_f.to(ty), mask=mask)
        tl.store(p_g + 2 * H, b_g.to(ty), mask=mask)
        tl.store(p_g + 3 * H, b_o.to(ty), mask=mask)


@triton.jit
def lstm_backward_kernel(
    p_act,  # [b, 4H] saved activations i|f|g|o
    p_cs,  # [b, H] saved c_t
    p_cprev,  # [b_prev, H] the previous step's saved c_t: c_{t-1} of rows < b_prev
    p_c0,  # [N, H] c_0: c_{t-1} of rows >= b_prev (with RESET, and of rows restarting from it)
    p_dh,  # [b, *] dL/dh_t from the later steps (ADD_GO), or dr_t with a projection
    p_go,  # [b, *] dL/dh_t from the output rows (ADD_GO)
    p_dc,  # [N, H] dL/dc_t on entry, dL/dc_{t-1} on exit (ACC)
    p_dG,  # [b, 4H] gradient of the pre-activations
    p_codes,  # [b] int8 restart codes of this step's rows (RESET)
    b,
    b_prev,
    H,
    s_dh,
    s_go,
    ACC: tl.constexpr,
    ADD_GO: tl.constexpr,
    RESET: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # With dr = dL/d(o tanh(c_t)) (dh_t itself without a projection):
    #   do = dr tanh(c_t),  dc_t += dr o (1 - tanh^2(c_t))
    #   c_t = f c_{t-1} + i g  =>  di = dc_t g, df = dc_t c_{t-1}, dg = dc_t i,
    #                              dc_{t-1} = dc_t f
    #   sigmoid' = s (1 - s), tanh' = 1 - t^2 turn them into dG = dL/d(pre-activations);
    #   dh_{t-1} = dG W_hh follows as a GEMM.
    o_n, o_h, mask = tile(b, H, BLOCK_N, BLOCK_H)
    p_a = p_act + o_n * 4 * H + o_h
    b_i = tl.load(p_a, mask=mask).to(ACC)
    b_f = tl.load(p_a + H, mask=mask).to(ACC)
    b_g = tl.load(p_a + 2 * H, mask=mask).to(ACC)
    b_o = tl.load(p_a + 3 * H, mask=mask).to(ACC)
    o_c = o_n * H + o_h
    b_tc = tanh(tl.load(p_cs + o_c, mask=mask).to(ACC))
    from_prev, from_init = prev_source(p_codes, o_n, b, b_prev, RESET)
    b_cp = tl.load(p_cprev + o_c, mask=mask & from_prev, other=0.0).to(ACC)
    b_cp += tl.load(p_c0 + o_c, mask=mask & from_init, other=0.0).to(ACC)
    b_dr = tl.load(p_dh + o_n * s_dh + o_h, mask=mask).to(ACC)
    if ADD_GO:
        b_dr += tl.load(p_go + o_n * s_go + o_h, mask=mask).to(ACC)
    b_dc = tl.load(p_dc + o_c, mask=mask) + b_dr * b_o * (1.0 - b_tc * b_tc)
    tl.store(p_dc + o_c, b_dc * b_f, mask=mask)
    ty = p_dG.dtype.element_ty
    p_d = p_dG + o_n * 4 * H + o_h
    tl.store(p_d, (b_dc * b_g * b_i * (1.0 - b_i)).to(ty), mask=mask)
    tl.store(p_d + H, (b_dc * b_cp * b_f * (1.0 - b_f)).to(ty), mask=mask)
    tl.store(p_d + 2 * H, (b_dc * b_i * (1.0 - b_g * b_g)).to(ty), mask=mask)
    tl.store(p_d + 3 * H, (b_dr * b_tc * b_o * (1.0 - b_o)).to(ty), mask=mask)


@triton.jit
def gru_forward_kernel(
    p_x,  # [b, 3H] x W_ih^T + b_ih of this step's rows
    p_hw,  # [b, 3H] h_{t-1} W_hh^T + b_hh
    p_h,  # [N, H] h_{t-1} on entry, h_t on exit (ACC)
    p_hio,  # [N, H] h_t in the layer's dtype for the next GEMM (IO_STATE)
    p_out,  # [b, *] output rows
    p_ws,  # [b, 4H] saved r|z|n|h_n (SAVE)
    b,
    H,
    s_out,
    ACC: tl.constexpr,
    IO_STATE: tl.constexpr,
    SAVE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # r = sigmoid(x_r + h_r), z = sigmoid(x_z + h_z), n = tanh(x_n + r h_n),
    # h_t = (h_{t-1} - n) z + n, in the op order of the reference cell
    o_n, o_h, mask = tile(b, H, BLOCK_N, BLOCK_H)
    p_xr = p_x + o_n * 3 * H + o_h
    p_hr = p_hw + o_n * 3 * H + o_h
    b_r = sigmoid(tl.load(p_hr, mask=mask).to(ACC) + tl.load(p_xr, mask=mask).to(ACC))
    b_z = sigmoid(tl.load(p_hr + H, mask=mask).to(ACC) + tl.load(p_xr + H, mask=mask).to(ACC))
    b_hn = tl.load(p_hr + 2 * H, mask=mask).to(ACC)
    b_n = tanh(tl.load(p_xr + 2 * H, mask=mask).to(ACC) + b_hn * b_r)
    o_s = o_n * H + o_h
    b_h = (tl.load(p_h + o_s, mask=mask) - b_n) * b_z + b_n
    tl.store(p_h + o_s, b_h, mask=mask)
    if IO_STATE:
        tl.store(p_hio + o_s, b_h.to(p_hio.dtype.element_ty), mask=mask)
    tl.store(p_out + o_n * s_out + o_h, b_h.to(p_out.dtype.element_ty), mask=mask)
    if SAVE:
        ty = p_ws.dtype.element_ty
        p_w = p_ws + o_n * 4 * H + o_h
        tl.store(p_w, b_r.to(ty), mask=mask)
        tl.store(p_w + H, b_z.to(ty), mask=mask)
        tl.store(p_w + 2 * H, b_n.to(ty), mask=mask)
        tl.store(p_w + 3 * H, b_hn.to(ty), mask=mask)


@triton.jit
def gru_backward_kernel(
    p_ws,  # [b, 4H] saved r|z|n|h_n
    p_hprev,  # [b_prev, *] the previous step's output rows: h_{t-1} of rows < b_prev
    p_h0,  # [N, H] h_0: h_{t-1} of rows >= b_prev (with RESET, and of rows restarting from it)
    p_dh,  # [N, H] dL/dh_t from the later steps on entry; its direct part dh_t z on exit
    p_go,  # [b, *] dL/dh_t from the output rows
    p_dG,  # [b, 4H] dA_r | dA_z | dA_n r (hidden side) | dA_n (input side)
    p_codes,  # [b] int8 restart codes of this step's rows (RESET)
    b,
    b_prev,
    H,
    s_prev,
    s_go,
    ACC: tl.constexpr,
    RESET: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # h_t = (h_{t-1} - n) z + n  =>  dz = dh (h_{t-1} - n), dn = dh (1 - z), dh_{t-1} = dh z + ...
    # n = tanh(x_n + r h_n)      =>  dA_n = dn (1 - n^2), dr = dA_n h_n, d(h_n) = dA_n r
    # r, z = sigmoid(.)          =>  dA_r = dr r (1 - r), dA_z = dz z (1 - z)
    # The reset gate sits inside n: the input side sees dA_n where the hidden side sees
    # dA_n r, so a row of dG holds both; dh_{t-1} += dG[:, :3H] W_hh follows as a GEMM.
    o_n, o_h, mask = tile(b, H, BLOCK_N, BLOCK_H)
    o_s = o_n * H + o_h
    b_dh = tl.load(p_dh + o_s, mask=mask).to(ACC)
    b_dh += tl.load(p_go + o_n * s_go + o_h, mask=mask).to(ACC)
    p_w = p_ws + o_n * 4 * H + o_h
    b_r = tl.load(p_w, mask=mask).to(ACC)
    b_z = tl.load(p_w + H, mask=mask).to(ACC)
    b_n = tl.load(p_w + 2 * H, mask=mask).to(ACC)
    b_hn = tl.load(p_w + 3 * H, mask=mask).to(ACC)
    from_prev, from_init = prev_source(p_codes, o_n, b, b_prev, RESET)
    b_hp = tl.load(p_hprev + o_n * s_prev + o_h, mask=mask & from_prev, other=0.0).to(ACC)
    b_hp += tl.load(p_h0 + o_s, mask=mask & from_init, other=0.0).to(ACC)
    b_dan = b_dh * (1.0 - b_z) * (1.0 - b_n * b_n)
    ty = p_dG.dtype.element_ty
    p_d = p_dG + o_n * 4 * H + o_h
    tl.store(p_d, (b_dan * b_hn * b_r * (1.0 - b_r)).to(ty), mask=mask)
    tl.store(p_d + H, (b_dh * (b_hp - b_n) * b_z * (1.0 - b_z)).to(ty), mask=mask)
    tl.store(p_d + 2 * H, (b_dan * b_r).to(ty), mask=mask)
    tl.store(p_d + 3 * H, b_dan.to(ty), mask=mask)
    tl.store(p_dh + o_s, (b_dh * b_z).to(p_dh.dtype.element_ty), mask=mask)


@triton.jit
def rnn_forward_kernel(
    p_a,  # [b, H] pre-activations
    p_h,  # [N, H] h_t (the state)
    p_out,  # [b, *] output rows
    b,
    H,
    s_out,
    ACC: tl.constexpr,
    RELU: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    o_n, o_h, mask = tile(b, H, BLOCK_N, BLOCK_H)
    b_a = tl.load(p_a + o_n * H + o_h, mask=mask).to(ACC)
    if RELU:
        b_h = tl.maximum(b_a, 0.0, propagate_nan=tl.PropagateNan.ALL)  # relu(NaN) = NaN
    else:
        b_h = tanh(b_a)
    tl.store(p_h + o_n * H + o_h, b_h.to(p_h.dtype.element_ty), mask=mask)
    tl.store(p_out + o_n * s_out + o_h, b_h.to(p_out.dtype.element_ty), mask=mask)


@triton.jit
def rnn_backward_kernel(
    p_hs,  # [b, *] this step's output rows h_t
    p_dh,  # [N, H] dL/dh_t from the later steps
    p_go,  # [b, *] dL/dh_t from the output rows
    p_dG,  # [b, H] gradient of the pre-activations
    b,
    H,
    s_hs,
    s_go,
    ACC: tl.constexpr,
    RELU: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # tanh: dA = dh (1 - h_t^2);  relu: dA = dh [h_t > 0];  dh_{t-1} = dA W_hh follows
    o_n, o_h, mask = tile(b, H, BLOCK_N, BLOCK_H)
    b_dh = tl.load(p_dh + o_n * H + o_h, mask=mask).to(ACC)
    b_dh += tl.load(p_go + o_n * s_go + o_h, mask=mask).to(ACC)
    b_h = tl.load(p_hs + o_n * s_hs + o_h, mask=mask).to(ACC)
    if RELU:
        b_da = tl.where(b_h <= 0, 0.0, b_dh)  # torch's threshold_backward: NaN passes
    else:
        b_da = b_dh * (1.0 - b_h * b_h)
    tl.store(p_dG + o_n * H + o_h, b_da.to(p_dG.dtype.element_ty), mask=mask)

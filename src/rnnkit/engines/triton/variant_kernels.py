"""Triton kernels of the LSTM variants (:mod:`rnnkit.variants`): one step's pointwise part.

One step, with h and c the previous state, k_h and k_c the zoneout keep weights (this step's
masks in training, the rates in eval), every clip optional (``variant.py`` runs the rest):

    rr  = LN_hh((h * m) W_hh^T) + b_hh        torch, before the forward kernel
    z   = gx + rr;  z_i += p_i c,  z_f += p_f c                       (peephole)
    i = sig(clip z_i),  f = sig(clip z_f) or 1 - i (coupled),  g = tanh(clip z_g)
    ct  = clip_c(f c + i g);  z_o += p_o ct;  o = sig(clip z_o)
    co  = w_c chat + b_c with chat = (ct - mean ct) rstd_c            (layer_norm; else co = ct)
    y   = o tanh(co)
    h'  = y + k_h (h - y)  (with a projection, torch: ht = clip_p(y W_hr^T), h' = ht + k_h (h - ht))
    c'  = ct + k_c (c - ct)

A program covers whole rows when layer_norm normalizes c (the launcher sees to it), since the
row statistics are a reduction over the row's units.
"""

from __future__ import annotations

import triton
import triton.language as tl

from rnnkit.engines.triton.kernels import prev_source, sigmoid, tanh, tile


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _row_sum(x):
    # tl.sum spelled with the core reduce: Triton's standard library (tl.sum, tl.zeros, ...) is
    # decorated when triton is imported, and cannot run in the interpreter when
    # TRITON_INTERPRET=1 came later
    return tl.reduce(x, 1, _add)


@triton.jit
def _clip(x, v, ON: tl.constexpr):
    if ON:
        # clamp(NaN) = NaN, as torch's
        x = tl.maximum(x, -v, propagate_nan=tl.PropagateNan.ALL)
        x = tl.minimum(x, v, propagate_nan=tl.PropagateNan.ALL)
    return x


@triton.jit
def _clip_grad(dx, x, v, ON: tl.constexpr):
    # torch.clamp's gradient: dx where -v <= x <= v
    if ON:
        dx = tl.where(tl.abs(x) <= v, dx, 0.0)
    return dx


@triton.jit
def _rows(BLOCK_N: tl.constexpr):
    """This program's rows as a vector (``tile`` gives them as a column)."""
    return (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)


@triton.jit
def _keep(p_k, o, mask, rate, MODE: tl.constexpr, ACC: tl.constexpr):
    """Zoneout's keep weight: 1 (MODE 1) this step's mask, (2) the eval rate."""
    if MODE == 1:
        k = tl.load(p_k + o, mask=mask, other=0.0).to(ACC)
    else:
        k = rate
    return k


@triton.jit
def lstm_variant_forward_kernel(
    p_gx,  # [b, 4H] input part of the gates (LN_ih(x W_ih^T) + b_ih)
    p_rr,  # [b, 4H] recurrent part (LN_hh(h W_hh^T) + b_hh)
    p_c,  # [N, H] c on entry, c' on exit (ACC)
    p_h,  # [N, H] h on entry, h' on exit (without a projection)
    p_out,  # [b, *] output rows (without a projection)
    p_y,  # [b, H] y = o tanh(co) (with a projection)
    p_peep,  # [3H] p_i | p_f | p_o
    p_lncw,  # [H] LayerNorm gain of c
    p_lncb,  # [H] LayerNorm shift of c
    p_kh,  # [b, H] zoneout masks of h (ZH == 1, without a projection)
    p_kc,  # [b, H] zoneout masks of c (ZC == 1)
    p_z,  # [b, 4H] saved pre-activations (SAVE)
    p_ct,  # [b, H] saved ct (SAVE)
    p_cz,  # [b, H] saved c' (SAVE and ZC)
    p_stats,  # [b, 2] saved mean and rstd of ct (SAVE and LN_C)
    p_scalars,  # [5] zoneout rates (h, c), gate and cell clips, LayerNorm eps, in ACC
    b,
    H,
    s_out,
    ACC: tl.constexpr,
    SAVE: tl.constexpr,
    PROJ: tl.constexpr,
    PEEP: tl.constexpr,
    CIFG: tl.constexpr,
    GCLIP: tl.constexpr,
    CCLIP: tl.constexpr,
    LN_C: tl.constexpr,
    ZH: tl.constexpr,
    ZC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    zh, zc = tl.load(p_scalars), tl.load(p_scalars + 1)
    gate_clip, cell_clip = tl.load(p_scalars + 2), tl.load(p_scalars + 3)
    o_n, o_h, mask = tile(b, H, BLOCK_N, BLOCK_H)
    o_g = o_n * 4 * H + o_h
    z_i = tl.load(p_gx + o_g, mask=mask).to(ACC) + tl.load(p_rr + o_g, mask=mask).to(ACC)
    z_f = tl.load(p_gx + o_g + H, mask=mask).to(ACC) + tl.load(p_rr + o_g + H, mask=mask).to(ACC)
    z_g = tl.load(p_gx + o_g + 2 * H, mask=mask).to(ACC)
    z_g += tl.load(p_rr + o_g + 2 * H, mask=mask).to(ACC)
    z_o = tl.load(p_gx + o_g + 3 * H, mask=mask).to(ACC)
    z_o += tl.load(p_rr + o_g + 3 * H, mask=mask).to(ACC)
    o_s = o_n * H + o_h
    b_c = tl.load(p_c + o_s, mask=mask, other=0.0)
    m_h = o_h < H
    if PEEP:
        z_i += tl.load(p_peep + o_h, mask=m_h).to(ACC) * b_c
        z_f += tl.load(p_peep + H + o_h, mask=m_h).to(ACC) * b_c
    b_i = sigmoid(_clip(z_i, gate_clip, GCLIP))
    if CIFG:
        b_f = 1.0 - b_i
    else:
        b_f = sigmoid(_clip(z_f, gate_clip, GCLIP))
    b_g = tanh(_clip(z_g, gate_clip, GCLIP))
    b_ct = _clip(b_f * b_c + b_i * b_g, cell_clip, CCLIP)
    if PEEP:
        z_o += tl.load(p_peep + 2 * H + o_h, mask=m_h).to(ACC) * b_ct
    b_o = sigmoid(_clip(z_o, gate_clip, GCLIP))
    b_co = b_ct
    if LN_C:
        mean = _row_sum(tl.where(mask, b_ct, 0.0)) / H
        diff = tl.where(mask, b_ct - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(_row_sum(diff * diff) / H + tl.load(p_scalars + 4))
        w_c = tl.load(p_lncw + o_h, mask=m_h).to(ACC)
        b_co = diff * rstd[:, None] * w_c + tl.load(p_lncb + o_h, mask=m_h).to(ACC)
    b_y = b_o * tanh(b_co)
    if PROJ:
        tl.store(p_y + o_s, b_y.to(p_y.dtype.element_ty), mask=mask)
    else:
        if ZH != 0:
            b_h = tl.load(p_h + o_s, mask=mask).to(ACC)
            b_y = b_y + _keep(p_kh, o_s, mask, zh, ZH, ACC) * (b_h - b_y)
        tl.store(p_h + o_s, b_y.to(p_h.dtype.element_ty), mask=mask)
        tl.store(p_out + o_n * s_out + o_h, b_y.to(p_out.dtype.element_ty), mask=mask)
    b_cn = b_ct
    if ZC != 0:
        b_cn = b_ct + _keep(p_kc, o_s, mask, zc, ZC, ACC) * (b_c - b_ct)
    tl.store(p_c + o_s, b_cn, mask=mask)
    if SAVE:
        ty = p_z.dtype.element_ty
        tl.store(p_z + o_g, z_i.to(ty), mask=mask)
        tl.store(p_z + o_g + H, z_f.to(ty), mask=mask)
        tl.store(p_z + o_g + 2 * H, z_g.to(ty), mask=mask)
        tl.store(p_z + o_g + 3 * H, z_o.to(ty), mask=mask)
        tl.store(p_ct + o_s, b_ct.to(ty), mask=mask)
        if ZC != 0:
            tl.store(p_cz + o_s, b_cn.to(ty), mask=mask)
        if LN_C:
            o_r = _rows(BLOCK_N)
            tl.store(p_stats + o_r * 2, mean.to(ty), mask=o_r < b)
            tl.store(p_stats + o_r * 2 + 1, rstd.to(ty), mask=o_r < b)


@triton.jit
def lstm_variant_backward_kernel(
    p_z,  # [b, 4H] saved pre-activations
    p_ct,  # [b, H] saved ct
    p_cprev,  # [b_prev, H] the previous step's c': c of rows < b_prev
    p_c0,  # [N, H] c_0: c of rows >= b_prev (with RESET, and of rows restarting from it)
    p_stats,  # [b, 2] mean and rstd of ct (LN_C)
    p_dy,  # [b, H] dL/dy (with a projection)
    p_dh,  # [N, H] dL/dh' from the later steps; on exit its part through zoneout (no PROJ)
    p_go,  # [b, *] dL/dh' from the output rows (no PROJ)
    p_kh,  # [b, H] zoneout masks of h (ZH == 1, no PROJ)
    p_dc,  # [N, H] dL/dc' on entry, dL/dc on exit (ACC)
    p_kc,  # [b, H] zoneout masks of c (ZC == 1)
    p_peep,
    p_lncw,
    p_lncb,
    p_dz,  # [b, 4H] gradient of the pre-activations
    p_dco,  # [b, H] dL/dco, for the LayerNorm parameters' gradients (LN_C)
    p_scalars,  # [5] as the forward kernel's
    p_codes,  # [b] int8 restart codes of this step's rows (RESET)
    b,
    b_prev,
    H,
    s_go,
    ACC: tl.constexpr,
    PROJ: tl.constexpr,
    RESET: tl.constexpr,
    PEEP: tl.constexpr,
    CIFG: tl.constexpr,
    GCLIP: tl.constexpr,
    CCLIP: tl.constexpr,
    LN_C: tl.constexpr,
    ZH: tl.constexpr,
    ZC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # zoneout: h' = y + k_h (h - y)  =>  dy = dh' (1 - k_h), dh += dh' k_h   (same for c)
    # do = dy tanh(co), dco = dy o (1 - tanh^2 co)
    # layer_norm on c: dchat = dco w_c, dct = rstd (dchat - mean(dchat) - chat mean(dchat chat))
    # dz_o = do o (1 - o) [|z_o| <= v];  dct += dc' (1 - k_c) + dz_o p_o
    # dpre = dct [|f c + i g| <= v_c];  di = dpre g, dg = dpre i, df = dpre c (coupled: di -= df)
    # dz_i = di i (1 - i) [..], dz_f = df f (1 - f) [..], dz_g = dg (1 - g^2) [..]
    # dc = dc' k_c + dpre f + dz_i p_i + dz_f p_f
    zh, zc = tl.load(p_scalars), tl.load(p_scalars + 1)
    gate_clip, cell_clip = tl.load(p_scalars + 2), tl.load(p_scalars + 3)
    o_n, o_h, mask = tile(b, H, BLOCK_N, BLOCK_H)
    o_s = o_n * H + o_h
    m_h = o_h < H
    if PROJ:
        b_dy = tl.load(p_dy + o_s, mask=mask, other=0.0).to(ACC)
    else:
        b_dhn = tl.load(p_dh + o_s, mask=mask, other=0.0).to(ACC)
        b_dhn += tl.load(p_go + o_n * s_go + o_h, mask=mask, other=0.0).to(ACC)
        b_dy = b_dhn
        b_dkeep = tl.full([BLOCK_N, BLOCK_H], 0.0, ACC)
        if ZH != 0:
            k = _keep(p_kh, o_s, mask, zh, ZH, ACC)
            b_dy = b_dhn * (1.0 - k)
            b_dkeep = b_dhn * k
        tl.store(p_dh + o_s, b_dkeep.to(p_dh.dtype.element_ty), mask=mask)
    o_g = o_n * 4 * H + o_h
    z_i = tl.load(p_z + o_g, mask=mask, other=0.0).to(ACC)
    z_f = tl.load(p_z + o_g + H, mask=mask, other=0.0).to(ACC)
    z_g = tl.load(p_z + o_g + 2 * H, mask=mask, other=0.0).to(ACC)
    z_o = tl.load(p_z + o_g + 3 * H, mask=mask, other=0.0).to(ACC)
    b_ct = tl.load(p_ct + o_s, mask=mask, other=0.0).to(ACC)
    from_prev, from_init = prev_source(p_codes, o_n, b, b_prev, RESET)
    b_cp = tl.load(p_cprev + o_s, mask=mask & from_prev, other=0.0).to(ACC)
    b_cp += tl.load(p_c0 + o_s, mask=mask & from_init, other=0.0).to(ACC)
    b_i = sigmoid(_clip(z_i, gate_clip, GCLIP))
    if CIFG:
        b_f = 1.0 - b_i
    else:
        b_f = sigmoid(_clip(z_f, gate_clip, GCLIP))
    b_g = tanh(_clip(z_g, gate_clip, GCLIP))
    b_o = sigmoid(_clip(z_o, gate_clip, GCLIP))
    b_co = b_ct
    if LN_C:
        o_r = _rows(BLOCK_N)
        mean = tl.load(p_stats + o_r * 2, mask=o_r < b, other=0.0).to(ACC)
        rstd = tl.load(p_stats + o_r * 2 + 1, mask=o_r < b, other=0.0).to(ACC)
        b_chat = tl.where(mask, (b_ct - mean[:, None]) * rstd[:, None], 0.0)
        w_c = tl.load(p_lncw + o_h, mask=m_h, other=0.0).to(ACC)
        b_co = b_chat * w_c + tl.load(p_lncb + o_h, mask=m_h, other=0.0).to(ACC)
    b_tc = tanh(b_co)
    b_dco = b_dy * b_o * (1.0 - b_tc * b_tc)
    d_zo = _clip_grad(b_dy * b_tc * b_o * (1.0 - b_o), z_o, gate_clip, GCLIP)
    b_dct = b_dco
    if LN_C:
        tl.store(p_dco + o_s, b_dco.to(p_dco.dtype.element_ty), mask=mask)
        b_dchat = tl.where(mask, b_dco * w_c, 0.0)
        s_d = _row_sum(b_dchat) / H
        s_dc = _row_sum(b_dchat * b_chat) / H
        b_dct = rstd[:, None] * (b_dchat - s_d[:, None] - b_chat * s_dc[:, None])
    b_dcn = tl.load(p_dc + o_s, mask=mask, other=0.0)
    b_dcp = tl.full([BLOCK_N, BLOCK_H], 0.0, ACC)
    if ZC != 0:
        k = _keep(p_kc, o_s, mask, zc, ZC, ACC)
        b_dct += b_dcn * (1.0 - k)
        b_dcp = b_dcn * k
    else:
        b_dct += b_dcn
    if PEEP:
        b_dct += d_zo * tl.load(p_peep + 2 * H + o_h, mask=m_h, other=0.0).to(ACC)
    b_dpre = _clip_grad(b_dct, b_f * b_cp + b_i * b_g, cell_clip, CCLIP)
    b_di = b_dpre * b_g
    b_df = b_dpre * b_cp
    if CIFG:
        b_di -= b_df
        d_zf = tl.full([BLOCK_N, BLOCK_H], 0.0, ACC)
    else:
        d_zf = _clip_grad(b_df * b_f * (1.0 - b_f), z_f, gate_clip, GCLIP)
    d_zi = _clip_grad(b_di * b_i * (1.0 - b_i), z_i, gate_clip, GCLIP)
    d_zg = _clip_grad(b_dpre * b_i * (1.0 - b_g * b_g), z_g, gate_clip, GCLIP)
    b_dcp += b_dpre * b_f
    if PEEP:
        b_dcp += d_zi * tl.load(p_peep + o_h, mask=m_h, other=0.0).to(ACC)
        b_dcp += d_zf * tl.load(p_peep + H + o_h, mask=m_h, other=0.0).to(ACC)
    tl.store(p_dc + o_s, b_dcp, mask=mask)
    ty = p_dz.dtype.element_ty
    tl.store(p_dz + o_g, d_zi.to(ty), mask=mask)
    tl.store(p_dz + o_g + H, d_zf.to(ty), mask=mask)
    tl.store(p_dz + o_g + 2 * H, d_zg.to(ty), mask=mask)
    tl.store(p_dz + o_g + 3 * H, d_zo.to(ty), mask=mask)

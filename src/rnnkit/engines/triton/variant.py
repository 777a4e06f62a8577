"""The LSTM variants (:mod:`rnnkit.variants`) on the Triton engine.

As on the fused CPU engine, the driver (:func:`~rnnkit.engines.driver.by_direction`) first
runs the shared :func:`rnnkit.cells.make_prepare` on torch ops for each layer and direction,
with autograd: the input projection (with ``layer_norm``'s input LayerNorm and ``b_ih``) of all
steps at once, and the random masks in their fixed order, so that this engine and the
reference draw the same masks under one seed.
:class:`VariantDirection` then runs the recurrence per step: torch for the GEMMs (and
``layer_norm``'s LayerNorm of the recurrent GEMM, the projection and its clip), one Triton
kernel for the rest (``variant_kernels.py``); and a hand-written backward that hands autograd
the gradient of the input projection, of the states and of every recurrent-side parameter.
Resets inside a sequence are the plain layers' per-row select (``recurrence.py``): the
direction's restart codes ride along as one more tensor input.

Runs every variant field but custom ``activations`` in any combination, with every core option, in float32 and float64, as the engine declares
(``engines/triton/__init__.py``); half precision, GRU/RNN variants, custom activations and any
field not named there run on the reference engine.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rnnkit.cells import LN_EPS, CellParams, State
from rnnkit.engines.driver import DirectionCall, LayerOutput, by_direction
from rnnkit.engines.grads import batched_grads, graph_grads, regrads
from rnnkit.engines.reference import direction_graph
from rnnkit.engines.triton import launch
from rnnkit.engines.triton.recurrence import (
    batch_rows,
    prev_states,
    restarting,
    restarts_at,
    restarts_of,
)
from rnnkit.variants import Variant

__all__ = ["layer"]


# The recurrent-side tensors of one direction, in VariantDirection's argument order.
def _recurrent_params(p: CellParams) -> list[Tensor | None]:
    return [p.w_hh, p.b_hh, p.w_hr, p.peephole, p.ln_hh, p.ln_c_weight, p.ln_c_bias]


def _params(params) -> CellParams:
    w_hh, b_hh, w_hr, peep, ln_hh, ln_cw, ln_cb = params
    return CellParams(None, w_hh, None, b_hh, w_hr, peep, None, ln_hh, ln_cw, ln_cb)  # type: ignore[arg-type]


def _keep_h(v: Variant, train: bool, keep_h: Tensor | None, rows: slice):
    """Zoneout's keep weight of h on these rows: the masks in training, the rate in eval, or
    None without zoneout of h."""
    if keep_h is not None:
        return keep_h[rows]
    return v.zoneout[0] if not train and v.zoneout[0] else None


def _forward(static, gx, h0, c0, params, masks, restart, save: bool):
    """The forward loop: ``gx`` [R, 4H], ``h0`` [N, H_out], ``c0`` [N, H], ``restart`` the
    direction's :class:`~rnnkit.resets.Restarts` or None. Returns ``out``, ``h_n``, ``c_n``
    and, when ``save``, what backward needs."""
    v, train, plan, _ = static
    p = _params(params)
    rec_mask, keep_h, keep_c = masks
    H, H_out, R, N = c0.size(1), h0.size(1), gx.size(0), plan.N
    proj = p.w_hr is not None
    w_hh_t = p.w_hh.t()
    out = gx.new_empty(R, H_out)
    h = h0.clone(memory_format=torch.contiguous_format)
    c = c0.clone(memory_format=torch.contiguous_format)
    rr = gx.new_empty(N, 4 * H)
    z = gx.new_empty(R, 4 * H) if save else None
    ct = gx.new_empty(R, H) if save else None
    cz = gx.new_empty(R, H) if save and v.zoneout[1] else None
    stats = gx.new_empty(R, 2) if save and v.layer_norm else None
    rhat = gx.new_empty(R, 4 * H) if save and v.layer_norm else None
    rstd = gx.new_empty(R, 1) if save and v.layer_norm else None
    y = gx.new_empty(R if save else N, H) if proj else None
    hp = gx.new_empty(R, H_out) if save and proj and v.proj_clip is not None else None
    scalars = launch.variant_scalars(v, gx)
    for s, (o, b) in enumerate(zip(plan.off, plan.bs, strict=True)):
        rows = slice(o, o + b)
        codes = restarts_at(restart, plan, s)
        if codes is not None:
            launch.restart_forward(codes, h, h0, c, c0, b)
        h_in = h[:b] if rec_mask is None else h[:b] * rec_mask[:b]
        r = torch.mm(h_in, w_hh_t, out=rr[:b])
        if p.ln_hh is not None:
            # LN_hh(r) = rhat g_hh with rhat = (r - mean r) rstd_r, by torch's own LayerNorm
            normed, _, inv = torch.native_layer_norm(r, (4 * H,), None, None, LN_EPS)
            if save:
                rhat[rows], rstd[rows] = normed, inv
            torch.mul(normed, p.ln_hh, out=r)
        if p.b_hh is not None:
            r += p.b_hh
        y_s = None if y is None else y[rows] if save else y[:b]
        steps = [None if t is None else t[rows] for t in (z, ct, cz, stats)]
        launch.lstm_variant_forward(
            v, train, gx[rows], r, c, h, None if proj else out[rows], y_s, p,
            None if keep_h is None or proj else keep_h[rows],
            None if keep_c is None else keep_c[rows], steps, scalars, b, H,
        )  # fmt: skip
        if proj:
            ht = torch.mm(y_s, p.w_hr.t())
            if hp is not None:
                hp[rows] = ht
            if v.proj_clip is not None:
                ht = ht.clamp_(-v.proj_clip, v.proj_clip)
            k = _keep_h(v, train, keep_h, rows)
            if k is not None:
                ht = torch.lerp(ht, h[:b], k)
            h[:b] = ht
            out[rows] = ht
    saved = [out, z, ct, cz, stats, rhat, rstd, y, hp] if save else []
    return out, h, c, saved


class VariantDirection(torch.autograd.Function):
    """One direction of one layer: ``gx`` ``[R, 4H]`` (input projection of every row), ``h0``
    ``[N, H_out]``, ``c0`` ``[N, H]``, the recurrent-side parameters, then the masks
    (``rec_mask`` ``[N, H_out]``, ``keep_h`` ``[R, H_out]``, ``keep_c`` ``[R, H]``, each or
    None), then the direction's restart codes ``[R]`` (or None). Returns ``out`` ``[R,
    H_out]``, ``h_n`` and ``c_n``. ``static`` is ``(variant, train, plan, steps)``, ``steps``
    those of the restart codes (``Restarts.steps``)."""

    @staticmethod
    def forward(ctx, static, gx, h0, c0, w_hh, b_hh, w_hr, peep, ln_hh, ln_cw, ln_cb, *masks_codes):
        params = [w_hh, b_hh, w_hr, peep, ln_hh, ln_cw, ln_cb]
        masks, codes = masks_codes[:3], masks_codes[3]
        restart = None if codes is None else restarts_of(codes, static[3])
        out, h_n, c_n, saved = _forward(static, gx, h0, c0, params, masks, restart, True)
        ctx.static = static
        # gx only for a double backward, which rebuilds the direction from it
        ctx.save_for_backward(gx, h0, c0, *params, *masks, codes, *saved)
        return out, h_n, c_n

    @staticmethod
    def backward(ctx, grad_out, grad_hn, grad_cn):
        gx, h0, c0, *rest = ctx.saved_tensors
        params, masks, codes, saved = rest[:7], rest[7:10], rest[10], rest[11:]
        restart = None if codes is None else restarts_of(codes, ctx.static[3])
        none = (None,) * 4  # the masks and the codes
        if batched_grads((grad_out, grad_hn, grad_cn)):
            # a batch of gradients: torch's ops have batching rules there, the kernels none
            inputs, need = [gx, h0, c0, *params], ctx.needs_input_grad[1:11]
            recompute = _recompute(ctx, masks, restart)
            grads = regrads(recompute, (grad_out, grad_hn, grad_cn), inputs, need)
            return (None, *grads, *none)
        if torch.is_grad_enabled():
            # create_graph=True: differentiate the same direction rebuilt from torch ops
            grads = _double_backward(
                ctx, gx, h0, c0, params, masks, restart, (grad_out, grad_hn, grad_cn)
            )
            return (None, *grads, *none)
        grads = _backward(
            ctx.static, grad_out, grad_hn, grad_cn, h0, c0, params, masks, restart, saved
        )
        need = ctx.needs_input_grad[1:11]
        grads = [g if n else None for g, n in zip(grads, need, strict=True)]
        return (None, *grads, *none)


def _backward(static, grad_out, grad_hn, grad_cn, h0, c0, params, masks, restart, saved):
    """The reverse-time loop, then the parameter gradients as one GEMM or sum each. Returns
    the gradients of ``gx, h0, c0, w_hh, b_hh, w_hr, peep, ln_hh, ln_cw, ln_cb``."""
    v, train, plan, _ = static
    p = _params(params)
    rec_mask, keep_h, keep_c = masks
    out, z, ct, cz, stats, rhat, rstd, y, hp = saved
    H, H_out, R = c0.size(1), h0.size(1), out.size(0)
    proj = p.w_hr is not None
    gout = grad_out.contiguous()
    dh = grad_hn.clone(memory_format=torch.contiguous_format)
    dc = grad_cn.clone(memory_format=torch.contiguous_format)
    dz = gout.new_empty(R, 4 * H)
    dr_all = gout.new_empty(R, 4 * H) if p.ln_hh is not None else dz
    dco = gout.new_empty(R, H) if v.layer_norm else None
    dht = gout.new_empty(R, H_out) if proj else None
    c_hist = ct if cz is None else cz
    scalars = launch.variant_scalars(v, gout)
    # the gradient that reaches the initial state through the rows that restart from it
    dh0 = None if restart is None else torch.zeros_like(dh)
    dc0 = None if restart is None else torch.zeros_like(dc)
    for s in reversed(range(len(plan.bs))):
        o, b = plan.off[s], plan.bs[s]
        o_prev, b_prev = plan.prev(s)
        rows = slice(o, o + b)
        codes = restarts_at(restart, plan, s)
        dy = None
        if proj:
            # h' = ht + k_h (h - ht), ht = clip(y W_hr^T): split dh', then through the clip
            dhn = dh[:b] + gout[rows]
            k = _keep_h(v, train, keep_h, rows)
            d = dhn if k is None else dhn * (1 - k)
            dh[:b] = 0.0 if k is None else dhn * k
            if hp is not None:
                d = d * (hp[rows].abs() <= v.proj_clip)
            dht[rows] = d
            dy = d @ p.w_hr
        launch.lstm_variant_backward(
            v, train, (z[rows], ct[rows], None if stats is None else stats[rows]),
            c_hist[o_prev:], c0, dy, dh, None if proj else gout[rows],
            None if keep_h is None or proj else keep_h[rows], dc,
            None if keep_c is None else keep_c[rows], p, dz[rows],
            None if dco is None else dco[rows], scalars, codes, b, b_prev, H,
        )  # fmt: skip
        dr = dz[rows]
        if p.ln_hh is not None:
            # through LN_hh: drhat = dz g, dr = rstd (drhat - mean drhat - rhat mean(drhat rhat))
            d = dz[rows] * p.ln_hh
            rh = rhat[rows]
            dr = dr_all[rows]
            mean_d = d.mean(-1, keepdim=True)
            mean_dr = (d * rh).mean(-1, keepdim=True)
            torch.mul(d - mean_d - rh * mean_dr, rstd[rows], out=dr)
        if rec_mask is None:
            dh[:b].addmm_(dr, p.w_hh)
        else:
            dh[:b].addcmul_(dr @ p.w_hh, rec_mask[:b])
        if codes is not None:
            launch.restart_backward(codes, dh, dh0, dc, dc0, b)
    if dh0 is not None:
        dh += dh0
        dc += dc0
    # the parameters' gradients, each one GEMM or sum over all rows
    restart = restarting(restart, plan)
    h_prev = prev_states(plan, out, h0, restart)
    if rec_mask is not None:
        h_prev = h_prev * rec_mask.index_select(0, batch_rows(plan, out.device))
    grads: list[Tensor | None] = [dz, dh, dc, dr_all.t() @ h_prev]
    grads.append(None if p.b_hh is None else dz.sum(0))
    grads.append(dht.t() @ y if proj else None)
    d_peep = None
    if v.peephole:
        # z_i += p_i c, z_f += p_f c with c the previous cell; z_o += p_o ct
        c_prev = prev_states(plan, c_hist, c0, restart)
        d_if = (dz[:, : 2 * H].view(R, 2, H) * c_prev.unsqueeze(1)).sum(0).flatten()
        d_peep = torch.cat([d_if, (dz[:, 3 * H :] * ct).sum(0)])
    grads.append(d_peep)
    if v.layer_norm:
        chat = (ct - stats[:, :1]) * stats[:, 1:]
        grads += [(dz * rhat).sum(0), (dco * chat).sum(0), dco.sum(0)]
    else:
        grads += [None, None, None]
    return grads


def _recompute(ctx, masks, restart):
    """The direction as a function of ``(gx, h0, c0, *params)`` on the reference engine's ops,
    with the call's masks (no new random numbers) and restarts: ``(out, h_n, c_n)``."""
    v, _, plan, _ = ctx.static
    rec_mask, keep_h, keep_c = masks
    batch_sizes = tuple(plan.bs[::-1] if plan.reverse else plan.bs)

    def direction(gx, h0, c0, *params):
        p = _params(params)._replace(rec_mask=rec_mask)
        out, (h_n, c_n) = direction_graph(
            "LSTM", v, (gx, keep_h, keep_c), batch_sizes, (h0, c0), p, plan.reverse, restart
        )
        return out, h_n, c_n

    return direction


def _double_backward(ctx, gx, h0, c0, params, masks, restart, grads):
    """Gradients as a graph: the direction recomputed by the reference engine's ops from the
    same inputs, masks and restarts, differentiated by autograd."""
    inputs = [gx, h0, c0, *params]
    outputs = _recompute(ctx, masks, restart)(*inputs)
    return graph_grads(outputs, grads, inputs, ctx.needs_input_grad[1:11])


def _run(static, gx, h0, c0, p: CellParams, keep_h, keep_c, restart):
    """Run one direction: through :class:`VariantDirection` when a gradient is wanted, else
    straight through the loop, which then keeps nothing for backward."""
    params = _recurrent_params(p)
    masks = [p.rec_mask, keep_h, keep_c]
    tensors = [gx, h0, c0, *params]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        codes = None if restart is None else restart.codes
        return VariantDirection.apply(static, gx, h0, c0, *params, *masks, codes)
    return _forward(static, gx, h0, c0, params, masks, restart, False)[:3]


def _direction(dc: DirectionCall, out: LayerOutput) -> State:
    """One prepared direction (``dc.seq`` is ``(gates_x, keep_h, keep_c)`` with the layer
    input's leading dims) on the kernels, its rows in time-major order."""
    lc = dc.layer
    gx, keep_h, keep_c = dc.seq_rows()
    h0, c0 = dc.state
    with launch.on_device(gx), torch.autocast(gx.device.type, enabled=False):
        steps = None if dc.restart is None else dc.restart.steps
        static = (lc.variant, lc.train, dc.plan, steps)
        y, h_n, c_n = _run(static, gx, h0, c0, dc.params, keep_h, keep_c, dc.restart)
    out.set(dc.d, lc.shaped(y))
    return h_n, c_n


layer = by_direction(_direction)

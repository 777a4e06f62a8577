"""The int8 layer's math on torch ops: what ``rnnkit_int8::direction_forward`` computes.

Each product's left side ``a`` (``x_t``, ``h_{t-1}``, LSTM's ``o * tanh(c)`` before the
projection) is quantized per row, as uint8 with a zero point:
``a ~ s_a * (q - z)``, ``s_a = (max(a, 0) - min(a, 0)) / 255``, ``z = round(-min(a, 0) / s_a)``;
with the int8 weight ``W ~ s_w[j] * Wq[j, k]`` and ``u[j] = sum_k Wq[j, k]``,

    (a W^T)[j] ~ float32(sum_k q_k Wq[j, k] - z u[j]) * (s_a s_w[j])

The integer sums are exact; everything after them is float32, in the kernel's op order, so
the products and the input projection agree with the kernel bit for bit and the steps differ
only by the activations' last bits (the kernel's vectorized sigmoid and tanh).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rnnkit.engines.driver import StepPlan, step_batches
from rnnkit.quantized.weights import QWeight

__all__ = ["direction_forward", "linear", "quantize_rows"]


def quantize_rows(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``a`` ``[M, K]`` float32 as ``(q, scale, zero)``: ``q`` ``[M, K]`` in ``[0, 255]`` (as
    int64), ``scale`` float32 ``[M]``, ``zero`` int64 ``[M]``. A row with inf or NaN gets scale
    NaN (its products are NaN) and ``q = 0``."""
    zero_f = a.new_zeros(())
    lo = torch.minimum(a.amin(dim=1), zero_f) if a.size(1) else zero_f.expand(a.size(0))
    hi = torch.maximum(a.amax(dim=1), zero_f) if a.size(1) else zero_f.expand(a.size(0))
    s = (hi - lo) / 255
    s = torch.where(s > 0, s, torch.ones_like(s))
    inv = 1 / s
    z = torch.round(-lo * inv).clamp(0, 255)
    q = (torch.round(a * inv.unsqueeze(1)) + z.unsqueeze(1)).clamp(0, 255)
    bad = ~torch.isfinite(a).all(dim=1)
    s = torch.where(bad, torch.full_like(s, float("nan")), s)
    q = torch.where(bad.unsqueeze(1), torch.zeros_like(q), q)
    z = torch.where(bad, torch.zeros_like(z), z)
    return q.long(), s, z.long()


def linear(a: Tensor, w: QWeight, bias: Tensor | None = None, add: Tensor | None = None) -> Tensor:
    """``deq(a W^T) [+ bias] [+ add]`` for float32 rows ``a`` ``[M, K]``."""
    q, s, z = quantize_rows(a)
    wq = w.int8().double()
    # exact: |sum| < 255 * 127 * K is far below 2^53
    acc = (q.double() @ wq.t()).long() - z.unsqueeze(1) * w.sum.long().unsqueeze(0)
    out = acc.to(torch.float32) * (s.unsqueeze(1) * w.scale.unsqueeze(0))
    if bias is not None:
        out = out + bias
    if add is not None:
        out = out + add
    return out


def direction_forward(
    mode: str,
    x: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    w_ih: QWeight,
    w_hh: QWeight,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    w_hr: QWeight | None,
    batch_sizes: tuple[int, ...],
    reverse: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One direction on rows ``x`` ``[R, H_in]`` (time-major; packed with ``batch_sizes``,
    empty for uniform steps of ``h0``'s batch): ``(out [R, H_out], h_n, c_n)``."""
    plan = StepPlan.of(step_batches(tuple(batch_sizes), x.size(0), h0.size(0)), reverse)
    H = w_hh.J // {"LSTM": 4, "GRU": 3}.get(mode, 1)
    gx = linear(x, w_ih, b_ih)
    h, c = h0.clone(), None if c0 is None else c0.clone()
    out = x.new_empty(x.size(0), h0.size(1))
    for o, b in zip(plan.off, plan.bs, strict=True):
        gx_s, h_s = gx[o : o + b], h[:b]
        if mode == "GRU":
            gh = linear(h_s, w_hh, b_hh)
            r = torch.sigmoid(gx_s[:, :H] + gh[:, :H])
            z = torch.sigmoid(gx_s[:, H : 2 * H] + gh[:, H : 2 * H])
            n = torch.tanh(gx_s[:, 2 * H :] + r * gh[:, 2 * H :])
            h[:b] = n + z * (h_s - n)
        else:
            g = linear(h_s, w_hh, b_hh, gx_s)
            if mode == "LSTM":
                i, f = torch.sigmoid(g[:, :H]), torch.sigmoid(g[:, H : 2 * H])
                gg, og = torch.tanh(g[:, 2 * H : 3 * H]), torch.sigmoid(g[:, 3 * H :])
                c[:b] = f * c[:b] + i * gg
                y = og * torch.tanh(c[:b])
                h[:b] = y if w_hr is None else linear(y, w_hr)
            else:
                h[:b] = torch.relu(g) if mode == "RNN_RELU" else torch.tanh(g)
        out[o : o + b] = h[:b]
    return out, h, c

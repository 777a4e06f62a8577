"""Fake (meta) implementations of the compiled ops, for ``torch.compile`` and ``torch.export``.

A tracer runs an op on tensors without data and needs its outputs' shapes and dtypes: these
functions give them, one per op of ``csrc/``, mirroring what the C++ returns (the buffers a
training forward keeps for backward included). :func:`register` installs them at import,
with the ops' schemas (``ops.py``), before any kernel is built.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rnnkit.modes import MODES

_LSTM, _GRU = MODES["LSTM"].code, MODES["GRU"].code
_GATES = {m.code: m.gates for m in MODES.values()}


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def layer_forward(mode, x, h0, c0, weights, batch_sizes, has_bias, train, restart=None):
    D, _, H_out = h0.shape
    R = x.size(0)
    G = _GATES[mode]
    H = weights[1].size(0) // G
    out = [x.new_empty(R, D * H_out), torch.empty_like(h0)]
    out.append(torch.empty_like(c0) if mode == _LSTM else _empty(x))
    if not train:
        return out
    proj = len(weights) // D == (5 if has_bias else 3)
    for _ in range(D):
        if mode == _LSTM:
            out += [x.new_empty(R, 4 * H), x.new_empty(R, H)]
            out.append(x.new_empty(R, H) if proj else _empty(x))
        elif mode == _GRU:
            out.append(x.new_empty(R, 4 * H))
    return out


def layer_backward(mode, grad_out, grad_hn, grad_cn, x, h0, c0, weights, out, saved,
                   batch_sizes, has_bias, need_dx, reuse_saved, restart=None):  # fmt: skip
    grads = [torch.empty_like(x) if need_dx else _empty(x), torch.empty_like(h0)]
    grads.append(torch.empty_like(c0) if mode == _LSTM else _empty(x))
    return grads + [torch.empty_like(w) for w in weights]


def lstm_variant_forward(gx, h0, c0, w_hh, b_hh, w_hr, peephole, ln_hh, ln_c_weight, ln_c_bias,
                         rec_mask, keep_h, keep_c, rates, coupled, batch_sizes, reverse, train,
                         restart=None):  # fmt: skip
    R, H, H_out = gx.size(0), c0.size(1), h0.size(1)
    out = [gx.new_empty(R, H_out), torch.empty_like(h0), torch.empty_like(c0)]
    if not train:
        return out
    zone_c = keep_c is not None or rates[1] != 0
    ln, proj = ln_hh is not None, w_hr is not None

    def buffer(present, *shape):
        return gx.new_empty(*shape) if present else _empty(gx)

    # z, ct, cz, rhat, stats, y, hp: see csrc/lstm_variant.cpp
    return out + [
        gx.new_empty(R, 4 * H),
        gx.new_empty(R, H),
        buffer(zone_c, R, H),
        buffer(ln, R, 4 * H),
        buffer(ln, R, 3),
        buffer(proj, R, H),
        buffer(proj and rates[4] > 0, R, H_out),
    ]


def lstm_variant_backward(grad_out, grad_hn, grad_cn, out, saved, h0, c0, w_hh, b_hh, w_hr,
                          peephole, ln_hh, ln_c_weight, ln_c_bias, rec_mask, keep_h, keep_c,
                          rates, coupled, batch_sizes, reverse, restart=None):  # fmt: skip
    R, H = out.size(0), c0.size(1)

    def like(t):
        return _empty(out) if t is None else torch.empty_like(t)

    grads = [out.new_empty(R, 4 * H), torch.empty_like(h0), torch.empty_like(c0)]
    return grads + [like(t) for t in (w_hh, b_hh, w_hr, peephole, ln_hh, ln_c_weight, ln_c_bias)]


def register(namespace: str) -> None:
    """Install the fake implementations of ``namespace``'s ops."""
    for fn in (layer_forward, layer_backward, lstm_variant_forward, lstm_variant_backward):
        torch.library.register_fake(f"{namespace}::{fn.__name__}", fn)

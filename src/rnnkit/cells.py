"""Per-step math of each recurrent cell: the reference engine's building blocks.

A step is a small pure function ``step(inputs, state, params) -> state``. For the plain cells
``inputs`` is the input projection ``x_t W_ih^T + b_ih`` of this step (``[N, G*H]``); for the
variants (and under a torch.func transform) it is the tuple ``(gates_x, keep_h, keep_c)`` that
:func:`make_prepare` builds, the projection with this step's zoneout keep-masks (or None).
``state`` is the previous state (``h``, or LSTM's ``(h, c)``) and ``params`` the layer's
:class:`CellParams`. The driver (``engines/driver.py``) owns the time loop's structure,
directions, layers, packing, dropout and the order of the random draws; a variant touches a
step and its prepare, not the driver.

The op order (and the in-place ops on ``unsafe_chunk`` pieces, which autograd does not track as
views) repeats ATen's CPU cells in ``aten/src/ATen/native/RNN.cpp`` so that forward values and
every gradient are bit-identical to ``torch.nn``'s ATen path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from rnnkit.modes import MODES


class CellParams(NamedTuple):
    """The weights of one layer and direction, in torch's ``_flat_weights`` roles."""

    w_ih: Tensor  # [G*H, H_in]
    w_hh: Tensor  # [G*H, H_out]
    b_ih: Tensor | None  # [G*H]
    b_hh: Tensor | None  # [G*H]
    w_hr: Tensor | None = None  # [H_out, H], LSTM with proj_size only
    # variants (rnnkit.variants): parameters, then masks drawn once per call
    peephole: Tensor | None = None  # [3*H], i, f, o
    ln_ih: Tensor | None = None  # [G*H]
    ln_hh: Tensor | None = None  # [G*H]
    ln_c_weight: Tensor | None = None  # [H]
    ln_c_bias: Tensor | None = None  # [H]
    rec_mask: Tensor | None = None  # [N, H_out], recurrent dropout, scaled

    def linear_ih(self, x: Tensor) -> Tensor:
        return F.linear(x, self.w_ih, self.b_ih)

    def linear_hh(self, h: Tensor) -> Tensor:
        return F.linear(h, self.w_hh, self.b_hh)

    @classmethod
    def from_flat(
        cls, weights: Sequence[Tensor], has_biases: bool, has_proj: bool, extras: Sequence[str] = ()
    ) -> CellParams:
        """One layer and direction from its slice of ``_flat_weights``: ``w_ih, w_hh[, b_ih,
        b_hh][, w_hr]``, then the variant's parameters with roles ``extras`` (in
        ``Variant.extra_param_roles`` order). Shapes are the caller's to have checked."""
        w = list(weights)
        named = {
            EXTRA_FIELDS[role]: t for role, t in zip(extras, w[len(w) - len(extras) :], strict=True)
        }
        w = w[: len(w) - len(extras)]
        w_hr = w.pop() if has_proj else None
        b_ih, b_hh = (w[2], w[3]) if has_biases else (None, None)
        return cls(w[0], w[1], b_ih, b_hh, w_hr, **named)

    def to_flat(self) -> list[Tensor]:
        """The plain weights in ``_flat_weights`` order, absent ones left out: the inverse of
        :meth:`from_flat` without variant parameters, as autograd Functions take them."""
        return [t for t in (self.w_ih, self.w_hh, self.b_ih, self.b_hh, self.w_hr) if t is not None]


def split_layer(weights: Sequence[Tensor], D: int, has_biases: bool) -> tuple[CellParams, ...]:
    """One layer's plain weights, its slice of ``_flat_weights``, as one :class:`CellParams`
    per direction (whether it has projections follows from the count)."""
    has_proj = len(weights) // D == (5 if has_biases else 3)
    return split_flat(weights, D, has_biases, has_proj)


# A variant parameter's role (``Variant.extra_param_roles``) -> its CellParams field
EXTRA_FIELDS = {
    "peephole": "peephole",
    "layer_norm_ih": "ln_ih",
    "layer_norm_hh": "ln_hh",
    "layer_norm_c_weight": "ln_c_weight",
    "layer_norm_c_bias": "ln_c_bias",
}


def split_flat(
    weights: Sequence[Tensor],
    count: int,
    has_biases: bool,
    has_proj: bool,
    extras: Sequence[str] = (),
) -> tuple[CellParams, ...]:
    """``count`` layer-directions' :class:`CellParams` (layer-major, as ``_flat_weights``)
    from the whole flat list."""
    n = len(weights) // count
    return tuple(
        CellParams.from_flat(weights[k * n : (k + 1) * n], has_biases, has_proj, extras)
        for k in range(count)
    )


LSTMState = tuple[Tensor, Tensor]
State = Tensor | LSTMState


def lstm_step(gates_x: Tensor, state: LSTMState, p: CellParams) -> LSTMState:
    r"""One LSTM step, gate order i, f, g, o.

    .. math::
        i, f, g, o = \sigma, \sigma, \tanh, \sigma\,(x W_{ih}^T + b_{ih} + h W_{hh}^T + b_{hh}) \\
        c' = f \odot c + i \odot g \qquad h' = (o \odot \tanh(c')) W_{hr}^T
    """
    h, c = state
    gates = p.linear_hh(h).add_(gates_x)  # [N, 4*H]
    i, f, g, o = gates.unsafe_chunk(4, 1)
    i = i.sigmoid_()
    f = f.sigmoid_()
    g = g.tanh_()
    o = o.sigmoid_()
    c_new = (f * c).add_(i * g)
    h_new = o * c_new.tanh()
    if p.w_hr is not None:
        h_new = torch.matmul(h_new, p.w_hr.t())
    return h_new, c_new


def gru_step(gates_x: Tensor, h: Tensor, p: CellParams) -> Tensor:
    r"""One GRU step, gate order r, z, n; ``b_hn`` sits inside the reset product.

    .. math::
        r = \sigma(x_r + h_r) \quad z = \sigma(x_z + h_z) \quad
        n = \tanh(x_n + r \odot h_n) \quad h' = (h - n) \odot z + n
    """
    x_r, x_z, x_n = gates_x.unsafe_chunk(3, 1)
    h_r, h_z, h_n = p.linear_hh(h).unsafe_chunk(3, 1)
    r = h_r.add_(x_r).sigmoid_()
    z = h_z.add_(x_z).sigmoid_()
    n = x_n.add(h_n.mul_(r)).tanh_()
    return (h - n).mul_(z).add_(n)


def rnn_tanh_step(gates_x: Tensor, h: Tensor, p: CellParams) -> Tensor:
    r""":math:`h' = \tanh(x W_{ih}^T + b_{ih} + h W_{hh}^T + b_{hh})`"""
    return torch.tanh(p.linear_hh(h).add_(gates_x))


def rnn_relu_step(gates_x: Tensor, h: Tensor, p: CellParams) -> Tensor:
    r""":math:`h' = \max(0, x W_{ih}^T + b_{ih} + h W_{hh}^T + b_{hh})`"""
    return torch.relu(p.linear_hh(h).add_(gates_x))


Step = Callable[[Tensor, State, CellParams], State]

# mode -> its plain step (``rnnkit.modes`` has the gate counts)
STEPS: dict[str, Step] = {
    "LSTM": lstm_step,
    "GRU": gru_step,
    "RNN_TANH": rnn_tanh_step,
    "RNN_RELU": rnn_relu_step,
}


# Variants. A variant step takes ``(gates_x, keep_h, keep_c)`` per step: the input projection
# (layer-normed and biased already) and this step's zoneout keep-masks (``None`` outside
# training, where zoneout uses its expectation). ``rnnkit.variants`` has the equations.

LN_EPS = 1e-5


def _recurrent(h: Tensor, p: CellParams) -> Tensor:
    """``LN_hh(h_in W_hh^T) + b_hh`` with ``h_in`` under the recurrent dropout mask."""
    if p.rec_mask is not None:
        h = h * p.rec_mask[: h.size(0)]
    r = torch.matmul(h, p.w_hh.t())
    if p.ln_hh is not None:
        r = F.layer_norm(r, (r.size(-1),), p.ln_hh, None, LN_EPS)
    return r if p.b_hh is None else r + p.b_hh


def _zoneout(new: Tensor, old: Tensor, keep: Tensor | None, p: float) -> Tensor:
    # keep = 1 where the unit keeps its previous value; eval uses E[keep] = p
    if keep is not None:
        return torch.lerp(new, old, keep)
    return torch.lerp(new, old, p) if p > 0 else new


def _clip(x: Tensor, v: float | None) -> Tensor:
    return x if v is None else torch.clamp(x, -v, v)


def make_step(mode: str, variant, out_of_place: bool = False) -> Step:
    """The step function of ``mode`` under ``variant``: the exact torch step when plain, unless
    ``out_of_place`` asks for the general step, which writes into no tensor (what torch.func's
    vmap needs: it cannot write a batched value into an unbatched tensor). It then takes
    :func:`make_prepare`'s per-step tuples, and computes the plain cell's values to rounding."""
    if variant.is_plain and not out_of_place:
        return STEPS[mode]
    acts = variant.activation_fns(mode)
    clip = variant.gate_clip
    zh_p, zc_p = variant.zoneout

    def lstm(inputs, state: LSTMState, p: CellParams) -> LSTMState:
        gates_x, keep_h, keep_c = inputs
        h, c = state
        gates = gates_x + _recurrent(h, p)
        gi, gf, gg, go = gates.chunk(4, 1)
        if p.peephole is not None:
            pi, pf, po = p.peephole.chunk(3)
            gi = gi + pi * c
            gf = gf + pf * c
        i = acts[0](_clip(gi, clip))
        f = 1 - i if variant.coupled_input_forget else acts[0](_clip(gf, clip))
        g = acts[1](_clip(gg, clip))
        c_new = _clip(f * c + i * g, variant.cell_clip)
        if p.peephole is not None:
            go = go + po * c_new
        o = acts[0](_clip(go, clip))
        c_out = c_new
        if p.ln_c_weight is not None:
            c_out = F.layer_norm(c_new, (c_new.size(-1),), p.ln_c_weight, p.ln_c_bias, LN_EPS)
        h_new = o * acts[2](c_out)
        if p.w_hr is not None:
            h_new = _clip(torch.matmul(h_new, p.w_hr.t()), variant.proj_clip)
        return _zoneout(h_new, h, keep_h, zh_p), _zoneout(c_new, c, keep_c, zc_p)

    def gru(inputs, h: Tensor, p: CellParams) -> Tensor:
        gates_x, keep_h, _ = inputs
        x_r, x_z, x_n = gates_x.chunk(3, 1)
        h_r, h_z, h_n = _recurrent(h, p).chunk(3, 1)
        r = acts[0](_clip(x_r + h_r, clip))
        z = acts[0](_clip(x_z + h_z, clip))
        n = acts[1](_clip(x_n + r * h_n, clip))
        return _zoneout((h - n) * z + n, h, keep_h, zh_p)

    def rnn(inputs, h: Tensor, p: CellParams) -> Tensor:
        gates_x, keep_h, _ = inputs
        h_new = acts[0](_clip(gates_x + _recurrent(h, p), clip))
        return _zoneout(h_new, h, keep_h, zh_p)

    return {"LSTM": lstm, "GRU": gru}.get(mode, rnn)


Prepare = Callable[[Tensor, CellParams, int], tuple[object, CellParams]]


def _plain_prepare(x: Tensor, p: CellParams, N: int) -> tuple[Tensor, CellParams]:
    return p.linear_ih(x), p


def make_prepare(mode: str, variant, training: bool, out_of_place: bool = False) -> Prepare:
    """What a layer-direction computes before its time loop, for all steps at once.

    ``prepare(x, p, N)`` takes the layer input ``x`` (``[L, N, H_in]``, packed rows
    ``[R, H_in]`` or one step ``[N, H_in]``) and returns the per-step sequence the step function
    consumes (same leading dims as ``x``) and the params of this call. The random masks are
    drawn here, in a fixed order — weight dropout, recurrent dropout, zoneout h, zoneout c — so
    that every engine that calls this function draws the same masks under the same seed.
    ``out_of_place`` pairs it with :func:`make_step`'s general step, and draws zoneout's masks
    out of place too (vmap's ``randomness="different"`` draws per sample only that way).
    """
    if variant.is_plain and not out_of_place:
        return _plain_prepare
    zh_p, zc_p = variant.zoneout

    def bernoulli(shape: tuple[int, ...], p: float, dense: dict) -> Tensor:
        if out_of_place:
            return torch.bernoulli(torch.full(shape, p, **dense))
        return torch.empty(shape, **dense).bernoulli_(p)

    def prepare(x: Tensor, p: CellParams, N: int) -> tuple[object, CellParams]:
        if p.ln_ih is not None:
            gates_x = F.linear(x, p.w_ih)
            gates_x = F.layer_norm(gates_x, (gates_x.size(-1),), p.ln_ih, None, LN_EPS)
            if p.b_ih is not None:
                gates_x = gates_x + p.b_ih
        else:
            gates_x = p.linear_ih(x)
        keep_h = keep_c = None
        if training:
            H_out = p.w_hh.size(1)
            # dense masks whatever the layout of x (a cell's input may be sparse)
            dense = dict(dtype=x.dtype, device=x.device)
            if variant.weight_dropout > 0:
                p = p._replace(w_hh=F.dropout(p.w_hh, variant.weight_dropout, training=True))
            if variant.recurrent_dropout > 0:
                ones = torch.ones(N, H_out, **dense)
                p = p._replace(rec_mask=F.dropout(ones, variant.recurrent_dropout, True))
            if zh_p > 0:
                keep_h = bernoulli((*x.shape[:-1], H_out), zh_p, dense)
            if zc_p > 0 and mode == "LSTM":
                H = p.w_hh.size(0) // MODES["LSTM"].gates
                keep_c = bernoulli((*x.shape[:-1], H), zc_p, dense)
        return (gates_x, keep_h, keep_c), p

    return prepare

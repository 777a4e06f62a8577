"""Per-step math of each recurrent cell: the reference engine's building blocks.

A step is a small pure function ``step(gates_x, state, params) -> state``: ``gates_x`` is the
input projection ``x_t W_ih^T + b_ih`` of this step (``[N, G*H]``), ``state`` the previous
state, ``params`` the layer's :class:`CellParams`. The driver in ``engines/reference.py`` owns
the time loop, directions, layers, packing and dropout; a variant touches a step, not the driver.

The op order (and the in-place ops on ``unsafe_chunk`` pieces, which autograd does not track as
views) repeats ATen's CPU cells in ``aten/src/ATen/native/RNN.cpp`` so that forward values and
every gradient are bit-identical to ``torch.nn``'s ATen path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class CellParams(NamedTuple):
    """The weights of one layer and direction, in torch's ``_flat_weights`` roles."""

    w_ih: Tensor  # [G*H, H_in]
    w_hh: Tensor  # [G*H, H_out]
    b_ih: Tensor | None  # [G*H]
    b_hh: Tensor | None  # [G*H]
    w_hr: Tensor | None = None  # [H_out, H], LSTM with proj_size only

    def linear_ih(self, x: Tensor) -> Tensor:
        return F.linear(x, self.w_ih, self.b_ih)

    def linear_hh(self, h: Tensor) -> Tensor:
        return F.linear(h, self.w_hh, self.b_hh)


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

# mode -> (step, number of gate blocks G)
STEPS: dict[str, tuple[Step, int]] = {
    "LSTM": (lstm_step, 4),
    "GRU": (gru_step, 3),
    "RNN_TANH": (rnn_tanh_step, 1),
    "RNN_RELU": (rnn_relu_step, 1),
}

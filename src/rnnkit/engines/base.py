"""The engine interface: what every engine receives, returns and declares it supports.

An engine is a pair of functions (``run_rnn`` for stacked layers, ``run_cell`` for one step)
plus two predicates that return ``None`` when the engine can run a call and otherwise a short
reason, which ``engine=<name>`` raises and ``engine="auto"`` uses to move on to the next engine.
Calls arrive validated (shapes, dtypes, devices) by ``rnnkit.functional``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch._C import _functorch

from rnnkit.cells import CellParams, State
from rnnkit.variants import PLAIN, Variant

# (output, h_n) for GRU/RNN, (output, h_n, c_n) for LSTM
RNNResult = tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]


# A constant to torch.compile, which cannot trace the stack: read when tracing, never a guard.
@torch.compiler.assume_constant_result
def transforms() -> tuple[str, ...]:
    """The torch.func transforms around this call, outermost first (``"vmap"``, ``"grad"``,
    ``"jvp"``, ``"functionalize"``); empty outside any. ``grad``, ``vjp`` and ``jacrev`` are
    ``"grad"``; ``jacfwd`` is ``"vmap"`` over ``"jvp"``."""
    stack = _functorch.get_interpreter_stack() or []
    return tuple(str(level.key()).rpartition(".")[2].lower() for level in stack)


def forward_ad(tensors: list[Tensor]) -> bool:
    """Whether forward-mode AD runs through this call: under ``torch.func.jvp``/``jacfwd``,
    or with a dual tensor of ``torch.autograd.forward_ad`` among ``tensors``."""
    if "jvp" in transforms():
        return True
    # no tensor has a tangent outside torch.autograd.forward_ad.dual_level()
    if getattr(fwAD, "_current_level", 0) < 0:
        return False
    return any(fwAD.unpack_dual(t).tangent is not None for t in tensors)


@dataclass(frozen=True)
class RNNCall:
    """A whole multi-layer RNN call, in the terms of ``torch._VF.lstm`` and friends.

    ``input`` is ``[L, N, H_in]`` (``[N, L, H_in]`` if ``batch_first``), or the packed data
    ``[sum(batch_sizes), H_in]`` when ``batch_sizes`` (int64, CPU, non-increasing) is given.
    ``hx`` is ``h_0`` ``[D*num_layers, N, H_out]``, or ``(h_0, c_0)`` for LSTM with ``c_0``
    ``[D*num_layers, N, H]``. ``params`` holds one :class:`CellParams` per layer and
    direction, layer-major. The output has the input's layout.
    """

    mode: str  # "LSTM", "GRU", "RNN_TANH", "RNN_RELU"
    input: Tensor
    batch_sizes: Tensor | None
    hx: Tensor | tuple[Tensor, Tensor]
    params: tuple[CellParams, ...]
    num_layers: int
    dropout: float
    train: bool
    bidirectional: bool
    batch_first: bool
    variant: Variant = PLAIN

    @property
    def proj_size(self) -> int:
        w_hr = self.params[0].w_hr
        return 0 if w_hr is None else w_hr.size(0)


def time_major(call: RNNCall) -> tuple[Tensor, list[int]]:
    """``call.input`` time-major (``[L, N, H_in]``; packed rows as given) and the batch size
    of every step, as the fast engines' time loops take them."""
    x = call.input
    if call.batch_sizes is not None:
        return x, call.batch_sizes.tolist()
    if call.batch_first:
        x = x.transpose(0, 1)
    return x, [x.size(1)] * x.size(0)


@dataclass(frozen=True)
class CellCall:
    """One step of a cell: ``input`` ``[N, H_in]``, ``hx`` ``[N, H]`` or ``(h, c)``."""

    mode: str
    input: Tensor
    hx: State
    params: CellParams
    variant: Variant = PLAIN
    train: bool = False


@dataclass(frozen=True)
class Engine:
    name: str
    run_rnn: Callable[[RNNCall], RNNResult]
    run_cell: Callable[[CellCall], State]
    # None when the engine can run the call, else why not
    rnn_unsupported: Callable[[RNNCall], str | None]
    cell_unsupported: Callable[[CellCall], str | None]

"""The one layer driver: every engine's stacked call runs under :func:`run_stack`.

The driver owns what is the same for every engine: the time-major layout (``batch_first``
turned at the start and the end), the step plan of packed or padded input (:class:`StepPlan`),
the slicing of the initial states and of the parameters per layer, inter-layer dropout, the
order of the random draws, and the final states of every layer. An engine hands it the
function that runs one layer, every direction of it (:data:`~rnnkit.engines.base.LayerFn`):
an engine whose kernels fuse both directions and the input projection gives that directly;
an engine that runs one direction at a time gives :func:`by_direction` its direction
function, and the driver then prepares each direction (its input projection and random masks,
in the fixed order of :func:`rnnkit.cells.make_prepare`) and joins the outputs.

Random draws come in one order whatever the engine: per layer, each direction's masks in
direction order (weight dropout, recurrent dropout, zoneout h, zoneout c), then that layer's
inter-layer dropout on ``[L, N, D*H_out]`` (packed: ``[R, D*H_out]``). Under one seed every
engine therefore draws the same masks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from rnnkit.cells import CellParams, State, make_prepare
from rnnkit.engines.base import LayerFn, RNNCall, RNNResult, time_major, transforms
from rnnkit.resets import Restarts, row_restarts
from rnnkit.variants import Variant

__all__ = [
    "DirectionCall",
    "LayerCall",
    "LayerOutput",
    "StepPlan",
    "by_direction",
    "records_graph",
    "run_stack",
    "step_batches",
]


def step_batches(batch_sizes: tuple[int, ...], R: int, N: int) -> tuple[int, ...]:
    """The batch of every step of ``R`` rows of widest batch ``N``: ``batch_sizes`` of packed
    input as given, and for uniform input, which gives none, ``R / N`` steps of ``N`` (an
    empty batch, ``N = 0``: one step of no rows). The compiled CPU ops take uniform input's as
    ``[-1]`` (``cpu/ops.py``'s ``UNIFORM``; ``step_batches`` in ``cpu/csrc/kernels.h``), so
    that no per-step list, which a trace or an exported graph would keep as a constant, reaches
    them for uniform input."""
    if batch_sizes:
        return tuple(batch_sizes)
    return (N,) * (R // N) if N else (0,)


@dataclass(frozen=True)
class StepPlan:
    """The steps of one direction in the order it runs them: the first row and the batch of
    each in the time-major rows ``[R, *]`` (a padded input is the packing with every batch
    ``N``). The compiled CPU kernels (``Plan`` in ``cpu/csrc/kernels.h``) and the Triton
    launchers walk the same plan.

    A step's rows are the first ``bs[s]`` of the batch (packed sequences are sorted by length):
    forward in time the batch shrinks, sequences that ended keeping their final state; in
    reverse it grows, sequences starting from their ``h_0`` rows.
    """

    off: tuple[int, ...]
    bs: tuple[int, ...]
    rows: int
    N: int
    uniform: bool
    reverse: bool

    @staticmethod
    # a few recent plans: a training loop repeats its lengths; a long one costs O(L) memory
    @functools.lru_cache(maxsize=8)
    def of(batch_sizes: tuple[int, ...], reverse: bool = False) -> StepPlan:
        offsets, row = [], 0
        for b in batch_sizes:
            offsets.append(row)
            row += b
        order = range(len(batch_sizes) - 1, -1, -1) if reverse else range(len(batch_sizes))
        N = max(batch_sizes, default=0)
        return StepPlan(
            off=tuple(offsets[t] for t in order),
            bs=tuple(batch_sizes[t] for t in order),
            rows=row,
            N=N,
            uniform=all(b == N for b in batch_sizes),
            reverse=reverse,
        )

    def prev(self, s: int) -> tuple[int, int]:
        """First row and batch of the step before ``s`` (rows ``j < batch`` ran in it)."""
        return (self.off[s - 1], self.bs[s - 1]) if s > 0 else (0, 0)


@dataclass(frozen=True)
class LayerCall:
    """One layer of a stacked call, as the driver hands it to an engine.

    ``x`` is time-major: ``[L, N, H_in]`` padded, or ``[R, H_in]`` packed rows (``packed``);
    ``batch_sizes`` the batch of every step of packed input, and empty for uniform input
    (every step ``N``; see :func:`step_batches`). ``h0`` is ``[D, N,
    H_out]``, ``c0`` ``[D, N, H]`` for LSTM (else None), ``params`` one :class:`CellParams` per
    direction. A layer returns its output with ``x``'s leading dims and ``D*H_out`` features,
    ``h_n`` ``[D, N, H_out]`` and ``c_n`` ``[D, N, H]`` (LSTM; else None).
    """

    mode: str
    variant: Variant
    train: bool
    x: Tensor
    batch_sizes: tuple[int, ...]
    packed: bool
    h0: Tensor
    c0: Tensor | None
    params: tuple[CellParams, ...]
    # per direction, where rows restart (rnnkit.resets); None without resets
    restart: tuple[Restarts, ...] | None = None

    @property
    def D(self) -> int:
        return len(self.params)

    @property
    def N(self) -> int:
        return self.h0.size(1)

    def steps(self) -> tuple[int, ...]:
        """The batch of every step, resolved (:func:`step_batches`)."""
        return step_batches(self.batch_sizes, self.x.shape[:-1].numel(), self.N)

    def plan(self, d: int) -> StepPlan:
        """Direction ``d``'s steps (``d == 1`` runs in reverse)."""
        return StepPlan.of(self.steps(), d == 1)

    def rows(self) -> Tensor:
        """``x`` as ``[R, H_in]`` rows in time-major order (a view when it can be one)."""
        return self.x if self.packed else self.x.reshape(-1, self.x.size(-1))

    def shaped(self, rows: Tensor) -> Tensor:
        """Output rows ``[R, F]`` with ``x``'s leading dims."""
        return rows if self.packed else rows.view(*self.x.shape[:-1], rows.size(-1))


def run_stack(call: RNNCall, layer: LayerFn) -> RNNResult:
    """Run a stacked, possibly bidirectional, possibly packed RNN (see
    :class:`~rnnkit.engines.base.RNNCall`) one ``layer(LayerCall)`` at a time."""
    D = 2 if call.bidirectional else 1
    x, batch_sizes = time_major(call)
    lstm = call.mode == "LSTM"
    h0_all, c0_all = call.hx if lstm else (call.hx, None)
    restart = None
    if call.reset is not None:
        packed, known = call.batch_sizes is not None, not _traced()
        restart = tuple(
            row_restarts(call.reset, tuple(batch_sizes), packed, d == 1, known) for d in range(D)
        )
    h_n, c_n = [], []
    for k in range(call.num_layers):
        states = slice(k * D, (k + 1) * D)
        lc = LayerCall(
            mode=call.mode,
            variant=call.variant,
            train=call.train,
            x=x,
            batch_sizes=tuple(batch_sizes),
            packed=call.batch_sizes is not None,
            h0=h0_all[states],
            c0=None if c0_all is None else c0_all[states],
            params=call.params[states],
            restart=restart,
        )
        x, h, c = layer(lc)
        h_n.append(h)
        c_n.append(c)
        if call.dropout != 0 and call.train and k < call.num_layers - 1:
            x = F.dropout(x, call.dropout, training=True)
    if call.batch_first and call.batch_sizes is None:
        x = x.transpose(0, 1)
    h_n = torch.cat(h_n, 0) if len(h_n) > 1 else h_n[0]
    if lstm:
        return x, h_n, torch.cat(c_n, 0) if len(c_n) > 1 else c_n[0]
    return x, h_n


def _traced() -> bool:
    """Whether data-dependent Python values would break a trace here."""
    return bool(transforms()) or torch.compiler.is_compiling() or torch.jit.is_tracing()


def records_graph(tensors: list[Tensor | None]) -> bool:
    """Whether a layer on ``tensors`` records an autograd graph (or runs under a torch.func
    transform, which takes the same path: a list of step outputs, no tensor written into)."""
    if transforms():
        return True
    if not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in tensors)


class LayerOutput:
    """A layer's output ``[*lead, D*H_out]`` gathered from its directions.

    With a graph (``in_place`` False) each direction gives its whole output (:meth:`set`) and
    the result joins them along the features, as ATen's bidirectional layer does. Without one,
    a direction may write each step's rows in place (:meth:`put`), so that the layer holds its
    output and a constant more whatever L; a direction that gives its whole output is copied
    into place (one direction's is kept as it is).
    """

    def __init__(self, lc: LayerCall, in_place: bool):
        self.lead = lc.x.shape[:-1]
        self.D = lc.D
        self.in_place = in_place
        self.parts: list[Tensor | None] = [None] * lc.D
        self.data: Tensor | None = None

    def _rows(self, like: Tensor) -> Tensor:
        if self.data is None:
            # allocated at the first write: its dtype is the step's (autocast may lower it);
            # sized by the leading dims, not their product, which a trace would keep fixed
            self.data = like.new_empty((*self.lead, self.D * like.size(-1))).flatten(0, -2)
        return self.data

    def put(self, d: int, row: int, h: Tensor) -> None:
        """Direction ``d``'s step output ``h`` ``[n, H_out]`` as rows ``row:row+n``."""
        H_out = h.size(1)
        rows = self._rows(h).narrow(0, row, h.size(0))
        (rows if self.D == 1 else rows.narrow(1, d * H_out, H_out)).copy_(h)

    def set(self, d: int, out: Tensor) -> None:
        """Direction ``d``'s whole output, with the layer input's leading dims."""
        if self.in_place and self.D > 1:
            H_out = out.size(-1)
            self._rows(out).narrow(1, d * H_out, H_out).copy_(out.reshape(-1, H_out))
        else:
            self.parts[d] = out

    def result(self) -> Tensor:
        if self.data is not None:
            return self.data.view(*self.lead, self.data.size(-1))
        if self.D == 1:
            return self.parts[0]
        return torch.cat(self.parts, self.parts[0].dim() - 1)


@dataclass(frozen=True)
class DirectionCall:
    """One direction of a layer, prepared: ``seq`` is what ``make_prepare`` gave (the input
    projection with ``x``'s leading dims, or for variants ``(gates_x, keep_h, keep_c)``),
    ``params`` the direction's parameters with the call's masks, ``state`` its initial state."""

    layer: LayerCall
    # the direction's place in the layer's output features, and its steps (None: the layer's
    # plan of direction d, made only when read, see `plan`)
    d: int
    given_plan: StepPlan | None
    seq: object
    params: CellParams
    state: State
    # where rows restart (rnnkit.resets), or None
    restart: Restarts | None = None

    @property
    def reverse(self) -> bool:
        """Whether the steps run down in time."""
        return self.given_plan.reverse if self.given_plan is not None else self.d == 1

    @property
    def plan(self) -> StepPlan:
        """The direction's steps, one Python int per step: a kernel that takes the batch
        sizes itself reads :attr:`reverse` alone, so that a trace (``torch.export``) of it keeps
        the sequence length symbolic."""
        return self.given_plan if self.given_plan is not None else self.layer.plan(self.d)

    def seq_rows(self) -> tuple[Tensor | None, ...]:
        """``seq`` as time-major rows, each tensor ``[R, *]`` (a view where it can be one):
        what a kernel that walks :attr:`plan` over rows takes."""
        seq = self.seq if isinstance(self.seq, tuple) else (self.seq,)
        return tuple(None if t is None else t.reshape(-1, t.size(-1)) for t in seq)


# A direction: runs ``DirectionCall``, gives its output to the LayerOutput, returns the final
# state.
DirectionFn = Callable[[DirectionCall, LayerOutput], State]


def by_direction(direction: DirectionFn) -> LayerFn:
    """The layer of an engine that runs one direction at a time: each direction prepared
    (input projection and masks, in direction order) right before it runs."""

    def layer(lc: LayerCall):
        prepare = make_prepare(lc.mode, lc.variant, lc.train, bool(transforms()))
        tensors = [lc.x, lc.h0, lc.c0, *(t for p in lc.params for t in p)]
        out = LayerOutput(lc, in_place=not records_graph(tensors))

        def prepared(d: int) -> DirectionCall:
            seq, p = prepare(lc.x, lc.params[d], lc.N)
            state = lc.h0[d] if lc.c0 is None else (lc.h0[d], lc.c0[d])
            restart = None if lc.restart is None else lc.restart[d]
            return DirectionCall(lc, d, None, seq, p, state, restart)

        # nothing here holds a direction's prepared input past its run (without a graph it is
        # freed before the next direction's is made, as in ATen's bidirectional layer)
        finals = [direction(prepared(d), out) for d in range(lc.D)]
        if lc.c0 is None:
            return out.result(), torch.stack(finals, 0), None
        h_n = torch.stack([f[0] for f in finals], 0)
        return out.result(), h_n, torch.stack([f[1] for f in finals], 0)

    return layer

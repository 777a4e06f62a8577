r"""Resets inside a sequence: ``forward(input, hx, *, reset=...)`` of the layers.

``reset`` is a bool tensor ``[L, N]`` (``[N, L]`` with ``batch_first``, ``[L]`` unbatched):
where ``reset[t, n]`` is true, sequence ``n`` starts over at step ``t``, as an episode of a
reinforcement-learning rollout starts after the previous one is done. Exactly: the result
equals cutting each sequence before every step ``t`` where ``reset[t, n]``, running the pieces
as separate sequences — the first piece from ``hx`` (zeros if absent), every later one from
zeros — and putting the outputs back in place. The final state of the forward direction is the
one after the last step; a reverse direction runs each piece from its own end, and its final
state is the one after step 0. No gradient flows across a reset.

The driver turns ``reset`` into one restart code per row and direction (:func:`restarts`),
which every engine's time loop applies before the step of that row: a per-row select on the
carried state, never a split into segments.

- ``CARRY`` (0): the state of the previous step, as without resets;
- ``ZERO`` (1): zeros, the start of a later piece;
- ``INITIAL`` (2): the row's initial state ``hx`` — in reverse, where the first piece begins
  its run (its last step) after a later piece's.

Examples::

    >>> lstm = rnnkit.LSTM(4, 8)
    >>> x = torch.randn(6, 2, 4)  # [L, N, H_in]
    >>> done = torch.zeros(6, 2, dtype=torch.bool)
    >>> done[2, 0] = True  # sequence 0's episode ends at step 2
    >>> reset = torch.zeros_like(done)
    >>> reset[1:] = done[:-1]  # the step after a done one starts over
    >>> out, _ = lstm(x, reset=reset)
    >>> torch.allclose(out[3:, 0], lstm(x[3:, :1])[0][:, 0])
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "CARRY", "INITIAL", "ZERO", "Restarts", "check_reset", "restarts", "restarts_of",
    "row_restarts",
]  # fmt: skip

CARRY, ZERO, INITIAL = 0, 1, 2


def check_reset(name: str, reset, input: Tensor, batch_first: bool, batched: bool = True) -> Tensor:
    """``reset`` checked against ``input`` (dense, not packed): a bool tensor on its device of
    shape ``[L, N]`` (``[N, L]`` with ``batch_first``) for a batched ``input``, ``[L]`` for an
    unbatched one; else a clear error whose message starts with ``name`` (if any). Returns it
    time-major (``[L, N]``; ``[L]`` unbatched)."""
    name = f"{name}: " if name else ""
    if not isinstance(reset, Tensor):
        raise TypeError(f"{name}reset must be a bool Tensor, got {type(reset).__name__}")
    if reset.dtype != torch.bool:
        raise RuntimeError(f"{name}reset must be a bool tensor, got dtype {reset.dtype}")
    if reset.layout != torch.strided:
        raise RuntimeError(f"{name}reset must be a dense tensor, got layout {reset.layout}")
    if reset.device != input.device:
        raise RuntimeError(
            f"{name}reset must be on the input's device ({input.device}), got {reset.device}"
        )
    if batched:
        L, N = (input.size(1), input.size(0)) if batch_first else (input.size(0), input.size(1))
        want, legend = ((N, L), "[N, L]") if batch_first else ((L, N), "[L, N]")
    else:
        want, legend = (input.size(0),), "[L]"
    if tuple(reset.shape) != want:
        raise RuntimeError(
            f"{name}reset must have shape {legend} = {list(want)} to match the input, got "
            f"{list(reset.shape)}"
        )
    return reset.t() if batched and batch_first else reset


def restarts(reset: Tensor, lengths: Tensor | None, reverse: bool) -> Tensor:
    """The restart code (``CARRY``, ``ZERO``, ``INITIAL``) of every step of each sequence of
    time-major ``reset`` ``[L, N]``, as ``[L, N]`` int8, for the direction that runs forward in
    time or in ``reverse``. ``lengths`` ``[N]`` (a CPU int64 tensor; all ``L`` when None) ends
    each sequence: codes past it are ``CARRY``.

    Forward, a step that starts a piece starts from zeros (step 0 too: a reset there drops
    ``hx``). In reverse, each piece starts at its last step: from zeros, unless it is the first
    piece (no reset at or before that step), which starts from ``hx`` — a plain start at the
    sequence's end when there is no reset at all, so ``CARRY`` there.
    """
    L, N = reset.shape
    t = torch.arange(L, device=reset.device).unsqueeze(1)
    end = (
        torch.full((1, N), L - 1, device=reset.device)
        if lengths is None
        else (lengths.to(reset.device) - 1).unsqueeze(0)
    )
    running = t <= end
    if not reverse:
        return (reset & running).to(torch.int8)
    # any reset at or before each step: the piece there is not the first
    # (a running sum, not cummax, which ONNX export has no translation for)
    later = reset.to(torch.int32).cumsum(0, dtype=torch.int32) > 0
    # a piece's last step in forward time, where its reverse run starts: before a reset ...
    before_reset = torch.roll(reset, -1, 0) & (t < end)
    code = torch.where(before_reset, torch.where(later, ZERO, INITIAL), CARRY)
    # ... or the sequence's end, which starts from hx anyway unless a reset came before
    return torch.where((t == end) & later, ZERO, code).to(torch.int8)


@dataclass(frozen=True)
class Restarts:
    """One direction's restart codes as rows ``[R]`` int8, in the order of the call's
    time-major (or packed) input rows; ``steps`` says per step, in time order, which codes
    occur there (bit ``ZERO``: some row starts from zeros, bit ``INITIAL``: from ``hx``), so
    that a loop selects only at the steps that need it — or None where that cannot be read
    without a graph break (under ``torch.compile`` or a torch.func transform): then every
    step selects."""

    codes: Tensor
    steps: tuple[int, ...] | None
    # [R, 1] bool: the rows that start from zeros, and those that start from hx
    zero: Tensor
    initial: Tensor

    def at(self, t: int) -> int:
        """The bits of the codes that occur at step ``t`` (both when unknown)."""
        return ZERO | INITIAL if self.steps is None else self.steps[t]


def restarts_of(codes: Tensor, steps: tuple[int, ...] | None = None) -> Restarts:
    """A direction's :class:`Restarts` again from its codes ``[R]`` (as an engine saves them
    for backward) and their ``steps`` (None: select at every step)."""
    return Restarts(codes, steps, (codes == ZERO).unsqueeze(1), (codes == INITIAL).unsqueeze(1))


def row_restarts(
    reset: Tensor, batch_sizes: tuple[int, ...], packed: bool, reverse: bool, known: bool
) -> Restarts:
    """The :class:`Restarts` of one direction: ``reset`` is time-major ``[L, N]``, or for
    ``packed`` input the packed rows ``[R]`` of it (``batch_sizes`` of every step); ``known``
    lets the steps be read out (no tracing)."""
    if packed:
        # back to [T, N] with each sequence's length, as the codes are defined there
        N = batch_sizes[0]
        sizes = torch.tensor(batch_sizes, device=reset.device)
        mask = torch.arange(N, device=reset.device).unsqueeze(0) < sizes.unsqueeze(1)
        padded = reset.new_zeros(mask.shape).masked_scatter(mask, reset)
        codes = restarts(padded, mask.sum(0), reverse)
        rows = codes[mask]
    else:
        codes = restarts(reset, None, reverse)
        rows = codes.reshape(-1)
    steps = None
    if known:
        zero = (codes == ZERO).any(1).to(torch.int8) * ZERO
        initial = (codes == INITIAL).any(1).to(torch.int8) * INITIAL
        steps = tuple((zero | initial).tolist())
    return Restarts(rows, steps, (rows == ZERO).unsqueeze(1), (rows == INITIAL).unsqueeze(1))

"""Variable-length batches without packing: ``forward(input, hx, lengths=...)`` of the layers.

A padded batch with its ``lengths`` runs as torch's packed path would run it::

    pack_padded_sequence(input, lengths, batch_first, enforce_sorted=False)
    -> module -> pad_packed_sequence(output, batch_first, total_length=L)

so the output has the input's layout with the positions past each sequence's length zeroed,
and the final states are each sequence's state at its own last step (the reverse direction
starts there). Outputs, states and gradients equal that packed path bit for bit, on every
engine, since they are computed by it. Under a torch.func transform the packing and padding
are the same copies made by index ops, which ``vmap`` batches (torch's packing op has no
batching rule).

Examples::

    >>> lstm = rnnkit.LSTM(4, 8, batch_first=True)
    >>> x = torch.randn(3, 6, 4)  # [N, L, H_in], padded
    >>> out, (h_n, c_n) = lstm(x, lengths=[6, 2, 4])
    >>> out.shape, out[1, 2:].abs().max().item()
    (torch.Size([3, 6, 8]), 0.0)
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from rnnkit.engines.base import transforms
from rnnkit.resets import check_reset

__all__ = ["check_lengths", "run_with_lengths"]


def check_lengths(lengths: Tensor | Sequence[int], N: int, L: int) -> Tensor:
    """``lengths`` as a CPU int64 tensor of ``N`` entries in ``[1, L]``, or a clear error.

    Takes a 1-D integer tensor on any device (as ``pack_padded_sequence`` takes CPU int64) or
    a list or tuple of ``N`` ints.
    """
    if isinstance(lengths, Tensor):
        if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
            raise TypeError(f"lengths must be an integer tensor, got dtype {lengths.dtype}")
        if torch._C._functorch.is_batchedtensor(lengths):
            raise ValueError(
                "lengths cannot be vmapped over: each sample would be a batch of other lengths"
            )
        if lengths.dim() != 1:
            raise ValueError(
                f"lengths must be a 1-D tensor of N={N} lengths, got a {lengths.dim()}-D tensor "
                f"of shape {list(lengths.shape)}"
            )
        values = lengths.detach().to(device="cpu", dtype=torch.int64)
    elif isinstance(lengths, (list, tuple)):
        for i, v in enumerate(lengths):
            if not isinstance(v, numbers.Integral) or isinstance(v, bool):
                raise TypeError(f"lengths must hold ints, got {type(v).__name__} at index {i}")
        values = torch.tensor([int(v) for v in lengths], dtype=torch.int64)
    else:
        raise TypeError(
            f"lengths must be a 1-D integer tensor or a list of ints, got {type(lengths).__name__}"
        )
    if values.numel() != N:
        raise ValueError(
            f"lengths must have one entry per sequence: expected {N} (the batch size), "
            f"got {values.numel()}"
        )
    bad = ((values < 1) | (values > L)).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise ValueError(
            f"lengths must be in [1, {L}] (the sequence length), got {int(values[i])} at index {i}"
        )
    return values


def _fits(hx, N: int) -> bool:
    states = hx if isinstance(hx, (tuple, list)) else (hx,)
    return all(isinstance(s, Tensor) and s.dim() == 3 and s.size(1) == N for s in states)


def run_with_lengths(
    run: Callable,
    name: str,
    input,
    hx,
    lengths: Tensor | Sequence[int],
    batch_first: bool,
    reset: Tensor | None = None,
):
    """``run(input, hx, reset)`` on the packing of the padded ``input``, padded back to its
    length.

    ``run`` is a layer's validated forward (``RNNBase._run``); ``name`` its class name for
    messages. The states keep the input's batch order (``enforce_sorted=False`` sorts and
    unsorts them). ``reset`` (``rnnkit.resets``, shaped as the padded input's steps) is packed
    alike.
    """
    if isinstance(input, PackedSequence):
        raise ValueError(
            f"{name}: lengths cannot be given with a PackedSequence input, which carries its "
            "own lengths"
        )
    if not isinstance(input, Tensor) or input.dim() != 3:
        if isinstance(input, Tensor) and input.dim() == 2:
            raise ValueError(
                f"{name}: lengths needs a batched 3-D input, got a 2-D (unbatched) input of "
                f"shape {list(input.shape)}"
            )
        # not a tensor, or of a rank no layer takes: the layer's own error
        return run(input, hx, reset)
    L, N = (input.size(1), input.size(0)) if batch_first else (input.size(0), input.size(1))
    if L == 0:
        # the layer's error for an empty sequence
        return run(input, hx, reset)
    if N == 0:
        # an empty batch has nothing to pack
        check_lengths(lengths, N, L)
        return run(input, hx, reset)
    lengths = check_lengths(lengths, N, L)
    if reset is not None:
        reset = check_reset(name, reset, input, batch_first)  # time-major [L, N]
    if hx is not None and not _fits(hx, N):
        # the layer's own error for a state that does not fit the padded batch (packing
        # would first reorder it along the wrong dimension)
        return run(input, hx, None if reset is None else _batch_major(reset, batch_first))
    if transforms():
        packed, rows = _pack_by_index(input, lengths, batch_first)
        output, hidden = run(packed, hx, _packed_like(reset, packed, rows))
        return _pad_by_index(output.data, rows, L, N, batch_first), hidden
    packed = pack_padded_sequence(input, lengths, batch_first, enforce_sorted=False)
    if reset is not None:
        reset = pack_padded_sequence(reset, lengths, enforce_sorted=False)
    output, hidden = run(packed, hx, reset)
    output, _ = pad_packed_sequence(output, batch_first, total_length=L)
    return output, hidden


def _batch_major(reset: Tensor, batch_first: bool) -> Tensor:
    return reset.t() if batch_first else reset


def _packed_like(reset: Tensor | None, packed: PackedSequence, rows: Tensor):
    """Time-major ``reset`` ``[L, N]`` packed as ``packed`` was, whose rows came from
    ``rows`` of the time-major input."""
    if reset is None:
        return None
    return packed._replace(data=reset.reshape(-1).index_select(0, rows))


def _pack_by_index(input: Tensor, lengths: Tensor, batch_first: bool):
    """``pack_padded_sequence(input, lengths, batch_first, enforce_sorted=False)`` as one
    ``index_select``; also returns the index: which row of the time-major ``[L*N, H_in]``
    input each packed row is."""
    x = input.transpose(0, 1) if batch_first else input
    L, N = x.shape[:2]
    # torch's order: sequences by decreasing length, then the rows of each step
    sorted_lengths, sorted_indices = torch.sort(lengths, descending=True)
    T = int(sorted_lengths[0])
    steps = torch.arange(T).unsqueeze(1)
    batch_sizes = (sorted_lengths.unsqueeze(0) > steps).sum(1)
    rows = (steps * N + sorted_indices.unsqueeze(0))[torch.arange(N) < batch_sizes.unsqueeze(1)]
    rows = rows.to(input.device)
    data = x.reshape(L * N, x.size(2)).index_select(0, rows)
    sorted_indices = sorted_indices.to(input.device)
    return PackedSequence(data, batch_sizes, sorted_indices, sorted_indices.argsort()), rows


def _pad_by_index(data: Tensor, rows: Tensor, L: int, N: int, batch_first: bool) -> Tensor:
    """``pad_packed_sequence(..., total_length=L)`` of packed ``data`` whose rows came from
    ``rows`` of the time-major input: zeros elsewhere."""
    padded = data.new_zeros(L * N, data.size(1)).index_copy(0, rows, data)
    padded = padded.view(L, N, data.size(1))
    return padded.transpose(0, 1) if batch_first else padded

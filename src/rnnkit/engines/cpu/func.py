"""Batching rules of the compiled ops, for ``torch.func.vmap``.

A forward op under vmap whose weights are shared (vmap over inputs and states only) folds the
vmapped dim ``B`` into the batch and runs once, on ``B*N`` sequences. Rows are ordered by step,
then sequence (``x`` ``[R, H_in]``, ``R = sum(batch_sizes)``); folded with the sample next to
the sequence (row ``r`` of sample ``b`` becomes row ``r*B + b``, state row ``n`` of sample
``b`` row ``n*B + b``), each step's batch is ``B*batch_sizes[t]`` rows, the first rows of the
state are the sequences still running, as packing wants, and every output unfolds to a view
with the vmapped dim second. A forward op with batched weights (an ensemble of models), and
every backward op, whose weight gradients are each sample's own, run once per sample.
:func:`register` installs the rules at import, with the ops' schemas (``ops.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor

# The kind of each argument of a forward op: rows (dim 0 is R), a state with its batch dim N
# at the given position, a weight (batched weights make the op run per sample), batch_sizes.
_ROWS, _WEIGHT, _SIZES = "rows", "weight", "sizes"
_FORWARD = {
    # mode, x, h0 [D, N, H_out], c0 [D, N, H], weights, batch_sizes, has_bias, train, restart
    # [D, R] (restart codes: its rows at dim 1, folded as the states' sequences are)
    "layer_forward": (None, _ROWS, 1, 1, _WEIGHT, _SIZES, None, None, 1),
    # gx, h0 [N, H_out], c0 [N, H], w_hh, b_hh, w_hr, peephole, ln_hh, ln_c_weight, ln_c_bias,
    # rec_mask [N, H_out], keep_h, keep_c, rates, coupled, batch_sizes, reverse, train,
    # restart [R]
    "lstm_variant_forward": (_ROWS, 0, 0, *[_WEIGHT] * 7, 0, _ROWS, _ROWS)
    + (None, None, _SIZES, None, None, _ROWS),
}
# Where the batch dim of the final states h_n, c_n is in a forward op's outputs (out, h_n,
# c_n, saved...); out and the saved buffers are rows, or 1-D empty placeholders.
_STATE_DIM = {"layer_forward": 1, "lstm_variant_forward": 0}


def _fold(t: Tensor | None, bdim: int | None, B: int, at: int) -> Tensor | None:
    """``t`` with the vmapped dim (``bdim``, or a broadcast one) merged into its dim ``at``."""
    if t is None:
        return None
    if bdim is None:
        shape = list(t.shape)
        shape.insert(at + 1, B)
        t = t.unsqueeze(at + 1).expand(shape)
    else:
        t = t.movedim(bdim, at + 1)
    return t.flatten(at, at + 1).contiguous()


def _unfold(t: Tensor, B: int, at: int) -> tuple[Tensor, int | None]:
    if t.dim() == 1:
        return t, None  # an empty placeholder: no rows
    return t.unflatten(at, (t.size(at) // B, B)), at + 1


def _sample(args: tuple, in_dims: tuple, i: int) -> list:
    """The arguments of sample ``i``: each batched tensor's slice, made contiguous for the
    kernels."""

    def pick(a, d):
        return a if d is None else a.select(d, i).contiguous()

    return [
        [pick(t, d) for t, d in zip(a, dims, strict=True)] if isinstance(a, list) else pick(a, dims)
        for a, dims in zip(args, in_dims, strict=True)
    ]


def _per_sample(op, info, in_dims: tuple, args: tuple):
    """``op`` once per sample, its outputs stacked along a new leading dim."""
    results = [op(*_sample(args, in_dims, i)) for i in range(info.batch_size)]
    return [torch.stack(ts) for ts in zip(*results, strict=True)], [0] * len(results[0])


def _forward_rule(name: str, op):
    kinds = _FORWARD[name]

    def rule(info, in_dims, *args):
        # trailing arguments left to their defaults (None)
        missing = len(kinds) - len(args)
        args, in_dims = (*args, *[None] * missing), (*in_dims, *[None] * missing)
        weight_dims = [d for kind, d in zip(kinds, in_dims, strict=True) if kind == _WEIGHT]
        if any(d is not None for d in _flat(weight_dims)):
            return _per_sample(op, info, in_dims, args)
        B = info.batch_size
        folded = []
        for kind, a, d in zip(kinds, args, in_dims, strict=True):
            if kind == _ROWS:
                a = _fold(a, d, B, 0)
            elif isinstance(kind, int):
                a = _fold(a, d, B, kind)
            elif kind == _SIZES:
                # (ops.UNIFORM, [-1]: uniform input, whose steps are all the folded batch)
                a = a if list(a) == [-1] else [b * B for b in a]
            folded.append(a)
        out, h_n, c_n, *saved = op(*folded)
        at = _STATE_DIM[name]
        outputs = [_unfold(out, B, 0), _unfold(h_n, B, at), _unfold(c_n, B, at)]
        outputs += [_unfold(t, B, 0) for t in saved]
        return [t for t, _ in outputs], [d for _, d in outputs]

    return rule


def _flat(dims: list) -> list:
    return [d for x in dims for d in (x if isinstance(x, list) else [x])]


def _backward_rule(op, reuse_saved_at: int | None):
    def rule(info, in_dims, *args):
        if reuse_saved_at is not None:
            # the saved buffers serve every sample's call: none may be written over
            args = (*args[:reuse_saved_at], False, *args[reuse_saved_at + 1 :])
        return _per_sample(op, info, in_dims, args)

    return rule


def register(namespace: str) -> None:
    """Install the batching rules of ``namespace``'s ops."""
    ops = getattr(torch.ops, namespace)
    for name in _FORWARD:
        torch.library.register_vmap(f"{namespace}::{name}", _forward_rule(name, getattr(ops, name)))
    for name in ("layer_backward", "lstm_variant_backward"):
        op = getattr(ops, name)
        names = [a.name for a in op.default._schema.arguments]
        reuse = names.index("reuse_saved") if "reuse_saved" in names else None
        rule = _backward_rule(op, reuse)
        torch.library.register_vmap(f"{namespace}::{name}", rule)

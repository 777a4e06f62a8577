"""Autograd helpers that every engine's hand-written backward shares.

A compiled backward is no graph of its own: under ``create_graph=True`` (a double backward) an
engine recomputes the same layer or direction on the reference engine's ops
(:func:`~rnnkit.engines.reference.layer_graph`, ``direction_graph``) and returns
:func:`graph_grads` of that graph instead. :func:`backward_needs_graph` says when, and
:func:`grad_or_zeros` gives the zero gradient autograd leaves out for an unused output.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch._C import _functorch

from rnnkit.engines.base import transforms

__all__ = ["backward_needs_graph", "batched_grads", "grad_or_zeros", "graph_grads", "regrads"]


def grad_or_zeros(grad: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if grad is None else grad


def backward_needs_graph(tensors: list[Tensor | None]) -> bool:
    """Whether a backward must build a graph: under ``create_graph=True`` of torch.autograd,
    not for torch.func's own gradients. Raises where it would need one inside a ``vmap``.

    ``grad``, ``vjp`` and ``jacrev`` differentiate with ``create_graph=True`` whatever is
    asked; the engines that hand-write a backward do not declare the nested transforms that
    would differentiate it (``grad_of_grad``). Their backward runs inside the ``grad``
    transform, or, for a ``vjp`` function called after its transform returned, on tensors of
    that ended transform.
    """
    if not torch.is_grad_enabled() or "grad" in transforms():
        return False
    levels = {_functorch.maybe_get_level(t) for t in tensors if t is not None}
    if -2 in levels:
        return False
    if any(level > 0 for level in levels):
        # the recomputed graph would hold vmap's batched tensors, which autograd cannot take
        raise RuntimeError(
            "rnnkit: a double backward (create_graph=True) through a torch.func.vmap call is "
            "not supported on the fused engine; run the model with engine='reference'"
        )
    return True


def _grads(outputs, grads, inputs, needs, create_graph: bool) -> list[Tensor | None]:
    """``torch.autograd.grad`` of ``outputs`` for the ``inputs`` whose ``needs`` is set, in
    the inputs' places; None for the others."""
    wanted = [i for i, (t, n) in enumerate(zip(inputs, needs, strict=True)) if n and t is not None]
    got = torch.autograd.grad(
        outputs, [inputs[i] for i in wanted], grads, create_graph=create_graph, allow_unused=True
    )
    result: list[Tensor | None] = [None] * len(inputs)
    for i, g in zip(wanted, got, strict=True):
        result[i] = g
    return result


def graph_grads(
    outputs: Sequence[Tensor],
    grads: Sequence[Tensor],
    inputs: Sequence[Tensor | None],
    needs: Sequence[bool],
) -> list[Tensor | None]:
    """The gradients of ``outputs`` (weighted by ``grads``) with respect to the ``inputs``
    whose ``needs`` is set, as a graph (``create_graph=True``); None for the others."""
    return _grads(outputs, grads, inputs, needs, create_graph=True)


def batched_grads(grads: Sequence[Tensor | None]) -> bool:
    """Whether a backward receives a batch of gradients (``torch.autograd.grad(...,
    is_grads_batched=True)``, ``gradcheck(check_batched_grad=True)``): torch's legacy vmap,
    under which only torch's own ops have batching rules, not the compiled ones."""
    is_batched = getattr(_functorch, "is_legacy_batchedtensor", None)
    if is_batched is None or torch.compiler.is_compiling():
        # a traced backward (torch.compile) is never run under the legacy vmap
        return False
    return any(g is not None and is_batched(g) for g in grads)


def regrads(
    recompute,
    grads: Sequence[Tensor],
    inputs: Sequence[Tensor | None],
    needs: Sequence[bool],
) -> list[Tensor | None]:
    """The gradients of ``recompute(*inputs)`` (a graph of torch ops) weighted by ``grads``,
    for the ``inputs`` whose ``needs`` is set, None for the others: a compiled backward
    computed again through torch ops, where its kernels cannot run (batched gradients)."""
    leaves = [
        None if t is None else t.detach().requires_grad_(bool(n))
        for t, n in zip(inputs, needs, strict=True)
    ]
    with torch.enable_grad():
        outputs = [o for o in recompute(*leaves) if o is not None]
    return _grads(outputs, grads[: len(outputs)], leaves, needs, create_graph=False)

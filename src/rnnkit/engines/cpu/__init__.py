"""The fused CPU engine: compiled time loops with a hand-written backward through time.

Runs every mode and option of :class:`~rnnkit.engines.base.RNNCall` (``proj_size``,
bidirectional, stacked layers, packed input, inter-layer dropout) on CPU tensors of float32 or
float64, and the LSTM variants except custom activations (``variant.py``). The C++ kernels
(``csrc/``) are compiled on first use, not at import; if that fails, ``engine="auto"`` moves on
to the reference engine after one warning, and ``engine="fused"`` raises with the compiler's
reason. Cells are a single step, where a fused loop gains nothing:
``engine="auto"`` gives them to the reference engine.

torch.func: ``vmap`` (over inputs, states or stacked weights), ``grad``, ``vjp``, ``jacrev``
and their compositions run on this engine (``func.py`` has the ops' batching rules);
forward-mode AD (``jvp``, ``jacfwd``, ``torch.autograd.forward_ad``) and gradients of
gradients under torch.func (``grad`` of ``grad``) do not, and ``engine="auto"``
gives them to the reference engine.
"""

from __future__ import annotations

import warnings

import torch

from rnnkit.engines.base import CellCall, Engine, RNNCall, forward_ad, transforms
from rnnkit.engines.cpu import build, variant
from rnnkit.engines.cpu.function import run_rnn as run_plain
from rnnkit.engines.cpu.function import tracked_outside

__all__ = ["FUSED"]

_DTYPES = (torch.float32, torch.float64)
_warned = False


def _tensors(call: RNNCall) -> list[torch.Tensor]:
    hx = list(call.hx) if isinstance(call.hx, tuple) else [call.hx]
    return [call.input, *hx, *(t for p in call.params for t in p if t is not None)]


def rnn_unsupported(call: RNNCall) -> str | None:
    """None when the fused engine can run ``call``, else a short reason."""
    global _warned
    if not call.variant.is_plain:
        reason = variant.unsupported(call.mode, call.variant)
        if reason is not None:
            return reason
    tensors = _tensors(call)
    if any(t.device.type != "cpu" for t in tensors):
        return "needs CPU tensors"
    dtype = call.input.dtype
    if dtype not in _DTYPES:
        return f"{dtype} not supported (float32 and float64 only)"
    if any(t.dtype != dtype for t in tensors):
        return "needs input, states and weights of one dtype"
    if torch.is_autocast_enabled("cpu"):
        return "CPU autocast not supported"
    if forward_ad(tensors):
        # the hand-written backward is reverse mode only
        return "forward-mode AD (torch.func.jvp, jacfwd, forward_ad) not supported"
    if transforms().count("grad") > 1:
        # torch.func differentiates a backward in place, not through the recomputed graph that
        # serves torch.autograd's double backward
        return "torch.func gradients of gradients (grad of grad, jacrev of jacrev) not supported"
    if "grad" in transforms() and tracked_outside(tensors):
        # torch.autograd could differentiate the transform's result again, through the
        # backward kernels, which have no derivative of their own
        return (
            "torch.func gradients (grad, vjp, jacrev) of tensors that torch.autograd also "
            "tracks not supported; pass detached tensors or call the transform under "
            "torch.no_grad()"
        )
    reason = build.build_error()
    if reason is not None:
        if not _warned:
            _warned = True
            warnings.warn(
                f"rnnkit: {reason}; engine='auto' falls back to the slower reference engine",
                RuntimeWarning,
                stacklevel=2,
            )
        return reason
    return None


def run_rnn(call: RNNCall):
    if call.variant.is_plain:
        return run_plain(call)
    return variant.run_rnn(call)


def cell_unsupported(call: CellCall) -> str | None:
    return "cells are one step; the reference engine runs them"


def _run_cell(call: CellCall):
    raise RuntimeError("the 'fused' engine does not run cells; use engine='reference'")


FUSED = Engine(
    name="fused",
    run_rnn=run_rnn,
    run_cell=_run_cell,
    rnn_unsupported=rnn_unsupported,
    cell_unsupported=cell_unsupported,
)

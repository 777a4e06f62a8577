"""The Triton engine: persistent and per-step Triton kernels, for CUDA tensors.

Runs every mode and option of :class:`~rnnkit.engines.base.RNNCall` (``proj_size``,
bidirectional, stacked layers, packed input, inter-layer dropout) on CUDA tensors of float32,
float64, float16 or bfloat16, with a hand-written backward through time. Directions without
projection on equal lengths and H <= 256 run their whole time loop in one
launch (``persistent.py``); the rest run per step, one GEMM ``h_{t-1} W_hh^T`` (torch, i.e.
cuBLAS) on the active rows and one Triton kernel for the gates and the state update
(``kernels.py``). Half-precision layers keep their state and the pointwise math in float32.

The LSTM variants run here too, in float32 and float64 (``variant.py``); cells, GRU/RNN
variants and custom activations run on the reference engine. ``engine="auto"`` does not pick
this engine until GPU measurements say where it is the fastest (``rnnkit.functional.ENGINES``).

With ``TRITON_INTERPRET=1`` set before the engine first runs, the kernels run in Triton's
interpreter, and while it stays set the engine also accepts CPU tensors: slow, but it checks
the kernels on any machine.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from rnnkit.engines.base import CellCall, Engine, RNNCall, RNNResult, forward_ad, transforms

__all__ = ["TRITON", "interpreted", "triton_error"]

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def triton_error() -> str | None:
    """Why Triton cannot be used here, or None."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    return None


def interpreted() -> bool:
    """Whether the kernels run in Triton's interpreter: ``TRITON_INTERPRET=1`` when they were
    first imported (this imports them)."""
    from rnnkit.engines.triton import kernels

    return kernels.INTERPRETED


def _tensors(call: RNNCall) -> list[torch.Tensor]:
    hx = list(call.hx) if isinstance(call.hx, tuple) else [call.hx]
    return [call.input, *hx, *(t for p in call.params for t in p if t is not None)]


def rnn_unsupported(call: RNNCall) -> str | None:
    """None when the Triton engine can run ``call``, else a short reason."""
    reason = triton_error()
    if reason is not None:
        return reason
    tensors = _tensors(call)
    devices = {t.device.type for t in tensors}
    if devices == {"cpu"}:
        if os.environ.get("TRITON_INTERPRET", "").lower() not in ("1", "true", "yes", "on"):
            return "needs CUDA tensors (CPU tensors run only with TRITON_INTERPRET=1)"
        if not interpreted():
            return "TRITON_INTERPRET=1 was set after the kernels were compiled for a GPU"
    elif devices != {"cuda"} or len({t.device for t in tensors}) != 1:
        return "needs CUDA tensors on one device"
    dtype = call.input.dtype
    if dtype not in _DTYPES:
        return f"{dtype} not supported (float32, float64, float16, bfloat16)"
    if any(t.dtype != dtype for t in tensors):
        return "needs input, states and weights of one dtype"
    if transforms() or forward_ad(tensors):
        # its autograd.Function has no setup_context or batching rule
        return "torch.func transforms and forward-mode AD run on the reference engine"
    if torch.is_autocast_enabled(call.input.device.type):
        from rnnkit.amp import torch_casts_layer

        cast = torch_casts_layer(
            call.mode, call.input, call.batch_sizes, _tensors(call)[1:], call.params, call.variant
        )
        if cast != dtype:
            return "under autocast runs only the layers torch.nn casts whole (cuDNN's, oneDNN's)"
    if not call.variant.is_plain:
        from rnnkit.engines.triton import variant

        return variant.unsupported(call)
    return None


def run_rnn(call: RNNCall) -> RNNResult:
    if call.variant.is_plain:
        from rnnkit.engines.triton.function import run_rnn as run
    else:
        from rnnkit.engines.triton.variant import run_rnn as run
    # under autocast the call arrives cast whole, in the dtype torch's kernel runs it in
    with torch.autocast(call.input.device.type, enabled=False):
        return run(call)


def cell_unsupported(call: CellCall) -> str | None:
    return "cells are one step; the reference engine runs them"


def _run_cell(call: CellCall):
    raise RuntimeError("the 'triton' engine does not run cells; use engine='reference'")


TRITON = Engine(
    name="triton",
    run_rnn=run_rnn,
    run_cell=_run_cell,
    rnn_unsupported=rnn_unsupported,
    cell_unsupported=cell_unsupported,
)

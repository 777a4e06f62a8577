"""The Triton engine: persistent and per-step Triton kernels, for CUDA tensors.

Runs every mode and option of :class:`~rnnkit.engines.base.RNNCall` (``proj_size``,
bidirectional, stacked layers, packed input, inter-layer dropout, resets inside a sequence) on
CUDA tensors of float32, float64, float16 or bfloat16, with a hand-written backward through
time. A reset (:mod:`rnnkit.resets`) is a per-row select on the carried state inside the
kernels' time loops, forward and backward, with no gradient across it. Directions without
projection on equal lengths and H <= 256 run their whole time loop in one
launch (``persistent.py``); the rest run per step, one GEMM ``h_{t-1} W_hh^T`` (torch, i.e.
cuBLAS) on the active rows and one Triton kernel for the gates and the state update
(``kernels.py``). Half-precision layers keep their state and the pointwise math in float32.

The LSTM variants run here too, in float32 and float64 (``variant.py``); cells, GRU/RNN
variants and custom activations run on the reference engine, as does every torch.func
transform (the autograd Functions have no batching rules). The engine declares all this as
data (:data:`SUPPORT`). ``engine="auto"`` does not pick this engine until GPU measurements say
where it is the fastest (``rnnkit.functional.ENGINES``): on CUDA, "auto" runs the reference.

With ``TRITON_INTERPRET=1`` set before the engine first runs, the kernels run in Triton's
interpreter, and while it stays set the engine also accepts CPU tensors: slow, but it checks
the kernels on any machine.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from rnnkit.engines.base import ALL_MODES, Engine, RNNCall, Support, call_tensors

__all__ = ["SUPPORT", "TRITON", "interpreted", "triton_error"]

_DTYPES = frozenset({torch.float32, torch.float64, torch.float16, torch.bfloat16})
_OPTIONS = frozenset(
    {"layers", "bidirectional", "proj_size", "packed", "dropout", "no_bias", "batch_first",
     "autocast", "reset"}
)  # fmt: skip
# what variant.py's loop and variant_kernels.py implement, for LSTM (forget_bias changes
# the init only); declared here, where nothing imports triton
_VARIANT_FIELDS = frozenset(
    {
        "layer_norm", "peephole", "zoneout", "recurrent_dropout", "weight_dropout",
        "forget_bias", "gate_clip", "cell_clip", "proj_clip", "coupled_input_forget",
    }
)  # fmt: skip
# CPU tensors only in Triton's interpreter (rnn_unsupported checks that it is on)
_DEVICES = frozenset({"cuda", "cpu"})
SUPPORT = (
    Support(ALL_MODES, _DEVICES, _DTYPES, _OPTIONS, frozenset({"forget_bias"})),
    Support(
        frozenset({"LSTM"}),
        _DEVICES,
        frozenset({torch.float32, torch.float64}),
        _OPTIONS,
        _VARIANT_FIELDS,
    ),
)


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


def rnn_unsupported(call: RNNCall) -> str | None:
    """What the declared support cannot say: None when Triton, the device and autocast let
    the engine run ``call``, else a short reason."""
    reason = triton_error()
    if reason is not None:
        return reason
    tensors = call_tensors(call)
    devices = {t.device.type for t in tensors}
    if devices == {"cpu"}:
        if os.environ.get("TRITON_INTERPRET", "").lower() not in ("1", "true", "yes", "on"):
            return "needs CUDA tensors (CPU tensors run only with TRITON_INTERPRET=1)"
        if not interpreted():
            return "TRITON_INTERPRET=1 was set after the kernels were compiled for a GPU"
    elif devices != {"cuda"} or len({t.device for t in tensors}) != 1:
        return "needs CUDA tensors on one device"
    if torch.is_autocast_enabled(call.input.device.type):
        from rnnkit.amp import torch_casts_layer

        cast = torch_casts_layer(
            call.mode, call.input, call.batch_sizes, tensors[1:], call.params, call.variant
        )
        if cast != call.input.dtype:
            return "under autocast runs only the layers torch.nn casts whole (cuDNN's, oneDNN's)"
    return None


def _layer(lc):
    if lc.variant.is_plain:
        from rnnkit.engines.triton.function import layer
    else:
        from rnnkit.engines.triton.variant import layer
    return layer(lc)


def _run_cell(call):
    raise RuntimeError("the 'triton' engine does not run cells; use engine='reference'")


# Cells are one step: the engine declares none.
TRITON = Engine(
    name="triton",
    layer=_layer,
    run_cell=_run_cell,
    rnn_support=SUPPORT,
    rnn_unsupported=rnn_unsupported,
)

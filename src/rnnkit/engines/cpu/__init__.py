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

import contextlib
import warnings

import torch

from rnnkit.engines.base import ALL_MODES, Engine, RNNCall, Support
from rnnkit.engines.cpu import build, function, variant

__all__ = ["FUSED"]

_DTYPES = frozenset({torch.float32, torch.float64})
# what FusedLayer and VariantLSTM handle: the core options, torch.func's vmap and
# reverse-mode gradients through their batching rules and setup_context, and torch.jit.trace
# (one op per layer or direction, whose uniform input carries no per-step sizes)
_OPTIONS = frozenset(
    {
        "layers", "bidirectional", "proj_size", "packed", "dropout", "no_bias", "batch_first",
        "vmap", "grad", "functionalize", "jit_trace",
    }
)  # fmt: skip
SUPPORT = (
    # forget_bias changes the init only: the step math is torch's
    Support(ALL_MODES, frozenset({"cpu"}), _DTYPES, _OPTIONS, frozenset({"forget_bias"})),
    Support(frozenset({"LSTM"}), frozenset({"cpu"}), _DTYPES, _OPTIONS, variant.VARIANT_FIELDS),
)
_warned = False


@contextlib.contextmanager
def _untraced():
    """No torch.jit.trace recording: loading the kernels calls ops (``blas_available``)
    that are no part of the traced call, and whose nodes break the trace."""
    state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        yield
    finally:
        torch._C._set_tracing_state(state)


def rnn_unsupported(call: RNNCall) -> str | None:
    """None when the kernels load (building them on first use), else the build's reason,
    with one warning that ``engine="auto"`` falls back."""
    global _warned
    with _untraced():
        reason = build.build_error()
    if reason is not None and not _warned:
        _warned = True
        warnings.warn(
            f"rnnkit: {reason}; engine='auto' falls back to the slower reference engine",
            RuntimeWarning,
            stacklevel=2,
        )
    return reason


def _layer(lc):
    return function.layer(lc) if lc.variant.is_plain else variant.layer(lc)


def _run_cell(call):
    raise RuntimeError("the 'fused' engine does not run cells; use engine='reference'")


# Cells are one step, where a fused loop gains nothing: the engine declares none.
FUSED = Engine(
    name="fused",
    layer=_layer,
    run_cell=_run_cell,
    rnn_support=SUPPORT,
    rnn_unsupported=rnn_unsupported,
)

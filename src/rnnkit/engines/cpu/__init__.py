"""The fused CPU engine: compiled time loops with a hand-written backward through time.

Runs every mode and option of :class:`~rnnkit.engines.base.RNNCall` (``proj_size``,
bidirectional, stacked layers, packed input, inter-layer dropout) on CPU tensors of float32 or
float64, and the LSTM variants except custom activations (``variant.py``). A plain layer of
bfloat16 runs too, each layer in float32 (:func:`_bfloat16_layer`). The C++ kernels
(``csrc/``) are compiled once per environment (``build.py``: by ``python -m rnnkit build``, or on
first use), never at import; if that fails, ``engine="auto"`` moves on to the reference engine
after one warning, and ``engine="fused"`` raises with the compiler's reason. The ops' schemas
are defined at import (``ops.py``). Cells are a single step, where a fused loop gains nothing:
``engine="auto"`` gives them to the reference engine.

torch.func: ``vmap`` (over inputs, states or stacked weights), ``grad``, ``vjp``, ``jacrev``
and their compositions run on this engine (``func.py`` has the ops' batching rules);
forward-mode AD (``jvp``, ``jacfwd``, ``torch.autograd.forward_ad``) and gradients of
gradients under torch.func (``grad`` of ``grad``) do not, and ``engine="auto"``
gives them to the reference engine.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from rnnkit.cells import CellParams
from rnnkit.engines.base import ALL_MODES, Engine, Support
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
    # forget_bias changes the init only: the step math is torch's; every time loop applies
    # resets inside a sequence (reset=)
    Support(
        ALL_MODES,
        frozenset({"cpu"}),
        _DTYPES | {torch.bfloat16},
        _OPTIONS | {"reset"},
        frozenset({"forget_bias"}),
    ),
    Support(
        frozenset({"LSTM"}),
        frozenset({"cpu"}),
        _DTYPES,
        _OPTIONS | {"reset"},
        variant.VARIANT_FIELDS,
    ),  # fmt: skip
)


@contextlib.contextmanager
def _untraced():
    """No torch.jit.trace recording: loading the kernels is no part of the traced call, and
    nodes recorded meanwhile would break the trace."""
    state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        yield
    finally:
        torch._C._set_tracing_state(state)


def _fault() -> str | None:
    """None when the kernels load (building them on first use), else the build's reason."""
    with _untraced():
        return build.build_error()


def _layer(lc):
    if lc.x.dtype == torch.bfloat16:
        return _bfloat16_layer(lc)
    return function.layer(lc) if lc.variant.is_plain else variant.layer(lc)


def _float32(t):
    return None if t is None else t.float()


def _bfloat16_layer(lc):
    """A bfloat16 layer: its input and states widened to float32 on the way in, its output and
    final states rounded to bfloat16 on the way out; the states and the pointwise math stay in
    float32 between the steps. Its products (:func:`build.bf16_kernel`): where the CPU has
    AVX-512-BF16, bfloat16 dot products of the weights with the input and h_{t-1} rounded to
    bfloat16, summed in float32, as torch's bfloat16 kernels (oneDNN) do; elsewhere the
    weights widened too, and float32 products. The casts are autograd ops: gradients reach the
    bfloat16 tensors in bfloat16; backward's per-step products and input gradient run in
    bfloat16 too, its weight gradients (sums over the steps) in float32."""
    params = lc.params
    if build.bf16_kernel() == "float32":
        params = tuple(CellParams(*(_float32(t) for t in p)) for p in params)
    wide = dataclasses.replace(
        lc, x=lc.x.float(), h0=lc.h0.float(), c0=_float32(lc.c0), params=params
    )
    out, h_n, c_n = function.layer(wide)
    bf16 = torch.bfloat16
    return out.to(bf16), h_n.to(bf16), None if c_n is None else c_n.to(bf16)


def _run_cell(call):
    raise RuntimeError("the 'fused' engine does not run cells; use engine='reference'")


# Cells are one step, where a fused loop gains nothing: the engine declares none.
FUSED = Engine(
    name="fused",
    layer=_layer,
    run_cell=_run_cell,
    rnn_support=SUPPORT,
    # the kernels, built on first use: a build that failed is the engine's fault
    fault=_fault,
)

"""The fused CPU engine: compiled time loops with a hand-written backward through time.

Runs every mode and option of :class:`~rnnkit.engines.base.RNNCall` (``proj_size``,
bidirectional, stacked layers, packed input, inter-layer dropout) on CPU tensors of float32 or
float64, and the LSTM variants except custom activations (``variant.py``). The C++ kernels
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

import torch

from rnnkit.engines.base import ALL_MODES, Engine, Support
from rnnkit.engines.cpu import build, function, variant

__all__ = ["FUSED"]

_DTYPES = frozenset({torch.float32, torch.float64})
# what FusedLayer and VariantLSTM handle: the core options, and torch.func's vmap and
# reverse-mode gradients through their batching rules and setup_context
_OPTIONS = frozenset(
    {
        "layers", "bidirectional", "proj_size", "packed", "dropout", "no_bias", "batch_first",
        "vmap", "grad", "functionalize",
    }
)  # fmt: skip
SUPPORT = (
    # forget_bias changes the init only: the step math is torch's
    Support(ALL_MODES, frozenset({"cpu"}), _DTYPES, _OPTIONS, frozenset({"forget_bias"})),
    Support(frozenset({"LSTM"}), frozenset({"cpu"}), _DTYPES, _OPTIONS, variant.VARIANT_FIELDS),
)


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
    # the kernels, built on first use: a build that failed is the engine's fault
    fault=build.build_error,
)

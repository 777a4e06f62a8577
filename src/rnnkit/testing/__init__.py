"""Parity helpers: run rnnkit and ``torch.nn`` on the same case and compare everything.

One comparison (:func:`compare`) serves the test suite, ``rnnkit check`` and the parity gate of
``rnnkit bench``. In float64 it holds to a tolerance table (:data:`TOLERANCES`); in float32 no
fixed tolerance is right on every CPU, so each side is measured against a float64 run of the
same case on the same values (its truth, :func:`run_truth`, :func:`float64_copy`) and rnnkit's
error must stay within a small factor of the other side's (:data:`FLOAT64_ACCURACY_FACTOR`).
A :class:`Case` is one layer or cell configuration with its input; :func:`run` feeds it to a
module, backpropagates a fixed random-weighted sum of the output and final states, and
returns every tensor worth comparing by name: ``output``, ``h_n`` (``c_n``), ``grad_input``,
``grad_h_0`` (``grad_c_0``) and ``grad_<parameter name>`` for every parameter.

torch takes one of two paths on CPU: ATen's native loops (``aten/src/ATen/native/RNN.cpp``) or,
for some float32 layers, oneDNN's fused kernels (cuDNN's on CUDA). rnnkit's reference engine is
bit-identical to the ATen path on CPU (:func:`aten_path`); against the default path results
agree to rounding.
"""

from rnnkit.testing.cases import MODULES, Case, aten_path, run, run_pair, run_truth
from rnnkit.testing.comparison import (
    ENGINE_TOLERANCES,
    EXACT,
    FLOAT64_ACCURACY_FACTOR,
    FLOAT64_ACCURACY_ULPS,
    TOLERANCES,
    Result,
    Tolerance,
    as_accurate,
    below_float64,
    compare,
    compare_all,
    engine_tolerance,
    float64_copy,
    kind_of,
    tolerance,
)

__all__ = [
    "ENGINE_TOLERANCES",
    "EXACT",
    "FLOAT64_ACCURACY_FACTOR",
    "FLOAT64_ACCURACY_ULPS",
    "MODULES",
    "TOLERANCES",
    "Case",
    "Result",
    "Tolerance",
    "as_accurate",
    "aten_path",
    "below_float64",
    "compare",
    "compare_all",
    "engine_tolerance",
    "float64_copy",
    "kind_of",
    "run",
    "run_pair",
    "run_truth",
    "tolerance",
]

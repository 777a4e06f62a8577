"""Benchmarks of rnnkit's engines against ``torch.nn``: the registries and the runners.

``rnnkit bench`` (:mod:`rnnkit.cli.bench`) is the command; :mod:`rnnkit.bench.shapes` holds the
registries of named shapes and variants, :mod:`rnnkit.bench.runner` what is measured and how,
:mod:`rnnkit.bench.variants` the runs of ``--variants`` against the plain LSTM, and
:mod:`rnnkit.bench.resets` the runs of ``--resets`` against the same calls without resets, and
:mod:`rnnkit.bench.deploy` the per-call latencies of ``--deploy``.
"""

from rnnkit.bench.resets import run_reset_bench
from rnnkit.bench.runner import BenchConfig, run_bench
from rnnkit.bench.shapes import (
    QUICK_SHAPES,
    SHAPES,
    VARIANTS,
    BenchShape,
    resolve_shapes,
    resolve_variants,
)
from rnnkit.bench.variants import run_variant_bench

__all__ = [
    "QUICK_SHAPES",
    "SHAPES",
    "VARIANTS",
    "BenchConfig",
    "BenchShape",
    "resolve_shapes",
    "resolve_variants",
    "run_bench",
    "run_reset_bench",
    "run_variant_bench",
]

"""Benchmarks of rnnkit's engines against ``torch.nn``: the shape registry and the runner.

``rnnkit bench`` (:mod:`rnnkit.cli.bench`) is the command; :mod:`rnnkit.bench.shapes` holds the
registry of named shapes and :mod:`rnnkit.bench.runner` what is measured and how.
"""

from rnnkit.bench.runner import BenchConfig, run_bench
from rnnkit.bench.shapes import QUICK_SHAPES, SHAPES, BenchShape, resolve_shapes

__all__ = ["QUICK_SHAPES", "SHAPES", "BenchConfig", "BenchShape", "resolve_shapes", "run_bench"]

"""``rnnkit bench --resets EVERY``: each engine's layer called with ``reset=``, against the same
layer called without.

On every shape, each engine that runs ``reset=`` there (asked of the dispatch as any option is,
:func:`rnnkit.bench.runner.unsupported`; an engine that does not declare the option is left
out, or, named with ``--engines``, a failed ``"unsupported"`` row) gets two rows: the plain call
of a plain run, parity-checked against ``torch.nn`` (:func:`rnnkit.bench.runner.check_parity`),
and the call with the shape's reset mask (:meth:`BenchShape.reset_mask`: each (step, sequence)
a reset with probability ``1/EVERY``, seeded), parity-checked against the reference engine with
the same mask, as the variants are (:func:`rnnkit.bench.variants.check_parity`: outputs, final
states and every gradient, training and inference). The reference engine's row with resets is
their spec (``tests/test_resets.py`` holds it to the definition) and has no check of its own.
An engine that fails a check gets no timings in that row.

The rows are timed by :mod:`rnnkit.bench.runner`'s workloads, all of a shape round-robin with
``torch.nn``'s plain layer, the baseline of the ``vs torch.nn`` ratios. Each shape gives two
entries of ``results``: the plain shape's rows, then ``<shape>+resets<EVERY>``'s, whose rows add
the ratios ``fwd_vs_plain``, ``train_vs_plain`` and ``peak_vs_plain``: the time (peak) with
resets over the same engine's without, the cost of the resets.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from dataclasses import asdict

from rnnkit.bench import runner
from rnnkit.bench.runner import (
    REFERENCE,
    TORCH_NN,
    BenchConfig,
    Row,
    build_workloads,
    engine_names,
    gate,
    measure,
    ratio,
    report,
    steps_per_shape,
    with_ratios,
)
from rnnkit.bench.shapes import BenchShape
from rnnkit.bench.variants import check_parity
from rnnkit.testing import Result

__all__ = ["run_reset_bench", "run_reset_shape", "steps_per_reset_shape"]


def _no_check(shape: BenchShape, engine: str, config: BenchConfig) -> list[Result]:
    # the reference engine is the spec of the resets
    return []


def steps_per_reset_shape(n_engines: int, config: BenchConfig) -> int:
    """Progress units for one shape: as many as a plain shape with two rows per engine."""
    return steps_per_shape(2 * n_engines, config)


def _median(row: dict, key: str) -> float | None:
    return row[key]["median"] if row.get(key) else None


def run_reset_shape(
    shape: BenchShape,
    every: int,
    engines: Sequence[str],
    config: BenchConfig,
    explicit: bool,
    advance: Callable[[int], None] = lambda n: None,
) -> list[dict]:
    """Two results, ``{"shape", "rows"}``: the plain ``shape``'s rows (torch.nn's, then each
    engine's) and its rows with resets every ``every`` steps (torch.nn's plain row, the same,
    then each engine's), with ``reset_mask``: the resets drawn and the entries of the mask.
    Without ``explicit``, an engine that cannot run the call with resets is left out of both."""
    resets = shape.with_resets(every)
    rows: dict[object, Row] = {TORCH_NN: Row(TORCH_NN)}
    for engine in engines:
        check = _no_check if engine == REFERENCE else check_parity
        with_resets = gate(resets, engine, config, explicit, check, advance)
        if with_resets is None:
            # left out: nor is its plain row timed
            advance(1 + config.warmup + config.repeats + 1)
            continue
        plain = gate(shape, engine, config, explicit, runner.check_parity, advance)
        if plain is not None:
            rows[shape.name, engine] = plain
        rows[resets.name, engine] = with_resets
    gc.collect()
    work = build_workloads(shape, config, [TORCH_NN])
    of = {shape.name: shape, resets.name: resets}
    for key, row in rows.items():
        if key != TORCH_NN and row.status == "ok":
            name, engine = key
            work[key] = build_workloads(of[name], config, [engine])[engine]
    measure(work, rows, config, advance)

    def rows_of(s: BenchShape) -> list[dict]:
        mine = [r for key, r in rows.items() if key == TORCH_NN or key[0] == s.name]
        return with_ratios([asdict(r) for r in mine])

    plain_rows, reset_rows = rows_of(shape), rows_of(resets)
    # torch.nn's row is the plain layer's: no ratio to the reference with resets
    reset_rows[0]["ratios"]["train_speedup_vs_reference"] = None
    plain_of = {r["impl"]: r for r in plain_rows}
    for row in reset_rows[1:]:
        plain = plain_of.get(row["impl"], {})
        row["ratios"].update(
            fwd_vs_plain=ratio(_median(row, "fwd_ms"), _median(plain, "fwd_ms")),
            train_vs_plain=ratio(_median(row, "train_ms"), _median(plain, "train_ms")),
            peak_vs_plain=ratio(row.get("train_peak_mb"), plain.get("train_peak_mb")),
        )
    mask = resets.reset_mask()
    drawn = {"every": every, "resets": int(mask.sum()), "entries": mask.numel()}
    return [
        {"shape": shape.as_dict(), "rows": plain_rows},
        {"shape": resets.as_dict(), "reset_mask": drawn, "rows": reset_rows},
    ]


def run_reset_bench(
    shapes: Sequence[BenchShape],
    every: int,
    engines: Sequence[str] | None,
    config: BenchConfig,
    advance: Callable[[int], None] = lambda n: None,
) -> dict:
    """Run every shape without and with resets every ``every`` steps; ``engines=None`` means
    every registered engine that runs ``reset=`` on the shape.

    Returns :mod:`rnnkit.bench.runner`'s report, with ``resets`` (``every``) and two entries of
    ``results`` per shape (:func:`run_reset_shape`).
    """
    names = engine_names(engines)

    def results() -> list[dict]:
        return [
            result
            for s in shapes
            for result in run_reset_shape(s, every, names, config, engines is not None, advance)
        ]

    return report(names, config, results, resets=every)

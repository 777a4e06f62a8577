"""``rnnkit bench --variants``: the LSTM variants, timed against the plain ``torch.nn.LSTM``.

A variant's math is not torch's, so its parity is checked against the reference engine, the
spec of every variant (its own tests check it against the equations written out): each
other engine runs the same variant with the same weights (:meth:`BenchShape.modules`) and input
on a short version of the shape (``L`` capped at ``parity_max_L``), under the same seed drawn
before each run so that the random masks of zoneout and recurrent and weight dropout are the
same; the training forward, every gradient (input, torch's parameters and the variant's own,
``peephole_l0``, ``layer_norm_ih_l0``, ...) and the inference forward must agree to rounding:
in float32 about as close to the reference engine run in float64 on the same values (and
masks) as the reference is (:func:`rnnkit.testing.compare`), in float64 within
:func:`rnnkit.testing.engine_tolerance`. The reference engine's row has no parity check of its
own. An engine that fails gets no timings. The calls with resets of ``rnnkit bench --resets``
(:mod:`rnnkit.bench.resets`) are checked by the same :func:`check_parity`, with a reset mask
(:func:`parity_reset`) given to both engines.

The timed workloads are :mod:`rnnkit.bench.runner`'s; in training they draw fresh masks on each
run (the seed does not matter to the time). Each shape's plain ``torch.nn.LSTM``, with the
weights every variant starts from, is timed once, round-robin with all the variants' rows,
and is the baseline of the ``vs torch.nn`` ratios; the speedup is over the reference engine
running the same variant.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, replace

import torch
from torch import Tensor

from rnnkit.bench.runner import (
    REFERENCE,
    TORCH_NN,
    BenchConfig,
    Row,
    build_workloads,
    engine_names,
    gate,
    measure,
    report,
    steps_per_shape,
    with_ratios,
)
from rnnkit.bench.shapes import VARIANTS, BenchShape
from rnnkit.testing import Result, below_float64, compare, engine_tolerance, float64_copy, run

__all__ = [
    "PARITY_RESETS",
    "check_parity",
    "parity_reset",
    "run_variant_bench",
    "run_variant_shape",
    "steps_per_variant_shape",
]

# The parity check of a call with resets draws at least one reset per this many steps.
PARITY_RESETS = 4


@contextlib.contextmanager
def _seeded(config: BenchConfig) -> Iterator[None]:
    """torch's global generators seeded with ``config.seed``, restored afterwards."""
    device = torch.device(config.device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        yield


def check_parity(shape: BenchShape, engine: str, config: BenchConfig) -> list[Result]:
    """Compare ``engine`` with the reference engine on ``shape`` (a variant, or a call with
    resets) cut to ``parity_max_L`` steps: the training run's outputs and every gradient, then
    the outputs of the inference run (``eval()``, ``torch.no_grad()``), with the same masks in
    training and the same reset mask (:func:`parity_reset`) in both."""
    short = shape.with_length(min(shape.L, config.parity_max_L))
    case = short.case(config.dtype)
    leaves = case.inputs(config.device, config.seed)
    reset = parity_reset(short, config)
    if reset is not None:
        leaves["reset"] = reset
    runs = {}
    for impl in (REFERENCE, engine):
        _, module = short.modules(impl, config.dtype, config.device, config.seed)
        train, inference = _runs(case, module, leaves, config)
        runs[impl] = {**train, **_eval(inference)}
        if impl == REFERENCE and below_float64(config.dtype):
            # the same masks drawn from the same seed: they do not depend on the dtype
            train, inference = _runs(case, float64_copy(module), float64_copy(leaves), config)
            truth = {**train, **_eval(inference)}
    results = []
    for name, expected in runs[REFERENCE].items():
        if below_float64(config.dtype):
            rule = {"truth": truth[name]}
        else:
            rule = {"tol": engine_tolerance(expected, name)}
        results.append(compare(runs[engine].get(name), expected, what=name, **rule))
    return results


def parity_reset(short: BenchShape, config: BenchConfig) -> Tensor | None:
    """The reset mask of the parity check of ``short`` (the shape cut to ``parity_max_L``
    steps), None without resets: :meth:`BenchShape.reset_mask` at a probability of at least
    ``1/PARITY_RESETS``, and in any case a reset at the middle step of the first sequence, as a
    short run at ``1/resets`` may draw none, and a check without one checks nothing."""
    if not short.resets:
        return None
    dense = replace(short, resets=min(short.resets, PARITY_RESETS))
    reset = dense.reset_mask(config.device, config.seed)
    reset[(0, short.L // 2) if short.batch_first else (short.L // 2, 0)] = True
    return reset


def _runs(case, module, leaves, config: BenchConfig) -> tuple[dict, dict]:
    with _seeded(config):
        train = run(case, module.train(), leaves, config.seed)
    reset = {"reset": leaves["reset"]} if "reset" in leaves else {}
    with torch.no_grad():
        output, hidden = module.eval()(leaves["input"], **reset)
    hidden = hidden if isinstance(hidden, tuple) else (hidden,)
    return train, {"output": output, **dict(zip(("h_n", "c_n"), hidden, strict=False))}


def _eval(named: dict) -> dict:
    return {f"eval_{k}": v for k, v in named.items()}


def _no_check(shape: BenchShape, engine: str, config: BenchConfig) -> list[Result]:
    # the reference engine is the spec of the variants
    return []


def steps_per_variant_shape(n_engines: int, n_variants: int, config: BenchConfig) -> int:
    """Progress units for one shape under ``n_variants`` variants: as many as a plain shape with
    an engine per variant and engine (one torch.nn row in all)."""
    return steps_per_shape(n_engines * n_variants, config)


def run_variant_shape(
    shape: BenchShape,
    variants: Sequence[str],
    engines: Sequence[str],
    config: BenchConfig,
    explicit: bool,
    advance: Callable[[int], None] = lambda n: None,
) -> list[dict]:
    """One result per variant of the plain ``shape``: ``{"shape", "rows"}``, the rows being
    torch.nn's plain layer (the same row in each: no speedup over one variant's reference),
    then each engine's on the variant. With ``explicit``, an engine that cannot run a variant
    is a failed row; otherwise it is left out."""
    shapes = {v: shape.with_variant(v) for v in variants}
    rows: dict[object, Row] = {TORCH_NN: Row(TORCH_NN)}
    for s in shapes.values():
        for engine in engines:
            check = _no_check if engine == REFERENCE else check_parity
            row = gate(s, engine, config, explicit, check, advance)
            if row is not None:
                rows[s.variant, engine] = row
    gc.collect()
    work = build_workloads(shape, config, [TORCH_NN])
    for key, row in rows.items():
        if key != TORCH_NN and row.status == "ok":
            variant, engine = key
            work[key] = build_workloads(shapes[variant], config, [engine])[engine]
    measure(work, rows, config, advance)
    results = []
    for s in shapes.values():
        mine = [asdict(r) for key, r in rows.items() if key == TORCH_NN or key[0] == s.variant]
        mine = with_ratios(mine)
        # torch.nn's row is the same in every variant of the shape: no ratio to one variant's
        mine[0]["ratios"]["train_speedup_vs_reference"] = None
        results.append({"shape": s.as_dict(), "rows": mine})
    return results


def run_variant_bench(
    shapes: Sequence[BenchShape],
    variants: Sequence[str],
    engines: Sequence[str] | None,
    config: BenchConfig,
    advance: Callable[[int], None] = lambda n: None,
) -> dict:
    """Run every variant on every (LSTM) shape; ``engines=None`` means every registered engine
    that supports the variant.

    Returns :mod:`rnnkit.bench.runner`'s report, with ``variants`` (name -> keywords, as
    registered) and one entry of ``results`` per shape and variant, in that order.
    """
    names = engine_names(engines)

    def results() -> list[dict]:
        return [
            result
            for s in shapes
            for result in run_variant_shape(
                s, variants, names, config, engines is not None, advance
            )
        ]

    return report(names, config, results, variants={v: VARIANTS[v] for v in variants})

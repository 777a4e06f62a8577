"""The fast engines under test, and how each is run and compared with the reference engine.

:data:`ENGINES` lists the engines that ``test_engines.py`` (LSTM/GRU/RNN) and
``test_engine_variants.py`` (LSTM variants) hold to the reference engine: a new engine joins
both suites by joining that list. Each :class:`Engine` states what the suites need to know
about it (device, dtypes, the fixture that makes it runnable here, the sizes its tests can
afford); what only one engine does is tested in its own file (``test_cpu.py``,
``test_triton.py``).

Every engine-against-reference comparison goes through :func:`assert_matches_reference`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

import rnnkit
from grid import CaseInputs, ModuleCase
from parity import assert_same_structure, randomize_variant_parameters
from rnnkit.testing import FLOAT64_ACCURACY_FACTOR, compare, engine_tolerance, kind_of, tolerance

CUDA = torch.cuda.is_available()

Tensors = Mapping[str, Tensor | None]


@dataclass(frozen=True)
class Engine:
    """What the shared suites need to know about one engine.

    ``fixture`` names a fixture of ``conftest.py`` that every test of the engine requests (it
    may skip them). A ``light`` engine runs smaller stand-ins for some of the suites'
    hand-picked cases (:func:`engine_params`); ``max_steps`` caps the sequence length of the
    variant grid's sizes and ``designs`` is how many covering designs (seeds) that grid takes.
    """

    name: str
    device: str = "cpu"
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64)
    fixture: str | None = None
    # the kernels run in Triton's interpreter: gradcheck in fast mode, bfloat16 by truncation
    interpreted: bool = False
    light: bool = False
    max_steps: int | None = None
    designs: int = 2


# bfloat16: plain layers only, with bfloat16 products (the variants run the reference)
FUSED = Engine("fused", dtypes=(torch.float32, torch.float64, torch.bfloat16))
# Without a GPU the kernels run in Triton's interpreter, where each step of a kernel is Python
# and the time grows with the steps: the light stand-ins, and the variant grid at L <= 17 from
# one covering design (on a GPU too, for now).
TRITON = Engine(
    "triton",
    device="cuda" if CUDA else "cpu",
    dtypes=(torch.float32, torch.float64, torch.float16, torch.bfloat16),
    fixture="triton_interpreter",
    interpreted=not CUDA,
    light=True,
    max_steps=17,
    designs=1,
)
ENGINES = (FUSED, TRITON)


def engine_params(
    params: Iterable | Callable[[Engine], Iterable],
    light: Iterable | None = None,
    engines: Iterable[Engine] = ENGINES,
) -> list:
    """``pytest.param(engine, *values)`` for each engine and each of ``params`` (or of
    ``params(engine)``; on a light engine, of ``light`` instead when given: smaller
    stand-ins), id'd ``"<engine>-<id>"``. ``params`` are ``pytest.param`` objects or cases with
    an ``id``; a param holding a ``torch.dtype`` that the engine does not run is left out."""
    out = []
    for engine in engines:
        if engine.light and light is not None:
            chosen = light
        else:
            chosen = params(engine) if callable(params) else params
        for p in chosen:
            # a pytest.param, or a case
            values, marks = (p.values, p.marks) if hasattr(p, "marks") else ((p,), ())
            if any(isinstance(v, torch.dtype) and v not in engine.dtypes for v in values):
                continue
            out.append(pytest.param(engine, *values, marks=marks, id=f"{engine.name}-{p.id}"))
    return out


def each_engine(engines: Iterable[Engine] = ENGINES) -> list:
    return [pytest.param(engine, id=engine.name) for engine in engines]


Truth = Tensors | Callable[[], Tensors] | None


def assert_matches_reference(
    actual: Tensors,
    expected: Tensors,
    *,
    engine: str,
    truth: Truth = None,
    dtype: torch.dtype | None = None,
    strict: bool = True,
    factor: float = FLOAT64_ACCURACY_FACTOR,
) -> None:
    """``engine``'s results against the reference engine's on the same case and values, name
    by name (outputs, final states, every gradient: ``grad_*``); every mismatch is reported.

    In float64 each tensor must be within :func:`rnnkit.testing.engine_tolerance` of the
    reference's. In float32, ``truth`` is the reference engine's run on float64 copies of the
    same values (or a function that makes it): the engine's error against it must be within a
    small factor of the reference's own (``rnnkit.testing.compare``'s one float32 rule, as
    :func:`parity.assert_engine_close` applies it elsewhere); a float32 comparison without a
    truth is an error.

    ``dtype`` (float16 or bfloat16) is the precision that both ran in, for tensors that may be
    of another dtype (a float32 leaf's gradient under autocast): then the tolerance table of
    ``dtype`` (:func:`rnnkit.testing.tolerance`) applies. Without ``truth``, its gradient row
    for every tensor, since both sides round in ``dtype``. With ``truth`` (the reference in
    float32 on the same rounded values), each tensor of ``actual`` must be within the table of
    ``truth``'s, and unless not ``strict``, no farther from it than about the reference's
    own error in ``dtype`` (twice, plus 1e-3).
    """
    assert list(actual) == list(expected), f"names differ: {list(actual)} != {list(expected)}"
    half = dtype in (torch.float16, torch.bfloat16)
    made: list[Tensors] = []

    def truth_of(name: str) -> Tensor | None:
        if not made:
            made.append(truth() if callable(truth) else truth)
        return made[0][name]

    failures = []
    for name, e in expected.items():
        a = actual[name]
        if a is None or e is None:
            result = compare(a, e, what=name)
        elif half and truth is not None:
            t = truth_of(name)
            result = compare(a.float(), t, what=name, tol=tolerance(dtype, kind_of(name)))
            error = (a.float() - t).abs().max().item()
            own = (e.float() - t).abs().max().item()
            if a.dtype != e.dtype or not result.ok or (strict and error > 2 * own + 1e-3):
                failures.append(f"{result} ({a.dtype}); reference in {e.dtype}: max_abs={own:.3e}")
            continue
        elif half:
            result = compare(a, e, what=name, tol=tolerance(dtype, "grad"))
        elif e.dtype == torch.float32:
            if truth is None:
                raise ValueError(f"{name}: a float32 comparison needs its float64 truth")
            result = compare(a, e, what=name, truth=truth_of(name), factor=factor)
        else:
            result = compare(a, e, what=name, tol=engine_tolerance(e, name))
        if not result.ok:
            failures.append(str(result))
    assert not failures, f"{engine} differs from reference:\n  " + "\n  ".join(failures)


def on_device(engine: Engine, inp: CaseInputs, dtype: torch.dtype | None = None) -> CaseInputs:
    """New leaves of ``inp``'s values on the engine's device (cast to ``dtype``, if given)."""

    def leaf(t: Tensor) -> Tensor:
        return t.detach().to(engine.device, dtype or t.dtype).requires_grad_()

    return CaseInputs(leaf(inp.x), {k: leaf(v) for k, v in inp.states.items()}, inp.lengths)


def run(case: ModuleCase, module: torch.nn.Module, inp: CaseInputs, seed: int = 0):
    """Forward from ``seed`` (the dropout masks), then the gradients of a fixed random-weighted
    sum of the outputs: the tensors by name and the structure to compare exactly."""
    torch.manual_seed(seed)
    tensors, structure = case.forward(module, inp)
    leaves = {"input": inp.x, **inp.states, **dict(module.named_parameters())}
    gen = torch.Generator().manual_seed(1)
    outs = list(tensors.values())
    weights = [torch.randn(o.shape, generator=gen).to(o) for o in outs]
    got = torch.autograd.grad(outs, list(leaves.values()), weights, allow_unused=True)
    grads = {f"grad_{name}": g for name, g in zip(leaves, got, strict=True)}
    return {**tensors, **grads}, structure


def with_reference(module: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``module`` and a copy of it on the reference engine."""
    reference = copy.deepcopy(module)
    reference.engine = "reference"
    return module, reference


def engine_module(engine: Engine, case: ModuleCase, *, scale: float = 1.0) -> torch.nn.Module:
    """The case's rnnkit module (torch's init) on ``engine``, weights times ``scale``."""
    _, module = case.modules(engine.name)
    module = module.to(engine.device)
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(scale)
    return module


def pair(engine: Engine, case: ModuleCase, *, scale: float = 1.0):
    """:func:`engine_module` and a reference copy."""
    return with_reference(engine_module(engine, case, scale=scale))


def run_as(engine: Engine, case: ModuleCase, module, dtype: torch.dtype, seed: int = 0):
    """:func:`run` on the case's inputs from ``seed`` on the engine's device, with ``module``
    and the inputs cast to ``dtype`` (a float64 copy of a float32 case: its truth)."""
    module = module if dtype == case.dtype else copy.deepcopy(module).to(dtype)
    return run(case, module, on_device(engine, case.inputs(seed), dtype), seed)


def check_module(
    engine: Engine, case: ModuleCase, module, *, seed: int = 0,
    factor: float = FLOAT64_ACCURACY_FACTOR,
) -> None:  # fmt: skip
    """``module`` (on ``engine``) and a reference copy on the case's inputs, from one seed
    (the masks): the same structure, and :func:`assert_matches_reference`, the reference on
    float64 copies the truth of a float32 case (made only when needed)."""
    module, reference = with_reference(module)
    (expected, expected_structure), (actual, structure) = (
        run_as(engine, case, m, case.dtype, seed) for m in (reference, module)
    )
    assert_same_structure(expected_structure, structure)

    def float64():
        return run_as(engine, case, reference, torch.float64, seed)[0]

    assert_matches_reference(actual, expected, engine=engine.name, truth=float64, factor=factor)


def check_case(engine: Engine, case: ModuleCase, *, seed: int = 0, scale: float = 1.0) -> None:
    """:func:`check_module` on the case's module (weights times ``scale``), training where
    ``case.dropout`` is set."""
    module = engine_module(engine, case, scale=scale).train(case.dropout > 0)
    check_module(engine, case, module, seed=seed)


def layer(engine: Engine, mode: str, **kw) -> torch.nn.Module:
    """An rnnkit layer of ``mode`` on ``engine`` and its device, in float64 unless told."""
    cls = {"RNN_TANH": "RNN", "RNN_RELU": "RNN"}.get(mode, mode)
    if mode.startswith("RNN_"):
        kw["nonlinearity"] = mode[4:].lower()
    module = getattr(rnnkit, cls)(engine=engine.name, **{"dtype": torch.float64, **kw})
    return module.to(engine.device)


def randn64(engine: Engine, *shape: int) -> Tensor:
    """A float64 leaf on the engine's device, from the global generator."""
    return torch.randn(*shape, dtype=torch.float64, device=engine.device, requires_grad=True)


# The float32 factor of the LayerNorm variant cases (check_variant_case). Measured on this
# suite's case LSTM-L5-N3-H6-bidir-l3-drop0.4 with every variant on, 40 seeds of its masks: the
# fused engine's error against the float64 truth was about the reference's (geometric mean of
# the ratio 1.0-1.1 per tensor kind) but reached 20 times it (one seed on an Intel Xeon, seed 0
# on an AMD EPYC), with a recurrent LayerNorm row of deviation 0.0016 (1 / rstd ~ 280 times
# rounding). Without layer_norm the same 40 seeds stayed within a third of the usual bound.
LAYER_NORM_FLOAT32_FACTOR = 4 * FLOAT64_ACCURACY_FACTOR

VARIANTS = {
    "layer_norm": dict(layer_norm=True),
    "peephole": dict(peephole=True),
    "zoneout": dict(zoneout=(0.3, 0.2)),
    "zoneout_h": dict(zoneout=(0.4, 0.0)),
    "recurrent_dropout": dict(recurrent_dropout=0.4),
    "weight_dropout": dict(weight_dropout=0.3),
    "forget_bias": dict(forget_bias=1.0),
    "clip": dict(gate_clip=0.5, cell_clip=0.3),
    "proj_clip": dict(proj_clip=0.2),
    "cifg": dict(coupled_input_forget=True),
    "all": dict(
        layer_norm=True,
        peephole=True,
        zoneout=(0.2, 0.1),
        recurrent_dropout=0.3,
        weight_dropout=0.2,
        gate_clip=2.0,
        cell_clip=1.5,
        coupled_input_forget=True,
    ),  # fmt: skip
}


@dataclass(frozen=True)
class VariantCase:
    """A core :class:`ModuleCase` (LSTM) with a variant, run in train or eval mode."""

    core: ModuleCase
    variant: str
    training: bool

    @property
    def id(self) -> str:
        return f"{self.variant}-{'train' if self.training else 'eval'}-{self.core.id}"

    def module(self, engine: Engine) -> torch.nn.Module:
        kw = self.core.kwargs()
        dtype = kw.pop("dtype")
        torch.manual_seed(0)
        m = rnnkit.LSTM(**kw, **VARIANTS[self.variant], engine=engine.name, dtype=dtype)
        return randomize_variant_parameters(m).to(engine.device).train(self.training)


def check_variant_case(engine: Engine, case: VariantCase, seed: int = 0) -> None:
    """:func:`check_module` on the variant's module. With ``layer_norm`` in float32 the
    comparison allows :data:`LAYER_NORM_FLOAT32_FACTOR` times the reference's own error: a
    recurrent LayerNorm over a few nearly equal units (a row of ``h`` mostly dropped or near 0)
    divides by a deviation near sqrt(eps), which amplifies each side's rounding by hundreds,
    and where the reference happens to round well the ratio of the two errors has a long tail.
    The float64 run of the same case keeps the tight check."""
    layer_norm = VARIANTS[case.variant].get("layer_norm", False)
    wide = layer_norm and case.core.dtype == torch.float32
    factor = LAYER_NORM_FLOAT32_FACTOR if wide else FLOAT64_ACCURACY_FACTOR
    check_module(engine, case.core, case.module(engine), seed=seed, factor=factor)

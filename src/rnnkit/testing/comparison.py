"""The comparison of rnnkit's results with another side's: bit for bit, within a tolerance
(float64, and half precision without a truth), or below float64 against a float64 truth of
the same case (:func:`compare`)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, is_dataclass, replace
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

import rnnkit


class Tolerance(NamedTuple):
    """``|actual - expected| <= atol + rtol * |expected|``, elementwise (``torch.allclose``)."""

    atol: float
    rtol: float


# dtype -> kind ("fwd": outputs and final states, "grad": gradients) -> tolerance. Gradients sum
# over every step and batch row, so they carry more rounding than the forward values. float32
# has no row: its results are measured against a float64 truth (FLOAT64_ACCURACY_FACTOR).
TOLERANCES: dict[torch.dtype, dict[str, Tolerance]] = {
    torch.float64: {"fwd": Tolerance(1e-12, 1e-12), "grad": Tolerance(1e-10, 1e-10)},
    torch.float16: {"fwd": Tolerance(5e-3, 5e-3), "grad": Tolerance(5e-2, 5e-2)},
    torch.bfloat16: {"fwd": Tolerance(3e-2, 3e-2), "grad": Tolerance(2e-1, 5e-2)},
}

EXACT = Tolerance(0.0, 0.0)
_TINY = torch.finfo(torch.float64).tiny
_INF = float("inf")

# Below float64 no fixed tolerance is right everywhere: another BLAS kernel (another CPU, ISA or
# thread count) sums in another order, and the rounding grows with the magnitudes a tensor is
# summed from and with how far the recurrence amplifies it. So each side is measured against a
# float64 run of the same case on the same values upcast (the truth), and rnnkit's largest
# error may be FLOAT64_ACCURACY_FACTOR times the other side's, plus FLOAT64_ACCURACY_ULPS units
# of the dtype's eps at the tensor's scale (its largest |truth|): the floor for tensors that the
# other side happens to round almost exactly (a gradient of few terms, a parameter after
# steps that DDP averages). Measured over the suite's float32 comparisons (35,000, with MKL and
# oneDNN as they are, limited to AVX2, and on one thread): past the floor, rnnkit's error was at
# most 6.3 times the other side's (1.3 but for one of torch's own samples); the fused LSTM
# variants' against the reference's up to 8.8 times (and 20 on rarer masks, so the suite's
# LayerNorm variants in float32 take a wider factor), where LayerNorm over a few nearly equal
# units divides by a deviation near sqrt(eps); at 16 times no comparison needed more than 2.7
# ulps of floor. A recurrent weight off by one part in a thousand, a bias shifted by 1e-4 or two
# gates swapped exceed the bound 4 times and more (tests/test_testing.py).
FLOAT64_ACCURACY_FACTOR = 16
FLOAT64_ACCURACY_ULPS = 8


def kind_of(what: str) -> str:
    """``"grad"`` for a gradient's name (``grad_*``), else ``"fwd"``."""
    return "grad" if what.startswith("grad") else "fwd"


def tolerance(dtype: torch.dtype, kind: str = "fwd") -> Tolerance:
    """The tolerance for a ``kind`` (``"fwd"`` or ``"grad"``) of tensor of ``dtype``."""
    if dtype == torch.float32:
        raise ValueError(
            "float32 has no fixed tolerance: compare it against a float64 truth (truth=)"
        )
    if dtype not in TOLERANCES:
        raise ValueError(f"no tolerance for {dtype}; known: {', '.join(map(str, TOLERANCES))}")
    if kind not in ("fwd", "grad"):
        raise ValueError(f"kind must be 'fwd' or 'grad', got {kind!r}")
    return TOLERANCES[dtype][kind]


def below_float64(dtype: torch.dtype) -> bool:
    """Whether results of ``dtype`` are compared against a float64 truth (float32 and half
    precision) rather than within a fixed tolerance."""
    return dtype.is_floating_point and torch.finfo(dtype).bits < 64


# A fast engine against the reference engine in float64: they add the same terms in another
# order and use their own exp/tanh, so results agree to rounding, not to the bit. rtol is
# relative to the largest entry of a tensor: a weight gradient sums over every step and row,
# and its entries that cancel to near zero keep the rounding of their large terms. float32
# has no row: it is compared against a float64 truth.
ENGINE_TOLERANCES: dict[torch.dtype, dict[str, Tolerance]] = {
    torch.float64: {"fwd": Tolerance(1e-12, 1e-10), "grad": Tolerance(1e-12, 1e-10)},
}


def engine_tolerance(expected: Tensor, what: str = "output") -> Tolerance:
    """The absolute tolerance of a fast engine's tensor ``what`` against the reference
    engine's ``expected``: :data:`ENGINE_TOLERANCES`' atol plus its rtol times the largest
    finite ``|expected|``."""
    if expected.dtype not in ENGINE_TOLERANCES:
        raise ValueError(f"no engine tolerance for {expected.dtype}")
    atol, rtol = ENGINE_TOLERANCES[expected.dtype][kind_of(what)]
    finite = expected.detach()[expected.isfinite()]
    scale = finite.abs().max().item() if finite.numel() else 0.0
    return Tolerance(atol + rtol * scale, 0.0)


def as_accurate(
    actual: Tensor, expected: Tensor, truth: Tensor, dtype: torch.dtype | None = None
) -> tuple[bool, float | None, float | None]:
    """Whether ``actual`` is about as accurate as ``expected`` against ``truth`` (a float64
    run), by :func:`compare`'s rule, with both max-abs errors against ``truth``."""
    result = compare(actual, expected, dtype, truth=truth)
    return result.ok, result.vs_truth, result.expected_vs_truth


@dataclass(frozen=True)
class Result:
    """How ``actual`` compares with ``expected`` for the tensor named ``what``.

    ``max_abs`` is the largest ``|actual - expected|``; ``max_rel`` is ``max_abs`` relative to
    the largest ``|expected|`` (the tensor's scale, so that near-zero entries do not blow it
    up). ``nan`` is true when NaN appears where the other tensor has none. ``problem`` names a
    mismatch that no number describes (a shape, a dtype, a missing tensor). Against a float64
    truth, ``vs_truth`` and ``expected_vs_truth`` are each side's largest ``|x - truth|`` and
    ``atol`` the bound on the first (``rtol`` is 0); without one they are None.
    """

    what: str
    max_abs: float
    max_rel: float
    atol: float
    rtol: float
    ok: bool
    nan: bool = False
    problem: str | None = None
    vs_truth: float | None = None
    expected_vs_truth: float | None = None

    @property
    def bitwise(self) -> bool:
        """Every element identical (NaN where NaN)."""
        return self.problem is None and not self.nan and self.max_abs == 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "bitwise": self.bitwise}

    def __str__(self) -> str:
        status = "ok" if self.ok else "FAIL"
        if self.problem is not None:
            return f"{self.what}: {status} ({self.problem})"
        nan = ", NaN mismatch" if self.nan else ""
        head = f"{self.what}: {status} max_abs={self.max_abs:.3e} max_rel={self.max_rel:.3e}"
        if self.vs_truth is None:
            return f"{head} (atol={self.atol:g}, rtol={self.rtol:g}{nan})"
        return (
            f"{head} (against float64: {self.vs_truth:.3e}, expected's own "
            f"{self.expected_vs_truth:.3e}, allowed {self.atol:.3e}{nan})"
        )


def compare(
    actual: Tensor | None,
    expected: Tensor | None,
    dtype: torch.dtype | None = None,
    what: str = "output",
    *,
    tol: Tolerance | None = None,
    truth: Tensor | None = None,
    factor: float = FLOAT64_ACCURACY_FACTOR,
) -> Result:
    """Compare ``actual`` with ``expected``; ``dtype`` (default: ``expected``'s) picks the rule.

    NaN where ``expected`` has NaN is a match, anywhere else a failure; infinities must be
    equal. Then, by precedence:

    * ``tol=EXACT``: identical bits (so are tensors of integers, always);
    * ``truth``, for a ``dtype`` below float64: ``truth`` is the same case computed in float64
      from the same values upcast (:func:`float64_copy`), and over the entries finite in all
      three, ``max|actual - truth| <= factor * max|expected - truth|
      + FLOAT64_ACCURACY_ULPS * eps(dtype) * max|truth|`` (``factor``: by default
      :data:`FLOAT64_ACCURACY_FACTOR`; larger only for a case whose conditioning is known to
      be poor);
    * ``tol``: elementwise ``|actual - expected| <= tol.atol + tol.rtol * |expected|``;
    * else :func:`tolerance` for ``dtype`` and the kind that :func:`kind_of` reads from
      ``what`` (float64 and half precision; float32 needs a truth).
    """
    if actual is None and expected is None:
        return Result(what, 0.0, 0.0, *(tol or EXACT), ok=True)
    known = expected if expected is not None else actual
    dtype = dtype or known.dtype
    if not known.is_floating_point():
        tol = EXACT
    rule = tol is not EXACT and truth is not None and below_float64(dtype)
    if not rule and tol is None:
        tol = tolerance(dtype, kind_of(what))
    if (
        actual is None
        or expected is None
        or actual.shape != expected.shape
        or actual.dtype != expected.dtype
    ):
        return _failure(what, f"expected {_describe(expected)}, got {_describe(actual)}", tol)
    if rule and truth.shape != expected.shape:
        return _failure(
            what, f"float64 truth is {_describe(truth)}, expected {_describe(expected)}"
        )
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    a_nan, e_nan = a.isnan(), e.isnan()
    nan = bool((a_nan != e_nan).any())
    finite = ~(a_nan | e_nan)
    # inf - inf is NaN: equal infinities are a zero difference
    diff = torch.where(a == e, torch.zeros_like(a), (a - e).abs())[finite]
    scale = e[finite].abs()
    max_abs = _max(diff)
    max_rel = max_abs / max(_max(scale), _TINY) if max_abs not in (0.0, _INF) else max_abs
    # rtol * inf would excuse any value where torch has an infinity: those must be equal
    inf_mismatch = bool(((a.isinf() | e.isinf()) & (a != e))[finite].any())
    if rule:
        return _against_truth(what, a, e, truth, dtype, max_abs, max_rel, nan, inf_mismatch, factor)
    # equal entries match whatever the tolerance (0 * inf would make an infinity's bound NaN)
    within = bool(((diff == 0) | (diff <= tol.atol + tol.rtol * scale)).all()) and not inf_mismatch
    return Result(what, max_abs, max_rel, *tol, ok=within and not nan, nan=nan)


def _against_truth(what, a, e, truth, dtype, max_abs, max_rel, nan, inf_mismatch, factor) -> Result:
    """The float64 rule of :func:`compare` on ``a`` and ``e`` (both already float64)."""
    t = truth.detach().to("cpu", torch.float64)
    finite = a.isfinite() & e.isfinite() & t.isfinite()
    error = _max((a - t).abs()[finite])
    own = _max((e - t).abs()[finite])
    scale = _max(t.abs()[t.isfinite()])
    eps = torch.finfo(dtype).eps
    bound = factor * own + FLOAT64_ACCURACY_ULPS * eps * scale
    ok = error <= bound and not (nan or inf_mismatch)
    return Result(what, max_abs, max_rel, bound, 0.0, ok=ok, nan=nan, vs_truth=error,
                  expected_vs_truth=own)  # fmt: skip


def _max(t: Tensor) -> float:
    return t.max().item() if t.numel() else 0.0


def _failure(what: str, problem: str, tol: Tolerance | None = None) -> Result:
    return Result(what, _INF, _INF, *(tol or EXACT), ok=False, problem=problem)


def _describe(t: Tensor | None) -> str:
    return "None" if t is None else f"{t.dtype} {list(t.shape)}"


def float64_copy(obj):
    """The same values in float64, for computing a truth: a floating tensor upcast (a leaf, that
    requires grad if ``obj`` does), a module deep-copied and upcast (rnnkit's layers and cells
    on the reference engine, the spec of every engine), a ``PackedSequence``'s data, and
    mappings, lists, tuples and dataclasses entry by entry; anything else (integer tensors,
    lengths, flags) as it is."""
    if isinstance(obj, Tensor):
        if not obj.is_floating_point():
            return obj
        return obj.detach().to(torch.float64).requires_grad_(obj.requires_grad)
    if isinstance(obj, nn.Module):
        module = copy.deepcopy(obj).double()
        for m in module.modules():
            if isinstance(m, (rnnkit.RNNBase, rnnkit.RNNCellBase)):
                m.engine = "reference"
        return module
    if isinstance(obj, PackedSequence):
        return obj._replace(data=float64_copy(obj.data))
    if isinstance(obj, Mapping):
        return {k: float64_copy(v) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*map(float64_copy, obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(map(float64_copy, obj))
    if is_dataclass(obj) and not isinstance(obj, type):
        copies = {f.name: float64_copy(getattr(obj, f.name)) for f in fields(obj) if f.init}
        return replace(obj, **copies)
    return obj


def compare_all(
    actual: Mapping[str, Tensor | None],
    expected: Mapping[str, Tensor | None],
    dtype: torch.dtype,
    *,
    exact: bool = False,
    truth: Mapping[str, Tensor | None] | None = None,
) -> list[Result]:
    """:func:`compare` of every name in ``expected`` (and a failure for any name missing),
    bit for bit if ``exact``, else against ``truth``'s tensor of the same name where given."""
    names = list(expected) + [n for n in actual if n not in expected]
    results = []
    for name in names:
        if name not in actual or name not in expected:
            side = "rnnkit" if name not in actual else "torch"
            results.append(_failure(name, f"missing from {side}'s results"))
        elif exact:
            results.append(compare(actual[name], expected[name], dtype, name, tol=EXACT))
        elif truth is not None and name not in truth:
            results.append(_failure(name, "missing from the float64 truth"))
        else:
            t = None if truth is None else truth[name]
            results.append(compare(actual[name], expected[name], dtype, name, truth=t))
    return results

"""Parity helpers: run rnnkit and ``torch.nn`` on the same case and compare everything.

One tolerance table per dtype (:data:`TOLERANCES`) and one comparison (:func:`compare`) serve
the test suite, ``rnnkit check`` and the parity gate of ``rnnkit bench``. A :class:`Case` is one
layer or cell configuration with its input; :func:`run` feeds it to a module, backpropagates a
fixed random-weighted sum of the output and final states, and returns every tensor worth
comparing by name: ``output``, ``h_n`` (``c_n``), ``grad_input``, ``grad_h_0`` (``grad_c_0``)
and ``grad_<parameter name>`` for every parameter.

torch takes one of two paths on CPU: ATen's native loops (``aten/src/ATen/native/RNN.cpp``) or,
for some float32 layers, oneDNN's fused kernels (cuDNN's on CUDA). rnnkit's reference engine is
bit-identical to the ATen path on CPU (:func:`aten_path`); against the default path results
agree within the tolerance table.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import rnnkit

__all__ = [
    "ENGINE_TOLERANCES",
    "EXACT",
    "FLOAT64_ACCURACY_FACTOR",
    "MODULES",
    "TOLERANCES",
    "Case",
    "Result",
    "Tolerance",
    "as_accurate",
    "aten_path",
    "compare",
    "compare_all",
    "engine_tolerance",
    "kind_of",
    "run",
    "run_pair",
    "tolerance",
]


class Tolerance(NamedTuple):
    """``|actual - expected| <= atol + rtol * |expected|``, elementwise (``torch.allclose``)."""

    atol: float
    rtol: float


# dtype -> kind ("fwd": outputs and final states, "grad": gradients) -> tolerance. Gradients sum
# over every step and batch row, so they carry more rounding than the forward values.
TOLERANCES: dict[torch.dtype, dict[str, Tolerance]] = {
    torch.float64: {"fwd": Tolerance(1e-12, 1e-12), "grad": Tolerance(1e-10, 1e-10)},
    torch.float32: {"fwd": Tolerance(1e-6, 1e-6), "grad": Tolerance(5e-4, 1e-4)},
    torch.float16: {"fwd": Tolerance(5e-3, 5e-3), "grad": Tolerance(5e-2, 5e-2)},
    torch.bfloat16: {"fwd": Tolerance(3e-2, 3e-2), "grad": Tolerance(2e-1, 5e-2)},
}

EXACT = Tolerance(0.0, 0.0)
_TINY = torch.finfo(torch.float64).tiny
_INF = float("inf")


def kind_of(what: str) -> str:
    """``"grad"`` for a gradient's name (``grad_*``), else ``"fwd"``."""
    return "grad" if what.startswith("grad") else "fwd"


def tolerance(dtype: torch.dtype, kind: str = "fwd") -> Tolerance:
    """The tolerance for a ``kind`` (``"fwd"`` or ``"grad"``) of tensor of ``dtype``."""
    if dtype not in TOLERANCES:
        raise ValueError(f"no tolerance for {dtype}; known: {', '.join(map(str, TOLERANCES))}")
    if kind not in ("fwd", "grad"):
        raise ValueError(f"kind must be 'fwd' or 'grad', got {kind!r}")
    return TOLERANCES[dtype][kind]


# A fast engine against the reference engine (float32 and float64 only): they add the same
# terms in another order and use their own exp/tanh, so results agree to rounding, not to the
# bit. rtol is relative to the largest entry of a tensor: a weight gradient sums over every
# step and row, and its entries that cancel to near zero keep the rounding of their large
# terms.
ENGINE_TOLERANCES: dict[torch.dtype, dict[str, Tolerance]] = {
    torch.float64: {"fwd": Tolerance(1e-12, 1e-10), "grad": Tolerance(1e-12, 1e-10)},
    torch.float32: {"fwd": Tolerance(1e-6, 1e-6), "grad": Tolerance(1e-6, 1e-5)},
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


# A fast engine's float32 result that misses the engine tolerance may still be right: where
# LayerNorm normalizes a few nearly equal units, it divides by a deviation near sqrt(eps) and
# float32 rounding grows in every implementation (either engine comes out up to ~10x closer to
# float64 than the other, depending on the case). It passes if it is about as accurate as the
# reference's own float32 result, both measured against the reference run in float64 on the
# same values; a bug is off by far more.
FLOAT64_ACCURACY_FACTOR = 16


def as_accurate(actual: Tensor, expected: Tensor, truth: Tensor) -> tuple[bool, float, float]:
    """Whether ``actual`` is within :data:`FLOAT64_ACCURACY_FACTOR` times ``expected``'s own
    error of ``truth`` (a float64 run), with both max-abs errors."""
    error = (actual.detach().double() - truth).abs().max().item()
    own = (expected.detach().double() - truth).abs().max().item()
    return error <= FLOAT64_ACCURACY_FACTOR * own, error, own


@dataclass(frozen=True)
class Result:
    """How ``actual`` compares with ``expected`` for the tensor named ``what``.

    ``max_abs`` is the largest ``|actual - expected|``; ``max_rel`` is ``max_abs`` relative to
    the largest ``|expected|`` (the tensor's scale, so that near-zero entries do not blow it
    up). ``nan`` is true when NaN appears where the other tensor has none. ``problem`` names a
    mismatch that no number describes (a shape, a dtype, a missing tensor).
    """

    what: str
    max_abs: float
    max_rel: float
    atol: float
    rtol: float
    ok: bool
    nan: bool = False
    problem: str | None = None

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
        return (
            f"{self.what}: {status} max_abs={self.max_abs:.3e} max_rel={self.max_rel:.3e} "
            f"(atol={self.atol:g}, rtol={self.rtol:g}{nan})"
        )


def compare(
    actual: Tensor | None,
    expected: Tensor | None,
    dtype: torch.dtype | None = None,
    what: str = "output",
    *,
    tol: Tolerance | None = None,
) -> Result:
    """Compare ``actual`` with ``expected`` within ``tol``.

    ``tol`` defaults to :func:`tolerance` for ``dtype`` (default: ``expected``'s) and the kind
    that :func:`kind_of` reads from ``what``; pass :data:`EXACT` to demand identical bits. NaN
    where ``expected`` has NaN is a match; anywhere else it fails.
    """
    if actual is None and expected is None:
        return Result(what, 0.0, 0.0, *(tol or EXACT), ok=True)
    if tol is None:
        known = expected if expected is not None else actual
        tol = tolerance(dtype or known.dtype, kind_of(what))
    if (
        actual is None
        or expected is None
        or actual.shape != expected.shape
        or actual.dtype != expected.dtype
    ):
        problem = f"expected {_describe(expected)}, got {_describe(actual)}"
        return _failure(what, tol, problem)
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    a_nan, e_nan = a.isnan(), e.isnan()
    nan = bool((a_nan != e_nan).any())
    finite = ~(a_nan | e_nan)
    # inf - inf is NaN: equal infinities are a zero difference
    diff = torch.where(a == e, torch.zeros_like(a), (a - e).abs())[finite]
    scale = e[finite].abs()
    max_abs = diff.max().item() if diff.numel() else 0.0
    max_rel = max_abs / max(scale.max().item(), _TINY) if max_abs not in (0.0, _INF) else max_abs
    # rtol * inf would excuse any value where torch has an infinity: those must be equal
    inf_mismatch = bool(((a.isinf() | e.isinf()) & (a != e))[finite].any())
    # equal entries match whatever the tolerance (0 * inf would make an infinity's bound NaN)
    within = bool(((diff == 0) | (diff <= tol.atol + tol.rtol * scale)).all()) and not inf_mismatch
    return Result(what, max_abs, max_rel, *tol, ok=within and not nan, nan=nan)


def _failure(what: str, tol: Tolerance, problem: str) -> Result:
    return Result(what, float("inf"), float("inf"), *tol, ok=False, problem=problem)


def _describe(t: Tensor | None) -> str:
    return "None" if t is None else f"{t.dtype} {list(t.shape)}"


@contextlib.contextmanager
def aten_path(device: torch.device | str = "cpu") -> Iterator[None]:
    """Run torch's recurrent layers on ATen's native loops: oneDNN off (cuDNN off on CUDA)."""
    with contextlib.ExitStack() as stack:
        # Toggling oneDNN warns about an Intel-GPU-only TF32 setting on every CPU build.
        stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
        stack.enter_context(torch.backends.mkldnn.flags(enabled=False))
        if torch.device(device).type == "cuda":
            stack.enter_context(torch.backends.cudnn.flags(enabled=False))
        yield


# module key -> (class name in torch.nn and rnnkit, extra constructor keywords)
MODULES: dict[str, tuple[str, dict]] = {
    "LSTM": ("LSTM", {}),
    "GRU": ("GRU", {}),
    "RNN(tanh)": ("RNN", {"nonlinearity": "tanh"}),
    "RNN(relu)": ("RNN", {"nonlinearity": "relu"}),
    "LSTMCell": ("LSTMCell", {}),
    "GRUCell": ("GRUCell", {}),
    "RNNCell(tanh)": ("RNNCell", {"nonlinearity": "tanh"}),
    "RNNCell(relu)": ("RNNCell", {"nonlinearity": "relu"}),
}


@dataclass(frozen=True)
class Case:
    """One layer or cell and its input: ``L`` steps of a batch of ``N``, ``H_in`` -> ``H``.

    A cell runs ``L`` steps in a Python loop, its state fed back, so that the gradients go
    through time as a layer's do. ``packed`` feeds the layer a ``PackedSequence`` of random
    lengths (``enforce_sorted=False``); ``batched=False`` drops the batch dimension; ``h0``
    passes a random initial state (else the default zeros).
    """

    module: str
    L: int = 5
    N: int = 3
    H_in: int = 4
    H: int = 6
    num_layers: int = 1
    bias: bool = True
    batch_first: bool = False
    bidirectional: bool = False
    proj_size: int = 0
    packed: bool = False
    batched: bool = True
    h0: bool = True
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.module not in MODULES:
            raise ValueError(f"module must be one of {', '.join(MODULES)}, got {self.module!r}")
        if self.is_cell and (
            self.num_layers != 1 or self.batch_first or self.bidirectional or self.packed
        ):
            raise ValueError(f"{self.module} takes no num_layers/batch_first/bidirectional/packing")
        if self.proj_size and self.module != "LSTM":
            raise ValueError("proj_size is only supported by LSTM")
        if self.packed and not self.batched:
            raise ValueError("a packed input needs a batch")

    @property
    def is_cell(self) -> bool:
        return self.module.endswith(("Cell", "Cell(tanh)", "Cell(relu)"))

    @property
    def is_lstm(self) -> bool:
        return self.module.startswith("LSTM")

    @property
    def D(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def H_out(self) -> int:
        return self.proj_size or self.H

    @property
    def config(self) -> str:
        """The configuration in a few words, e.g. ``L5-N3-H6-l2-bidir-proj3-packed``."""
        parts = [f"L{self.L}", f"N{self.N}" if self.batched else "unbatched", f"H{self.H}"]
        parts += [f"l{self.num_layers}"] if self.num_layers != 1 else []
        parts += ["bidir"] if self.bidirectional else []
        parts += [f"proj{self.proj_size}"] if self.proj_size else []
        parts += ["bf"] if self.batch_first else []
        parts += ["packed"] if self.packed else []
        parts += ["nobias"] if not self.bias else []
        parts += [] if self.h0 else ["no-h0"]
        return "-".join(parts)

    @property
    def id(self) -> str:
        return f"{self.module}-{self.config}-{str(self.dtype).removeprefix('torch.')}"

    def with_dtype(self, dtype: torch.dtype) -> Case:
        return replace(self, dtype=dtype)

    def kwargs(self) -> dict:
        """Constructor keywords, the same for torch.nn and rnnkit."""
        _, extra = MODULES[self.module]
        kw = {"input_size": self.H_in, "hidden_size": self.H, "bias": self.bias, **extra}
        if not self.is_cell:
            kw.update(
                num_layers=self.num_layers,
                batch_first=self.batch_first,
                bidirectional=self.bidirectional,
            )
        if self.proj_size:
            kw["proj_size"] = self.proj_size
        return kw

    def modules(
        self, engine: str = "auto", device: torch.device | str = "cpu", seed: int = 0
    ) -> tuple[nn.Module, nn.Module]:
        """The ``torch.nn`` module (torch's init, seeded) and rnnkit's with the same weights."""
        name, _ = MODULES[self.module]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            expected = getattr(nn, name)(**self.kwargs(), dtype=self.dtype)
            actual = getattr(rnnkit, name)(**self.kwargs(), dtype=self.dtype, engine=engine)
        actual.load_state_dict(expected.state_dict(), strict=True)
        return expected.to(device), actual.to(device)

    def inputs(self, device: torch.device | str = "cpu", seed: int = 0) -> dict[str, Tensor]:
        """The leaves: ``input`` (padded when packed), ``h_0`` (``c_0``); and ``lengths``.

        Drawn on the CPU in float64, then cast, so that every device and dtype sees the same
        numbers.
        """
        gen = torch.Generator().manual_seed(seed)

        def randn(*shape: int) -> Tensor:
            t = torch.randn(shape, generator=gen, dtype=torch.float64)
            return t.to(device=device, dtype=self.dtype).requires_grad_()

        batch = (self.N,) if self.batched else ()
        if self.is_cell:
            x = randn(self.L, *batch, self.H_in)
        elif self.batch_first and self.batched:
            x = randn(self.N, self.L, self.H_in)
        else:
            x = randn(self.L, *batch, self.H_in)
        leaves = {"input": x}
        if self.h0:
            layers = () if self.is_cell else (self.D * self.num_layers,)
            leaves["h_0"] = randn(*layers, *batch, self.H_out)
            if self.is_lstm:
                leaves["c_0"] = randn(*layers, *batch, self.H)
        if self.packed:
            lengths = torch.randint(1, self.L + 1, (self.N,), generator=gen)
            # the longest not first, so that sorting really permutes the batch
            lengths[-1] = self.L
            leaves["lengths"] = lengths
        return leaves


def _forward(case: Case, module: nn.Module, leaves: Mapping[str, Tensor]) -> dict[str, Tensor]:
    x = leaves["input"]
    hx = None
    if "h_0" in leaves:
        hx = (leaves["h_0"], leaves["c_0"]) if case.is_lstm else leaves["h_0"]
    if case.is_cell:
        outputs = []
        for x_t in x.unbind(0):
            hx = module(x_t, hx)
            outputs.append(hx[0] if case.is_lstm else hx)
        named = {"output": torch.stack(outputs)}
        hidden = hx
    else:
        if case.packed:
            x = pack_padded_sequence(x, leaves["lengths"], case.batch_first, enforce_sorted=False)
        out, hidden = module(x, hx)
        named = {"output": out.data if isinstance(out, PackedSequence) else out}
    if case.is_lstm:
        named["h_n"], named["c_n"] = hidden
    else:
        named["h_n"] = hidden
    return named


def run(case: Case, module: nn.Module, leaves: Mapping[str, Tensor], seed: int = 0) -> dict:
    """Forward, then backward of ``sum_k (out_k * w_k).sum()``: every tensor to compare.

    The weights ``w_k`` depend only on ``seed`` and the shapes (drawn on the CPU in float64),
    so torch's run and rnnkit's get the same upstream gradients. Returns ``output``, ``h_n``
    (``c_n``), then ``grad_<leaf>`` for ``input``, ``h_0`` (``c_0``) and every parameter.
    """
    named = _forward(case, module, leaves)
    gen = torch.Generator().manual_seed(seed + 1)
    weights = [
        torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.device, t.dtype)
        for t in named.values()
    ]
    loss = sum((t * w).sum() for t, w in zip(named.values(), weights, strict=True))
    wrt = {k: v for k, v in leaves.items() if k != "lengths"}
    wrt.update(module.named_parameters())
    grads = torch.autograd.grad(loss, list(wrt.values()), allow_unused=True)
    named = {k: v.detach() for k, v in named.items()}
    named.update({f"grad_{k}": g for k, g in zip(wrt, grads, strict=True)})
    return named


def run_pair(
    case: Case,
    engine: str = "auto",
    device: torch.device | str = "cpu",
    *,
    torch_path: str = "default",
    seed: int = 0,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(actual, expected)``: :func:`run` of rnnkit's module on ``engine`` and of torch's.

    ``torch_path`` is ``"aten"`` (torch under :func:`aten_path`) or ``"default"``.
    """
    if torch_path not in ("aten", "default"):
        raise ValueError(f"torch_path must be 'aten' or 'default', got {torch_path!r}")
    expected_module, actual_module = case.modules(engine, device, seed)
    leaves = case.inputs(device, seed)
    context = aten_path(device) if torch_path == "aten" else contextlib.nullcontext()
    with context, warnings.catch_warnings():
        # torch leaves LSTM with projections to ATen on CPU anyway, and says so
        warnings.filterwarnings("ignore", message="LSTM with projections is not supported")
        expected = run(case, expected_module, leaves, seed)
    actual = run(case, actual_module, leaves, seed)
    return actual, expected


def compare_all(
    actual: Mapping[str, Tensor | None],
    expected: Mapping[str, Tensor | None],
    dtype: torch.dtype,
    *,
    exact: bool = False,
) -> list[Result]:
    """:func:`compare` of every name in ``expected`` (and a failure for any name missing)."""
    names = list(expected) + [n for n in actual if n not in expected]
    results = []
    for name in names:
        if name not in actual or name not in expected:
            side = "rnnkit" if name not in actual else "torch"
            tol = tolerance(dtype, kind_of(name))
            results.append(_failure(name, tol, f"missing from {side}'s results"))
        else:
            tol = EXACT if exact else None
            results.append(compare(actual[name], expected[name], dtype, name, tol=tol))
    return results

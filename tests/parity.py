"""Shared checks of the suite, on top of ``rnnkit.testing``'s comparison.

``torch.nn``'s recurrent layers on CPU take one of two paths: ATen's native loops
(``aten/src/ATen/native/RNN.cpp``) or, for LSTM in float32, oneDNN's fused kernel. rnnkit's
reference engine promises bit-identical results to the ATen path, so the suite compares it
against torch run under ``rnnkit.testing.aten_path``, and to rounding against torch's default
path. Every other engine, and ``engine="auto"`` which picks the fastest that can run a call,
promises rounding against both paths: :func:`assert_parity` picks the check that an engine
promises, and the tests that hold for every engine run on :data:`ENGINES`.

"To rounding" is :func:`rnnkit.testing.compare`'s rule: in float64 a fixed tolerance; in
float32 each side is measured against a float64 truth of the same case (:func:`truth_of` on
the side that is expected, or ``rnnkit.testing.float64_copy`` of its module and leaves), and
rnnkit's error must stay within a small factor of the other side's.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import Tensor

from rnnkit.testing import below_float64, compare, compare_all, engine_tolerance, float64_copy

# The engines that the module-level tests run on: the reference, bit for bit against torch's
# ATen path, and the default, to rounding (tests/engines/ name the others).
ENGINES = ("reference", "auto")

Named = Mapping[str, Tensor | None]


@contextlib.contextmanager
def default_path() -> Iterator[None]:
    """torch's default dispatch, quiet about the LSTM cases it leaves to ATen anyway."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LSTM with projections is not supported")
        yield


def truth_of(fn: Callable[..., Named], *args, seed: int | None = None) -> dict | None:
    """``fn(*args)`` on float64 copies of ``args`` (``rnnkit.testing.float64_copy``: modules,
    tensors, containers of them), from ``torch.manual_seed(seed)`` if given: the float64 truth
    of a float32 run ``fn(*args)``. None where ``args`` hold no floating tensor below float64,
    since float64 results keep their fixed tolerances."""
    if not any(below_float64(dtype) for dtype in _dtypes(args)):
        return None
    copies = float64_copy(args)
    if seed is not None:
        torch.manual_seed(seed)
    return fn(*copies)


def _dtypes(obj) -> Iterator[torch.dtype]:
    if isinstance(obj, Tensor):
        yield obj.dtype
    elif isinstance(obj, torch.nn.Module):
        yield from (p.dtype for p in obj.parameters())
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _dtypes(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _dtypes(v)
    elif hasattr(obj, "__dataclass_fields__") and not isinstance(obj, type):
        for name in obj.__dataclass_fields__:
            yield from _dtypes(getattr(obj, name))


def _check(expected, actual, dtype, exact: bool, title: str, truth=None) -> None:
    dtype = dtype or next(t.dtype for t in expected.values() if t is not None)
    results = compare_all(actual, expected, dtype, exact=exact, truth=truth)
    failures = [str(r) for r in results if not r.ok]
    assert not failures, title + "\n  " + "\n  ".join(failures)


def assert_bitwise(expected: Named, actual: Named, dtype: torch.dtype | None = None) -> None:
    """Every named tensor of ``actual`` equals ``expected``'s bit for bit (NaN where NaN)."""
    _check(expected, actual, dtype, True, "not bit-identical to torch:")


def assert_close(
    expected: Named,
    actual: Named,
    dtype: torch.dtype | None = None,
    *,
    truth: Named | None = None,
) -> None:
    """Every named tensor of ``actual`` as close to ``expected`` as ``dtype`` asks.

    Below float64 against ``truth`` (the float64 run of the same case, the same names), if
    given: ``actual``'s error within a small factor of ``expected``'s own
    (``rnnkit.testing.compare``); float32 needs it. In float64 (and half precision without a
    truth) within the tolerance table, forward values and gradients (``grad_*``) on their own
    rows. ``dtype`` defaults to the tensors'.
    """
    _check(expected, actual, dtype, False, "not within rounding of torch:", truth)


def assert_parity(
    expected: Named,
    actual: Named,
    engine: str,
    dtype: torch.dtype | None = None,
    *,
    truth: Named | None = None,
) -> None:
    """What ``engine`` promises against torch's ATen path (``expected``).

    Bit for bit on the reference engine; to rounding on any other (``"auto"`` included, since
    it may pick a faster engine that agrees with the reference only to rounding), as
    :func:`assert_close` with ``truth``.
    """
    if engine == "reference":
        assert_bitwise(expected, actual, dtype)
    else:
        assert_close(expected, actual, dtype, truth=truth)


def assert_engine_close(
    expected: Named, actual: Named, truth: Named | None, title: str = "engine differs"
) -> None:
    """A fast engine's results to rounding of the reference engine's (``expected``).

    Below float64 against ``truth``, the reference engine's run in float64 on the same values
    (``ModuleCase.truth(reference, inp)``, or :func:`truth_of`): the engine's error within a
    small factor of the reference's own. In float64 (where ``truth`` is None) within
    ``rnnkit.testing.engine_tolerance``, which allows for the other order of summation.
    """
    assert list(actual) == list(expected), f"names differ: {list(actual)} != {list(expected)}"
    failures = []
    for name, e in expected.items():
        t = None if truth is None else truth[name]
        engine = e is not None and not below_float64(e.dtype) and e.is_floating_point()
        tol = engine_tolerance(e, name) if engine else None
        result = compare(actual[name], e, what=name, tol=tol, truth=t)
        if not result.ok:
            failures.append(str(result))
    assert not failures, f"{title}:\n  " + "\n  ".join(failures)


def grads(outputs: Mapping[str, Tensor], inputs: Mapping[str, Tensor], seed: int = 1):
    """Gradients of ``sum(out * g)`` with a fixed random ``g`` per output, keyed ``grad_*``.

    ``g`` depends only on the seed and the output shapes (it is drawn in float32 whatever the
    dtype), so torch's run and rnnkit's get the same upstream gradients.
    """
    gen = torch.Generator().manual_seed(seed)
    outs = [o for o in outputs.values() if o.requires_grad]
    grad_outputs = [torch.randn(o.shape, generator=gen).to(o.dtype) for o in outs]
    leaves = list(inputs.values())
    got = torch.autograd.grad(outs, leaves, grad_outputs, allow_unused=True)
    return {f"grad_{name}": g for name, g in zip(inputs, got, strict=True)}


def same_outcome(torch_fn: Callable[[], object], rnnkit_fn: Callable[[], object], *, message=True):
    """Both calls succeed, or both raise the same exception type (and message, if asked).

    Returns torch's exception, or None when both succeeded.
    """
    expected = _raised(torch_fn)
    actual = _raised(rnnkit_fn)
    if expected is None:
        assert actual is None, f"torch succeeds but rnnkit raises {actual!r}"
        return None
    assert actual is not None, f"torch raises {expected!r} but rnnkit does not raise"
    assert type(actual) is type(expected), f"torch raises {expected!r}, rnnkit {actual!r}"
    if message:
        assert str(actual) == str(expected), f"torch raises {expected!r}, rnnkit {actual!r}"
    return expected


def _raised(fn: Callable[[], object]) -> Exception | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            fn()
        except Exception as e:  # the exception is the result under test
            return e
    return None


def assert_same_structure(expected: Mapping[str, object], actual: Mapping[str, object]):
    """Types, lengths and index tensors (of a PackedSequence) exactly as torch's."""
    assert list(actual) == list(expected), f"names differ: {list(actual)} != {list(expected)}"
    for name, e in expected.items():
        a = actual[name]
        if isinstance(e, Tensor) or isinstance(a, Tensor):
            same = isinstance(e, Tensor) and isinstance(a, Tensor) and torch.equal(e, a)
            same = same or (e is None and a is None)
        else:
            same = e == a
        assert same, f"{name}: torch gives {e!r}, rnnkit {a!r}"


def randomize_variant_parameters(module: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial variant parameters (rnnkit's init makes peepholes 0 and LayerNorm gains 1),
    so that a wrong use of one shows: peepholes and the cell LayerNorm's shift in
    ``[-0.5, 0.5]``, the LayerNorm gains in ``[0.5, 1.5]``. Draws from the global generator."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.startswith(("peephole", "layer_norm_c_bias")):
                p.uniform_(-0.5, 0.5)
            elif name.startswith("layer_norm"):
                p.uniform_(0.5, 1.5)
    return module


def engines_picked(monkeypatch) -> list[str]:
    """The names of the engines ``rnnkit.functional`` selects from now on, appended per call."""
    from rnnkit import functional

    picked: list[str] = []
    select = functional.select_engine

    def spy(engine, call):
        chosen = select(engine, call)
        picked.append(chosen.name)
        return chosen

    monkeypatch.setattr(functional, "select_engine", spy)
    return picked

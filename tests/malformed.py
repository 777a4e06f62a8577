"""Malformed inputs for every public entry point, drawn by hypothesis; and a runner for them.

A case is a small, valid layer or cell (any of the six modules, or a functional layer) and a
valid call of it with one thing broken, from one of :data:`CATEGORIES`: a wrong Python type, a
wrong rank or size, an integer, complex or mismatched dtype, a sparse layout, the meta device,
an empty sequence, states of the wrong type, count or shape, a malformed ``PackedSequence``, a
parameter replaced by one of the wrong shape or dtype, out-of-range options. Every case must
raise ``TypeError``, ``ValueError`` or ``RuntimeError`` from rnnkit's own checks
(:func:`raised_by_checks`): before any engine or kernel runs, never an output.

Run as a script, it checks ``--examples`` cases on one engine and prints one JSON line of
counts; ``tests/test_fuzz.py`` runs it in a subprocess, so that a crash of a compiled engine
shows as the subprocess's signal instead of taking pytest down::

    python tests/malformed.py --engine fused --examples 2000
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import traceback
import warnings

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn import Parameter
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import rnnkit
import rnnkit.functional as RF

# The files whose raise counts as a check: the public entry points and their validation.
CHECK_FILES = ("validation.py", "functional.py", "modules.py", "cell_modules.py", "convert.py")
ERRORS = (TypeError, ValueError, RuntimeError)

LAYER_CATEGORIES = [
    "input-type", "input-rank", "input-features", "input-dtype", "input-layout", "input-device",
    "empty-sequence", "hx-type", "hx-rank", "hx-shape", "hx-dtype", "hx-layout", "hx-device",
    "weight-shape", "weight-dtype", "weight-missing", "packed-batch-sizes", "packed-data",
    "packed-indices", "packed-hx-batch",
]  # fmt: skip
CELL_CATEGORIES = [
    "input-type", "input-rank", "input-features", "input-dtype", "input-layout", "input-device",
    "hx-type", "hx-rank", "hx-shape", "hx-dtype", "hx-layout", "hx-device", "weight-shape",
    "weight-dtype", "weight-missing",
]  # fmt: skip
FUNCTIONAL_CATEGORIES = ["weights-count", "weights-type", "weights-shape", "options"]
CATEGORIES = sorted(set(LAYER_CATEGORIES + CELL_CATEGORIES + FUNCTIONAL_CATEGORIES))

LAYERS = ("LSTM", "GRU", "RNN")
CELLS = ("LSTMCell", "GRUCell", "RNNCell")
FLOATS = (torch.float32, torch.float64)
OTHER_DTYPES = (
    torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64, torch.float16,
    torch.bfloat16, torch.float32, torch.float64,
)  # fmt: skip
NOT_TENSORS = st.sampled_from([3, 2.5, "x", [1.0, 2.0], {"h": 1}, object(), (1, 2)])


def raised_by_checks(error: BaseException) -> bool:
    """Whether ``error`` comes from rnnkit's checks: raised in one of :data:`CHECK_FILES` of the
    ``rnnkit`` package, not in an engine, a cell's math or a torch op."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return False
    path = frames[-1].filename
    parts = path.replace(os.sep, "/").split("/")
    return len(parts) >= 2 and parts[-2] == "rnnkit" and parts[-1] in CHECK_FILES


def _other_dtype(draw, dtype: torch.dtype) -> torch.dtype:
    return draw(st.sampled_from([d for d in OTHER_DTYPES if d != dtype]))


def _other(draw, value: int, low: int = 0) -> int:
    return draw(st.integers(low, value + 3).filter(lambda v: v != value))


def _randn(shape, dtype) -> torch.Tensor:
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, dtype=dtype)
    return torch.ones(shape, dtype=dtype)


def _resize(draw, t: torch.Tensor) -> torch.Tensor:
    """``t`` with one dimension of another size."""
    dim = draw(st.integers(0, t.dim() - 1))
    shape = list(t.shape)
    shape[dim] = _other(draw, shape[dim])
    return torch.randn(shape, dtype=t.dtype)


def _rerank(draw, t: torch.Tensor, allowed: tuple[int, ...]) -> torch.Tensor:
    rank = draw(st.sampled_from([r for r in range(6) if r not in allowed]))
    return torch.randn(draw(st.lists(st.integers(1, 3), min_size=rank, max_size=rank)))


def _sparse(draw, t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 2 and draw(st.booleans()):
        return t.to_sparse_csr()
    return t.to_sparse()


def _replace_parameter(draw, module, category: str) -> None:
    """One parameter of ``module`` replaced by one of the wrong shape or dtype, or by None."""
    name = draw(st.sampled_from([n for n, _ in module.named_parameters()]))
    p = getattr(module, name)
    if category == "weight-shape":
        setattr(module, name, Parameter(_resize(draw, p.detach())))
    elif category == "weight-dtype":
        dtype = draw(st.sampled_from([d for d in FLOATS + (torch.float16,) if d != p.dtype]))
        setattr(module, name, Parameter(p.detach().to(dtype)))
    else:
        # a weight matrix: a missing bias of a bias=True layer is indistinguishable from bias=False
        name = draw(st.sampled_from([n for n, _ in module.named_parameters() if "weight" in n]))
        setattr(module, name, None)


def _states(mode: str, shape_h, shape_c, dtype):
    h = torch.randn(shape_h, dtype=dtype)
    return (h, torch.randn(shape_c, dtype=dtype)) if mode == "LSTM" else h


def _bad_hx_type(draw, mode: str, hx):
    if mode == "LSTM":
        h, c = hx
        return draw(
            st.sampled_from([h, (h,), (h, c, c), (h, None), (None, c), [h, "c"], (h, 1.0)])
            | NOT_TENSORS
        )
    return draw(st.sampled_from([(hx,), [hx], (hx, hx)]) | NOT_TENSORS)


def _map_states(hx, fn, which: int):
    if isinstance(hx, tuple):
        return tuple(fn(s) if i == which else s for i, s in enumerate(hx))
    return fn(hx)


def _packed(draw, x: torch.Tensor, batch_first: bool) -> PackedSequence:
    L, N = (x.size(1), x.size(0)) if batch_first else (x.size(0), x.size(1))
    lengths = draw(st.lists(st.integers(1, L), min_size=N, max_size=N))
    return pack_padded_sequence(x, torch.tensor(lengths), batch_first, enforce_sorted=False)


def _raw_packed(data, batch_sizes, sorted_indices, unsorted_indices) -> PackedSequence:
    # past PackedSequence's constructor, as a hand-built or deserialized one may be
    return tuple.__new__(PackedSequence, (data, batch_sizes, sorted_indices, unsorted_indices))


def _bad_batch_sizes(draw, bs: torch.Tensor):
    sizes = bs.tolist()
    kind = draw(
        st.sampled_from(
            ["dtype", "rank", "list", "empty", "zero", "negative", "increasing", "sum", "device"]
        )
    )
    if kind == "dtype":
        return bs.to(draw(st.sampled_from([torch.int32, torch.float32, torch.uint8])))
    if kind == "rank":
        return bs.view(1, -1)
    if kind == "list":
        return sizes
    if kind == "empty":
        return bs[:0]
    if kind == "device":
        return bs.to("meta")
    if kind == "zero":
        return torch.tensor([*sizes, 0])
    if kind == "negative":
        return torch.tensor([*sizes[:-1], -sizes[-1]])
    if kind == "increasing":
        return torch.tensor([*sizes, sizes[-1] + 1])
    t = draw(st.integers(0, len(sizes) - 1))
    sizes[t] += draw(st.sampled_from([-1, 1, 5])) if sizes[t] > 1 else 1
    return torch.tensor(sizes).clamp(min=1).sort(descending=True).values


def _bad_indices(draw, packed: PackedSequence):
    s, u = packed.sorted_indices, packed.unsorted_indices
    N = s.numel()
    kind = draw(
        st.sampled_from(["one-none", "length", "range", "duplicate", "dtype", "not-inverse"])
    )
    if kind == "one-none":
        return (None, u) if draw(st.booleans()) else (s, None)
    if kind == "length":
        return torch.arange(N + 1), torch.arange(N + 1)
    if kind == "range":
        return s + N, u
    if kind == "dtype":
        return s.float(), u
    if N == 1:
        return torch.tensor([1]), u
    if kind == "duplicate":
        return torch.zeros(N, dtype=torch.int64), u
    # a permutation, and an inverse of another one
    return s, torch.roll(u, 1)


@st.composite
def layer_case(draw, engine: str, category: str):
    """A call of an LSTM, GRU or RNN module, malformed as ``category`` says."""
    name = draw(st.sampled_from(LAYERS))
    mode = {"RNN": "RNN_" + draw(st.sampled_from(["TANH", "RELU"]))}.get(name, name)
    H_in, H = draw(st.integers(1, 5)), draw(st.integers(2, 6))
    num_layers, bidirectional = draw(st.integers(1, 2)), draw(st.booleans())
    batch_first, dtype = draw(st.booleans()), draw(st.sampled_from(FLOATS))
    kwargs = dict(
        num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first,
        bias=draw(st.booleans()), dtype=dtype, engine=engine,
    )  # fmt: skip
    if name == "RNN":
        kwargs["nonlinearity"] = mode[4:].lower()
    if name == "LSTM" and draw(st.booleans()):
        kwargs["proj_size"] = draw(st.integers(1, H - 1))
    if name != "RNN" and draw(st.booleans()):
        kwargs.update(layer_norm=True, peephole=name == "LSTM")
    module = getattr(rnnkit, name)(H_in, H, **kwargs)
    module.train(draw(st.booleans()))
    L, N = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    D = 2 if bidirectional else 1
    H_out = kwargs.get("proj_size", H)
    x = torch.randn((N, L, H_in) if batch_first else (L, N, H_in), dtype=dtype)
    hx = _states(mode, (num_layers * D, N, H_out), (num_layers * D, N, H), dtype)
    which = draw(st.integers(0, 1)) if name == "LSTM" else 0
    if category == "input-type":
        x = draw(NOT_TENSORS | st.sampled_from([(x,), x.numpy()]))
    elif category == "input-rank":
        x = _rerank(draw, x, (2, 3))
    elif category == "input-features":
        x = torch.randn(*x.shape[:-1], _other(draw, H_in, 1), dtype=dtype)
    elif category == "input-dtype":
        x = _randn(x.shape, _other_dtype(draw, dtype))
    elif category == "input-layout":
        x = _sparse(draw, x)
    elif category == "input-device":
        x = x.to("meta")
    elif category == "empty-sequence":
        x = x.narrow(1 if batch_first else 0, 0, 0)
        hx = draw(st.sampled_from([None, hx]))
        if draw(st.booleans()):
            # unbatched
            x, hx = x.select(0 if batch_first else 1, 0), None
    elif category == "hx-type":
        hx = _bad_hx_type(draw, mode, hx)
    elif category == "hx-rank":
        hx = _map_states(hx, lambda s: _rerank(draw, s, (3,)), which)
    elif category == "hx-shape":
        hx = _map_states(hx, lambda s: _resize(draw, s), which)
    elif category == "hx-dtype":
        hx = _map_states(hx, lambda s: _randn(s.shape, _other_dtype(draw, dtype)), which)
    elif category == "hx-layout":
        hx = _map_states(hx, lambda s: s.to_sparse(), which)
    elif category == "hx-device":
        hx = _map_states(hx, lambda s: s.to("meta"), which)
    elif category.startswith("weight-"):
        _replace_parameter(draw, module, category)
    elif category == "packed-batch-sizes":
        p = _packed(draw, x, batch_first)
        bad = _bad_batch_sizes(draw, p.batch_sizes)
        x, hx = _raw_packed(p.data, bad, p.sorted_indices, p.unsorted_indices), None
    elif category == "packed-data":
        p = _packed(draw, x, batch_first)
        bad = [
            p.data.unsqueeze(0),  # rank
            p.data[:, :0],  # features
            torch.cat([p.data, p.data[:1]]),  # one row more than batch_sizes count
            p.data.to(_other_dtype(draw, dtype)),
            p.data.to_sparse(),
        ]
        if p.data.size(0) > 1:
            bad.append(p.data[1:])  # one row fewer
        data = draw(st.sampled_from(bad))
        x = _raw_packed(data, p.batch_sizes, p.sorted_indices, p.unsorted_indices)
    elif category == "packed-indices":
        p = _packed(draw, x, batch_first)
        x = _raw_packed(p.data, p.batch_sizes, *_bad_indices(draw, p))
    else:
        # a state for another batch size: torch.nn takes the first rows after sorting
        p = _packed(draw, x, batch_first)
        N_bad = _other(draw, N, 1)
        x = p if draw(st.booleans()) else _raw_packed(p.data, p.batch_sizes, None, None)
        hx = _states(mode, (num_layers * D, N_bad, H_out), (num_layers * D, N_bad, H), dtype)
    return name, category, lambda: module(x, hx)


@st.composite
def cell_case(draw, engine: str, category: str):
    """A call of an LSTMCell, GRUCell or RNNCell module, malformed as ``category`` says."""
    name = draw(st.sampled_from(CELLS))
    H_in, H, N = draw(st.integers(1, 5)), draw(st.integers(1, 6)), draw(st.integers(0, 3))
    dtype = draw(st.sampled_from(FLOATS))
    kwargs = dict(bias=draw(st.booleans()), dtype=dtype, engine=engine)
    if name == "RNNCell":
        kwargs["nonlinearity"] = draw(st.sampled_from(["tanh", "relu"]))
    if draw(st.booleans()):
        kwargs.update(layer_norm=True, zoneout=0.25)
    module = getattr(rnnkit, name)(H_in, H, **kwargs)
    module.train(draw(st.booleans()))
    batched = draw(st.booleans())
    lead = (N,) if batched else ()
    x = torch.randn(*lead, H_in, dtype=dtype)
    h = torch.randn(*lead, H, dtype=dtype)
    lstm = name == "LSTMCell"
    hx = (h, torch.randn(*lead, H, dtype=dtype)) if lstm else h
    which = draw(st.integers(0, 1)) if lstm else 0
    if category == "input-type":
        x = draw(NOT_TENSORS | st.sampled_from([(x,), x.numpy()]))
    elif category == "input-rank":
        x = _rerank(draw, x, (1, 2))
    elif category == "input-features":
        x = torch.randn(*lead, _other(draw, H_in, 1), dtype=dtype)
    elif category == "input-dtype":
        x = _randn(x.shape, _other_dtype(draw, dtype))
    elif category == "input-layout":
        # torch.nn's cells take sparse input (a sparse matrix product); not a mkldnn one
        x = x.float().to_mkldnn()
    elif category == "input-device":
        x = x.to("meta")
    elif category == "hx-type":
        hx = _bad_hx_type(draw, "LSTM" if lstm else "GRU", hx)
    elif category == "hx-rank":
        hx = _map_states(hx, lambda s: _rerank(draw, s, (1, 2)), which)
    elif category == "hx-shape":
        hx = _map_states(hx, lambda s: _resize(draw, s), which)
    elif category == "hx-dtype":
        hx = _map_states(hx, lambda s: _randn(s.shape, _other_dtype(draw, dtype)), which)
    elif category == "hx-layout":
        hx = _map_states(hx, lambda s: s.to_sparse(), which)
    elif category == "hx-device":
        hx = _map_states(hx, lambda s: s.to("meta"), which)
    else:
        _replace_parameter(draw, module, category)
    return name, category, lambda: module(x, hx)


@st.composite
def functional_case(draw, engine: str, category: str):
    """A call of ``rnnkit.functional.lstm``/``gru``/``rnn_*``, malformed as ``category`` says."""
    fn_name = draw(st.sampled_from(["lstm", "gru", "rnn_tanh", "rnn_relu"]))
    cls = {"lstm": "LSTM", "gru": "GRU"}.get(fn_name, "RNN")
    num_layers, bidirectional = draw(st.integers(1, 2)), draw(st.booleans())
    proj = {"proj_size": 2} if cls == "LSTM" and draw(st.booleans()) else {}
    nonlinearity = {"nonlinearity": fn_name[4:]} if cls == "RNN" else {}
    module = getattr(torch.nn, cls)(
        3, 4, num_layers, bidirectional=bidirectional, **proj, **nonlinearity
    )
    weights = list(module._flat_weights)
    x = torch.randn(2, 2, 3)
    options = dict(num_layers=num_layers, bidirectional=bidirectional, engine=engine)
    i = draw(st.integers(0, len(weights) - 1))
    if category == "weights-count":
        weights = draw(st.sampled_from([weights[:-1], weights + weights[:1], []]))
    elif category == "weights-type":
        weights = draw(
            st.sampled_from([weights[:i] + [None] + weights[i + 1 :], tuple(weights)[0], "w"])
        )
    elif category == "weights-shape":
        weights[i] = _resize(draw, weights[i].detach())
    else:
        options.update(
            draw(
                st.sampled_from(
                    [
                        dict(num_layers=0),
                        dict(num_layers=-1),
                        dict(num_layers=1.5),
                        dict(dropout=1.5),
                        dict(dropout=-0.1),
                        dict(dropout="0.5"),
                        dict(engine="nonesuch"),
                        dict(num_layers=num_layers + 1),
                    ]
                )
            )
        )
    fn = getattr(RF, fn_name)
    return "functional", category, lambda: fn(x, weights, **options)


# (strategy, categories): every category of every family gets its share of the examples
FAMILIES = [
    (layer_case, LAYER_CATEGORIES),
    (cell_case, CELL_CATEGORIES),
    (functional_case, FUNCTIONAL_CATEGORIES),
]
N_GROUPS = sum(len(categories) for _, categories in FAMILIES)


def check(engine: str, examples: int) -> dict:
    """Draw about ``examples`` malformed cases on ``engine``, split evenly over the categories
    of every family; each must raise from rnnkit's checks.

    Returns the counts, by module and by category. Hypothesis raises, with the smallest
    failing case, when one returns an output or raises from elsewhere.
    """
    by_module = collections.Counter()
    by_category = collections.Counter()

    def one(drawn):
        name, category, call = drawn
        by_module[name] += 1
        by_category[category] += 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                out = call()
            except ERRORS as e:
                if not raised_by_checks(e):
                    raise AssertionError(
                        f"{name} {category}: {type(e).__name__} not from rnnkit's checks"
                    ) from e
                return
        raise AssertionError(f"{name} {category}: returned {type(out).__name__}, no error")

    per_group = max(1, examples // N_GROUPS)
    for strategy, categories in FAMILIES:
        for category in categories:
            run = settings(
                max_examples=per_group,
                deadline=None,
                derandomize=True,
                database=None,
                suppress_health_check=list(HealthCheck),
            )(given(drawn=strategy(engine, category))(one))
            run()
    return {
        "engine": engine,
        "cases": sum(by_module.values()),
        "by_module": dict(sorted(by_module.items())),
        "by_category": dict(sorted(by_category.items())),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--examples", type=int, default=10 * N_GROUPS)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(json.dumps(check(args.engine, args.examples)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

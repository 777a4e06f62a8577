"""The fused CPU engine against the reference engine: outputs, final states, every gradient.

Same covering grid as the reference engine's tests (``grid.MODULE_CASES``), plus sizes that
reach the kernels' threaded and partial-vector paths, gradcheck on tiny layers, dropout,
saturated gates, double backward and the fallback when the kernels cannot be built.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import rnnkit
from grid import ModuleCase, module_params
from parity import assert_same_structure, engines_picked
from rnnkit.engines import cpu as fused_engine
from rnnkit.engines.cpu import build
from rnnkit.testing import compare, engine_tolerance


def assert_matches_reference(case: ModuleCase, *, seed: int = 0, scale: float = 1.0) -> None:
    """Fused and reference on the same weights (times ``scale``) and inputs agree within
    :data:`rnnkit.testing.ENGINE_TOLERANCES`; with ``case.dropout`` both train from the same seed."""
    _, fused = case.modules("fused")
    with torch.no_grad():
        for p in fused.parameters():
            p.mul_(scale)
    reference = copy.deepcopy(fused)
    reference.engine = "reference"
    runs = []
    for module in (reference, fused):
        module.train(case.dropout > 0)
        torch.manual_seed(seed)
        runs.append(case.run(module, case.inputs(seed)))
    (expected, expected_structure), (actual, structure) = runs
    assert_same_structure(expected_structure, structure)
    failures = []
    for name, e in expected.items():
        result = compare(actual[name], e, what=name, tol=engine_tolerance(e, name))
        if not result.ok:
            failures.append(str(result))
    assert not failures, "fused differs from reference:\n  " + "\n  ".join(failures)


@pytest.mark.parametrize("case", module_params())
def test_matches_reference(case):
    assert_matches_reference(case)


# Sizes past the covering grid's: a step wide enough for the threaded pointwise pass (N*H >=
# 16384), H spanning several vectors plus a partial one, a long sequence with N=1, the
# batches of a packed sequence shrinking by more than one row at a time, and sequences of more
# rows than the backward's blocks of steps hold (128 rows: the Elman dG, the packed-input
# gather of previous states), down to one step wider than a block.
EXTRA_CASES = [
    ModuleCase("LSTM", size=(3, 64, 40, 256), dtype=torch.float32),
    ModuleCase("GRU", size=(3, 64, 40, 256), bidirectional=True, dtype=torch.float64),
    ModuleCase("RNN_TANH", size=(3, 64, 40, 256), h0=True, dtype=torch.float32),
    ModuleCase("LSTM", size=(4, 6, 9, 40), proj=True, packed="unsorted", h0=True),
    ModuleCase("GRU", size=(5, 9, 8, 33), packed="sorted", bidirectional=True, num_layers=2),
    ModuleCase("RNN_RELU", size=(5, 9, 8, 33), packed="unsorted", num_layers=2),
    ModuleCase("LSTM", size=(200, 1, 8, 24), bidirectional=True, dtype=torch.float64),
    ModuleCase(
        "RNN_TANH",
        size=(45, 7, 5, 9),
        packed="unsorted",
        bidirectional=True,
        h0=True,
        dtype=torch.float64,
    ),
    ModuleCase("RNN_RELU", size=(60, 5, 6, 17), bidirectional=True, num_layers=2),
    ModuleCase("RNN_TANH", size=(3, 150, 4, 5), bidirectional=True, dtype=torch.float64),
    ModuleCase("LSTM", size=(45, 7, 5, 9), proj=True, packed="sorted", bidirectional=True),
    ModuleCase("GRU", size=(45, 7, 5, 9), packed="unsorted", num_layers=2, dtype=torch.float64),
]


@pytest.mark.parametrize("case", module_params(EXTRA_CASES))
def test_matches_reference_wide_and_long(case):
    assert_matches_reference(case)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize(
    "case",
    module_params(
        [
            ModuleCase("LSTM", size=(6, 11, 8, 256), proj=True, packed="unsorted", h0=True),
            ModuleCase("GRU", size=(6, 11, 8, 160), bidirectional=True, packed="sorted"),
        ]
    ),
)
def test_any_thread_count(case, threads):
    """Per-step GEMMs large enough to use every BLAS thread, under other thread counts."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert_matches_reference(case)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "case",
    module_params(
        [
            ModuleCase(mode, size=(6, 3, 4, 5), dtype=dtype, h0=True)
            for mode in ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")
            for dtype in (torch.float32, torch.float64)
        ]
    ),
)
def test_saturated_gates(case):
    """Pre-activations around +-1e3: exp overflows inside sigmoid and tanh, no NaN appears."""
    assert_matches_reference(case, scale=300.0)


@pytest.mark.parametrize(
    "case",
    module_params(
        [
            ModuleCase(mode, num_layers=3, bidirectional=bidir, packed=packed, dropout=0.4)
            for mode in ("LSTM", "GRU", "RNN_TANH")
            for bidir, packed in ((False, "none"), (True, "unsorted"))
        ]
        + [ModuleCase("LSTM", num_layers=2, proj=True, h0=True, dropout=0.5, dtype=torch.float64)]
    ),
)
def test_dropout_masks_match_reference(case):
    """Inter-layer dropout draws the reference's (and so torch's) masks under one seed."""
    assert_matches_reference(case)


def _layer(mode: str, **kw) -> torch.nn.Module:
    cls = {"RNN_TANH": "RNN", "RNN_RELU": "RNN"}.get(mode, mode)
    if mode.startswith("RNN_"):
        kw["nonlinearity"] = mode[4:].lower()
    return getattr(rnnkit, cls)(engine="fused", dtype=torch.float64, **kw)


@pytest.mark.parametrize(
    "mode, kw, packed",
    [
        pytest.param("LSTM", dict(num_layers=2), False, id="LSTM-l2"),
        pytest.param(
            "LSTM", dict(bidirectional=True, proj_size=2), True, id="LSTM-bidir-proj2-packed"
        ),
        pytest.param("GRU", dict(bidirectional=True), True, id="GRU-bidir-packed"),
        pytest.param("GRU", dict(bias=False, batch_first=True), False, id="GRU-nobias-bf"),
        pytest.param(
            "RNN_TANH", dict(num_layers=2, bidirectional=True), False, id="RNNtanh-l2-bidir"
        ),
        pytest.param("RNN_RELU", dict(), True, id="RNNrelu-packed"),
    ],
)
def test_gradcheck(mode, kw, packed):
    """The hand-written backward against finite differences, in float64 on tiny layers."""
    torch.manual_seed(0)
    module = _layer(mode, input_size=3, hidden_size=4, **kw)
    L, N = 4, 3
    bf = kw.get("batch_first", False)
    x = torch.randn((N, L, 3) if bf else (L, N, 3), dtype=torch.float64, requires_grad=True)
    D, H_out = (2 if kw.get("bidirectional") else 1), kw.get("proj_size") or 4
    lead = (D * kw.get("num_layers", 1), N)
    h0 = torch.randn(*lead, H_out, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(*lead, 4, dtype=torch.float64, requires_grad=True)
    params = list(module.parameters())
    lengths = torch.tensor([4, 2, 3])

    names = [name for name, _ in module.named_parameters()]

    def fn(x, h0, c0, *weights):
        inp = pack_padded_sequence(x, lengths, bf, enforce_sorted=False) if packed else x
        hx = (h0, c0) if mode == "LSTM" else h0
        out, hidden = torch.func.functional_call(
            module, dict(zip(names, weights, strict=True)), (inp, hx)
        )
        out = out.data if packed else out
        return (out, *(hidden if mode == "LSTM" else (hidden,)))

    inputs = (x, h0, c0, *params)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, nondet_tol=0.0)


@pytest.mark.parametrize(
    "mode, kw, packed",
    [
        pytest.param("LSTM", dict(proj_size=2, bidirectional=True), False, id="LSTM-proj-bidir"),
        pytest.param("GRU", dict(num_layers=2), True, id="GRU-l2-packed"),
        pytest.param("RNN_TANH", dict(bias=False, bidirectional=True), True, id="RNN-packed"),
    ],
)
def test_double_backward(mode, kw, packed):
    """create_graph=True recomputes through torch ops: gradgradcheck holds on this engine."""
    module = _layer(mode, input_size=3, hidden_size=4, **kw)
    names = [name for name, _ in module.named_parameters()]
    x = torch.randn(4, 3, 3, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([4, 2, 3])

    def fn(x, *weights):
        inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x
        out, _ = torch.func.functional_call(module, dict(zip(names, weights, strict=True)), (inp,))
        return out.data if packed else out

    params = [p.detach().clone().requires_grad_() for p in module.parameters()]
    assert torch.autograd.gradgradcheck(fn, (x, *params), fast_mode=True)


@pytest.mark.parametrize(
    "mode, kw, packed",
    [
        pytest.param("LSTM", dict(bidirectional=True), False, id="LSTM-bidir"),
        pytest.param(
            "LSTM", dict(bidirectional=True, proj_size=2), True, id="LSTM-bidir-proj2-packed"
        ),
        pytest.param("GRU", dict(bidirectional=True), False, id="GRU-bidir"),
        pytest.param("GRU", dict(num_layers=2), True, id="GRU-l2-packed"),
        pytest.param("RNN_TANH", dict(bidirectional=True), True, id="RNNtanh-bidir-packed"),
    ],
)
def test_backward_twice_with_retain_graph(mode, kw, packed):
    """The saved buffers survive a backward with retain_graph=True; the last backward, which
    writes its gate gradients over them, gives the same gradients, bit for bit."""
    module = _layer(mode, input_size=3, hidden_size=4, **kw)
    x = torch.randn(50, 4, 3, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([50, 17, 49, 3])
    out, _ = module(pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x)
    loss = (out.data if packed else out).sum()
    leaves = [x, *module.parameters()]
    first = torch.autograd.grad(loss, leaves, retain_graph=True)
    second = torch.autograd.grad(loss, leaves, retain_graph=True)
    last = torch.autograd.grad(loss, leaves)
    for a, b, c in zip(first, second, last, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize(
    "mode, kw, packed",
    [
        pytest.param("LSTM", dict(bidirectional=True, proj_size=3), False, id="LSTM-bidir-proj3"),
        pytest.param("GRU", dict(bidirectional=True), True, id="GRU-bidir-packed"),
        pytest.param("RNN_RELU", dict(num_layers=2), False, id="RNNrelu-l2"),
    ],
)
@pytest.mark.parametrize("loss", ["sum", "mean", "row_broadcast", "transposed"])
def test_strided_output_gradients(mode, kw, packed, loss):
    """Output gradients that are not a dense [R, D*H_out] block: the output's sum or mean
    (stride 0 everywhere), a weight per feature (rows broadcast), a transposed tensor."""
    module = _layer(mode, input_size=3, hidden_size=5, **kw)
    reference = copy.deepcopy(module)
    reference.engine = "reference"
    x = torch.randn(40, 4, 3, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([40, 17, 39, 3])
    results = []
    for m in (reference, module):
        out, _ = m(pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x)
        out = out.data if packed else out
        leaves = [x, *m.parameters()]
        if loss == "sum":
            results.append(torch.autograd.grad(out.sum(), leaves))
        elif loss == "mean":
            results.append(torch.autograd.grad(out.mean(), leaves))
        elif loss == "row_broadcast":
            w = torch.linspace(-1, 2, out.size(-1), dtype=out.dtype)
            results.append(torch.autograd.grad(out, leaves, w.expand_as(out)))
        else:
            g = torch.randn(out.shape[::-1], generator=torch.Generator().manual_seed(0))
            g = g.to(out.dtype).permute(*range(g.dim() - 1, -1, -1))
            results.append(torch.autograd.grad(out, leaves, g))
    for e, a in zip(*results, strict=True):
        result = compare(a, e, tol=engine_tolerance(e, "grad"))
        assert result.ok, str(result)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bidir"])
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH"])
def test_training_step_peak_memory_within_torch(mode, bidirectional):
    """A training step allocates no more than torch.nn's: the gate gradients go over the saved
    activations, the Elman ones a block of steps at a time. float64, where no weight is packed
    for MKL, so that the count is this engine's buffers and torch's alone."""
    from rnnkit.bench.runner import _peak_mb

    L, N, H_in, H = 100, 16, 64, 64
    x = torch.randn(L, N, H_in, dtype=torch.float64, requires_grad=True)
    peaks = []
    for module in (
        getattr(torch.nn, mode.removesuffix("_TANH"))(
            H_in, H, bidirectional=bidirectional, dtype=torch.float64
        ),
        _layer(mode, input_size=H_in, hidden_size=H, bidirectional=bidirectional),
    ):

        def step(module=module):
            out, hidden = module(x)
            hidden = hidden if isinstance(hidden, tuple) else (hidden,)
            sum(t.sum() for t in (out, *hidden)).backward()

        step()
        peaks.append(_peak_mb(step, torch.device("cpu")))
    expected, actual = peaks
    assert actual <= expected, f"fused {actual:.3f} MiB, torch.nn {expected:.3f} MiB"


def test_non_contiguous_states_and_empty_batch():
    module = _layer("LSTM", input_size=3, hidden_size=4, num_layers=2)
    h0 = torch.randn(2, 4, 2, dtype=torch.float64).transpose(1, 2)  # [2, 2, 4], strided
    c0 = torch.randn(2, 2, 4, dtype=torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    out, (h_n, c_n) = module(x, (h0, c0))
    reference = copy.deepcopy(module)
    reference.engine = "reference"
    expected, (e_h, e_c) = reference(x, (h0, c0))
    for a, e in ((out, expected), (h_n, e_h), (c_n, e_c)):
        assert compare(a, e, tol=engine_tolerance(e)).ok
    out, (h_n, _) = module(torch.randn(5, 0, 3, dtype=torch.float64))
    assert out.shape == (5, 0, 4) and h_n.shape == (2, 0, 4)


@pytest.mark.parametrize(
    "dtype, reason", [(torch.float16, "float16 not supported"), (torch.bfloat16, "bfloat16")]
)
def test_unsupported_dtype_falls_back_under_auto(dtype, reason):
    x = torch.randn(3, 2, 4, dtype=dtype)
    named = rnnkit.LSTM(4, 5, dtype=dtype, engine="fused")
    with pytest.raises(RuntimeError, match=reason):
        named(x)
    auto = rnnkit.LSTM(4, 5, dtype=dtype)
    auto.load_state_dict(named.state_dict())
    reference = copy.deepcopy(auto)
    reference.engine = "reference"
    assert torch.equal(auto(x)[0], reference(x)[0])


def test_variants_go_to_the_reference():
    """GRU and RNN variants are the reference engine's (LSTM's: test_cpu_variants.py)."""
    x = torch.randn(3, 2, 4)
    with pytest.raises(RuntimeError, match=r"fused: variant gate_clip=0\.5 not supported"):
        rnnkit.GRU(4, 5, gate_clip=0.5, engine="fused")(x)
    auto = rnnkit.GRU(4, 5, gate_clip=0.5)
    reference = copy.deepcopy(auto)
    reference.engine = "reference"
    assert torch.equal(auto(x)[0], reference(x)[0])


def test_auto_picks_fused_on_cpu(monkeypatch):
    picked = engines_picked(monkeypatch)
    rnnkit.GRU(4, 5)(torch.randn(3, 2, 4))
    rnnkit.LSTM(4, 5, dtype=torch.float16)(torch.randn(3, 2, 4, dtype=torch.float16))
    assert picked == ["fused", "reference"]


def test_unavailable_build_warns_once_and_falls_back(monkeypatch):
    """A failed build: auto warns once per process and runs the reference; fused raises why."""
    monkeypatch.setattr(build, "_ops", None)
    monkeypatch.setattr(build, "_error", "CalledProcessError: c++ not found")
    monkeypatch.setattr(fused_engine, "_warned", False)
    x = torch.randn(3, 2, 4)
    auto = rnnkit.LSTM(4, 5)
    reference = copy.deepcopy(auto)
    reference.engine = "reference"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = auto(x)[0]
        auto(x)
    fallback = [w for w in caught if "falls back to the slower reference" in str(w.message)]
    assert len(fallback) == 1 and "c++ not found" in str(fallback[0].message)
    assert torch.equal(out, reference(x)[0])
    named = copy.deepcopy(auto)
    named.engine = "fused"
    with pytest.raises(RuntimeError, match="fused: .*unavailable.*c\\+\\+ not found"):
        named(x)

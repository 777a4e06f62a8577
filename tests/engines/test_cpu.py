"""What the fused CPU engine alone does, against the reference engine where it computes.

The suites of every fast engine (``test_engines.py``, ``test_engine_variants.py``) hold it to
the reference on the covering grids; here are the sizes that reach its kernels' threaded and
partial-vector paths and its blocks of steps, BLAS thread counts, output gradients of any
strides, peak memory, and the dispatch: what ``engine="auto"`` picks, and the fallback when the
kernels cannot be built.
"""

from __future__ import annotations

import copy
import threading
import warnings

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import rnnkit
from engines import (
    FUSED,
    VariantCase,
    assert_matches_reference,
    check_case,
    check_variant_case,
    layer,
    with_reference,
)
from grid import MODULE_CASES, ModuleCase, module_params
from parity import engines_picked
from rnnkit.engines.cpu import build

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
    check_case(FUSED, case)


@pytest.mark.parametrize("step_gemm", ["own", "mkl"])
@pytest.mark.parametrize("case", module_params(MODULE_CASES + EXTRA_CASES[3:]))
def test_either_step_gemm_matches_reference(case, step_gemm, monkeypatch):
    """Every product on rnnkit's own PanelGemm (``RNNKIT_GEMM=own``: the step products and
    the whole-sequence GEMMs, as on a CPU that is not Intel's) and on MKL (``RNNKIT_GEMM=mkl``),
    whatever this CPU is: the covering grid and the packed, long and partial-vector cases."""
    monkeypatch.setenv("RNNKIT_GEMM", step_gemm)
    check_case(FUSED, case)


@pytest.mark.parametrize("step_gemm", ["own", "mkl"])
@pytest.mark.parametrize("variant", ["all", "layer_norm"])
def test_either_step_gemm_variant_matches_reference(variant, step_gemm, monkeypatch):
    monkeypatch.setenv("RNNKIT_GEMM", step_gemm)
    check_variant_case(
        FUSED, VariantCase(ModuleCase("LSTM", size=(7, 5, 6, 13), h0=True), variant, True)
    )


@pytest.mark.parametrize("projection", ["step", "sequence"])
@pytest.mark.parametrize("case", module_params(MODULE_CASES + EXTRA_CASES))
def test_either_input_projection_matches_reference(case, projection, monkeypatch):
    """The time loop projecting each step's rows of x (``RNNKIT_PROJECTION=step``, the default
    from batch 2) and one GEMM over the sequence first (``sequence``, the default at batch 1)."""
    monkeypatch.setenv("RNNKIT_PROJECTION", projection)
    check_case(FUSED, case)


@pytest.mark.parametrize("projection", ["step", "sequence"])
@pytest.mark.parametrize(
    "mode, size, kw, lengths",
    [
        pytest.param(
            "LSTM", (9, 7, 6, 40), dict(proj_size=5, bidirectional=True), None, id="LSTM-proj-bidir"
        ),
        pytest.param("LSTM", (30, 1, 3, 33), dict(num_layers=2), None, id="LSTM-N1-l2"),
        pytest.param(
            "LSTM", (8, 5, 4, 17), dict(bidirectional=True), [8, 3, 8, 1, 5], id="LSTM-packed"
        ),
        pytest.param("LSTM", (6, 64, 20, 256), {}, None, id="LSTM-N64-H256"),
        pytest.param("GRU", (9, 7, 6, 40), dict(bidirectional=True), None, id="GRU-bidir"),
        pytest.param("GRU", (8, 5, 4, 17), dict(num_layers=2), [8, 3, 8, 1, 5], id="GRU-packed"),
        pytest.param("RNN_TANH", (9, 7, 6, 40), dict(bidirectional=True), None, id="RNN-bidir"),
        pytest.param("RNN_RELU", (8, 5, 4, 17), {}, [8, 3, 8, 1, 5], id="RNNrelu-packed"),
    ],
)
def test_inference_equals_training_forward(mode, size, kw, lengths, projection, monkeypatch):
    """no_grad (which projects into a scratch block per step, or keeps no saved buffers) gives
    the training forward's values bit for bit, either projection, on every thread count."""
    monkeypatch.setenv("RNNKIT_PROJECTION", projection)
    L, N, H_in, H = size
    module = layer(FUSED, mode, input_size=H_in, hidden_size=H, dtype=torch.float32, **kw)
    x = torch.randn(L, N, H_in, requires_grad=True)
    inp = (
        x
        if lengths is None
        else pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
    )
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            with torch.no_grad():
                inference = flat(module(inp))
            for a, b in zip(inference, flat(module(inp)), strict=True):
                assert torch.equal(a, b)
    finally:
        torch.set_num_threads(before)


def flat(result):
    """A layer's output (its data, if packed) and final states, as one list."""
    out, hidden = result
    out = out.data if isinstance(out, torch.nn.utils.rnn.PackedSequence) else out
    return [out, *(hidden if isinstance(hidden, tuple) else (hidden,))]


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize(
    "H, kw",
    [
        pytest.param(17, dict(bias=False), id="H17-nobias"),
        pytest.param(40, dict(num_layers=2), id="H40-l2"),
        pytest.param(128, {}, id="H128"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_batch1_unit_split_gives_the_same_bits(H, kw, dtype, threads, monkeypatch):
    """At batch 1 the LSTM splits each step by hidden units over the threads
    (``RNNKIT_UNIT_SPLIT``): the same sums in the same order as one thread, so the same bits,
    in inference and in the training forward, whose backward then matches too."""
    module = layer(FUSED, "LSTM", input_size=5, hidden_size=H, dtype=dtype, **kw)
    x = torch.randn(23, 1, 5, dtype=dtype, requires_grad=True)
    hx = tuple(torch.randn(module.num_layers, 1, H, dtype=dtype) for _ in range(2))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    runs = []
    try:
        for split in ("on", "off"):
            monkeypatch.setenv("RNNKIT_UNIT_SPLIT", split)
            with torch.no_grad():
                inference = module(x, hx)
            out, (h_n, c_n) = module(x, hx)
            grads = torch.autograd.grad(
                (out.sum(), h_n.sum(), c_n.sum()), [x, *module.parameters()]
            )
            runs.append([inference[0], *inference[1], out, h_n, c_n, *grads])
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "case",
    module_params(
        [
            ModuleCase("LSTM", size=(30, 1, 7, 40), h0=True),
            ModuleCase("LSTM", size=(30, 1, 7, 33), num_layers=2, dtype=torch.float64),
        ]
    ),
)
def test_batch1_unit_split_matches_reference(case, monkeypatch):
    monkeypatch.setenv("RNNKIT_UNIT_SPLIT", "on")
    check_case(FUSED, case)


# A step wide enough for BLAS threads, H over several vectors plus a partial one.
WIDE_VARIANT_CASES = [
    VariantCase(ModuleCase("LSTM", size=(4, 48, 20, 200), h0=True), "all", True),
    VariantCase(ModuleCase("LSTM", size=(4, 48, 20, 200), proj=True), "layer_norm", False),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in WIDE_VARIANT_CASES])
def test_variant_matches_reference_wide(case):
    check_variant_case(FUSED, case)


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
        check_case(FUSED, case)
    finally:
        torch.set_num_threads(before)


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
    module, reference = with_reference(layer(FUSED, mode, input_size=3, hidden_size=5, **kw))
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
    names = ["grad_input", *(f"grad_{name}" for name, _ in module.named_parameters())]
    expected, actual = (dict(zip(names, r, strict=True)) for r in results)
    assert_matches_reference(actual, expected, engine="fused")


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
        layer(FUSED, mode, input_size=H_in, hidden_size=H, bidirectional=bidirectional),
    ):

        def step(module=module):
            out, hidden = module(x)
            hidden = hidden if isinstance(hidden, tuple) else (hidden,)
            sum(t.sum() for t in (out, *hidden)).backward()

        step()
        peaks.append(_peak_mb(step, torch.device("cpu")))
    expected, actual = peaks
    assert actual <= expected, f"fused {actual:.3f} MiB, torch.nn {expected:.3f} MiB"


@pytest.mark.parametrize(
    "mode, size, kw",
    [
        pytest.param("LSTM", (100, 16, 64, 64), {}, id="LSTM-L100-N16-H64"),
        pytest.param("LSTM", (50, 8, 32, 48), dict(bidirectional=True), id="LSTM-bidir"),
        pytest.param("LSTM", (40, 8, 16, 24), dict(proj_size=8), id="LSTM-proj"),
        pytest.param("LSTM", (16, 4096, 1, 8), {}, id="LSTM-wide-batch"),
        pytest.param("LSTM", (300, 1, 32, 64), {}, id="LSTM-N1"),
        pytest.param("GRU", (100, 16, 64, 64), dict(bidirectional=True), id="GRU-bidir"),
        pytest.param("GRU", (16, 4096, 1, 8), {}, id="GRU-wide-batch"),
        pytest.param("RNN", (100, 16, 64, 64), {}, id="RNN"),
    ],
)
def test_inference_peak_memory_within_torch(mode, size, kw):
    """no_grad allocates no more than torch.nn's: the LSTM and GRU loops project each step
    into a block that holds one step's gates (the [R, G*H] projection is kept only at batch 1,
    where it is L x G*H). float64, as the training-step test."""
    from rnnkit.bench.runner import _peak_mb

    L, N, H_in, H = size
    x = torch.randn(L, N, H_in, dtype=torch.float64)
    peaks = []
    for module in (
        getattr(torch.nn, mode)(H_in, H, dtype=torch.float64, **kw),
        layer(FUSED, mode, input_size=H_in, hidden_size=H, **kw),
    ):

        def forward(module=module):
            with torch.no_grad():
                module(x)

        forward()
        peaks.append(_peak_mb(forward, torch.device("cpu")))
    expected, actual = peaks
    assert actual <= expected, f"fused {actual:.3f} MiB, torch.nn {expected:.3f} MiB"


@pytest.mark.parametrize(
    "dtype, kw, reason",
    [
        (torch.float16, {}, "float16 not supported"),
        (torch.bfloat16, {"peephole": True}, "bfloat16 not supported"),
    ],
)
def test_unsupported_dtype_falls_back_under_auto(dtype, kw, reason):
    x = torch.randn(3, 2, 4, dtype=dtype)
    named = rnnkit.LSTM(4, 5, dtype=dtype, engine="fused", **kw)
    with pytest.raises(RuntimeError, match=reason):
        named(x)
    auto = rnnkit.LSTM(4, 5, dtype=dtype, **kw)
    auto.load_state_dict(named.state_dict())
    reference = copy.deepcopy(auto)
    reference.engine = "reference"
    # oneDNN's bfloat16 GEMMs can die on CPUs that list AMX without enabling it (README)
    with torch.backends.mkldnn.flags(enabled=False):
        assert torch.equal(auto(x)[0], reference(x)[0])


def test_auto_picks_fused_on_cpu(monkeypatch):
    picked = engines_picked(monkeypatch)
    rnnkit.GRU(4, 5)(torch.randn(3, 2, 4))
    rnnkit.LSTM(4, 5, dtype=torch.float16)(torch.randn(3, 2, 4, dtype=torch.float16))
    assert picked == ["fused", "reference"]


def test_auto_picks_fused_for_lstm_variants(monkeypatch):
    picked = engines_picked(monkeypatch)
    rnnkit.LSTM(4, 5, layer_norm=True, zoneout=0.1)(torch.randn(3, 2, 4))
    assert picked == ["fused"]


def test_variant_parameters_of_another_dtype_are_refused():
    module = rnnkit.LSTM(4, 5, peephole=True, engine="fused")
    module.peephole_l0.data = module.peephole_l0.data.double()
    with pytest.raises(RuntimeError, match="one dtype"):
        module(torch.randn(3, 2, 4))


def test_unavailable_build_warns_once_and_falls_back(monkeypatch):
    """A failed build: auto warns once per process, in one line that names the cause first,
    and runs the reference; fused raises why, with no word of a fallback."""
    monkeypatch.setattr(build, "_loaded", None)
    monkeypatch.setattr(build, "_error", "no C++ compiler: 'c++' is not on PATH")
    monkeypatch.setattr(rnnkit.functional, "_warned", set())
    x = torch.randn(3, 2, 4)
    auto = rnnkit.LSTM(4, 5)
    reference = copy.deepcopy(auto)
    reference.engine = "reference"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = auto(x)[0]
        auto(x)
    fallback = [str(w.message) for w in caught if "engine='auto' runs" in str(w.message)]
    assert fallback == [
        "rnnkit: the fused CPU engine is unavailable: no C++ compiler: 'c++' is not on PATH; "
        "engine='auto' runs the slower reference engine instead"
    ]
    assert torch.equal(out, reference(x)[0])
    named = copy.deepcopy(auto)
    named.engine = "fused"
    monkeypatch.setattr(rnnkit.functional, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match="fused: .*unavailable.*not on PATH"):
            named(x)
    assert not [w for w in caught if "engine='auto'" in str(w.message)]


def test_a_call_leaves_torchs_thread_count_as_it_was():
    """The first parallel region of a thread fixes its OpenMP thread count (ATen reads MKL's
    then): the ops make sure that is not the single thread their per-step BLAS calls pin. A
    fresh thread, whose first parallel call is the op's, keeps torch's count."""
    counts = {}

    def first_call_here():
        counts["before"] = torch.get_num_threads()
        layer = rnnkit.LSTM(6, 13, engine="fused")
        layer(torch.randn(7, 5, 6))[0].sum().backward()
        with torch.no_grad():
            rnnkit.LSTM(6, 13, engine="fused", layer_norm=True)(torch.randn(7, 5, 6))
        counts["after"] = torch.get_num_threads()

    thread = threading.Thread(target=first_call_here)
    thread.start()
    thread.join()
    assert counts["after"] == counts["before"], counts

"""Every fast engine (``engines.ENGINES``) against the reference engine: outputs, final states,
every gradient.

Same covering grid as the reference engine's tests (``grid.MODULE_CASES``), plus packed
batches that shrink unevenly and long sequences, saturated gates, dropout, half precision (on
the engines that run it), gradcheck and gradgradcheck on tiny float64 layers, saved buffers
across backwards, and what the engines leave to the reference. Triton's kernels run in its
interpreter without a GPU (``conftest.py``). What one engine alone does is tested in its own
file (``test_cpu.py``, ``test_triton.py``).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import rnnkit
from engines import (
    assert_matches_reference,
    check_case,
    each_engine,
    engine_module,
    engine_params,
    layer,
    on_device,
    randn64,
    run,
    with_reference,
)
from grid import MODULE_CASES, CaseInputs, ModuleCase


@pytest.mark.parametrize("engine, case", engine_params(MODULE_CASES))
def test_matches_reference(engine, case):
    check_case(engine, case)


# Batches of a packed sequence shrinking by more than one row at a time, a long sequence
# with N=1, an LSTM whose projection is a single unit.
PACKED_AND_LONG = [
    ModuleCase("LSTM", size=(4, 6, 9, 12), proj=True, packed="unsorted", h0=True),
    ModuleCase("GRU", size=(5, 9, 8, 7), packed="sorted", bidirectional=True, num_layers=2),
    ModuleCase("RNN_RELU", size=(5, 9, 8, 7), packed="unsorted", h0=True),
    ModuleCase("LSTM", size=(40, 1, 3, 5), bidirectional=True, dtype=torch.float64),
    ModuleCase("LSTM", size=(5, 3, 4, 2), proj=True, bidirectional=True, h0=True),
]


@pytest.mark.parametrize("engine, case", engine_params(PACKED_AND_LONG))
def test_matches_reference_packed_and_long(engine, case):
    check_case(engine, case)


SATURATED = [
    ModuleCase(mode, size=(6, 3, 4, 5), dtype=dtype, h0=True)
    for mode in ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")
    for dtype in (torch.float32, torch.float64)
]


@pytest.mark.parametrize("engine, case", engine_params(SATURATED))
def test_saturated_gates(engine, case):
    """Pre-activations around +-1e3: exp overflows inside sigmoid and tanh, no NaN appears."""
    check_case(engine, case, scale=300.0)


DROPOUT = [
    ModuleCase(mode, num_layers=3, bidirectional=bidir, packed=packed, dropout=0.4)
    for mode in ("LSTM", "GRU", "RNN_TANH")
    for bidir, packed in ((False, "none"), (True, "unsorted"))
] + [
    ModuleCase("LSTM", num_layers=2, proj=True, h0=True, dropout=0.5, dtype=torch.float64),
    ModuleCase("LSTM", num_layers=2, proj=True, h0=True, dropout=0.5, batch_first=True),
]


@pytest.mark.parametrize("engine, case", engine_params(DROPOUT))
def test_dropout_masks_match_reference(engine, case):
    """Inter-layer dropout draws the reference's (and so torch's) masks under one seed."""
    check_case(engine, case)


def _cast(inp: CaseInputs, dtype: torch.dtype) -> CaseInputs:
    states = {k: v.to(dtype) for k, v in inp.states.items()}
    return CaseInputs(inp.x.to(dtype), states, inp.lengths)


HALF = [
    pytest.param(case, dtype, id=f"{case.id}-{name}")
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float16, "f16"))
    for case in (
        ModuleCase("LSTM", size=(7, 3, 5, 6), proj=True, h0=True),
        ModuleCase("LSTM", size=(7, 3, 5, 6), num_layers=2),
        ModuleCase("GRU", size=(7, 3, 5, 6), bidirectional=True, packed="unsorted", h0=True),
        ModuleCase("RNN_TANH", size=(7, 3, 5, 6), h0=True),
    )
]


@pytest.mark.parametrize("engine, case, dtype", engine_params(HALF))
def test_half_precision(engine, case, dtype):
    """float16/bfloat16 with float32 state and pointwise math: within the tolerance table of
    ``dtype`` of the float32 reference on the same (rounded) values, and at least about as
    close to it as the reference engine run in ``dtype`` itself. Triton's interpreter casts
    float32 to bfloat16 by truncation (compiled kernels round to nearest even), a bias that
    adds up over the rows of a weight gradient: there only the tolerance table applies."""
    module = engine_module(engine, case).to(dtype)
    truth_module = copy.deepcopy(module).float()
    truth_module.engine = "reference"
    _, half_reference = with_reference(module)
    half = on_device(engine, _cast(case.inputs(), dtype))
    single = on_device(engine, _cast(half, torch.float32))
    # oneDNN's bfloat16 GEMMs can die on CPUs that list AMX without enabling it (README)
    with torch.backends.mkldnn.flags(enabled=False):
        truth, _ = run(case, truth_module, single)
        actual, _ = run(case, module, half)
        own, _ = run(case, half_reference, half)
    strict = not (engine.interpreted and dtype == torch.bfloat16)
    assert_matches_reference(
        actual, own, engine=engine.name, truth=truth, dtype=dtype, strict=strict
    )


def _gradcheck(engine, fn, inputs) -> bool:
    """gradcheck; interpreted, in its fast mode (one random direction per input) and without its
    undefined-gradient pass, which autograd answers with zeros before the kernels see it."""
    return torch.autograd.gradcheck(
        fn,
        inputs,
        eps=1e-6,
        atol=1e-7,
        fast_mode=engine.interpreted,
        check_undefined_grad=not engine.interpreted,
    )


GRADCHECK = [
    pytest.param("LSTM", dict(bidirectional=True, proj_size=2), True, id="LSTM-bidir-proj2-packed"),
    pytest.param("GRU", dict(bidirectional=True), True, id="GRU-bidir-packed"),
    pytest.param("GRU", dict(bias=False, batch_first=True), False, id="GRU-nobias-bf"),
    pytest.param("RNN_RELU", dict(), True, id="RNNrelu-packed"),
]
# more than the light engines' interpreters afford
GRADCHECK_MULTILAYER = [
    pytest.param("LSTM", dict(num_layers=2), False, id="LSTM-l2"),
    pytest.param("RNN_TANH", dict(num_layers=2, bidirectional=True), False, id="RNNtanh-l2-bidir"),
]


@pytest.mark.parametrize(
    "engine, mode, kw, packed", engine_params(GRADCHECK + GRADCHECK_MULTILAYER, light=GRADCHECK)
)
def test_gradcheck(engine, mode, kw, packed):
    """The hand-written backward against finite differences, in float64 on tiny layers."""
    torch.manual_seed(0)
    module = layer(engine, mode, input_size=3, hidden_size=4, **kw)
    L, N = 4, 3
    bf = kw.get("batch_first", False)
    D, H_out = (2 if kw.get("bidirectional") else 1), kw.get("proj_size") or 4
    lead = (D * kw.get("num_layers", 1), N)
    x = randn64(engine, *((N, L, 3) if bf else (L, N, 3)))
    h0, c0 = randn64(engine, *lead, H_out), randn64(engine, *lead, 4)
    names = [name for name, _ in module.named_parameters()]
    lengths = torch.tensor([4, 2, 3])

    def fn(x, h0, c0, *weights):
        inp = pack_padded_sequence(x, lengths, bf, enforce_sorted=False) if packed else x
        hx = (h0, c0) if mode == "LSTM" else h0
        out, hidden = torch.func.functional_call(
            module, dict(zip(names, weights, strict=True)), (inp, hx)
        )
        out = out.data if packed else out
        return (out, *(hidden if mode == "LSTM" else (hidden,)))

    assert _gradcheck(engine, fn, (x, h0, c0, *module.parameters()))


DOUBLE_BACKWARD = [
    pytest.param("LSTM", dict(proj_size=2, bidirectional=True), False, 4, 3, id="LSTM-proj-bidir"),
    pytest.param("GRU", dict(num_layers=2), True, 4, 3, id="GRU-l2-packed"),
    pytest.param("RNN_TANH", dict(bias=False, bidirectional=True), True, 4, 3, id="RNN-packed"),
]
# the stand-in that Triton's interpreter affords: a shorter sequence, fewer rows, not packed
DOUBLE_BACKWARD_LIGHT = [
    pytest.param(
        "LSTM", dict(proj_size=2, bidirectional=True), False, 3, 2, id="LSTM-proj-bidir-L3"
    ),
]


@pytest.mark.parametrize(
    "engine, mode, kw, packed, L, N", engine_params(DOUBLE_BACKWARD, light=DOUBLE_BACKWARD_LIGHT)
)
def test_double_backward(engine, mode, kw, packed, L, N):
    """create_graph=True recomputes through torch ops: gradgradcheck holds on the engine."""
    module = layer(engine, mode, input_size=3, hidden_size=4, **kw)
    names = [name for name, _ in module.named_parameters()]
    x = randn64(engine, L, N, 3)
    lengths = torch.tensor([4, 2, 3])

    def fn(x, *weights):
        inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x
        out, _ = torch.func.functional_call(module, dict(zip(names, weights, strict=True)), (inp,))
        return out.data if packed else out

    params = [p.detach().clone().requires_grad_() for p in module.parameters()]
    assert torch.autograd.gradgradcheck(fn, (x, *params), fast_mode=True)


# (L, N) and the lengths of a packed input (None: not packed)
LENGTHS = [50, 17, 49, 3]
RETAIN_GRAPH = [
    pytest.param("LSTM", dict(bidirectional=True), (50, 4), None, id="LSTM-bidir"),
    pytest.param(
        "LSTM",
        dict(bidirectional=True, proj_size=2),
        (50, 4),
        LENGTHS,
        id="LSTM-bidir-proj2-packed",
    ),
    pytest.param("GRU", dict(bidirectional=True), (50, 4), None, id="GRU-bidir"),
    pytest.param("GRU", dict(num_layers=2), (50, 4), LENGTHS, id="GRU-l2-packed"),
    pytest.param("RNN_TANH", dict(bidirectional=True), (50, 4), LENGTHS, id="RNNtanh-bidir-packed"),
]
# the stand-in that Triton's interpreter affords: 5 steps, 2 rows, not packed
RETAIN_GRAPH_LIGHT = [
    pytest.param("LSTM", dict(bidirectional=True), (5, 2), None, id="LSTM-bidir-L5"),
]


@pytest.mark.parametrize(
    "engine, mode, kw, size, lengths", engine_params(RETAIN_GRAPH, light=RETAIN_GRAPH_LIGHT)
)
def test_backward_twice_with_retain_graph(engine, mode, kw, size, lengths):
    """The saved buffers survive a backward with retain_graph=True; the last backward, which
    may write its gate gradients over them, gives the same gradients, bit for bit."""
    module = layer(engine, mode, input_size=3, hidden_size=4, **kw)
    x = randn64(engine, *size, 3)
    inp = (
        x
        if lengths is None
        else pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
    )
    out, _ = module(inp)
    loss = (out if lengths is None else out.data).sum()
    leaves = [x, *module.parameters()]
    first = torch.autograd.grad(loss, leaves, retain_graph=True)
    second = torch.autograd.grad(loss, leaves, retain_graph=True)
    last = torch.autograd.grad(loss, leaves)
    for a, b, c in zip(first, second, last, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("engine", each_engine())
def test_inference_matches_training_forward(engine):
    """no_grad runs the loops without saving; same values as the graph-building forward."""
    module = layer(engine, "LSTM", input_size=3, hidden_size=5, proj_size=2, bidirectional=True)
    x = randn64(engine, 4, 3, 3)
    with torch.no_grad():
        inference = module(x.detach())
    training = module(x)
    assert torch.equal(inference[0], training[0])
    assert all(torch.equal(a, b) for a, b in zip(inference[1], training[1], strict=True))


@pytest.mark.parametrize("engine", each_engine())
def test_non_contiguous_states_and_empty_batch(engine):
    module, reference = with_reference(
        layer(engine, "LSTM", input_size=3, hidden_size=4, num_layers=2)
    )
    h0 = torch.randn(2, 4, 2, dtype=torch.float64, device=engine.device).transpose(1, 2)
    c0 = torch.randn(2, 2, 4, dtype=torch.float64, device=engine.device)
    x = randn64(engine, 5, 2, 3)
    runs = []
    for m in (reference, module):
        out, (h_n, c_n) = m(x, (h0, c0))
        runs.append({"output": out, "h_n": h_n, "c_n": c_n})
    expected, actual = runs
    assert_matches_reference(actual, expected, engine=engine.name)
    out, (h_n, _) = module(randn64(engine, 5, 0, 3))
    assert out.shape == (5, 0, 4) and h_n.shape == (2, 0, 4)


@pytest.mark.parametrize("engine", each_engine())
def test_cells_go_to_the_reference(engine):
    """Named, the engine raises why; it never falls back."""
    x = torch.randn(2, 4, device=engine.device)
    with pytest.raises(RuntimeError, match=f"{engine.name}: cells not supported"):
        rnnkit.GRUCell(4, 5, engine=engine.name).to(engine.device)(x)


BATCHED = [
    pytest.param(
        "LSTM", dict(bidirectional=True, num_layers=2, proj_size=2), id="LSTM-bidir-l2-proj2"
    ),
    pytest.param("GRU", dict(bidirectional=True), id="GRU-bidir"),
    pytest.param("RNN_RELU", dict(num_layers=2), id="RNNrelu-l2"),
    pytest.param("LSTM", dict(layer_norm=True, peephole=True, zoneout=0.2), id="LSTM-variants"),
]


@pytest.mark.parametrize("engine, mode, kw", engine_params(BATCHED))
def test_batched_gradients(engine, mode, kw):
    """``torch.autograd.grad(..., is_grads_batched=True)`` (what ``gradcheck``'s
    ``check_batched_grad`` and jacobians use): a batch of output gradients through the
    hand-written backward, whose kernels have no batching rule, gives the reference's."""
    torch.manual_seed(0)
    module, reference = with_reference(layer(engine, mode, input_size=3, hidden_size=4, **kw))
    module.train(), reference.train()
    x = randn64(engine, 5, 2, 3)
    results = []
    for m in (reference, module):
        torch.manual_seed(1)
        out = m(x)[0]
        v = torch.randn(3, *out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(2))
        results.append(
            torch.autograd.grad(out, [x, *m.parameters()], v.to(out.device), is_grads_batched=True)
        )
    names = ["grad_input", *(f"grad_{n}" for n, _ in module.named_parameters())]
    expected, actual = (dict(zip(names, r, strict=True)) for r in results)
    assert expected["grad_input"].shape[0] == 3
    assert_matches_reference(actual, expected, engine=engine.name)

    # and gradcheck's own batched-gradient check, masks fixed by seed
    def fn(x):
        torch.manual_seed(1)
        return module(x)[0]

    assert torch.autograd.gradcheck(fn, (x,), check_batched_grad=True)

"""Reliability: NaN and Inf propagate as in torch; results repeat bit for bit; threads agree;
checkpoints round-trip; the reference engine's no-graph path equals its graph path.

Memory (a long sequence, thousands of training calls) is in ``test_memory.py``; malformed
inputs in ``test_validation.py`` and ``test_fuzz.py``.
"""

import copy
import io
import pickle
import threading

import pytest
import torch
from torch import nn

import rnnkit
from grid import ModuleCase
from parity import assert_bitwise, assert_engine_close, truth_of
from rnnkit.testing import aten_path

CPU_ENGINES = ("reference", "fused", "auto")

# (id, where, index) of one non-finite entry; states are [D*num_layers, N, H]
POISON = [
    ("x-nan", "x", (2, 1, 0), float("nan")),
    ("x-inf", "x", (2, 1, 0), float("inf")),
    ("x-neginf", "x", (0, 2, 3), float("-inf")),
    ("h0-nan", "h0", (1, 2, 0), float("nan")),
    ("h0-inf", "h0", (0, 0, 1), float("inf")),
    ("c0-nan", "c0", (2, 1, 1), float("nan")),
    ("c0-inf", "c0", (3, 0, 2), float("-inf")),
]
NAN_CASES = [
    (ModuleCase(mode, **kw, h0=True, size=(5, 3, 4, 6)), where, index, value, i)
    for mode in ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")
    for kw in (dict(num_layers=2, bidirectional=True), dict(proj=mode == "LSTM"))
    for i, where, index, value in POISON
    if where != "c0" or mode == "LSTM"
    if index[0] < (4 if kw.get("num_layers") else 1) or where == "x"
]


def _nan_params(fused: bool):
    return [
        pytest.param(
            case, where, index, value,
            id=f"{case.id}-{i}",
        )
        for case, where, index, value, i in NAN_CASES
    ]  # fmt: skip


def _poisoned(case: ModuleCase, where: str, index, value):
    inp = case.inputs()
    with torch.no_grad():
        (inp.x if where == "x" else inp.states[where])[index] = value
    return inp


def _nonfinite(tensors):
    return {k: int((~v.isfinite()).sum()) for k, v in tensors.items() if v is not None}


@pytest.mark.parametrize("case,where,index,value", _nan_params(fused=False))
def test_nan_and_inf_propagate_as_in_torch(case, where, index, value):
    """The reference engine: the same bits as torch's ATen path, NaN where NaN, forward and
    backward."""
    ref, reference = case.modules("reference")
    inp = _poisoned(case, where, index, value)
    with aten_path():
        expected, _ = case.run(ref, inp)
    actual, _ = case.run(reference, inp)
    assert_bitwise(expected, actual)
    assert any(_nonfinite(expected).values()), "the poison must reach the outputs"


def assert_same_nonfinite(expected, actual, truth):
    """NaN and infinities where ``expected`` has them, finite values to rounding: against
    ``truth`` (a float64 run of the reference, the same names; None for a float64 case) by
    :func:`parity.assert_engine_close`."""
    assert_engine_close(expected, actual, truth, "differs from the reference engine")
    assert _nonfinite(actual) == _nonfinite(expected)


@pytest.mark.parametrize("case,where,index,value", _nan_params(fused=True))
def test_nan_and_inf_propagate_on_fused_as_on_reference(case, where, index, value):
    _, reference = case.modules("reference")
    _, fused = case.modules("fused")
    inp = _poisoned(case, where, index, value)
    expected, actual = case.run(reference, inp)[0], case.run(fused, inp)[0]
    assert_same_nonfinite(expected, actual, case.truth(reference, inp))


@pytest.mark.parametrize("where", ["x", "h0", "c0"])
def test_nan_propagates_through_fused_variants_as_on_reference(where):
    torch.manual_seed(0)
    fused = rnnkit.LSTM(4, 6, 2, layer_norm=True, peephole=True, proj_size=3, engine="fused")
    reference = copy.deepcopy(fused)
    reference.engine = "reference"
    x = torch.randn(5, 3, 4)
    hx = [torch.randn(2, 3, 3), torch.randn(2, 3, 6)]
    with torch.no_grad():
        {"x": x, "h0": hx[0], "c0": hx[1]}[where][1, 1, 1] = float("nan")

    def run(module, x, h0, c0):
        leaves = [t.clone().requires_grad_() for t in (x, h0, c0)]
        out, (h, c) = module(leaves[0], tuple(leaves[1:]))
        # drawn in float32 whatever the run's dtype: its float64 truth gets the same weights
        weights = torch.linspace(-1, 1, out.numel()).to(out.dtype).view_as(out)
        loss = (out * weights).sum() + h.sum() + c.sum()
        grads = torch.autograd.grad(loss, [*leaves, *module.parameters()])
        named = {f"grad_{i}": g for i, g in enumerate(grads)}
        return {"output": out, "h_n": h, "c_n": c, **named}

    runs = [run(module, x, *hx) for module in (reference, fused)]
    assert_same_nonfinite(*runs, truth_of(run, reference, x, *hx))


DETERMINISM_CASES = [
    ModuleCase("LSTM", num_layers=2, bidirectional=True, proj=True, h0=True, dropout=0.3),
    ModuleCase("GRU", num_layers=2, packed="unsorted", h0=True, dtype=torch.float64),
    ModuleCase("RNN_RELU", batch_first=True, size=(40, 8, 16, 32)),
]


@pytest.mark.parametrize("engine", CPU_ENGINES)
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in DETERMINISM_CASES])
def test_repeated_calls_are_bit_identical(case, engine):
    """Outputs, final states and every gradient, twice from the same seed (dropout included)."""
    _, module = case.modules(engine)
    module.train(case.dropout > 0)
    inp = case.inputs()
    runs = []
    for _ in range(3):
        torch.manual_seed(5)
        runs.append(case.run(module, inp)[0])
    assert_bitwise(runs[0], runs[1])
    assert_bitwise(runs[0], runs[2])


@pytest.mark.parametrize("engine", CPU_ENGINES)
def test_variant_repeats_bit_identically(engine):
    module = rnnkit.LSTM(4, 6, 2, layer_norm=True, peephole=True, zoneout=0.2, engine=engine)
    x = torch.randn(7, 3, 4, requires_grad=True)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        out, (h, c) = module(x)
        loss = out.square().sum() + h.sum() + c.sum()
        grads = torch.autograd.grad(loss, [x, *module.parameters()])
        runs.append({"out": out, "h": h, "c": c, **{f"grad{i}": g for i, g in enumerate(grads)}})
    assert_bitwise(*runs)


NO_GRAD_CASES = [
    ModuleCase("LSTM", num_layers=2, bidirectional=True, proj=True, h0=True),
    ModuleCase("LSTM", packed="unsorted", bidirectional=True, num_layers=2),
    ModuleCase("GRU", batch_first=True, bidirectional=True, dtype=torch.float64),
    ModuleCase("GRU", packed="sorted", num_layers=3, h0=True),
    ModuleCase("RNN_TANH", batched=False, bidirectional=True),
    ModuleCase("RNN_RELU", size=(6, 0, 3, 5)),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in NO_GRAD_CASES])
def test_reference_no_graph_path_equals_graph_path(case):
    """Without a graph the reference engine writes each step into its output: the same bits as
    the list it keeps (and joins, as ATen does) when autograd records."""
    _, module = case.modules("reference")
    inp = case.inputs()
    with_graph, _ = case.forward(module, inp)
    assert with_graph["output"].requires_grad
    with torch.no_grad():
        without, _ = case.forward(module, inp)
    with torch.inference_mode():
        inference, _ = case.forward(module, inp)
    assert_bitwise(with_graph, without)
    assert_bitwise(with_graph, inference)


def test_reference_no_graph_path_for_variants():
    module = rnnkit.LSTM(4, 6, 2, bidirectional=True, layer_norm=True, zoneout=0.3)
    module.engine = "reference"
    x = torch.randn(5, 3, 4)
    for training in (False, True):
        module.train(training)
        torch.manual_seed(0)
        expected = module(x.requires_grad_())
        torch.manual_seed(0)
        with torch.no_grad():
            actual = module(x)
        assert_bitwise(
            {"out": expected[0], "h": expected[1][0], "c": expected[1][1]},
            {"out": actual[0], "h": actual[1][0], "c": actual[1][1]},
        )


@pytest.mark.parametrize("engine", ["reference", "fused"])
@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
def test_concurrent_no_grad_calls_match_sequential_ones(name, engine):
    """Four threads calling one module at once get what one thread gets, call by call."""
    torch.manual_seed(0)
    module = getattr(rnnkit, name)(8, 16, 2, bidirectional=True, engine=engine).eval()
    inputs = [torch.randn(12, 4, 8) for _ in range(16)]
    with torch.no_grad():
        expected = [module(x)[0] for x in inputs]
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def work(first: int) -> None:
        start.wait()
        try:
            with torch.no_grad():
                for i in range(first, len(inputs), 4):
                    results[i] = module(inputs[i])[0]
        except BaseException as e:  # reported below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, e in enumerate(expected):
        assert torch.equal(results[i], e), f"call {i} differs from the sequential one"


# Modules whose state_dict, pickle and deepcopy must round-trip exactly
CHECKPOINT_MODULES = {
    "lstm-variants": lambda: rnnkit.LSTM(4, 6, 2, layer_norm=True, peephole=True, proj_size=3),
    "gru-layer-norm-bidir": lambda: rnnkit.GRU(4, 6, bidirectional=True, layer_norm=True),
    "rnn-relu": lambda: rnnkit.RNN(4, 6, nonlinearity="relu", engine="fused"),
    "lstm-cell-variants": lambda: rnnkit.LSTMCell(4, 6, layer_norm=True, peephole=True),
    "gru-cell": lambda: rnnkit.GRUCell(4, 6, bias=False),
}


def _randomized(make):
    # parameters away from their init (the layer-norm gains start at exactly 1)
    torch.manual_seed(0)
    module = make()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p))
    return module


def _call(module):
    x = torch.randn(3, 4) if isinstance(module, rnnkit.RNNCellBase) else torch.randn(5, 3, 4)
    out = module(x)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("make", list(CHECKPOINT_MODULES.values()), ids=list(CHECKPOINT_MODULES))
def test_checkpoints_round_trip_exactly(make):
    module = _randomized(make)
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = make()
    fresh.load_state_dict(state, strict=True)
    # the whole module under torch.load's default weights_only=True, only its public class
    # allowlisted (rnnkit's Variant, plain values, is allowlisted by rnnkit itself)
    whole = io.BytesIO()
    torch.save(torch.nn.Sequential(module), whole)
    whole.seek(0)
    with torch.serialization.safe_globals([torch.nn.Sequential, type(module)]):
        loaded = torch.load(whole)[0]
    copies = {
        "state_dict": fresh,
        "whole module, weights_only": loaded,
        "pickle": pickle.loads(pickle.dumps(module)),
        "deepcopy": copy.deepcopy(module),
    }
    torch.manual_seed(1)
    expected = _call(module)
    for how, restored in copies.items():
        assert list(restored.state_dict()) == list(module.state_dict()), how
        for (name, p), q in zip(
            module.state_dict().items(), restored.state_dict().values(), strict=True
        ):
            assert torch.equal(p, q) and p.dtype == q.dtype, f"{how}: {name}"
        assert repr(restored) == repr(module), how
        assert restored.variant == module.variant, how
        torch.manual_seed(1)
        assert torch.equal(_call(restored), expected), how


@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"])
def test_bad_checkpoints_fail_with_torchs_message(name):
    """A missing key, an unexpected one and a shape mismatch: torch's load_state_dict message."""
    torch.manual_seed(0)
    ours, theirs = getattr(rnnkit, name)(4, 6), getattr(nn, name)(4, 6)
    good = theirs.state_dict()
    first, second = list(good)[:2]
    bad = {
        "missing": {k: v for k, v in good.items() if k != first},
        "unexpected": {**good, "weight_xx_l7": torch.zeros(1)},
        "shape": {**good, second: torch.zeros(good[second].shape[0] + 1, *good[second].shape[1:])},
    }
    for kind, state in bad.items():
        with pytest.raises(RuntimeError) as expected:
            theirs.load_state_dict(state)
        with pytest.raises(RuntimeError) as actual:
            ours.load_state_dict(state)
        assert str(actual.value) == str(expected.value), kind
        assert "Error(s) in loading state_dict" in str(actual.value)


def test_variant_checkpoint_into_a_plain_layer_fails():
    state = rnnkit.LSTM(4, 6, peephole=True).state_dict()
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "peephole_l0"'):
        rnnkit.LSTM(4, 6).load_state_dict(state)
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "peephole_l0"'):
        rnnkit.LSTM(4, 6, peephole=True).load_state_dict(nn.LSTM(4, 6).state_dict())

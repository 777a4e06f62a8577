"""rnnkit.functional against torch._VF (ATen's functions) and against rnnkit's own modules.

Against torch, bit for bit on the reference engine and to rounding on the default engine
(``parity.ENGINES``).
"""

from functools import partial

import pytest
import torch
from torch import _VF, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import rnnkit
import rnnkit.functional as RF
from grid import ModuleCase
from parity import (
    ENGINES,
    assert_bitwise,
    assert_close,
    assert_parity,
    grads,
    same_outcome,
    truth_of,
)
from rnnkit.testing import aten_path

FUNCTIONS = {"LSTM": RF.lstm, "GRU": RF.gru, "RNN_TANH": RF.rnn_tanh, "RNN_RELU": RF.rnn_relu}
VF = {"LSTM": _VF.lstm, "GRU": _VF.gru, "RNN_TANH": _VF.rnn_tanh, "RNN_RELU": _VF.rnn_relu}
CELL_FUNCTIONS = {
    "LSTM": (RF.lstm_cell, _VF.lstm_cell),
    "GRU": (RF.gru_cell, _VF.gru_cell),
    "RNN_TANH": (RF.rnn_tanh_cell, _VF.rnn_tanh_cell),
    "RNN_RELU": (RF.rnn_relu_cell, _VF.rnn_relu_cell),
}

LAYER_CASES = [
    ModuleCase("LSTM", num_layers=2, bidirectional=True, h0=True, dtype=torch.float64),
    ModuleCase("LSTM", num_layers=3, proj=True, batch_first=True, h0=True),
    ModuleCase("LSTM", bias=False, num_layers=2, packed="sorted", h0=True),
    ModuleCase("GRU", num_layers=2, bidirectional=True, batch_first=True, h0=True),
    ModuleCase("GRU", bidirectional=True, packed="sorted", h0=True, dtype=torch.float64),
    ModuleCase("RNN_TANH", num_layers=2, bias=False, h0=True),
    ModuleCase("RNN_RELU", bidirectional=True, num_layers=2, packed="sorted", h0=True),
]


def _flat(mode, hidden):
    return {"h_n": hidden[0], "c_n": hidden[1]} if mode == "LSTM" else {"h_n": hidden}


def _vf_call(case, weights, x, hx, lengths, dropout=0.0, train=False):
    """torch._VF.<mode> as torch.nn calls it (explicit state, packed data + batch_sizes)."""
    fn = VF[case.mode]
    options = (case.bias, case.num_layers, dropout, train, case.bidirectional)
    if lengths is not None:
        packed = pack_padded_sequence(x, lengths, case.batch_first)
        out = fn(packed.data, packed.batch_sizes, hx, weights, *options)
    else:
        out = fn(x, hx, weights, *options, case.batch_first)
    return out[0], out[1:] if case.mode == "LSTM" else out[1]


def _rk_call(case, weights, x, hx, lengths, dropout=0.0, train=False, engine="auto"):
    """rnnkit.functional.<mode> on the same arguments (packed data + batch_sizes keyword)."""
    options = dict(
        has_biases=case.bias,
        num_layers=case.num_layers,
        dropout=dropout,
        train=train,
        bidirectional=case.bidirectional,
        engine=engine,
    )
    if lengths is not None:
        packed = pack_padded_sequence(x, lengths, case.batch_first)
        out = FUNCTIONS[case.mode](
            packed.data, weights, hx, batch_sizes=packed.batch_sizes, **options
        )
    else:
        out = FUNCTIONS[case.mode](x, weights, hx, batch_first=case.batch_first, **options)
    return out[0], out[1:] if case.mode == "LSTM" else out[1]


def _run(call, case, weights, inp, **kwargs):
    hx = tuple(inp.states.values()) if case.mode == "LSTM" else inp.states["h0"]
    out, hidden = call(case, weights, inp.x, hx, inp.lengths, **kwargs)
    tensors = {"output": out, **_flat(case.mode, hidden)}
    return {**tensors, **grads(tensors, {"input": inp.x, **inp.states, **dict(enumerate(weights))})}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in LAYER_CASES])
def test_layers_match_vf(case, engine):
    ref, _ = case.modules()
    weights = [w.detach().clone().requires_grad_() for w in ref._flat_weights]
    inp = case.inputs()
    with aten_path():
        expected = _run(_vf_call, case, weights, inp)
    actual = _run(_rk_call, case, weights, inp, engine=engine)
    truth = truth_of(partial(_run, _vf_call, case), weights, inp)
    assert_parity(expected, actual, engine, truth=truth)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in LAYER_CASES[:4]])
def test_dropout_matches_vf(case, engine):
    ref, _ = case.modules()
    weights = [w.detach().clone().requires_grad_() for w in ref._flat_weights]
    inp = case.inputs()
    vf = partial(_run, _vf_call, case, dropout=0.6, train=True)
    with aten_path():
        torch.manual_seed(7)
        expected = vf(weights, inp)
    torch.manual_seed(7)
    actual = _run(_rk_call, case, weights, inp, dropout=0.6, train=True, engine=engine)
    assert_parity(expected, actual, engine, truth=truth_of(vf, weights, inp, seed=7))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("packed", ["none", "unsorted"])
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH", "RNN_RELU"])
def test_layers_match_rnnkit_modules(mode, packed, engine):
    """The functional layer on a module's _flat_weights is the module, PackedSequence included.

    Both on one engine: the same call, so the same bits.
    """
    case = ModuleCase(mode, num_layers=2, bidirectional=True, packed=packed, h0=True)
    _, module = case.modules(engine)
    inp = case.inputs()
    x = inp.x
    if case.is_packed:
        x = pack_padded_sequence(x, inp.lengths, enforce_sorted=False)
    hx = tuple(inp.states.values()) if mode == "LSTM" else inp.states["h0"]
    expected_out, expected_hidden = module(x, hx)
    out, *hidden = FUNCTIONS[mode](
        x, module._flat_weights, hx, num_layers=2, bidirectional=True, engine=engine
    )
    if case.is_packed:
        assert isinstance(out, PackedSequence)
        for name in ("batch_sizes", "sorted_indices", "unsorted_indices"):
            assert torch.equal(getattr(out, name), getattr(expected_out, name)), name
        out, expected_out = out.data, expected_out.data
    expected = {"output": expected_out, **_flat(mode, expected_hidden)}
    assert_bitwise(
        expected, {"output": out, **_flat(mode, hidden if mode == "LSTM" else hidden[0])}
    )


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_RELU"])
def test_default_state_is_zeros(mode, engine):
    case = ModuleCase(mode, num_layers=2, proj=mode == "LSTM", batch_first=True)
    ref, _ = case.modules()
    x = case.inputs().x
    N = x.size(0)
    h0 = torch.zeros(2, N, case.H_out)
    hx = (h0, torch.zeros(2, N, case.size[3])) if mode == "LSTM" else h0
    names = ["output", "h_n", "c_n"][: 3 if mode == "LSTM" else 2]

    def vf(x, hx, weights):
        out = VF[mode](x, hx, weights, True, 2, 0.0, False, False, True)
        return dict(zip(names, out, strict=True))

    with aten_path():
        expected = vf(x, hx, ref._flat_weights)
    actual = FUNCTIONS[mode](x, ref._flat_weights, num_layers=2, batch_first=True, engine=engine)
    truth = truth_of(vf, x, hx, ref._flat_weights)
    assert_parity(expected, dict(zip(names, actual, strict=True)), engine, truth=truth)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH", "RNN_RELU"])
def test_cells_match_vf(mode, dtype, bias, engine):
    gen = torch.Generator().manual_seed(0)
    G = {"LSTM": 4, "GRU": 3}.get(mode, 1)

    def randn(*shape):
        return torch.randn(shape, generator=gen, dtype=dtype).requires_grad_()

    x, w_ih, w_hh = randn(3, 5), randn(G * 7, 5), randn(G * 7, 7)
    biases = {"b_ih": randn(G * 7), "b_hh": randn(G * 7)} if bias else {}
    states = {"h": randn(3, 7), "c": randn(3, 7)} if mode == "LSTM" else {"h": randn(3, 7)}
    leaves = {"input": x, **states, "w_ih": w_ih, "w_hh": w_hh, **biases}
    ours, theirs = CELL_FUNCTIONS[mode]

    def run(fn, leaves):
        hx = (leaves["h"], leaves["c"]) if mode == "LSTM" else leaves["h"]
        b_ih, b_hh = leaves.get("b_ih"), leaves.get("b_hh")
        out = fn(leaves["input"], hx, leaves["w_ih"], leaves["w_hh"], b_ih, b_hh)
        tensors = {"h_1": out[0], "c_1": out[1]} if mode == "LSTM" else {"h_1": out}
        return {**tensors, **grads(tensors, leaves)}

    with aten_path():
        expected = run(theirs, leaves)
    actual = run(partial(ours, engine=engine), leaves)
    assert_parity(expected, actual, engine, truth=truth_of(partial(run, theirs), leaves))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH"])
def test_cells_match_rnnkit_cell_modules(mode, engine):
    name = {"RNN_TANH": "RNNCell"}.get(mode, mode + "Cell")
    cell = getattr(rnnkit, name)(5, 7, engine=engine)
    x = torch.randn(3, 5)
    hx = (torch.randn(3, 7), torch.randn(3, 7)) if mode == "LSTM" else torch.randn(3, 7)
    fn, _ = CELL_FUNCTIONS[mode]
    out = fn(x, hx, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh, engine=engine)
    expected = cell(x, hx)
    if mode == "LSTM":
        assert_bitwise({"h": expected[0], "c": expected[1]}, {"h": out[0], "c": out[1]})
    else:
        assert_bitwise({"h": expected}, {"h": out})


def test_engine_argument():
    m = nn.GRU(3, 4)
    x = torch.randn(2, 1, 3)
    assert "reference" in RF.available_engines()

    def gru(x, weights, engine="reference"):
        output, h_n = RF.gru(x, weights, engine=engine)
        return {"o": output, "h": h_n}

    # auto may pick a faster engine, which agrees with the reference to rounding
    assert_close(
        gru(x, m._flat_weights),
        gru(x, m._flat_weights, "auto"),
        truth=truth_of(gru, x, m._flat_weights),
    )
    for bad in ("no-such-engine", "", None):
        with pytest.raises(ValueError):
            RF.gru(x, m._flat_weights, engine=bad)
        with pytest.raises(ValueError):
            RF.gru_cell(x[0], torch.zeros(1, 4), m.weight_ih_l0, m.weight_hh_l0, engine=bad)
    with pytest.raises(TypeError):
        # everything after hx is keyword-only
        RF.gru(x, m._flat_weights, None, None, True)


def _lstm_args():
    m = nn.LSTM(5, 7, 2)
    x = torch.randn(4, 3, 5)
    h = (torch.zeros(2, 3, 7), torch.zeros(2, 3, 7))
    return m._flat_weights, x, h


# (id, rnnkit call, torch._VF call or None); rnnkit must raise wherever ATen fails, and also
# where ATen silently computes garbage (no shape check on a state or on the features)
W, X, HX = _lstm_args()
FUNCTIONAL_ERRORS = [
    (
        "empty-sequence",
        lambda: RF.lstm(torch.randn(0, 3, 5), W, HX, num_layers=2),
        lambda: _VF.lstm(torch.randn(0, 3, 5), HX, W, True, 2, 0.0, False, False, False),
    ),
    (
        "one-state",
        lambda: RF.lstm(X, W, HX[:1], num_layers=2),
        lambda: _VF.lstm(X, HX[:1], W, True, 2, 0.0, False, False, False),
    ),
    ("input-2d", lambda: RF.lstm(torch.randn(4, 5), W, HX, num_layers=2), None),
    ("features", lambda: RF.lstm(torch.randn(4, 3, 6), W, HX, num_layers=2), None),
    ("h-batch", lambda: RF.lstm(X, W, (torch.zeros(2, 4, 7), HX[1]), num_layers=2), None),
    ("c-hidden", lambda: RF.lstm(X, W, (HX[0], torch.zeros(2, 3, 6)), num_layers=2), None),
    ("weights-count", lambda: RF.lstm(X, W[:-1], HX, num_layers=2), None),
    ("layers-vs-weights", lambda: RF.lstm(X, W, HX, num_layers=3), None),
    ("input-dtype", lambda: RF.lstm(X.double(), W, HX, num_layers=2), None),
    (
        "cell-input-size",
        lambda: RF.gru_cell(torch.randn(3, 6), torch.zeros(3, 7), *nn.GRUCell(5, 7).parameters()),
        lambda: _VF.gru_cell(torch.randn(3, 6), torch.zeros(3, 7), *nn.GRUCell(5, 7).parameters()),
    ),
    (
        "cell-hidden-size",
        lambda: RF.rnn_tanh_cell(
            torch.randn(3, 5), torch.zeros(3, 8), *nn.RNNCell(5, 7).parameters()
        ),
        lambda: _VF.rnn_tanh_cell(
            torch.randn(3, 5), torch.zeros(3, 8), *nn.RNNCell(5, 7).parameters()
        ),
    ),
    (
        "cell-batch",
        lambda: RF.lstm_cell(
            torch.randn(3, 5), (torch.zeros(4, 7),) * 2, *nn.LSTMCell(5, 7).parameters()
        ),
        lambda: _VF.lstm_cell(
            torch.randn(3, 5), (torch.zeros(4, 7),) * 2, *nn.LSTMCell(5, 7).parameters()
        ),
    ),
    (
        "cell-three-states",
        lambda: RF.lstm_cell(
            torch.randn(3, 5), (torch.zeros(3, 7),) * 3, *nn.LSTMCell(5, 7).parameters()
        ),
        lambda: _VF.lstm_cell(
            torch.randn(3, 5), (torch.zeros(3, 7),) * 3, *nn.LSTMCell(5, 7).parameters()
        ),
    ),
    (
        "cell-input-1d",
        lambda: RF.gru_cell(torch.randn(5), torch.zeros(7), *nn.GRUCell(5, 7).parameters()),
        None,
    ),
]


@pytest.mark.parametrize("ours,theirs", [pytest.param(o, t, id=i) for i, o, t in FUNCTIONAL_ERRORS])
def test_functional_errors(ours, theirs):
    if theirs is None:
        with pytest.raises((RuntimeError, ValueError)):
            ours()
    else:
        assert same_outcome(theirs, ours) is not None

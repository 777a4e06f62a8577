"""rnnkit.convert and rnnkit.revert: every recurrent layer swapped, nothing else changed.

The converted model's numbers: bit for bit against torch on the reference engine, to rounding
on the default engine (``parity.ENGINES``).
"""

import copy

import pytest
import torch
from torch import nn

import rnnkit
from parity import ENGINES, assert_bitwise, assert_parity, truth_of
from rnnkit.testing import aten_path

PAIRS = {
    nn.LSTM: rnnkit.LSTM,
    nn.GRU: rnnkit.GRU,
    nn.RNN: rnnkit.RNN,
    nn.LSTMCell: rnnkit.LSTMCell,
    nn.GRUCell: rnnkit.GRUCell,
    nn.RNNCell: rnnkit.RNNCell,
}


class Model(nn.Module):
    """Every layer kind, nested in Sequential, ModuleList and ModuleDict, around a Linear."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 5)
        self.encoder = nn.Sequential(
            nn.LSTM(5, 6, num_layers=2, bidirectional=True, proj_size=2, dropout=0.3)
        )
        self.stack = nn.ModuleList([nn.GRU(4, 5, batch_first=True), nn.RNN(5, 4, 2, "relu")])
        self.cells = nn.ModuleDict(
            {"lstm": nn.LSTMCell(4, 3), "gru": nn.GRUCell(3, 3), "rnn": nn.RNNCell(3, 2, False)}
        )
        self.head = nn.Linear(2, 1)

    def forward(self, x):
        y, _ = self.encoder[0](self.embed(x))  # [L, N, 4]
        y, _ = self.stack[0](y.transpose(0, 1))  # [N, L, 5]
        y, _ = self.stack[1](y.transpose(0, 1))  # [L, N, 4]
        h, c = self.cells["lstm"](y[-1])
        h = self.cells["gru"](h)
        return self.head(self.cells["rnn"](h)) + c.sum()


def _layers(model):
    return {
        name: m
        for name, m in model.named_modules()
        if type(m) in PAIRS or type(m) in PAIRS.values()
    }


def _repr(torch_layer, engine):
    """The repr of ``torch_layer`` converted to ``engine``: torch's, plus a non-default engine."""
    text = repr(torch_layer)
    return text if engine == "auto" else f"{text[:-1]}, engine={engine!r})"


def _numbered(tensors):
    return {f"out_{i}": t for i, t in enumerate(tensors)}


def _outputs_and_grads(model, x):
    out = model(x)
    g = torch.autograd.grad(out.sum(), [x, *model.parameters()])
    return {"out": out, **{f"grad_{i}": t for i, t in enumerate(g)}}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("training", [False, True])
def test_convert_swaps_every_layer_and_keeps_outputs(training, engine):
    torch.manual_seed(0)
    model = Model().train(training)
    reference = copy.deepcopy(model)
    x = torch.randn(7, 2, 3, requires_grad=True)
    params_before = dict(model.named_parameters())

    converted = rnnkit.convert(model, engine=engine)
    assert converted is model
    layers = _layers(converted)
    assert len(layers) == 6
    for name, layer in layers.items():
        expected_type = PAIRS[type(_layers(reference)[name])]
        assert type(layer) is expected_type, name
        assert layer.engine == engine, name
        assert layer.training == training, name
        assert repr(layer) == _repr(_layers(reference)[name], engine)
    # the very same Parameter objects: an optimizer built before the call keeps working
    assert all(p is params_before[n] for n, p in converted.named_parameters())
    assert type(converted.embed) is nn.Linear and type(converted.head) is nn.Linear

    with aten_path():
        torch.manual_seed(1)
        expected = _outputs_and_grads(reference, x)
    torch.manual_seed(1)
    actual = _outputs_and_grads(converted, x)
    truth = truth_of(_outputs_and_grads, reference, x, seed=1)
    assert_parity(expected, actual, engine, truth=truth)


def test_revert_goes_back_to_torch():
    torch.manual_seed(0)
    model = Model().eval()
    reference = copy.deepcopy(model)
    reverted = rnnkit.revert(rnnkit.convert(model))
    for name, layer in _layers(reverted).items():
        assert type(layer) is type(_layers(reference)[name]), name
    x = torch.randn(5, 2, 3, requires_grad=True)
    with aten_path():
        assert_bitwise(_outputs_and_grads(reference, x), _outputs_and_grads(reverted, x))
    assert reverted.state_dict().keys() == reference.state_dict().keys()


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.LSTM(3, 4, 2, bidirectional=True, proj_size=2),
        lambda: nn.GRU(3, 4, bias=False, batch_first=True),
        lambda: nn.RNN(3, 4, nonlinearity="relu"),
        lambda: nn.LSTMCell(3, 4),
        lambda: nn.GRUCell(3, 4, bias=False),
        lambda: nn.RNNCell(3, 4, nonlinearity="relu"),
    ],
    ids=["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"],
)
@pytest.mark.parametrize("engine", ENGINES)
def test_convert_a_layer_itself(make, engine):
    torch.manual_seed(0)
    layer = make()
    converted = rnnkit.convert(layer, engine=engine)
    assert type(converted) is PAIRS[type(layer)] and converted.engine == engine
    assert repr(converted) == _repr(layer, engine)
    x = torch.randn(2, 3) if "Cell" in type(layer).__name__ else torch.randn(5, 2, 3)
    with aten_path():
        expected = layer(x)
    actual = converted(x)
    flat = torch.utils._pytree.tree_leaves
    truth = truth_of(lambda m, x: _numbered(flat(m(x))), layer, x)
    assert_parity(_numbered(flat(expected)), _numbered(flat(actual)), engine, truth=truth)
    back = rnnkit.revert(converted)
    assert type(back) is type(layer)
    with aten_path():
        assert_bitwise(_numbered(flat(expected)), _numbered(flat(back(x))))


def test_convert_keeps_dtype_engine_and_hooks():
    layer = nn.GRU(3, 4).double()
    calls = []
    layer.register_forward_hook(lambda m, args, out: calls.append(type(m)))
    converted = rnnkit.convert(layer, engine="reference")
    assert converted.engine == "reference"
    assert {p.dtype for p in converted.parameters()} == {torch.float64}
    converted(torch.randn(2, 1, 3, dtype=torch.float64))
    assert calls == [rnnkit.GRU]
    with pytest.raises(ValueError):
        rnnkit.convert(nn.GRU(3, 4), engine="no-such-engine")


def test_shared_layer_is_converted_once():
    """A layer registered under two names becomes one rnnkit layer under both."""
    shared = nn.LSTM(3, 3)
    model = nn.Sequential(shared, nn.Identity())
    model.again = shared
    rnnkit.convert(model)
    assert type(model[0]) is rnnkit.LSTM
    assert type(model.again) is rnnkit.LSTM
    assert model.again is model[0]


def test_a_model_without_recurrent_layers_is_unchanged():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
    before = copy.deepcopy(model.state_dict())
    assert rnnkit.convert(model) is model
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

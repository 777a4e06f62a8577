"""torch.jit.trace of rnnkit's modules: correct at every shape, or refused when it cannot be.

A layer on the default engine traces into one compiled op per layer (or direction), which
takes uniform input with no per-step sizes, and every shape it reads is recorded from the
input: the trace runs at other sequence lengths and batches as the module does. What a trace
cannot keep is refused at trace time with what to use instead: packed input (its batch sizes
are data), and engines whose time loop runs in Python (the reference, Triton), which a trace
would unroll at one length. A cell is one step and traces on any engine.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import rnnkit

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated"),
    pytest.mark.filterwarnings("ignore:`torch.jit.trace_method` is deprecated"),
]

# (L, N) of the trace's example, then of the runs it must match the module at
TRACED_AT = (5, 3)
RUN_AT = [(9, 3), (2, 6), (1, 1)]

LAYERS = [
    pytest.param("LSTM", dict(num_layers=2), id="LSTM-l2"),
    pytest.param("LSTM", dict(bidirectional=True, proj_size=3), id="LSTM-bidir-proj3"),
    pytest.param("LSTM", dict(batch_first=True, num_layers=2, dropout=0.5), id="LSTM-bf-l2"),
    pytest.param("GRU", dict(bidirectional=True, num_layers=2), id="GRU-bidir-l2"),
    pytest.param("GRU", dict(batch_first=True, bias=False), id="GRU-bf-nobias"),
    pytest.param("RNN", dict(nonlinearity="relu", bidirectional=True), id="RNNrelu-bidir"),
    pytest.param("RNN", dict(num_layers=2), id="RNNtanh-l2"),
    pytest.param("LSTM", dict(layer_norm=True, bidirectional=True), id="LSTM-layernorm-bidir"),
    pytest.param(
        "LSTM",
        dict(layer_norm=True, peephole=True, proj_size=3, batch_first=True),
        id="LSTM-layernorm-peephole-proj3-bf",
    ),
]


def _inputs(module, L: int, N: int, hx: bool, batched: bool = True):
    D = 2 if module.bidirectional else 1
    H_out = module.proj_size or module.hidden_size
    H_in = module.input_size
    x = torch.randn(N, L, H_in) if module.batch_first else torch.randn(L, N, H_in)
    if not batched:
        x = x[0] if module.batch_first else x[:, 0]
    if not hx:
        return (x,)
    lead = (D * module.num_layers, N) if batched else (D * module.num_layers,)
    h0 = torch.randn(*lead, H_out)
    if module.mode == "LSTM":
        return (x, (h0, torch.randn(*lead, module.hidden_size)))
    return (x, h0)


def _trace(module, example):
    with warnings.catch_warnings():
        # the tracer's notes on Python values it keeps (the checks' branches); the runs at
        # other shapes below are what says whether the trace is right
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return torch.jit.trace(module, example, check_trace=False)


def _assert_same(actual, expected):
    for a, e in zip(
        torch.utils._pytree.tree_leaves(actual), torch.utils._pytree.tree_leaves(expected),
        strict=True,
    ):  # fmt: skip
        # the same kernels on the same shapes: the same bits
        torch.testing.assert_close(a, e, rtol=0, atol=0)


@pytest.mark.parametrize("hx", [False, True], ids=["zeros", "hx"])
@pytest.mark.parametrize("cls, kw", LAYERS)
def test_a_traced_layer_runs_at_other_lengths_and_batches(cls, kw, hx):
    module = getattr(rnnkit, cls)(4, 5, **kw).eval()
    traced = _trace(module, _inputs(module, *TRACED_AT, hx))
    for L, N in RUN_AT:
        inputs = _inputs(module, L, N, hx)
        _assert_same(traced(*inputs), module(*inputs))


@pytest.mark.parametrize("cls, kw", [LAYERS[1], LAYERS[3], LAYERS[7]])
def test_a_layer_traced_in_training_mode_or_without_grad_runs_at_other_shapes(cls, kw):
    """Training mode records the ops that keep buffers for backward; no_grad writes each
    direction's output in place: both trace shapes from the input."""
    module = getattr(rnnkit, cls)(4, 5, **kw)
    for train, grad in ((True, True), (False, False)):
        module.train(train)
        with torch.set_grad_enabled(grad):
            traced = _trace(module, _inputs(module, *TRACED_AT, True))
            for L, N in RUN_AT:
                inputs = _inputs(module, L, N, True)
                _assert_same(traced(*inputs), module(*inputs))


def test_an_unbatched_traced_layer_runs_at_other_lengths():
    module = rnnkit.LSTM(4, 5, num_layers=2, bidirectional=True).eval()
    traced = _trace(module, _inputs(module, 5, 1, True, batched=False))
    for L in (9, 1):
        inputs = _inputs(module, L, 1, True, batched=False)
        _assert_same(traced(*inputs), module(*inputs))


@pytest.mark.parametrize("cls", ["LSTMCell", "GRUCell", "RNNCell"])
@pytest.mark.parametrize("hx", [False, True], ids=["zeros", "hx"])
def test_a_traced_cell_runs_at_other_batches(cls, hx):
    cell = getattr(rnnkit, cls)(4, 5)

    def inputs(N):
        x = torch.randn(N, 4)
        if not hx:
            return (x,)
        h = torch.randn(N, 5)
        return (x, (h, torch.randn(N, 5))) if cls == "LSTMCell" else (x, h)

    traced = _trace(cell, inputs(3))
    for N in (7, 1):
        args = inputs(N)
        _assert_same(traced(*args), cell(*args))


class _Packing(torch.nn.Module):
    """A layer over a padded batch that it packs itself, or hands ``lengths=``."""

    def __init__(self, how: str):
        super().__init__()
        self.rnn = rnnkit.GRU(4, 5)
        self.how = how

    def forward(self, x, lengths):
        if self.how == "lengths":
            return self.rnn(x, lengths=lengths)[0]
        return self.rnn(pack_padded_sequence(x, lengths))[0].data


@pytest.mark.parametrize("how", ["pack", "lengths"])
def test_tracing_packed_input_is_refused(how):
    x, lengths = torch.randn(5, 3, 4), torch.tensor([5, 4, 2])
    with pytest.raises(
        RuntimeError, match="torch.jit.trace cannot trace an rnnkit layer on packed"
    ):
        _trace(_Packing(how), (x, lengths))
    _Packing(how)(x, lengths)  # not traced, it runs


TRACE_REFUSED = r"torch\.jit\.trace \(a time loop in Python is unrolled .* rnnkit\.onnx\.export\)"


@pytest.mark.parametrize(
    "kw",
    [
        pytest.param(dict(engine="reference"), id="reference"),
        pytest.param(dict(engine="triton"), id="triton"),
        # no compiled loop for custom activations: engine="auto" would take the reference
        pytest.param(dict(activations=("sigmoid", "tanh", "relu")), id="auto-activations"),
    ],
)
def test_tracing_a_layer_on_a_python_time_loop_is_refused(kw):
    module = rnnkit.LSTM(4, 5, **kw).eval()
    name = kw.get("engine", "reference")
    with pytest.raises(RuntimeError, match=f"{name}: {TRACE_REFUSED} not supported"):
        _trace(module, (torch.randn(5, 3, 4),))


def test_outside_a_trace_auto_picks_as_before():
    """Only a trace refuses the reference's layers: without one, the same module runs."""
    module = rnnkit.LSTM(4, 5, activations=("sigmoid", "tanh", "relu")).eval()
    reference = rnnkit.LSTM(4, 5, activations=("sigmoid", "tanh", "relu"), engine="reference")
    reference.load_state_dict(module.state_dict())
    x = torch.randn(5, 3, 4)
    assert torch.equal(module(x)[0], reference.eval()(x)[0])

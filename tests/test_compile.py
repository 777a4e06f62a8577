"""torch.compile(fullgraph=True) and torch.export of models with rnnkit layers.

The fused engine's kernels are torch ops with fake implementations (engines/cpu/fake.py), so
a compiled or exported model holds one op per layer where torch.nn's modules graph-break.
Compiled results equal eager ones to rounding (in float32 about as close to a float64 eager
run as eager is): the graph of a plain layer is our ops alone, and inductor generates code for
the torch ops around them (a variant's input LayerNorm). In training, random variants draw their masks from inductor's generator under
compile, as torch's dropout does.
"""

from __future__ import annotations

import pytest
import torch

import rnnkit
from parity import assert_engine_close, truth_of

MODELS = [
    pytest.param("LSTM", {}, id="LSTM"),
    pytest.param("GRU", dict(bidirectional=True), id="GRU-bidir"),
    pytest.param("RNN", dict(nonlinearity="relu", num_layers=2), id="RNNrelu-l2"),
    pytest.param("LSTM", dict(proj_size=3, num_layers=2, bidirectional=True), id="LSTM-proj"),
    # float64: inductor's own LayerNorm code rounds otherwise than eager's, and in float32 a
    # LayerNorm over 5 units grows that past the engine tolerance
    pytest.param(
        "LSTM",
        dict(layer_norm=True, peephole=True, zoneout=0.2, dtype=torch.float64),
        id="LSTM-variants-f64",
    ),  # fmt: skip
]


def _close(actual: dict, expected: dict, truth: dict | None) -> None:
    """In float64 within the engine tolerance; below it against ``truth``, eager in float64."""
    assert_engine_close(expected, actual, truth, "compiled differs from eager")


def _layer_run(module, x) -> dict:
    """Output, final states and the input's gradient of ``out.square().sum()``."""
    out, hidden = module(x)
    hidden = hidden if isinstance(hidden, tuple) else (hidden,)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    return {"output": out, **{f"h_n.{i}": h for i, h in enumerate(hidden)}, "grad_input": grad}


@pytest.mark.parametrize("cls, kw", MODELS)
def test_compile_fullgraph_matches_eager(cls, kw):
    torch.manual_seed(0)
    module = getattr(rnnkit, cls)(4, 5, batch_first=True, **kw).eval()
    compiled = torch.compile(module, fullgraph=True)
    for L in (3, 6):  # a new length recompiles or runs the dynamic graph
        x = torch.randn(2, L, 4, dtype=kw.get("dtype"), requires_grad=True)
        truth = truth_of(_layer_run, module, x)
        _close(_layer_run(compiled, x), _layer_run(module, x), truth)


def test_compiled_training_step_matches_eager():
    torch.manual_seed(0)
    model = torch.nn.Sequential(rnnkit.LSTM(4, 6, num_layers=2, batch_first=True))
    x = torch.randn(3, 5, 4)

    def step(model, x, compile: bool = False) -> dict:
        def loss_of():
            return model(x)[0].square().mean()

        loss = torch.compile(loss_of, fullgraph=True)() if compile else loss_of()
        grads = torch.autograd.grad(loss, list(model.parameters()))
        return {"loss": loss, **{f"grad_{i}": g for i, g in enumerate(grads)}}

    _close(step(model, x, compile=True), step(model, x), truth_of(step, model, x))


def test_cells_compile_fullgraph():
    torch.manual_seed(0)
    cell = rnnkit.LSTMCell(4, 5)
    x = torch.randn(2, 4)

    def run(cell, x) -> dict:
        h, c = cell(x)
        return {"h": h, "c": c}

    compiled = torch.compile(cell, fullgraph=True)
    _close(run(compiled, x), run(cell, x), truth_of(run, cell, x))


def test_export_holds_one_op_per_layer():
    torch.manual_seed(0)
    module = rnnkit.LSTM(4, 5, num_layers=2, bidirectional=True, engine="fused")
    x = torch.randn(3, 2, 4)
    module(x)  # kernels built before tracing
    exported = torch.export.export(module, (x,))
    targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert targets.count("rnnkit_cpu.layer_forward.default") == 2
    assert not any("lstm" in t and "rnnkit" not in t for t in targets)
    out, (h, c) = exported.module()(x)
    expected, (eh, ec) = module(x)
    assert torch.equal(out, expected) and torch.equal(h, eh) and torch.equal(c, ec)


EXPORT_MODELS = [
    pytest.param("LSTM", {}, id="LSTM"),
    pytest.param("GRU", {}, id="GRU"),
    pytest.param("LSTM", dict(proj_size=3, num_layers=2, bidirectional=True), id="LSTM-proj"),
    pytest.param("LSTM", dict(layer_norm=True), id="LSTM-layer_norm"),
    pytest.param("RNN", dict(nonlinearity="relu", bidirectional=True), id="RNNrelu-bidir"),
]


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("cls, kw", EXPORT_MODELS)
def test_export_keeps_length_and_batch_symbolic(cls, kw, grad):
    """torch.export with a dynamic sequence length and batch: the program runs at other sizes
    and gives eager's bits (Linear(layer(x)), the fused engine)."""
    torch.manual_seed(0)
    rnn = getattr(rnnkit, cls)(4, 6, engine="fused", **kw).eval()
    features = (kw.get("proj_size") or 6) * (2 if kw.get("bidirectional") else 1)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = rnn, torch.nn.Linear(features, 2)

        def forward(self, x):
            return self.head(self.rnn(x)[0])

    model = Model().eval()
    L, N = torch.export.Dim("L", min=2, max=512), torch.export.Dim("N", min=2, max=64)
    with torch.set_grad_enabled(grad):
        program = torch.export.export(
            model, (torch.randn(10, 3, 4),), dynamic_shapes={"x": {0: L, 1: N}}
        )
    with torch.no_grad():
        for size in ((37, 3), (5, 8), (64, 2)):
            x = torch.randn(*size, 4)
            assert torch.equal(program.module()(x), model(x))

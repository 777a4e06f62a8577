"""torch.compile(fullgraph=True) and torch.export of models with rnnkit layers.

The fused engine's kernels are torch ops with fake implementations (engines/cpu/fake.py), so
a compiled or exported model holds one op per layer where torch.nn's modules graph-break.
Compiled results equal eager ones within the engine tolerance: the graph of a plain layer is
our ops alone, and inductor generates code for the torch ops around them (a variant's input
LayerNorm). In training, random variants draw their masks from inductor's generator under
compile, as torch's dropout does.
"""

from __future__ import annotations

import pytest
import torch

import rnnkit
from rnnkit.testing import engine_tolerance

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


def _close(actual, expected):
    assert torch.allclose(actual, expected, rtol=0, atol=engine_tolerance(expected).atol)


@pytest.mark.parametrize("cls, kw", MODELS)
def test_compile_fullgraph_matches_eager(cls, kw):
    torch.manual_seed(0)
    module = getattr(rnnkit, cls)(4, 5, batch_first=True, **kw).eval()
    compiled = torch.compile(module, fullgraph=True)
    for L in (3, 6):  # a new length recompiles or runs the dynamic graph
        x = torch.randn(2, L, 4, dtype=kw.get("dtype"), requires_grad=True)
        out, hidden = compiled(x)
        expected, expected_hidden = module(x)
        _close(out, expected)
        for a, e in zip(torch.atleast_1d(hidden), torch.atleast_1d(expected_hidden), strict=True):
            _close(a, e)
        (grad,) = torch.autograd.grad(out.square().sum(), x)
        (expected_grad,) = torch.autograd.grad(expected.square().sum(), x)
        _close(grad, expected_grad)


def test_compiled_training_step_matches_eager():
    torch.manual_seed(0)
    model = torch.nn.Sequential(rnnkit.LSTM(4, 6, num_layers=2, batch_first=True))
    x = torch.randn(3, 5, 4)

    def loss_of(m):
        return m(x)[0].square().mean()

    compiled = torch.compile(lambda: loss_of(model), fullgraph=True)
    loss = compiled()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    expected = torch.autograd.grad(loss_of(model), list(model.parameters()))
    _close(loss, loss_of(model))
    for g, e in zip(grads, expected, strict=True):
        _close(g, e)


def test_cells_compile_fullgraph():
    torch.manual_seed(0)
    cell = rnnkit.LSTMCell(4, 5)
    x = torch.randn(2, 4)
    h, c = torch.compile(cell, fullgraph=True)(x)
    eh, ec = cell(x)
    _close(h, eh)
    _close(c, ec)


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

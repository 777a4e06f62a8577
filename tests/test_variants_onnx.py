"""Variants that ONNX defines, against onnxruntime running a one-node LSTM/GRU/RNN model.

``rnnkit.onnx_layers`` builds the node: the layer's weights in ONNX's layout (LSTM gates
i, o, f, c; GRU z, r, h with ``linear_before_reset=1``, which is torch's GRU), peepholes as
``P``, and ``clip``, ``input_forget`` and ``activations``. ``onnx.reference`` ignores ``clip``,
``input_forget`` and ``activations``, so onnxruntime is the referee.
"""

from __future__ import annotations

import pytest
import torch

import rnnkit
from parity import assert_close, truth_of

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

from rnnkit.onnx_layers import OnnxGraph, build_layer, layer_spec, uses_onnx_node  # noqa: E402


def onnx_run(m, x):
    """Run ``m``'s single layer as one ONNX node on ``x`` ``[L, N, H_in]``; returns Y, Y_h."""
    spec = layer_spec(m)
    assert uses_onnx_node(spec)
    g = OnnxGraph("g", x.dtype, {})
    y, y_h, _ = build_layer(g, spec, "X", None, None, None)
    recurrent = [n.op_type for n in g.nodes if n.op_type in ("LSTM", "GRU", "RNN", "Scan")]
    assert recurrent == [{"LSTM": "LSTM", "GRU": "GRU"}.get(m.mode, "RNN")]
    elem = TensorProto.DOUBLE if x.dtype == torch.float64 else TensorProto.FLOAT
    graph = helper.make_graph(
        g.nodes,
        "g",
        [helper.make_tensor_value_info("X", elem, list(x.shape))],
        [helper.make_tensor_value_info(name, elem, None) for name in (y, y_h)],
        initializer=list(g.initializers.values()),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y, y_h = session.run(None, {"X": x.numpy()})
    return torch.from_numpy(y), torch.from_numpy(y_h)


CASES = [
    pytest.param("LSTM", dict(peephole=True), id="LSTM-peephole"),
    pytest.param("LSTM", dict(gate_clip=0.3), id="LSTM-clip"),
    pytest.param("LSTM", dict(coupled_input_forget=True), id="LSTM-input_forget"),
    pytest.param("LSTM", dict(activations=("hard_sigmoid", "softsign", "elu")), id="LSTM-acts"),
    pytest.param("LSTM", dict(activations=("sigmoid", "relu", "softplus")), id="LSTM-acts2"),
    pytest.param(
        "LSTM",
        dict(
            peephole=True,
            gate_clip=0.5,
            coupled_input_forget=True,
            activations=("sigmoid", "tanh", "softsign"),
        ),
        id="LSTM-all",
    ),  # fmt: skip
    pytest.param("GRU", dict(gate_clip=0.3), id="GRU-clip"),
    pytest.param("GRU", dict(activations=("hard_sigmoid", "softsign")), id="GRU-acts"),
    pytest.param("RNN", dict(gate_clip=0.3), id="RNN-clip"),
    pytest.param("RNN", dict(activations=("softsign",)), id="RNN-acts"),
]


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bidir"])
@pytest.mark.parametrize("cls, kw", CASES)
def test_matches_onnxruntime(cls, kw, bidirectional):
    torch.manual_seed(0)
    m = getattr(rnnkit, cls)(4, 6, bidirectional=bidirectional, **kw).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("peephole"):
                p.uniform_(-1, 1)
            else:
                p.mul_(3)  # reach the clip bounds and the nonlinear ranges
    x = torch.randn(5, 3, 4)

    def run(m, x):
        with torch.no_grad():
            out, hidden = m(x)
        return {"output": out, "h_n": hidden[0] if cls == "LSTM" else hidden}

    y, y_h = onnx_run(m, x)
    # rnnkit and onnxruntime each measured against rnnkit's reference engine in float64
    assert_close({"output": y, "h_n": y_h}, run(m, x), truth=truth_of(run, m, x))

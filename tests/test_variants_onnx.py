"""Variants that ONNX defines, against onnxruntime running a one-node LSTM/GRU/RNN model.

The layer's weights are converted to ONNX's layout (LSTM gates i, o, f, c; GRU z, r, h with
``linear_before_reset=1``, which is torch's GRU). ``onnx.reference`` ignores ``clip``,
``input_forget`` and ``activations``, so onnxruntime is the referee.
"""

from __future__ import annotations

import pytest
import torch

import rnnkit

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

ONNX_ACT = {
    "sigmoid": "Sigmoid",
    "tanh": "Tanh",
    "relu": "Relu",
    "hard_sigmoid": "HardSigmoid",
    "softsign": "Softsign",
    "softplus": "Softplus",
    "elu": "Elu",
}
DEFAULT_ACTS = {"LSTM": ("sigmoid", "tanh", "tanh"), "GRU": ("sigmoid", "tanh")}


def _reorder(w, H, order):
    return torch.cat([w[k * H : (k + 1) * H] for k in order])


def onnx_run(m, x):
    """Run ``m``'s single layer as one ONNX node on ``x`` ``[L, N, H_in]``; returns Y, Y_h."""
    mode, H, v = m.mode, m.hidden_size, m.variant
    op, order = {"LSTM": ("LSTM", [0, 3, 1, 2]), "GRU": ("GRU", [1, 0, 2])}.get(mode, ("RNN", [0]))
    D = 2 if m.bidirectional else 1
    W, R, B, P = [], [], [], []
    for d in range(D):
        sfx = "_l0_reverse" if d else "_l0"
        W.append(_reorder(getattr(m, "weight_ih" + sfx), H, order))
        R.append(_reorder(getattr(m, "weight_hh" + sfx), H, order))
        B.append(
            torch.cat(
                [
                    _reorder(getattr(m, "bias_ih" + sfx), H, order),
                    _reorder(getattr(m, "bias_hh" + sfx), H, order),
                ]
            )
        )
        if v.peephole:
            # ONNX's P is (i, o, f); rnnkit's peephole is (i, f, o)
            P.append(_reorder(getattr(m, "peephole" + sfx), H, [0, 2, 1]))
    acts = v.activations or DEFAULT_ACTS.get(mode, ("tanh" if mode == "RNN_TANH" else "relu",))
    attrs = dict(
        hidden_size=H,
        direction="bidirectional" if D == 2 else "forward",
        activations=[ONNX_ACT[a] for a in acts] * D,
    )
    # alpha/beta are consumed in order by the activations that take them; give the defaults
    alphas = {"HardSigmoid": 0.2, "Elu": 1.0}
    alpha = [alphas[a] for a in attrs["activations"] if a in alphas]
    beta = [0.5 for a in attrs["activations"] if a == "HardSigmoid"]
    if alpha:
        attrs["activation_alpha"] = alpha
    if beta:
        attrs["activation_beta"] = beta
    if v.gate_clip is not None:
        attrs["clip"] = v.gate_clip
    if mode == "GRU":
        attrs["linear_before_reset"] = 1
    if v.coupled_input_forget:
        attrs["input_forget"] = 1
    inputs = ["X", "W", "R", "B", "", "", ""] if mode == "LSTM" else ["X", "W", "R", "B"]
    feeds = {
        "X": x.numpy(),
        "W": torch.stack(W).detach().numpy(),
        "R": torch.stack(R).detach().numpy(),
        "B": torch.stack(B).detach().numpy(),
    }
    if P:
        inputs.append("P")
        feeds["P"] = torch.stack(P).detach().numpy()
    node = helper.make_node(op, inputs, ["Y", "Y_h"], **attrs)
    L, N, H_in = x.shape
    f64 = TensorProto.DOUBLE if x.dtype == torch.float64 else TensorProto.FLOAT
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info(k, f64, list(t.shape)) for k, t in feeds.items()],
        [
            helper.make_tensor_value_info("Y", f64, [L, D, N, H]),
            helper.make_tensor_value_info("Y_h", f64, [D, N, H]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y, y_h = session.run(None, feeds)
    y = torch.from_numpy(y).permute(0, 2, 1, 3).reshape(L, N, D * H)
    return y, torch.from_numpy(y_h)


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
    with torch.no_grad():
        out, hidden = m(x)
    h = hidden[0] if cls == "LSTM" else hidden
    y, y_h = onnx_run(m, x)
    torch.testing.assert_close(out, y, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(h, y_h, atol=2e-5, rtol=1e-4)

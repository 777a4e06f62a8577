"""Export through torch's current exporters: ``torch.onnx.export(..., dynamo=True)`` run by
onnxruntime, and ``torch.export`` programs compiled by AOTInductor, against eager.

Every model is exported at ``L=10, N=3`` with the sequence length and the batch symbolic and
run at ``(L, N) = (13, 2)`` and ``(5, 4)``. Layers that ONNX's LSTM/GRU/RNN op computes must
export as those nodes, the others as a ``Scan``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.export import Dim
from torch.nn.utils.rnn import pack_padded_sequence

import rnnkit
from export_cases import SIZES, cells_case, check, flat, head_case, reset_case, tagger_case

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
import rnnkit.onnx  # noqa: E402

P = pytest.param


ONNX_CASES = [
    P(lambda: head_case(rnnkit.LSTM(4, 8)), "LSTM", id="LSTM"),
    P(lambda: head_case(rnnkit.GRU(4, 8, num_layers=2)), "GRU", id="GRU-2layers"),
    P(lambda: head_case(rnnkit.RNN(4, 8, nonlinearity="relu", bidirectional=True)), "RNN",
      id="RNN-relu-bidir"),
    P(lambda: head_case(rnnkit.LSTM(4, 8, peephole=True, bidirectional=True, batch_first=True)),
      "LSTM", id="LSTM-peephole-bidir-batch_first"),
    P(lambda: head_case(rnnkit.LSTM(4, 8, 2, proj_size=3, bidirectional=True)), "Scan",
      id="LSTM-proj-bidir-2layers"),
    P(lambda: head_case(rnnkit.LSTM(4, 8, layer_norm=True)), "Scan", id="LSTM-layer_norm"),
    P(lambda: head_case(rnnkit.LSTM(4, 8, bidirectional=True).double()), "Scan",
      id="LSTM-bidir-float64"),
    P(lambda: head_case(rnnkit.GRU(4, 8, num_layers=2, zoneout=0.2)), "Scan",
      id="GRU-zoneout-2layers"),
    P(lambda: head_case(rnnkit.LSTM(4, 8, 2, proj_size=3, layer_norm=True, peephole=True,
                                    coupled_input_forget=True, zoneout=0.1, gate_clip=3.0,
                                    activations=("hard_sigmoid", "tanh", "softsign"))),
      "Scan", id="LSTM-every-variant-2layers"),
    P(lambda: head_case(rnnkit.GRU(4, 8, bidirectional=True, layer_norm=True, zoneout=0.2)),
      "Scan", id="GRU-bidir-layer_norm-zoneout"),
    P(lambda: head_case(rnnkit.RNN(4, 8, nonlinearity="relu", bidirectional=True,
                                   layer_norm=True, zoneout=0.2)),
      "Scan", id="RNN-relu-bidir-layer_norm-zoneout"),
    P(reset_case, "Scan", id="LSTM-bidir-reset"),
    P(cells_case, "Gemm", id="cells"),
    P(tagger_case, "Scan", id="Embedding-LSTM-proj-bidir-2layers-Linear"),
]  # fmt: skip


def _ort(proto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


@pytest.mark.parametrize("make, expect", ONNX_CASES)
def test_torch_onnx_export_dynamo(make, expect):
    torch.manual_seed(0)
    model, inputs, dims = make()
    model.eval()
    program = torch.onnx.export(model, inputs(10, 3), dynamo=True, dynamic_shapes=dims,
                                verbose=False)  # fmt: skip
    proto = program.model_proto
    ops = {node.op_type for node in proto.graph.node}
    assert expect in ops
    # no engine's op is left in the graph
    assert all(node.domain in ("", "ai.onnx") for node in proto.graph.node)
    session = _ort(proto)
    for L, N in SIZES:
        args = inputs(L, N)
        feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args, strict=True)}
        got = [torch.from_numpy(y) for y in session.run(None, feeds)]
        check(got, model, args, f"onnxruntime differs from eager at L{L}-N{N}")


def test_rnnkit_onnx_export_dynamo_takes_dynamic_axes():
    torch.manual_seed(0)
    model, inputs, _ = head_case(rnnkit.LSTM(4, 8, 2, proj_size=3))
    model.train()
    axes = {"x": {0: "L", 1: "N"}, "lengths": {0: "N"}}
    proto = rnnkit.onnx.export(model, inputs(10, 3), None, dynamo=True, input_names=["x", "lengths"],
                               dynamic_axes=axes)  # fmt: skip
    assert model.training, "the model's mode is restored"
    model.eval()
    session = _ort(proto)
    for L, N in SIZES:
        x, lengths = inputs(L, N)
        got = session.run(None, {"x": x.numpy(), "lengths": lengths.numpy()})
        check([torch.from_numpy(y) for y in got], model, (x, lengths), f"L{L}-N{N}")


class WithState(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = rnnkit.LSTM(4, 6, proj_size=3)

    def forward(self, x, hx):
        return self.lstm(x, hx)[0]


def test_rnnkit_onnx_export_dynamo_names_nested_inputs_in_order():
    """``input_names`` name the tensors inside a tuple argument too, as the TorchScript-based
    exporter names them: ``(x, (h, c))`` is ``x, h, c``."""
    torch.manual_seed(0)
    model = WithState().eval()
    args = (torch.randn(5, 2, 4), (torch.zeros(1, 2, 3), torch.zeros(1, 2, 6)))
    axes = {"x": {0: "L", 1: "N"}, "h": {1: "N"}, "c": {1: "N"}}
    proto = rnnkit.onnx.export(model, args, None, dynamo=True, input_names=["x", "h", "c"],
                               dynamic_axes=axes)  # fmt: skip
    session = _ort(proto)
    assert [i.name for i in session.get_inputs()] == ["x", "h", "c"]
    x, hx = torch.randn(9, 3, 4), (torch.randn(1, 3, 3), torch.randn(1, 3, 6))
    (got,) = session.run(None, {"x": x.numpy(), "h": hx[0].numpy(), "c": hx[1].numpy()})
    check([torch.from_numpy(got)], model, (x, hx), "L9-N3")


class Packed(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = rnnkit.LSTM(4, 6)

    def forward(self, x, lengths):
        return self.lstm(pack_padded_sequence(x, lengths, enforce_sorted=False))[1][0]


def test_packed_input_raises():
    with pytest.raises(Exception, match="pass the padded input with lengths="):
        torch.onnx.export(Packed().eval(), (torch.randn(5, 2, 4), torch.tensor([5, 3])),
                          dynamo=True, verbose=False)  # fmt: skip


def test_training_mode_with_random_draws_raises():
    model = rnnkit.LSTM(4, 6, zoneout=0.1).train()
    with pytest.raises(Exception, match="export the model in eval mode"):
        torch.onnx.export(model, (torch.randn(5, 2, 4),), dynamo=True, verbose=False)


AOTI_CASES = [
    P(lambda: rnnkit.LSTM(4, 8), id="LSTM"),
    P(lambda: rnnkit.GRU(4, 8), id="GRU"),
    P(lambda: rnnkit.LSTM(4, 8, 2, proj_size=3, bidirectional=True), id="LSTM-proj-bidir-2layers"),
    P(lambda: rnnkit.LSTM(4, 8, layer_norm=True), id="LSTM-layer_norm"),
    P(None, id="Embedding-LSTM-proj-bidir-2layers-Linear"),
]


@pytest.mark.parametrize("make", AOTI_CASES)
def test_aot_inductor_package(make, tmp_path):
    from rnnkit.engines.cpu import FUSED

    if FUSED.fault() is not None:
        pytest.skip(f"the fused engine did not build: {FUSED.fault()}")
    torch.manual_seed(0)
    if make is None:
        model, inputs, dims = tagger_case()
    else:
        model, with_lengths, _ = head_case(make())
        dims = {"x": {0: Dim("L"), 1: Dim("N")}}

        def inputs(L: int, N: int):
            # lengths= packs the input, whose batch sizes are data: AOTInductor takes padded
            return with_lengths(L, N)[:1]

    model.eval()
    with torch.no_grad():
        program = torch.export.export(model, inputs(10, 3), dynamic_shapes=dims)
        path = torch._inductor.aoti_compile_and_package(
            program, package_path=str(tmp_path / "m.pt2")
        )
    compiled = torch._inductor.aoti_load_package(str(path))
    for L, N in SIZES:
        args = inputs(L, N)
        with torch.no_grad():
            got = flat(compiled(*args))
        check(got, model, args, f"the AOTInductor package differs from eager at L{L}-N{N}")

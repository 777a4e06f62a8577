"""``rnnkit.onnx.export``: models with rnnkit layers, run by onnxruntime against eager.

Every case is exported with ``L=5, N=2`` and run with ``L=3, N=1`` and ``L=9, N=4``, so the
sequence length and the batch are dynamic. Layers that ONNX's LSTM/GRU/RNN op computes must
export as those nodes, the others as a ``Scan``; plain layers are also checked against
``torch.nn``'s.
"""

from __future__ import annotations

import copy
import doctest
import io
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import rnnkit
from parity import assert_engine_close
from rnnkit.testing import float64_copy

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
import rnnkit.onnx  # noqa: E402

SIZES = [(3, 1), (9, 4)]  # (L, N) run; the export uses (5, 2)


def ort_run(proto, feeds: dict) -> list[torch.Tensor]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return [
        torch.from_numpy(y) for y in session.run(None, {k: v.numpy() for k, v in feeds.items()})
    ]


def op_types(proto) -> set[str]:
    return {node.op_type for node in proto.graph.node}


def assert_close(actual, expected, what: str, truth) -> None:
    """onnxruntime's ``actual`` to rounding of eager's ``expected``: in float32 about as close
    to ``truth`` (eager in float64, :func:`in_float64`) as eager is; in float64 within a fast
    engine's tolerance."""
    truth = None if truth is None else {what: truth}
    assert_engine_close({what: expected}, {what: actual}, truth, "onnxruntime differs from eager")


def in_float64(module, *inputs) -> list[torch.Tensor]:
    """``module``'s outputs (flat) in float64 on the same weights and inputs, without a graph:
    the truth of onnxruntime's and eager's float32 runs."""
    with torch.no_grad():
        out = float64_copy(module)(*float64_copy(inputs))
    return list(out) if isinstance(out, tuple) else [out]


class Call(nn.Module):
    """Calls ``layer`` on ``(x, [h0, [c0]], [lengths], [reset])`` and returns its outputs
    flat."""

    def __init__(self, layer: nn.Module, with_hx: bool, with_lengths: bool, with_reset=False):
        super().__init__()
        self.layer, self.with_hx, self.with_lengths = layer, with_hx, with_lengths
        self.with_reset = with_reset

    def forward(self, x, *extra):
        is_lstm = isinstance(self.layer, (rnnkit.LSTM, rnnkit.LSTMCell, nn.LSTM))
        extra = list(extra)
        hx = None
        if self.with_hx:
            hx = (extra.pop(0), extra.pop(0)) if is_lstm else extra.pop(0)
        if isinstance(self.layer, rnnkit.RNNCellBase):
            out = self.layer(x, hx)
            return tuple(out) if is_lstm else (out,)
        kwargs = {"lengths": extra.pop(0)} if self.with_lengths else {}
        if self.with_reset:
            kwargs["reset"] = extra.pop(0)
        out, hidden = self.layer(x, hx, **kwargs)
        return (out, *hidden) if is_lstm else (out, hidden)


def _inputs(m, L: int, N: int, with_hx: bool, with_lengths: bool, unbatched: bool,
            with_reset: bool = False):  # fmt: skip
    """Random ``(x, [h0, c0], [lengths], [reset])`` for ``m`` and the dynamic axes of each
    (``reset``: a restart at about one step in three, at least one, in ``x``'s layout)."""
    batch_first = getattr(m, "batch_first", False)
    x_shape = [N, L, m.input_size] if batch_first else [L, N, m.input_size]
    x_axes = {0: "N", 1: "L"} if batch_first else {0: "L", 1: "N"}
    if unbatched:
        x_shape, x_axes = [L, m.input_size], {0: "L"}
    feeds = {"x": torch.randn(x_shape)}
    axes = {"x": x_axes}
    if with_hx:
        D = 2 if m.bidirectional else 1
        H_out = m.proj_size or m.hidden_size
        sizes = {"h0": H_out, "c0": m.hidden_size} if m.mode == "LSTM" else {"h0": H_out}
        for name, size in sizes.items():
            shape = [D * m.num_layers, size] if unbatched else [D * m.num_layers, N, size]
            feeds[name] = torch.randn(shape)
            axes[name] = {} if unbatched else {1: "N"}
    if with_lengths:
        lengths = torch.randint(1, L + 1, (N,))
        lengths[0] = L
        feeds["lengths"] = lengths
        axes["lengths"] = {0: "N"}
    if with_reset:
        reset = torch.rand(x_shape[:-1]) < 0.3
        reset.view(-1)[torch.randint(reset.numel(), ())] = True
        feeds["reset"] = reset
        axes["reset"] = x_axes
    return feeds, axes


def _output_names(m) -> list[str]:
    return ["output", "h_n", "c_n"] if m.mode == "LSTM" else ["output", "h_n"]


# rnnkit.onnx.export's two routes: torch's dynamo-based exporter (the default) and its
# TorchScript-based one
ROUTES = pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])


def _check_layer(
    m, with_hx=False, with_lengths=False, unbatched=False, expect="LSTM", with_reset=False,
    dynamo=True,
):  # fmt: skip
    torch.manual_seed(0)
    m.eval()
    call = Call(m, with_hx, with_lengths, with_reset).eval()
    feeds, axes = _inputs(m, 5, 2, with_hx, with_lengths, unbatched, with_reset)
    names = _output_names(m)
    out_axes = {"output": axes["x"], "h_n": {1: "N"}, "c_n": {1: "N"}}
    if unbatched:
        out_axes = {"output": {0: "L"}}
    proto = rnnkit.onnx.export(
        call, tuple(feeds.values()), None, input_names=list(feeds), output_names=names,
        dynamic_axes={**axes, **{k: v for k, v in out_axes.items() if k in names}},
        dynamo=dynamo,
    )  # fmt: skip
    assert expect in op_types(proto)
    assert not any(node.domain == "rnnkit" for node in proto.graph.node)
    plain = m.variant.is_plain and not with_reset
    torch_m = rnnkit.revert(copy.deepcopy(m)).eval() if plain else None
    for L, N in SIZES:
        feeds, _ = _inputs(m, L, N, with_hx, with_lengths, unbatched, with_reset)
        got = ort_run(proto, feeds)
        with torch.no_grad():
            want = call(*feeds.values())
            ref = None if torch_m is None else _torch_call(torch_m, feeds, with_hx, with_lengths)
        truth = in_float64(call, *feeds.values())
        for j, name in enumerate(names):
            assert_close(got[j], want[j], f"{name} L{L}-N{N}", truth[j])
            if ref is not None:
                assert_close(got[j], ref[j], f"{name} vs torch.nn L{L}-N{N}", truth[j])


def _torch_call(torch_m, feeds: dict, with_hx: bool, with_lengths: bool):
    """torch.nn's layer on the same inputs; with lengths through its packed path."""
    if not with_lengths:
        return Call(torch_m, with_hx, False)(*feeds.values())
    x = feeds["x"]
    packed = pack_padded_sequence(
        x, feeds["lengths"], batch_first=torch_m.batch_first, enforce_sorted=False
    )
    hx = None
    if with_hx:
        hx = (feeds["h0"], feeds["c0"]) if isinstance(torch_m, nn.LSTM) else feeds["h0"]
    out, hidden = torch_m(packed, hx)
    L = x.size(1 if torch_m.batch_first else 0)
    out, _ = nn.utils.rnn.pad_packed_sequence(out, torch_m.batch_first, total_length=L)
    return (out, *hidden) if isinstance(torch_m, nn.LSTM) else (out, hidden)


P = pytest.param
LAYERS = [
    P("LSTM", {}, {}, "LSTM", id="LSTM"),
    P("LSTM", dict(bias=False, batch_first=True), {}, "LSTM", id="LSTM-nobias-batch_first"),
    P("LSTM", dict(bidirectional=True, num_layers=2, dropout=0.3), dict(with_hx=True),
      "LSTM", id="LSTM-bidir-2layers-dropout-h0"),
    P("LSTM", dict(bidirectional=True, num_layers=2), dict(with_lengths=True), "LSTM",
      id="LSTM-bidir-2layers-lengths"),
    P("LSTM", dict(proj_size=3), {}, "Scan", id="LSTM-proj"),
    P("LSTM", dict(proj_size=3, bidirectional=True, num_layers=2, batch_first=True),
      dict(with_hx=True), "Scan", id="LSTM-proj-bidir-2layers-batch_first-h0"),
    P("LSTM", dict(proj_size=2, bidirectional=True), dict(with_lengths=True, with_hx=True),
      "Scan", id="LSTM-proj-bidir-lengths-h0"),
    P("LSTM", dict(), dict(unbatched=True, with_hx=True), "LSTM", id="LSTM-unbatched-h0"),
    P("LSTM", dict(proj_size=3), dict(unbatched=True), "Scan", id="LSTM-proj-unbatched"),
    P("GRU", {}, {}, "GRU", id="GRU"),
    P("GRU", dict(bidirectional=True, num_layers=2, bias=False), dict(with_hx=True), "GRU",
      id="GRU-bidir-2layers-nobias-h0"),
    P("GRU", dict(bidirectional=True, batch_first=True), dict(with_lengths=True), "GRU",
      id="GRU-bidir-batch_first-lengths"),
    P("RNN", {}, {}, "RNN", id="RNN-tanh"),
    P("RNN", dict(nonlinearity="relu", bidirectional=True, num_layers=2), dict(with_hx=True),
      "RNN", id="RNN-relu-bidir-2layers-h0"),
    P("RNN", dict(bidirectional=True), dict(with_lengths=True, unbatched=False), "RNN",
      id="RNN-bidir-lengths"),
]  # fmt: skip


@ROUTES
@pytest.mark.parametrize("cls, kw, call_kw, expect", LAYERS)
def test_layer(cls, kw, call_kw, expect, dynamo):
    torch.manual_seed(0)
    _check_layer(getattr(rnnkit, cls)(4, 6, **kw), expect=expect, **call_kw, dynamo=dynamo)


VARIANTS = [
    P("LSTM", dict(peephole=True), "LSTM", id="LSTM-peephole"),
    P("LSTM", dict(forget_bias=1.0), "LSTM", id="LSTM-forget_bias"),
    P("LSTM", dict(gate_clip=0.3, coupled_input_forget=True), "LSTM", id="LSTM-clip-cifg"),
    P("LSTM", dict(activations=("hard_sigmoid", "softsign", "elu")), "LSTM", id="LSTM-acts"),
    P("LSTM", dict(activations=("sigmoid", "identity", "softplus")), "Scan",
      id="LSTM-acts-identity"),
    P("LSTM", dict(layer_norm=True), "Scan", id="LSTM-layer_norm"),
    P("LSTM", dict(zoneout=(0.2, 0.1)), "Scan", id="LSTM-zoneout"),
    P("LSTM", dict(cell_clip=0.5, peephole=True), "Scan", id="LSTM-cell_clip-peephole"),
    P("LSTM", dict(proj_size=3, proj_clip=0.1, recurrent_dropout=0.2, weight_dropout=0.2),
      "Scan", id="LSTM-proj_clip-dropouts"),
    P("LSTM", dict(layer_norm=True, peephole=True, coupled_input_forget=True, zoneout=0.1,
                   gate_clip=0.5, proj_size=3, activations=("hard_sigmoid", "tanh", "softsign")),
      "Scan", id="LSTM-all"),
    P("GRU", dict(gate_clip=0.3, activations=("hard_sigmoid", "softsign")), "GRU",
      id="GRU-clip-acts"),
    P("GRU", dict(layer_norm=True, zoneout=0.2), "Scan", id="GRU-layer_norm-zoneout"),
    P("RNN", dict(gate_clip=0.3, activations=("softsign",)), "RNN", id="RNN-clip-acts"),
    P("RNN", dict(layer_norm=True, nonlinearity="relu", zoneout=0.1), "Scan",
      id="RNN-relu-layer_norm-zoneout"),
]  # fmt: skip


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bidir"])
@pytest.mark.parametrize("cls, kw, expect", VARIANTS)
@ROUTES
def test_variant(cls, kw, expect, bidirectional, dynamo):
    torch.manual_seed(0)
    m = getattr(rnnkit, cls)(4, 6, bidirectional=bidirectional, num_layers=2, **kw)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith(("peephole", "layer_norm")):
                p.uniform_(-1, 1)
            else:
                p.mul_(3)  # reach the clip bounds and the nonlinear ranges
    _check_layer(m, with_hx=True, with_lengths=bidirectional, expect=expect, dynamo=dynamo)


CELLS = [
    P("LSTMCell", {}, "LSTM", id="LSTMCell"),
    P("GRUCell", dict(bias=False), "GRU", id="GRUCell-nobias"),
    P("RNNCell", dict(nonlinearity="relu"), "RNN", id="RNNCell-relu"),
    P("LSTMCell", dict(layer_norm=True, zoneout=0.1, peephole=True), "Scan", id="LSTMCell-var"),
    P("GRUCell", dict(gate_clip=0.5), "GRU", id="GRUCell-clip"),
]


@pytest.mark.parametrize("unbatched", [False, True], ids=["batched", "unbatched"])
@pytest.mark.parametrize("with_hx", [False, True], ids=["zeros", "hx"])
@pytest.mark.parametrize("cls, kw, expect", CELLS)
@ROUTES
def test_cell(cls, kw, expect, with_hx, unbatched, dynamo):
    """A cell is one step: a one-step ONNX node through the TorchScript-based exporter, the
    step's own ops (its products as ``Gemm``) through the dynamo-based one."""
    torch.manual_seed(0)
    cell = getattr(rnnkit, cls)(4, 6, **kw).eval()
    call = Call(cell, with_hx, False).eval()
    is_lstm = cls == "LSTMCell"

    def inputs(N):
        shape = [] if unbatched else [N]
        feeds = {"x": torch.randn(*shape, 4)}
        if with_hx:
            feeds["h"] = torch.randn(*shape, 6)
            if is_lstm:
                feeds["c"] = torch.randn(*shape, 6)
        return feeds

    feeds = inputs(2)
    axes = {} if unbatched else {name: {0: "N"} for name in ("x", "h", "c", "h_out", "c_out")}
    outputs = ["h_out", "c_out"] if is_lstm else ["h_out"]
    proto = rnnkit.onnx.export(
        call, tuple(feeds.values()), None, input_names=list(feeds), output_names=outputs,
        dynamic_axes={k: v for k, v in axes.items() if k in {*feeds, *outputs}}, dynamo=dynamo,
    )  # fmt: skip
    assert (expect if not dynamo else "Gemm") in op_types(proto)
    for N in (1, 4):
        feeds = inputs(N)
        got = ort_run(proto, feeds)
        with torch.no_grad():
            want = call(*feeds.values())
        truth = in_float64(call, *feeds.values())
        for name, a, e, t in zip(outputs, got, want, truth, strict=True):
            assert_close(a, e, f"{name} N{N}", t)


class Tagger(nn.Module):
    """Embedding -> LSTM(proj_size) over padded sequences with lengths -> Linear."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.lstm = rnnkit.LSTM(8, 12, num_layers=2, proj_size=5, bidirectional=True,
                                batch_first=True, dropout=0.2)  # fmt: skip
        self.head = nn.Linear(10, 3)

    def forward(self, tokens, lengths):
        out, _ = self.lstm(self.embed(tokens), lengths=lengths)
        return self.head(out)


def test_whole_model():
    torch.manual_seed(0)
    model = Tagger().eval()
    tokens = torch.randint(0, 20, (2, 5))
    f = io.BytesIO()
    proto = rnnkit.onnx.export(
        model, (tokens, torch.tensor([5, 3])), f, input_names=["tokens", "lengths"],
        output_names=["logits"],
        dynamic_axes={"tokens": {0: "N", 1: "L"}, "lengths": {0: "N"}, "logits": {0: "N", 1: "L"}},
    )  # fmt: skip
    assert onnx.load_from_string(f.getvalue()) == proto
    assert {"Gather", "Scan", "MatMul"} <= op_types(proto)
    for L, N in SIZES:
        tokens = torch.randint(0, 20, (N, L))
        lengths = torch.randint(1, L + 1, (N,))
        (got,) = ort_run(proto, {"tokens": tokens, "lengths": lengths})
        with torch.no_grad():
            want = model(tokens, lengths)
        (truth,) = in_float64(model, tokens, lengths)
        assert_close(got, want, f"logits L{L}-N{N}", truth)


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(proj_size=3, peephole=True, zoneout=0.1, cell_clip=0.5)],
    ids=["plain", "variant"],
)
@ROUTES
def test_float64(kw, dynamo):
    """Float64 layers run as a Scan: onnxruntime's LSTM node takes float32 only.

    torch 2.13's dynamo-based exporter writes a Python float in the graph (zoneout's rate in
    its ``lerp``) as a float32 constant: 0.1 becomes 0.10000000149, measured to move the
    variant's outputs by up to 6e-10 (relative 1.3e-9), so that route is held to 1e-8
    relative there; an exact float32 rate (0.125) keeps float64's own tolerance."""
    torch.manual_seed(0)
    m = rnnkit.LSTM(4, 6, bidirectional=True, dtype=torch.float64, **kw).eval()
    x = torch.randn(5, 2, 4, dtype=torch.float64)
    proto = rnnkit.onnx.export(
        m, (x,), None, input_names=["x"], dynamic_axes={"x": {0: "L", 1: "N"}}, dynamo=dynamo
    )
    assert "Scan" in op_types(proto) and "LSTM" not in op_types(proto)
    x = torch.randn(9, 4, 4, dtype=torch.float64)
    got = ort_run(proto, {"x": x})
    with torch.no_grad():
        out, (h, c) = m(x)
    for name, a, e in zip(("output", "h_n", "c_n"), got, (out, h, c), strict=True):
        if dynamo and m.variant.zoneout != (0.0, 0.0):
            torch.testing.assert_close(a, e, rtol=1e-8, atol=1e-8 * e.abs().max().item())
        else:
            assert_close(a, e, name, None)


def test_converted_torch_model():
    """A torch.nn.LSTM with proj_size, which torch's exporter refuses, through rnnkit.convert."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.LSTM(4, 6, proj_size=2, num_layers=2)).eval()
    x = torch.randn(5, 2, 4)
    proto = rnnkit.onnx.export(
        rnnkit.convert(model), (x,), None, input_names=["x"], dynamic_axes={"x": {0: "L"}}
    )
    x = torch.randn(9, 2, 4)
    got = ort_run(proto, {"x": x})
    model = rnnkit.revert(model)
    with torch.no_grad():
        out, (h, c) = model(x)
    truth = in_float64(model[0], x)
    truth = [truth[0], *truth[1]]
    for name, a, e, t in zip(("output", "h_n", "c_n"), got, (out, h, c), truth, strict=True):
        assert_close(a, e, name, t)


def test_training_mode_exports_eval_with_a_warning():
    torch.manual_seed(0)
    model = Call(rnnkit.GRU(4, 6, zoneout=0.3), False, False).train()
    x = torch.randn(5, 2, 4)
    with pytest.warns(UserWarning, match="exported in eval mode"):
        proto = rnnkit.onnx.export(model, (x,), None)
    assert model.training
    with torch.no_grad():
        want = model.eval()(x)
    truth = in_float64(model, x)
    assert_close(ort_run(proto, {proto.graph.input[0].name: x})[0], want[0], "output", truth[0])


def test_training_export_of_random_layers_raises():
    model = Call(rnnkit.LSTM(4, 6, recurrent_dropout=0.2), False, False).train()
    with pytest.raises(NotImplementedError, match="draw random numbers in training mode"):
        rnnkit.onnx.export(
            model, (torch.randn(5, 2, 4),), None, training=torch.onnx.TrainingMode.TRAINING
        )


class Packed(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = rnnkit.LSTM(4, 6)

    def forward(self, x, lengths):
        return self.lstm(pack_padded_sequence(x, lengths, enforce_sorted=False))[1][0]


BARE = [
    P("LSTM", {}, False, id="LSTM"),
    P("LSTM", {}, True, id="LSTM-h0"),
    P("LSTM", dict(bidirectional=True, batch_first=True), True, id="LSTM-bidir-batch_first-h0"),
    P("LSTM", dict(num_layers=2), False, id="LSTM-2layers"),
    P("GRU", {}, True, id="GRU-h0"),
    P("GRU", dict(bidirectional=True, num_layers=2), False, id="GRU-bidir-2layers"),
    P("RNN", dict(nonlinearity="relu", num_layers=2), True, id="RNN-relu-2layers-h0"),
    P("RNN", dict(bidirectional=True), False, id="RNN-bidir"),
]  # fmt: skip


@pytest.mark.parametrize("cls, kw, with_hx", BARE)
def test_torch_onnx_export_of_a_bare_layer(cls, kw, with_hx):
    """torch's own exporter on a bare layer: its forward's defaults come positionally, and the
    layer exports as its ONNX nodes, with a dynamic sequence length and batch."""
    torch.manual_seed(0)
    m = getattr(rnnkit, cls)(4, 6, **kw).eval()
    feeds, axes = _inputs(m, 5, 2, with_hx, False, False)
    args = tuple(feeds.values())
    if with_hx:
        args = (args[0], args[1:]) if m.mode == "LSTM" else args
    names = _output_names(m)
    out_axes = {"output": axes["x"], "h_n": {1: "N"}, "c_n": {1: "N"}}
    f = io.BytesIO()
    torch.onnx.export(
        m, args, f, dynamo=False, input_names=list(feeds), output_names=names,
        dynamic_axes={**axes, **{k: v for k, v in out_axes.items() if k in names}},
    )  # fmt: skip
    proto = onnx.load_from_string(f.getvalue())
    assert m.mode.split("_")[0] in op_types(proto)
    call = Call(m, with_hx, False)
    for L, N in SIZES:
        feeds, _ = _inputs(m, L, N, with_hx, False, False)
        got = ort_run(proto, feeds)
        with torch.no_grad():
            want = call(*feeds.values())
        truth = in_float64(call, *feeds.values())
        for j, name in enumerate(names):
            assert_close(got[j], want[j], f"{name} L{L}-N{N}", truth[j])


def test_torch_onnx_export_of_a_layer_that_needs_a_scan_raises():
    m = rnnkit.LSTM(4, 6, proj_size=3).eval()
    with pytest.raises(NotImplementedError, match="rnnkit.onnx.export"):
        torch.onnx.export(m, (torch.randn(5, 2, 4),), io.BytesIO(), dynamo=False)


# Resets inside a sequence (reset=): always a Scan, whose steps select the restarted rows'
# state; against eager rnnkit with the same mask (tests/test_resets.py holds eager to the
# definition), on two other sizes than the export's.
RESET_LAYERS = [
    P("LSTM", dict(bidirectional=True), dict(with_hx=True, with_lengths=True),
      id="LSTM-bidir-h0-lengths"),
    P("LSTM", dict(proj_size=2, num_layers=2), dict(), id="LSTM-proj-2layers"),
    P("GRU", dict(bidirectional=True, batch_first=True, num_layers=2), dict(with_hx=True),
      id="GRU-bidir-batch_first-2layers-h0"),
    P("RNN", dict(nonlinearity="relu", bidirectional=True), dict(unbatched=True),
      id="RNN-relu-bidir-unbatched"),
    P("LSTM", dict(layer_norm=True, peephole=True, bidirectional=True),
      dict(with_hx=True, with_lengths=True), id="LSTM-layer_norm-peephole-bidir-h0-lengths"),
]  # fmt: skip


@ROUTES
@pytest.mark.parametrize("cls, kw, call_kw", RESET_LAYERS)
def test_layer_with_resets(cls, kw, call_kw, dynamo):
    m = getattr(rnnkit, cls)(4, 3, **kw)
    _check_layer(m, **call_kw, with_reset=True, expect="Scan", dynamo=dynamo)


def test_torch_onnx_export_of_a_call_with_resets_raises():
    """torch's own exporter takes ONNX's LSTM/GRU/RNN nodes alone; resets need a Scan."""
    m = rnnkit.LSTM(4, 3).eval()

    class WithResets(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = m

        def forward(self, x, reset):
            return self.m(x, reset=reset)[0]

    args = (torch.randn(5, 2, 4), torch.zeros(5, 2, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match=r"reset= runs as a Scan: rnnkit.onnx.export"):
        torch.onnx.export(WithResets(), args, io.BytesIO(), dynamo=False)


@pytest.mark.parametrize(
    "dynamo, match",
    [
        (True, "pass the padded input with lengths="),
        (False, "PackedSequence input is not supported"),
    ],
    ids=["dynamo", "torchscript"],
)
def test_packed_input_raises(dynamo, match):
    args = (torch.randn(5, 2, 4), torch.tensor([5, 3]))
    with pytest.raises(NotImplementedError, match=match):
        rnnkit.onnx.export(Packed().eval(), args, None, dynamo=dynamo)


def test_unsupported_options_raise():
    m = rnnkit.LSTM(4, 6, layer_norm=True).eval()
    x = torch.randn(5, 2, 4)
    with pytest.raises(TypeError, match="dynamic_shapes needs dynamo=True"):
        rnnkit.onnx.export(
            m, (x,), None, dynamic_shapes=({0: torch.export.Dim("L")},), dynamo=False
        )
    with pytest.raises(ValueError, match="opset_version >= 17"):
        rnnkit.onnx.export(m, (x,), None, opset_version=16)
    with pytest.raises(ValueError, match="opset_version must be"):
        rnnkit.onnx.export(m, (x,), None, opset_version=13)


def test_import_rnnkit_does_not_import_onnx():
    code = "import sys, rnnkit; assert 'onnx' not in sys.modules; rnnkit.onnx.export"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_docstring_examples():
    globs = {"torch": torch, "rnnkit": rnnkit}
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner()
    for test in finder.find(rnnkit.onnx, globs=globs):
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0

"""rnnkit.quantize_dynamic and the int8 layers and cells: against float32, torch.ao's dynamic
int8 LSTM, themselves on every way of calling them, and their errors."""

from __future__ import annotations

import copy
import io
import threading
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnkit
from rnnkit import quantized as Q

# The documented accuracy (README, "Deploying on CPU"): on torch's init, inputs N(0, 1), the
# outputs and final states of an int8 layer are within this of the float32 layer's.
FLOAT_ERROR = Q.FLOAT32_ERROR

LAYERS = [
    pytest.param(nn.LSTM, dict(), id="lstm"),
    pytest.param(nn.LSTM, dict(num_layers=2, bidirectional=True), id="lstm-2-bidir"),
    pytest.param(nn.LSTM, dict(proj_size=7, num_layers=2), id="lstm-proj"),
    pytest.param(nn.GRU, dict(num_layers=2, batch_first=True), id="gru-2-batch_first"),
    pytest.param(nn.GRU, dict(bias=False, bidirectional=True), id="gru-nobias-bidir"),
    pytest.param(nn.RNN, dict(nonlinearity="relu"), id="rnn-relu"),
    pytest.param(nn.RNN, dict(num_layers=3), id="rnn-tanh-3"),
    pytest.param(rnnkit.LSTM, dict(bidirectional=True), id="rnnkit-lstm-bidir"),
    pytest.param(rnnkit.GRU, dict(), id="rnnkit-gru"),
]


def _layer(cls, kw, H_in=16, H=32):
    torch.manual_seed(0)
    return cls(H_in, H, **kw).eval()


def _input(kw, L=10, N=3, H_in=16):
    return torch.randn(N, L, H_in) if kw.get("batch_first") else torch.randn(L, N, H_in)


def _flat(result):
    out, hx = result
    out = out.data if isinstance(out, nn.utils.rnn.PackedSequence) else out
    return [out, *(hx if isinstance(hx, tuple) else (hx,))]


def _max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(_flat(a), _flat(b), strict=True))


@pytest.mark.parametrize("cls,kw", LAYERS)
def test_int8_is_within_the_documented_error_of_float32(cls, kw):
    m = _layer(cls, kw)
    q = rnnkit.quantize_dynamic(m)
    assert type(q) is {"LSTM": Q.LSTM, "GRU": Q.GRU}.get(m.mode, Q.RNN)
    x = _input(kw)
    with torch.no_grad():
        err = _max_diff(q(x), m(x))
    assert 0 < err <= FLOAT_ERROR


@pytest.mark.parametrize("cls,kw", LAYERS)
def test_packed_and_lengths_run_each_sequence_alone(cls, kw):
    q = rnnkit.quantize_dynamic(_layer(cls, kw))
    bf = kw.get("batch_first", False)
    x, lengths = _input(kw), torch.tensor([6, 10, 3])
    with torch.no_grad():
        packed = pack_padded_sequence(x, lengths, batch_first=bf, enforce_sorted=False)
        out_p, h_p = q(packed)
        out_p, _ = pad_packed_sequence(out_p, batch_first=bf)
        out_l, h_l = q(x, lengths=lengths)
        for n, length in enumerate(lengths.tolist()):
            xn = x[n : n + 1, :length] if bf else x[:length, n : n + 1]
            out_n, h_n = q(xn)
            got = out_p[n : n + 1, :length] if bf else out_p[:length, n : n + 1]
            assert torch.equal(got, out_n)
            for a, b in zip(_flat((out_n, h_n))[1:], _flat((out_p, h_p))[1:], strict=True):
                assert torch.equal(a, b[:, n : n + 1])
        for a, b in zip(_flat((out_l, h_l))[1:], _flat((out_p, h_p))[1:], strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("cls,kw", LAYERS)
def test_the_direct_path_is_the_general_path(cls, kw):
    q = rnnkit.quantize_dynamic(_layer(cls, kw))
    x = _input(kw)
    with torch.no_grad():
        direct = q._direct(x, None)
        general = q._eager_forward(x, None, None)
    assert direct is not None
    for a, b in zip(_flat(direct), _flat(general), strict=True):
        assert torch.equal(a, b)


def test_streaming_in_steps_and_chunks_is_the_whole_sequence():
    # activations are quantized per row, so a step sees what the whole call sees
    q = rnnkit.quantize_dynamic(_layer(nn.LSTM, dict(num_layers=2)))
    x = torch.randn(12, 2, 16)
    with torch.no_grad():
        whole, (h, c) = q(x)
        state, outs = None, []
        for t in range(12):
            y, state = q.step(x[t], state)
            outs.append(y)
        assert torch.equal(torch.stack(outs), whole)
        assert torch.equal(state[0], h) and torch.equal(state[1], c)
        state, chunks = None, []
        for chunk in x.split(5):
            y, state = q(chunk, state)
            chunks.append(y)
        assert torch.equal(torch.cat(chunks), whole)


def test_unbatched_input_is_a_batch_of_one():
    q = rnnkit.quantize_dynamic(_layer(nn.GRU, dict(num_layers=2)))
    x = torch.randn(7, 16)
    with torch.no_grad():
        out, h = q(x)
        out1, h1 = q(x.unsqueeze(1))
    assert out.shape == (7, 32) and h.shape == (2, 32)
    assert torch.equal(out, out1.squeeze(1)) and torch.equal(h, h1.squeeze(1))


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_int8_is_at_least_as_accurate_as_torch_ao(mode):
    cls = getattr(nn, mode)
    m = _layer(cls, dict(num_layers=2), H_in=64, H=128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ao = torch.ao.quantization.quantize_dynamic(
                nn.Sequential(copy.deepcopy(m)), {cls}, dtype=torch.qint8
            )[0]
        except (AttributeError, RuntimeError, ImportError) as e:
            pytest.skip(f"this torch has no dynamic int8 {mode}: {e}")
    q = rnnkit.quantize_dynamic(m)
    torch.manual_seed(1)
    x = torch.randn(32, 4, 64)
    with torch.no_grad():
        ours, theirs = _max_diff(q(x), m(x)), _max_diff(ao(x), m(x))
    # measured about half of torch.ao's (per-channel weights, per-row activations)
    assert ours <= theirs


@pytest.mark.parametrize(
    "cls,kw",
    [pytest.param(nn.LSTMCell, {}, id="lstm"), pytest.param(nn.GRUCell, {}, id="gru"),
     pytest.param(nn.RNNCell, dict(nonlinearity="relu"), id="rnn-relu"),
     pytest.param(rnnkit.LSTMCell, dict(bias=False), id="rnnkit-lstm-nobias")],
)  # fmt: skip
def test_cells_are_one_step_of_the_layer(cls, kw):
    m = _layer(cls, kw)
    q = rnnkit.quantize_dynamic(m)
    assert type(q).__name__ == cls.__name__ and q._get_name() == "Quantized" + cls.__name__
    x = torch.randn(4, 16)
    with torch.no_grad():
        got, want = q(x), m(x)
        unbatched = q(x[0])
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    unbatched = unbatched if isinstance(unbatched, tuple) else (unbatched,)
    for a, b, u in zip(got, want, unbatched, strict=True):
        assert (a - b).abs().max() <= FLOAT_ERROR
        assert torch.equal(u, a[0])
    layer_cls = {nn.LSTMCell: nn.LSTM, nn.GRUCell: nn.GRU, nn.RNNCell: nn.RNN}.get(cls, nn.LSTM)
    layer = layer_cls(16, 32, **kw)
    layer.load_state_dict({f"{k}_l0": v for k, v in m.state_dict().items()})
    with torch.no_grad():
        _, hx = rnnkit.quantize_dynamic(layer)(x.unsqueeze(0))
    for a, b in zip(got, hx if isinstance(hx, tuple) else (hx,), strict=True):
        assert torch.equal(a, b[0])


def test_state_dict_round_trips():
    q = rnnkit.quantize_dynamic(_layer(nn.LSTM, dict(num_layers=2, proj_size=5)))
    sd = q.state_dict()
    assert list(sd)[:3] == ["weight_ih_l0", "weight_ih_l0_scale", "weight_hh_l0"]
    assert sd["weight_ih_l0"].dtype == torch.int8 and sd["weight_hr_l0"].shape == (5, 32)
    assert sd["bias_ih_l0"].dtype == torch.float32
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    other = rnnkit.quantize_dynamic(nn.LSTM(16, 32, num_layers=2, proj_size=5))
    other.load_state_dict(torch.load(buf))
    x = torch.randn(6, 2, 16)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(_flat(q(x)), _flat(other(x)), strict=True))
    bad = dict(sd, weight_ih_l0=sd["weight_ih_l0"][:, :3])
    with pytest.raises(RuntimeError, match="size mismatch for weight_ih_l0"):
        other.load_state_dict(bad)
    missing = {k: v for k, v in sd.items() if k != "weight_hh_l1_scale"}
    with pytest.raises(RuntimeError, match="Missing key.*weight_hh_l1_scale"):
        other.load_state_dict(missing)


def test_weights_are_over_3_5x_smaller():
    m = nn.LSTM(640, 640, num_layers=2)
    q = rnnkit.quantize_dynamic(m)
    float_bytes = sum(p.numel() * p.element_size() for p in m.parameters())
    assert float_bytes / q.weight_nbytes() >= 3.5
    assert list(q.parameters()) == []


def test_quantize_dynamic_replaces_nested_layers_and_leaves_the_rest():
    lstm = nn.LSTM(16, 32)
    model = nn.Sequential(nn.Linear(16, 16), nn.ModuleDict({"a": lstm, "b": lstm}))
    q = rnnkit.quantize_dynamic(model)
    assert type(model[1]["a"]) is nn.LSTM  # the original is left alone
    assert type(q[1]["a"]) is Q.LSTM and q[1]["a"] is q[1]["b"]
    assert type(q[0]) is nn.Linear
    same = rnnkit.quantize_dynamic(model, inplace=True)
    assert same is model and type(model[1]["a"]) is Q.LSTM
    assert type(rnnkit.quantize_dynamic(nn.GRUCell(3, 4))) is Q.GRUCell
    # already int8: left as it is
    assert rnnkit.quantize_dynamic(q, inplace=True)[1]["a"] is q[1]["a"]


def test_quantize_dynamic_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="torch.qint8"):
        rnnkit.quantize_dynamic(nn.LSTM(3, 4), dtype=torch.float16)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        rnnkit.quantize_dynamic("lstm")
    with pytest.raises(NotImplementedError, match="peephole"):
        rnnkit.quantize_dynamic(rnnkit.LSTM(3, 4, peephole=True))
    # forget_bias only changes the init: quantized as a plain layer
    assert type(rnnkit.quantize_dynamic(rnnkit.LSTM(3, 4, forget_bias=1.0))) is Q.LSTM


def test_training_and_bad_calls_raise_clear_errors():
    q = rnnkit.quantize_dynamic(nn.LSTM(16, 32, num_layers=2, dropout=0.5))
    x = torch.randn(5, 2, 16)
    with pytest.raises(RuntimeError, match="inference only"):
        q(x)  # training mode, with dropout between the layers
    q.eval()
    with pytest.raises(RuntimeError, match="inference only"):
        q(x.clone().requires_grad_())
    h = (torch.zeros(2, 2, 32, requires_grad=True), torch.zeros(2, 2, 32))
    with pytest.raises(RuntimeError, match="inference only"):
        q(x, h)
    with torch.no_grad():
        q(x.clone().requires_grad_(), h)
    with pytest.raises(ValueError, match="float32 input"):
        q(x.double())
    with pytest.raises(RuntimeError, match="input.size\\(-1\\) must be equal to input_size"):
        q(torch.randn(5, 2, 15))
    with pytest.raises(RuntimeError, match="Expected hidden\\[0\\] size"):
        q(x, (torch.zeros(2, 3, 32), torch.zeros(2, 2, 32)))
    with pytest.raises(ValueError, match="Expected input to be 2D or 3D"):
        q(torch.randn(5, 2, 16, 1))
    with pytest.raises(NotImplementedError, match="reset="):
        q(x, reset=torch.zeros(5, 2, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="eagerly"):
        torch.jit.trace(q, (x,))
    cell = rnnkit.quantize_dynamic(nn.LSTMCell(16, 32))
    with pytest.raises(RuntimeError, match="input has inconsistent input_size: got 15"):
        cell(torch.randn(2, 15))
    with pytest.raises(RuntimeError, match="Input batch size 2 doesn't match hidden0"):
        cell(torch.randn(2, 16), (torch.zeros(3, 32), torch.zeros(3, 32)))
    with pytest.raises(RuntimeError, match="inference only"):
        cell(torch.randn(2, 16, requires_grad=True))


def test_threads_share_a_layer_safely():
    q = rnnkit.quantize_dynamic(_layer(nn.LSTM, dict(num_layers=2)))
    xs = [torch.randn(8, 2, 16) for _ in range(4)]
    with torch.no_grad():
        want = [q(x)[0] for x in xs]
    got = [None] * 4

    def run(i):
        with torch.no_grad():
            for _ in range(20):
                got[i] = q(xs[i])[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_kernel_names_the_product_kernel(monkeypatch):
    assert Q.kernel() in ("vnni", "portable")
    monkeypatch.setenv("RNNKIT_INT8_KERNEL", "portable")
    assert Q.kernel() == "portable"

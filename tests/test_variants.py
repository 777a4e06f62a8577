"""The variants of ``rnnkit.variants`` against an independent formula implementation.

``naive_layer`` below is written from the equations in ``rnnkit.variants``' docstring, one gate
at a time, without ``rnnkit.cells``. Training-mode tests draw the masks in the documented order
(weight dropout, recurrent dropout, zoneout h, zoneout c, per layer and direction) under the
same seed as the module.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnkit
from parity import randomize_variant_parameters
from rnnkit.variants import ACTIVATIONS

ACT = {
    "sigmoid": lambda x: 1 / (1 + torch.exp(-x)),
    "tanh": torch.tanh,
    "relu": lambda x: x.clamp_min(0),
    "hard_sigmoid": lambda x: (0.2 * x + 0.5).clamp(0, 1),
    "softsign": lambda x: x / (1 + x.abs()),
    "softplus": lambda x: torch.log1p(torch.exp(x)),
    "elu": lambda x: torch.where(x > 0, x, torch.expm1(x)),
    "identity": lambda x: x,
}


def _ln(v, gain, shift=None):
    mean = v.mean(-1, keepdim=True)
    var = ((v - mean) ** 2).mean(-1, keepdim=True)
    out = (v - mean) / torch.sqrt(var + 1e-5) * gain
    return out if shift is None else out + shift


def _clip(v, c):
    return v if c is None else v.clamp(-c, c)


def naive_layer(mode, x, h, c, P, opt, masks):
    """One direction of one layer, time-major ``x`` [L, N, H_in]; returns outputs and state."""
    L = x.size(0)
    H = P["w_hh"].size(0) // {"LSTM": 4, "GRU": 3}.get(mode, 1)
    acts = [ACT[a] for a in opt["acts"]]
    w_hh = P["w_hh"] if masks.get("w") is None else P["w_hh"] * masks["w"]
    outs = []
    for t in range(L):
        xp = x[t] @ P["w_ih"].T
        h_in = h if masks.get("rec") is None else h * masks["rec"]
        rp = h_in @ w_hh.T
        if opt["layer_norm"]:
            xp, rp = _ln(xp, P["ln_ih"]), _ln(rp, P["ln_hh"])
        if "b_ih" in P:
            xp, rp = xp + P["b_ih"], rp + P["b_hh"]

        def gate(k, extra=0.0, xp=xp, rp=rp):
            return _clip(xp[:, k * H : (k + 1) * H] + rp[:, k * H : (k + 1) * H] + extra, opt["gc"])

        if mode == "LSTM":
            pi = pf = po = 0.0
            if opt["peephole"]:
                pi, pf, po = P["peep"][:H], P["peep"][H : 2 * H], P["peep"][2 * H :]
            i = acts[0](gate(0, pi * c))
            f = 1 - i if opt["cifg"] else acts[0](gate(1, pf * c))
            g = acts[1](gate(2))
            c_new = _clip(f * c + i * g, opt["cell_clip"])
            o = acts[0](gate(3, po * c_new))
            c_out = _ln(c_new, P["ln_cw"], P["ln_cb"]) if opt["layer_norm"] else c_new
            h_new = o * acts[2](c_out)
            if "w_hr" in P:
                h_new = _clip(h_new @ P["w_hr"].T, opt["proj_clip"])
            kc = masks["zc"][t] if masks.get("zc") is not None else opt["zc"]
            c = kc * c + (1 - kc) * c_new
        elif mode == "GRU":
            r = acts[0](_clip(xp[:, :H] + rp[:, :H], opt["gc"]))
            z = acts[0](_clip(xp[:, H : 2 * H] + rp[:, H : 2 * H], opt["gc"]))
            n = acts[1](_clip(xp[:, 2 * H :] + r * rp[:, 2 * H :], opt["gc"]))
            h_new = (1 - z) * n + z * h
        else:
            h_new = acts[0](gate(0))
        kh = masks["zh"][t] if masks.get("zh") is not None else opt["zh"]
        h = kh * h + (1 - kh) * h_new
        outs.append(h)
    return torch.stack(outs), h, c


def _layer_params(m, k, suffix):
    def get(name):
        return getattr(m, f"{name}_l{k}{suffix}", None)

    P = {"w_ih": get("weight_ih"), "w_hh": get("weight_hh")}
    for key, name in [
        ("b_ih", "bias_ih"),
        ("b_hh", "bias_hh"),
        ("w_hr", "weight_hr"),
        ("peep", "peephole"),
        ("ln_ih", "layer_norm_ih"),
        ("ln_hh", "layer_norm_hh"),
        ("ln_cw", "layer_norm_c_weight"),
        ("ln_cb", "layer_norm_c_bias"),
    ]:
        if get(name) is not None:
            P[key] = get(name)
    return P


def naive_forward(m, x, training):
    """The whole stack, drawing masks in the documented order; ``x`` time-major."""
    mode, v = m.mode, m.variant
    defaults = {"LSTM": ("sigmoid", "tanh", "tanh"), "GRU": ("sigmoid", "tanh")}
    acts = v.activations or defaults.get(mode, ("tanh" if mode == "RNN_TANH" else "relu",))
    opt = dict(
        acts=acts, layer_norm=v.layer_norm, peephole=v.peephole, gc=v.gate_clip,
        cell_clip=v.cell_clip, proj_clip=v.proj_clip, cifg=v.coupled_input_forget,
        zh=v.zoneout[0], zc=v.zoneout[1],
    )  # fmt: skip
    L, N = x.shape[:2]
    H_out = m.proj_size or m.hidden_size
    D = 2 if m.bidirectional else 1
    hs, cs = [], []
    for k in range(m.num_layers):
        outs = []
        for d in range(D):
            P = _layer_params(m, k, "_reverse" if d else "")
            masks = {}
            if training:
                if v.weight_dropout:
                    keep = torch.empty_like(P["w_hh"]).bernoulli_(1 - v.weight_dropout)
                    masks["w"] = keep / (1 - v.weight_dropout)
                if v.recurrent_dropout:
                    keep = torch.empty(N, H_out, dtype=x.dtype).bernoulli_(1 - v.recurrent_dropout)
                    masks["rec"] = keep / (1 - v.recurrent_dropout)
                if v.zoneout[0]:
                    masks["zh"] = torch.empty(L, N, H_out, dtype=x.dtype).bernoulli_(v.zoneout[0])
                if mode == "LSTM" and v.zoneout[1]:
                    shape = (L, N, m.hidden_size)
                    masks["zc"] = torch.empty(shape, dtype=x.dtype).bernoulli_(v.zoneout[1])
            seq = x if d == 0 else x.flip(0)
            if d == 1:
                masks = {key: (t.flip(0) if key in ("zh", "zc") else t) for key, t in masks.items()}
            h0 = x.new_zeros(N, H_out)
            c0 = x.new_zeros(N, m.hidden_size)
            out, h, c = naive_layer(mode, seq, h0, c0, P, opt, masks)
            outs.append(out if d == 0 else out.flip(0))
            hs.append(h)
            cs.append(c)
        x = torch.cat(outs, -1)
        if training and m.dropout and k < m.num_layers - 1:
            x = F.dropout(x, m.dropout, True)
    return x, torch.stack(hs), torch.stack(cs)


LSTM_CASES = {
    "layer_norm": dict(layer_norm=True),
    "peephole": dict(peephole=True),
    "zoneout": dict(zoneout=(0.3, 0.2)),
    "recurrent_dropout": dict(recurrent_dropout=0.4),
    "weight_dropout": dict(weight_dropout=0.3),
    "gate_clip": dict(gate_clip=0.5),
    "cell_clip": dict(cell_clip=0.3),
    "proj_clip": dict(proj_size=3, proj_clip=0.2),
    "cifg": dict(coupled_input_forget=True),
    "activations": dict(activations=("hard_sigmoid", "softsign", "elu")),
    "all": dict(
        layer_norm=True,
        peephole=True,
        zoneout=(0.2, 0.1),
        recurrent_dropout=0.3,
        weight_dropout=0.2,
        gate_clip=2.0,
        cell_clip=1.5,
        proj_size=4,
        proj_clip=1.0,
        activations=("sigmoid", "tanh", "softsign"),
    ),  # fmt: skip
}
GRU_RNN_CASES = {
    "layer_norm": dict(layer_norm=True),
    "zoneout": dict(zoneout=0.3),
    "recurrent_dropout": dict(recurrent_dropout=0.4),
    "weight_dropout": dict(weight_dropout=0.3),
    "gate_clip": dict(gate_clip=0.4),
    "all": dict(layer_norm=True, zoneout=0.2, recurrent_dropout=0.3, weight_dropout=0.2),
}
CASES = [pytest.param("LSTM", kw, id=f"LSTM-{name}") for name, kw in LSTM_CASES.items()] + [
    pytest.param(cls, kw, id=f"{cls}-{name}")
    for cls in ("GRU", "RNN")
    for name, kw in GRU_RNN_CASES.items()
]


def _module(cls, kw, engine="auto", **extra):
    torch.manual_seed(0)
    m = getattr(rnnkit, cls)(5, 7, **kw, **extra, engine=engine, dtype=torch.float64)
    return randomize_variant_parameters(m)


# The reference, and what auto picks (the fused engine for most LSTM variants).
ENGINES = ("reference", "auto")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("cls, kw", CASES)
def test_matches_formula(cls, kw, training, engine):
    m = _module(cls, kw, engine, num_layers=2, bidirectional=True).train(training)
    x = torch.randn(6, 3, 5, dtype=torch.float64)
    torch.manual_seed(11)
    out, hidden = m(x)
    h = hidden[0] if cls == "LSTM" else hidden
    torch.manual_seed(11)
    ref_out, ref_h, ref_c = naive_forward(m, x, training)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(h, ref_h, atol=1e-12, rtol=1e-10)
    if cls == "LSTM":
        torch.testing.assert_close(hidden[1], ref_c, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("cls, kw", CASES)
def test_gradcheck(cls, kw, engine):
    m = _module(cls, kw, engine).eval()
    x = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in m.parameters()]

    def f(x, *ps):
        out, hidden = torch.func.functional_call(m, dict(zip(names, ps, strict=True)), (x,))
        return out, *(hidden if isinstance(hidden, tuple) else (hidden,))

    assert torch.autograd.gradcheck(f, (x, *params), fast_mode=True)


def test_zoneout_eval_is_expectation_and_train_is_random():
    m = _module("LSTM", dict(zoneout=(0.5, 0.5)))
    x = torch.randn(5, 2, 5, dtype=torch.float64)
    m.eval()
    assert torch.equal(m(x)[0], m(x)[0])
    m.train()
    torch.manual_seed(1)
    a = m(x)[0]
    torch.manual_seed(2)
    b = m(x)[0]
    assert not torch.equal(a, b)


def test_recurrent_dropout_mask_is_fixed_across_time():
    """With W_hh = I and no input, the recurrent term shows the mask: the same at every step."""
    m = rnnkit.RNN(1, 64, nonlinearity="relu", bias=False, recurrent_dropout=0.5)
    with torch.no_grad():
        m.weight_ih_l0.fill_(0.0)
        m.weight_hh_l0.copy_(torch.eye(64))
    h0 = torch.ones(1, 1, 64)
    out, _ = m(torch.zeros(4, 1, 1), h0)
    kept = out[0, 0] != 0
    assert 0 < kept.sum() < 64
    for t in range(1, 4):
        assert torch.equal(out[t, 0] != 0, kept)
    m.eval()
    assert torch.equal(m(torch.zeros(4, 1, 1), h0)[0], torch.ones(4, 1, 64))


def test_weight_dropout_is_one_mask_per_call_and_off_in_eval():
    m = _module("GRU", dict(weight_dropout=0.5))
    x = torch.randn(4, 2, 5, dtype=torch.float64)
    torch.manual_seed(3)
    a = m(x)[0]
    torch.manual_seed(3)
    assert torch.equal(a, m(x)[0])
    torch.manual_seed(4)
    assert not torch.equal(a, m(x)[0])
    m.eval()
    plain = rnnkit.GRU(5, 7, dtype=torch.float64, engine="reference")
    plain.load_state_dict(m.state_dict())
    assert torch.equal(m(x)[0], plain(x)[0])


def test_forget_bias_only_changes_init():
    torch.manual_seed(0)
    ref = torch.nn.LSTM(5, 7, 2)
    torch.manual_seed(0)
    m = rnnkit.LSTM(5, 7, 2, forget_bias=1.0)
    for name, p in ref.named_parameters():
        q = getattr(m, name).detach().clone()
        if name.startswith("bias_ih"):
            q[7:14] -= 1.0
        # p + 1 rounds once (to half an ulp of 1: eps / 2) and subtracting 1 again is exact:
        # IEEE arithmetic, the same on every CPU
        torch.testing.assert_close(q, p.detach(), atol=torch.finfo(p.dtype).eps / 2, rtol=0)


def test_variant_init_draws_no_random_numbers():
    torch.manual_seed(0)
    torch.nn.LSTM(5, 7, 2)
    expected = torch.rand(3)
    torch.manual_seed(0)
    rnnkit.LSTM(5, 7, 2, layer_norm=True, peephole=True, forget_bias=1.0)
    assert torch.equal(torch.rand(3), expected)


def test_defaults_are_torch_bit_for_bit():
    torch.manual_seed(0)
    ref = torch.nn.LSTM(5, 7, 2)
    torch.manual_seed(0)
    m = rnnkit.LSTM(
        5, 7, 2, layer_norm=False, zoneout=0.0, activations=("sigmoid", "tanh", "tanh"),
        engine="reference",
    )  # fmt: skip
    x = torch.randn(4, 3, 5)
    with torch.backends.mkldnn.flags(enabled=False):
        expected = ref(x)[0]
    assert m.variant.is_plain
    assert torch.equal(m(x)[0], expected)


def test_packed_variant_matches_padded():
    m = _module("LSTM", dict(layer_norm=True, peephole=True, zoneout=(0.3, 0.3))).eval()
    x = torch.randn(6, 3, 5, dtype=torch.float64)
    lengths = torch.tensor([6, 4, 2])
    packed_out, _ = m(pack_padded_sequence(x, lengths, enforce_sorted=False))
    out, _ = pad_packed_sequence(packed_out)
    for n, length in enumerate(lengths.tolist()):
        expected, _ = m(x[:length, n])
        torch.testing.assert_close(out[:length, n], expected, atol=1e-12, rtol=0)


def test_cells_match_one_layer_step():
    kw = dict(layer_norm=True, peephole=True, gate_clip=1.0, cell_clip=2.0)
    cell = _module("LSTMCell", kw).eval()
    layer = rnnkit.LSTM(5, 7, **kw, dtype=torch.float64).eval()
    layer.load_state_dict({f"{k}_l0": v for k, v in cell.state_dict().items()})
    x = torch.randn(3, 5, dtype=torch.float64)
    h, c = cell(x)
    out, (h_n, c_n) = layer(x.unsqueeze(0))
    torch.testing.assert_close(h, h_n[0], atol=1e-12, rtol=0)
    torch.testing.assert_close(c, c_n[0], atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(zoneout=1.0), ValueError),
        (dict(recurrent_dropout=-0.1), ValueError),
        (dict(gate_clip=0), ValueError),
        (dict(activations=("sigmoid", "tanh")), ValueError),
        (dict(activations=("sigmoid", "nope", "tanh")), ValueError),
        (dict(layer_norm=1), TypeError),
    ],
)
def test_bad_variant_arguments(kwargs, error):
    with pytest.raises(error):
        rnnkit.LSTM(5, 7, **kwargs)


@pytest.mark.parametrize("cls", ["GRU", "RNN"])
def test_lstm_only_variants_rejected(cls):
    with pytest.raises(ValueError, match="only supported for LSTM"):
        getattr(rnnkit, cls)(5, 7, peephole=True)


def test_revert_refuses_variants():
    with pytest.raises(ValueError, match="torch.nn has no layer"):
        rnnkit.revert(rnnkit.LSTM(5, 7, layer_norm=True))


def test_activation_menu_is_documented():
    assert set(ACTIVATIONS) == set(ACT)
    x = torch.linspace(-5, 5, 101, dtype=torch.float64)
    for name, fn in ACTIVATIONS.items():
        torch.testing.assert_close(fn(x), ACT[name](x), atol=1e-12, rtol=0)
    assert math.isclose(
        ACTIVATIONS["hard_sigmoid"](torch.tensor(1.0, dtype=torch.float64)).item(), 0.7
    )

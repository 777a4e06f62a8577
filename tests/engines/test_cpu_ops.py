"""The compiled ops of the fused CPU engine (``csrc/checks.h``, ``layer.cpp``,
``lstm_variant.cpp``) check every argument they read.

Traces and deserialized graphs call ``torch.ops.rnnkit_cpu.*`` directly, with no Python caller
to vouch for the arguments: each bad argument here must raise a RuntimeError that names it
before a kernel touches memory (without the check, the op returns garbage or aborts the
process, and the test fails either way), and the good arguments beside them must still run.
Uniform input passes empty ``batch_sizes``: every step has the full batch, as the explicit
list ``[N] * L`` says, to the bit.
"""

from __future__ import annotations

import pytest
import torch

from rnnkit.modes import MODES

_F64 = torch.float64


@pytest.fixture(scope="module")
def ops():
    from rnnkit.engines.cpu.build import build_error, kernels

    if build_error() is not None:
        pytest.skip(build_error())
    return kernels()


def _randn(*shape, dtype=_F64):
    return torch.randn(*shape, dtype=dtype)


def layer_args(mode="LSTM", D=2, L=4, N=3, H_in=5, H=6, proj=0, packed=(), train=True):
    """Good ``layer_forward`` arguments: ``packed`` batch sizes, or uniform ``[L, N]`` rows."""
    G, H_out = MODES[mode].gates, proj or H
    N = packed[0] if packed else N
    R = sum(packed) if packed else L * N
    weights = []
    for _ in range(D):
        weights += [_randn(G * H, H_in), _randn(G * H, H_out), _randn(G * H), _randn(G * H)]
        weights += [_randn(H_out, H)] if proj else []
    lstm = mode == "LSTM"
    return dict(
        mode=MODES[mode].code, x=_randn(R, H_in), h0=_randn(D, N, H_out),
        c0=_randn(D, N, H) if lstm else None, weights=weights, batch_sizes=list(packed),
        has_bias=True, train=train,
    )  # fmt: skip


def backward_args(ops, fwd):
    """Good ``layer_backward`` arguments for the forward arguments ``fwd``."""
    out, h_n, c_n, *saved = ops.layer_forward(**fwd)
    lstm = fwd["c0"] is not None
    return dict(
        mode=fwd["mode"], grad_out=torch.randn_like(out), grad_hn=torch.randn_like(h_n),
        grad_cn=torch.randn_like(c_n) if lstm else None, x=fwd["x"], h0=fwd["h0"], c0=fwd["c0"],
        weights=fwd["weights"], out=out, saved=saved, batch_sizes=fwd["batch_sizes"],
        has_bias=True, need_dx=True, reuse_saved=False,
    )  # fmt: skip


GOOD_LAYERS = [
    pytest.param(dict(mode="LSTM", proj=4), id="LSTM-bidir-proj"),
    pytest.param(dict(mode="LSTM", D=1, packed=(3, 3, 2, 1)), id="LSTM-packed"),
    pytest.param(dict(mode="GRU", packed=(4, 2, 2)), id="GRU-bidir-packed"),
    pytest.param(dict(mode="RNN_TANH", L=1, N=1), id="RNNtanh-L1-N1"),
    pytest.param(dict(mode="RNN_RELU", D=1, N=0), id="RNNrelu-N0"),
]


@pytest.mark.parametrize("kw", GOOD_LAYERS)
def test_good_layer_arguments_run(ops, kw):
    fwd = layer_args(**kw)
    out, h_n, c_n, *_ = ops.layer_forward(**fwd)
    D, N, H_out = fwd["h0"].shape
    assert out.shape == (fwd["x"].size(0), D * H_out) and h_n.shape == (D, N, H_out)
    dx, dh0, dc0, *dweights = ops.layer_backward(**backward_args(ops, fwd))
    assert dx.shape == fwd["x"].shape and dh0.shape == fwd["h0"].shape
    assert [g.shape for g in dweights] == [w.shape for w in fwd["weights"]]


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH"])
def test_restart_codes_of_carry_alone_change_nothing(ops, mode):
    """Codes that all carry the state (rnnkit.resets.CARRY) give the results without codes,
    bit for bit, forward and backward; a code that restarts a row changes them."""
    fwd = layer_args(mode, L=5, N=3)
    carry = torch.zeros(2, 15, dtype=torch.int8)
    for a, b in zip(ops.layer_forward(**fwd), ops.layer_forward(**fwd, restart=carry), strict=True):
        assert torch.equal(a, b)
    bwd = backward_args(ops, fwd)
    grads = ops.layer_backward(**bwd)
    for a, b in zip(grads, ops.layer_backward(**bwd, restart=carry), strict=True):
        assert torch.equal(a, b)
    zero = carry.clone()
    zero[0, 7] = 1  # direction 0, step 2, sequence 1 starts from zeros
    assert not torch.equal(ops.layer_forward(**fwd)[0], ops.layer_forward(**fwd, restart=zero)[0])


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH"])
def test_empty_batch_sizes_mean_the_full_batch_every_step(ops, mode):
    fwd = layer_args(mode, L=5, N=3)
    explicit = dict(fwd, batch_sizes=[3] * 5)
    for a, b in zip(ops.layer_forward(**fwd), ops.layer_forward(**explicit), strict=True):
        assert torch.equal(a, b)
    bwd = backward_args(ops, fwd)
    grads = ops.layer_backward(**bwd)
    for a, b in zip(grads, ops.layer_backward(**dict(bwd, batch_sizes=[3] * 5)), strict=True):
        assert torch.equal(a, b)


def _set(**changes):
    def mutate(args):
        args.update(changes)

    return mutate


def _weight(k, t):
    def mutate(args):
        args["weights"] = [t if i == k else w for i, w in enumerate(args["weights"])]

    return mutate


def _drop_weight(args):
    args["weights"] = args["weights"][:-1]


# One bad argument each, of an LSTM layer (bidirectional, proj_size 4: H = 6, H_out = 4) on
# uniform input L = 4, N = 3 (R = 12 rows, H_in = 5), unless `kw` says otherwise.
_DEFAULT = dict(proj=4)
BAD_FORWARD = [
    ("sizes-short-of-rows", {}, _set(batch_sizes=[3, 3, 3, 2]),
     r"batch_sizes sum to 11 but the input has 12 rows"),
    ("sizes-past-rows", {}, _set(batch_sizes=[3, 3, 3, 3, 3]),
     r"batch_sizes sum to 15 but the input has 12 rows"),
    ("batch-wider-than-h0", {}, _set(batch_sizes=[4, 4, 4]),
     r"batch_sizes\[0\] must equal h0's batch N = 3, got 4"),
    ("batch-narrower-than-h0", {}, _set(batch_sizes=[2, 2, 2, 2, 2, 2]),
     r"batch_sizes\[0\] must equal h0's batch N = 3, got 2"),
    ("negative-batch", {}, _set(batch_sizes=[3, -3, 3, 3, 3, 3]),
     r"batch_sizes must be positive, got -3 at position 1"),
    ("zero-batch", {}, _set(batch_sizes=[3, 3, 0, 3, 3]),
     r"batch_sizes must be positive, got 0 at position 2"),
    ("growing-batch", {}, _set(batch_sizes=[3, 2, 3, 3, 1]),
     r"non-increasing, got 3 at position 2 after 2"),
    ("uniform-rows-not-a-multiple", {}, _set(x=_randn(13, 5)),
     r"uniform input \(batch_sizes \[-1\]\) must have a positive multiple of N = 3 rows"),
    ("uniform-no-rows", {}, _set(x=_randn(0, 5)), r"positive multiple of N = 3 rows .* got 0"),
    ("empty-batch-with-rows", {}, _set(h0=_randn(2, 0, 4), c0=_randn(2, 0, 6)),
     r"uniform input of batch N = 0 must have 0 rows, got 12"),
    ("wrong-H_in", {}, _set(x=_randn(12, 7)),
     r"w_ih of direction 0 must have shape \[24, 7\] \(\[G\*H, H_in\], H_in of x\), got "
     r"\[24, 5\]"),
    ("x-1d", {}, _set(x=_randn(12)), r"x must be 2-D, got 1-D"),
    ("x-int", {}, _set(x=torch.zeros(12, 5, dtype=torch.int64)), r"float32 or float64 only"),
    ("h0-dtype", {}, _set(h0=_randn(2, 3, 4, dtype=torch.float32)),
     r"h0 must have dtype Double \(the op's\), got Float"),
    ("weight-dtype", {}, _weight(6, _randn(24, 4, dtype=torch.float32)),
     r"w_hh of direction 1 must have dtype Double"),
    ("weight-bfloat16-float64-x", {}, _weight(1, _randn(24, 4, dtype=torch.bfloat16)),
     r"w_hh of direction 0 must have dtype Double"),
    ("h0-2d", {}, _set(h0=_randn(3, 4)), r"h0 must be 3-D, got 2-D"),
    ("three-directions", {}, _set(h0=_randn(3, 3, 4), c0=_randn(3, 3, 6)), r"D = 1 or 2"),
    ("c0-missing", {}, _set(c0=None), r"an LSTM layer needs c0"),
    ("c0-shape", {}, _set(c0=_randn(2, 3, 4)),
     r"c0 must have shape \[2, 3, 6\] \(\[D, N, H\]\), got \[2, 3, 4\]"),
    ("c0-for-gru", dict(mode="GRU"), _set(c0=_randn(2, 3, 6)), r"c0 is for LSTM only"),
    ("weight-missing", {}, _drop_weight,
     r"expected 8 \(or with w_hr 10\) weights for 2 direction\(s\) with biases, got 9"),
    ("mode", {}, _set(mode=7), r"mode must be one of LSTM = 0, .* got 7"),
    ("w_hh-rows", {}, _weight(1, _randn(25, 4)), r"w_hh of direction 0 must have G\*H rows"),
    ("w_hh-cols", {}, _weight(6, _randn(24, 5)),
     r"w_hh of direction 1 must have shape \[24, 4\] \(\[G\*H, H_out\]\), got \[24, 5\]"),
    ("b_ih-shape", {}, _weight(2, _randn(23)), r"b_ih of direction 0 must have shape \[24\]"),
    ("b_hh-shape", {}, _weight(8, _randn(24, 1)),
     r"b_hh of direction 1 must have shape \[24\] \(\[G\*H\]\), got \[24, 1\]"),
    ("w_hr-shape", {}, _weight(4, _randn(6, 4)),
     r"w_hr of direction 0 must have shape \[4, 6\] \(\[H_out, H\]\), got \[6, 4\]"),
    ("H_out-without-proj", dict(mode="GRU"), _set(h0=_randn(2, 3, 7)),
     r"h0's H_out \(7\) must equal the hidden size H = 6 without w_hr"),
    ("restart-dtype", {}, _set(restart=torch.zeros(2, 12, dtype=torch.bool)),
     r"restart must have dtype Char \(the op's\), got Bool"),
    ("restart-shape", {}, _set(restart=torch.zeros(1, 12, dtype=torch.int8)),
     r"restart must have shape \[2, 12\] \(\[D, R\]\), got \[1, 12\]"),
    ("restart-code", {}, _set(restart=torch.tensor([[0] * 12, [0] * 5 + [3] + [0] * 6],
                                                   dtype=torch.int8)),
     r"restart codes must be 0, 1 or 2, got 3 at row 5 of direction 1"),
]  # fmt: skip


@pytest.mark.parametrize(
    "kw, mutate, message",
    [pytest.param(kw, m, msg, id=name) for name, kw, m, msg in BAD_FORWARD],
)
def test_layer_forward_refuses_bad_arguments(ops, kw, mutate, message):
    args = layer_args(**(kw or _DEFAULT))
    mutate(args)
    with pytest.raises(RuntimeError, match="rnnkit fused engine: .*" + message):
        ops.layer_forward(**args)


@pytest.mark.parametrize(
    "kw, mutate, message",
    [pytest.param(kw, m, msg, id=name) for name, kw, m, msg in BAD_FORWARD],
)
def test_layer_backward_refuses_bad_forward_arguments(ops, kw, mutate, message):
    """Backward reads the forward's arguments again: the same checks."""
    args = backward_args(ops, layer_args(**(kw or _DEFAULT)))
    forward_keys = {"mode", "x", "h0", "c0", "weights", "batch_sizes", "restart"}
    fwd = {k: args[k] for k in forward_keys if k in args}
    mutate(fwd)
    with pytest.raises(RuntimeError, match="rnnkit fused engine: .*" + message):
        ops.layer_backward(**{**args, **fwd})


def _bfloat16_layer_args(**kw):
    """A bfloat16 layer's forward arguments: float32 input and states, bfloat16 weights."""
    args = layer_args(**kw)
    args.update({k: args[k].float() for k in ("x", "h0", "c0") if args[k] is not None})
    args["weights"] = [w.bfloat16() for w in args["weights"]]
    return args


def test_bfloat16_weights_take_float32_input_and_states(ops):
    """A bfloat16 layer: forward and backward take bfloat16 weights beside float32 x, h0, c0
    (and float32 gradients, which they return in float32), and refuse a mix of weights."""
    args = _bfloat16_layer_args(proj=4)
    out, h_n, c_n, *saved = ops.layer_forward(**args)
    assert out.dtype == h_n.dtype == c_n.dtype == torch.float32
    mixed = [*args["weights"][:6], args["weights"][6].float(), *args["weights"][7:]]
    with pytest.raises(RuntimeError, match=r"w_hh of direction 1 must have dtype BFloat16"):
        ops.layer_forward(**dict(args, weights=mixed))
    with pytest.raises(RuntimeError, match=r"float32 or float64 only, got x of dtype BFloat16"):
        ops.layer_forward(**dict(args, x=args["x"].bfloat16()))
    bwd = dict(
        mode=args["mode"], grad_out=torch.randn_like(out), grad_hn=torch.randn_like(h_n),
        grad_cn=torch.randn_like(c_n), x=args["x"], h0=args["h0"], c0=args["c0"],
        weights=args["weights"], out=out, saved=saved, batch_sizes=[], has_bias=True,
        need_dx=True, reuse_saved=False,
    )  # fmt: skip
    grads = ops.layer_backward(**bwd)
    assert len(grads) == 3 + len(args["weights"])
    assert all(g.dtype == torch.float32 for g in grads)
    with pytest.raises(RuntimeError, match=r"w_hh of direction 1 must have dtype BFloat16"):
        ops.layer_backward(**dict(bwd, weights=mixed))


def _saved(k, t):
    def mutate(args):
        args["saved"] = [t if i == k else s for i, s in enumerate(args["saved"])]

    return mutate


def _drop_saved(args):
    args["saved"] = args["saved"][:-1]


BAD_BACKWARD = [
    ("grad_out-shape", {}, _set(grad_out=_randn(12, 4)),
     r"grad_out must have shape \[12, 8\] \(\[R, D\*H_out\]\), got \[12, 4\]"),
    ("grad_out-dtype", {}, _set(grad_out=_randn(12, 8, dtype=torch.float32)),
     r"grad_out must have dtype Double"),
    ("grad_hn-shape", {}, _set(grad_hn=_randn(2, 4, 4)), r"grad_hn must have shape \[2, 3, 4\]"),
    ("grad_cn-missing", {}, _set(grad_cn=None), r"an LSTM layer's backward needs grad_cn"),
    ("grad_cn-shape", {}, _set(grad_cn=_randn(2, 3, 4)), r"grad_cn must have shape \[2, 3, 6\]"),
    ("grad_cn-for-gru", dict(mode="GRU"), _set(grad_cn=_randn(2, 3, 6)),
     r"grad_cn is for LSTM only"),
    ("out-shape", {}, _set(out=_randn(11, 8)), r"out must have shape \[12, 8\]"),
    ("saved-missing", {}, _drop_saved,
     r"backward needs the 6 saved buffers of a training forward, got 5"),
    ("saved-none", {}, _set(saved=[]), r"backward needs the 6 saved buffers"),
    ("saved-gates", {}, _saved(3, _randn(12, 23)),
     r"saved gates of direction 1 must have shape \[12, 24\]"),
    ("saved-cells", {}, _saved(1, _randn(11, 6)),
     r"saved cell states of direction 0 must have shape \[12, 6\]"),
    ("saved-projection", {}, _saved(5, _randn(0)),
     r"saved projection inputs of direction 1 must have shape \[12, 6\]"),
    ("saved-gru", dict(mode="GRU"), _saved(0, _randn(12, 18)),
     r"saved gates of direction 0 must have shape \[12, 24\]"),
    ("saved-rnn", dict(mode="RNN_TANH"), _set(saved=[_randn(12, 6)]),
     r"backward needs the 0 saved buffers of a training forward, got 1"),
]  # fmt: skip


@pytest.mark.parametrize(
    "kw, mutate, message",
    [pytest.param(kw, m, msg, id=name) for name, kw, m, msg in BAD_BACKWARD],
)
def test_layer_backward_refuses_bad_gradients_and_buffers(ops, kw, mutate, message):
    args = backward_args(ops, layer_args(**(kw or _DEFAULT)))
    mutate(args)
    with pytest.raises(RuntimeError, match="rnnkit fused engine: .*" + message):
        ops.layer_backward(**args)


# A variant direction: H = 6, H_out = 4 (proj), N = 3, R = 12 rows, every optional tensor on,
# the three clips on (the projection's too, so that every saved buffer is there).
def variant_args(proj=True, packed=(), train=True, reverse=False):
    H, H_out = 6, 4 if proj else 6
    N = packed[0] if packed else 3
    R = sum(packed) if packed else 12
    return dict(
        gx=_randn(R, 4 * H), h0=_randn(N, H_out), c0=_randn(N, H), w_hh=_randn(4 * H, H_out),
        b_hh=_randn(4 * H), w_hr=_randn(H_out, H) if proj else None, peephole=_randn(3 * H),
        ln_hh=_randn(4 * H), ln_c_weight=_randn(H), ln_c_bias=_randn(H),
        rec_mask=_randn(N, H_out), keep_h=torch.rand(R, H_out, dtype=_F64),
        keep_c=torch.rand(R, H, dtype=_F64), rates=[0.0, 0.0, 3.0, 2.0, 1.5], coupled=False,
        batch_sizes=list(packed), reverse=reverse, train=train,
    )  # fmt: skip


_VARIANT_STATE = ("h0", "c0", "w_hh", "b_hh", "w_hr", "peephole", "ln_hh", "ln_c_weight")
_VARIANT_STATE += ("ln_c_bias", "rec_mask", "keep_h", "keep_c", "rates", "coupled")


def variant_backward_args(ops, fwd):
    out, h_n, c_n, *saved = ops.lstm_variant_forward(**fwd)
    return dict(
        grad_out=torch.randn_like(out), grad_hn=torch.randn_like(h_n),
        grad_cn=torch.randn_like(c_n), out=out, saved=saved,
        **{k: fwd[k] for k in _VARIANT_STATE}, batch_sizes=fwd["batch_sizes"],
        reverse=fwd["reverse"],
    )  # fmt: skip


GOOD_VARIANTS = [
    pytest.param(dict(), id="proj"),
    pytest.param(dict(proj=False, packed=(3, 3, 2, 1), reverse=True), id="packed-reverse"),
]


@pytest.mark.parametrize("kw", GOOD_VARIANTS)
def test_good_variant_arguments_run(ops, kw):
    fwd = variant_args(**kw)
    out, h_n, c_n, *saved = ops.lstm_variant_forward(**fwd)
    assert out.shape == (fwd["gx"].size(0), fwd["h0"].size(1)) and len(saved) == 7
    dgx, dh0, dc0, dw_hh, *_ = ops.lstm_variant_backward(**variant_backward_args(ops, fwd))
    assert dgx.shape == fwd["gx"].shape and dw_hh.shape == fwd["w_hh"].shape


def test_variant_empty_batch_sizes_mean_the_full_batch_every_step(ops):
    fwd = variant_args()
    explicit = dict(fwd, batch_sizes=[3] * 4)
    results = ops.lstm_variant_forward(**fwd), ops.lstm_variant_forward(**explicit)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


BAD_VARIANT_FORWARD = [
    ("gx-cols", _set(gx=_randn(12, 23)), r"gx must have shape \[12, 24\] \(\[R, 4\*H\]\)"),
    ("gx-int", _set(gx=torch.zeros(12, 24, dtype=torch.int32)), r"float32 or float64 only"),
    ("sizes-short-of-rows", _set(batch_sizes=[3, 3, 3]),
     r"batch_sizes sum to 9 but the input has 12 rows"),
    ("batch-wider-than-h0", _set(batch_sizes=[4, 4, 4]),
     r"batch_sizes\[0\] must equal h0's batch N = 3, got 4"),
    ("negative-batch", _set(batch_sizes=[3, -3, 3, 3, 3, 3]), r"must be positive, got -3"),
    ("uniform-rows-not-a-multiple", _set(gx=_randn(13, 24), keep_h=_randn(13, 4),
                                         keep_c=_randn(13, 6)),
     r"positive multiple of N = 3 rows"),
    ("h0-1d", _set(h0=_randn(4)), r"h0 must be 2-D, got 1-D"),
    ("c0-batch", _set(c0=_randn(2, 6)), r"c0 must have shape \[3, 6\] \(\[N, H\], N of h0\)"),
    ("c0-dtype", _set(c0=_randn(3, 6, dtype=torch.float32)), r"c0 must have dtype Double"),
    ("w_hh-shape", _set(w_hh=_randn(24, 6)), r"w_hh must have shape \[24, 4\]"),
    ("b_hh-shape", _set(b_hh=_randn(18)), r"b_hh must have shape \[24\]"),
    ("w_hr-shape", _set(w_hr=_randn(4, 5)), r"w_hr must have shape \[4, 6\]"),
    ("H_out-without-proj", _set(w_hr=None), r"h0's H_out \(4\) must equal c0's H = 6"),
    ("peephole-shape", _set(peephole=_randn(24)), r"peephole must have shape \[18\]"),
    ("layer-norm-half", _set(ln_c_bias=None),
     r"layer_norm takes ln_hh, ln_c_weight and ln_c_bias together"),
    ("layer-norm-without-ln_hh", _set(ln_hh=None), r"layer_norm takes ln_hh"),
    ("ln_hh-shape", _set(ln_hh=_randn(6)), r"ln_hh must have shape \[24\]"),
    ("ln_c_weight-shape", _set(ln_c_weight=_randn(4)), r"ln_c_weight must have shape \[6\]"),
    ("rec_mask-shape", _set(rec_mask=_randn(2, 4)), r"rec_mask must have shape \[3, 4\]"),
    ("keep_h-shape", _set(keep_h=_randn(11, 4)), r"keep_h must have shape \[12, 4\]"),
    ("keep_c-shape", _set(keep_c=_randn(12, 4)), r"keep_c must have shape \[12, 6\]"),
    ("keep_c-dtype", _set(keep_c=_randn(12, 6, dtype=torch.float32)),
     r"keep_c must have dtype Double"),
    ("rates-length", _set(rates=[0.0, 0.0, 3.0, 2.0]), r"rates must hold 5 values .* got 4"),
]  # fmt: skip


@pytest.mark.parametrize(
    "mutate, message", [pytest.param(m, msg, id=name) for name, m, msg in BAD_VARIANT_FORWARD]
)
def test_lstm_variant_forward_refuses_bad_arguments(ops, mutate, message):
    args = variant_args()
    mutate(args)
    with pytest.raises(RuntimeError, match="rnnkit fused engine: .*" + message):
        ops.lstm_variant_forward(**args)


@pytest.mark.parametrize(
    "mutate, message",
    [
        pytest.param(m, msg, id=name)
        for name, m, msg in BAD_VARIANT_FORWARD
        if not name.startswith(("gx-", "uniform-"))
    ],
)
def test_lstm_variant_backward_refuses_bad_forward_arguments(ops, mutate, message):
    args = variant_backward_args(ops, variant_args())
    mutate(args)
    with pytest.raises(RuntimeError, match="rnnkit fused engine: .*" + message):
        ops.lstm_variant_backward(**args)


BAD_VARIANT_BACKWARD = [
    ("out-shape", _set(out=_randn(12, 6)), r"out must have shape \[12, 4\] \(\[R, H_out\]\)"),
    ("grad_out-shape", _set(grad_out=_randn(11, 4)), r"grad_out must have shape \[12, 4\]"),
    ("grad_hn-shape", _set(grad_hn=_randn(3, 6)), r"grad_hn must have shape \[3, 4\]"),
    ("grad_cn-dtype", _set(grad_cn=_randn(3, 6, dtype=torch.float32)),
     r"grad_cn must have dtype Double"),
    ("saved-missing", _drop_saved, r"backward needs the 7 saved buffers .* got 6"),
    ("saved-pre-activations", _saved(0, _randn(12, 23)),
     r"saved pre-activations must have shape \[12, 24\]"),
    ("saved-rhat", _saved(3, _randn(0)),
     r"saved normalized recurrent part must have shape \[12, 24\]"),
    ("saved-stats", _saved(4, _randn(12, 2)), r"saved row statistics must have shape \[12, 3\]"),
    ("saved-projection-clip", _saved(6, _randn(0)), r"saved projections must have shape \[12, 4\]"),
    ("saved-zoneout-absent", _saved(2, _randn(12, 6)),
     r"saved zoned-out cell states must have shape \[0\]"),
]  # fmt: skip


@pytest.mark.parametrize(
    "mutate, message", [pytest.param(m, msg, id=name) for name, m, msg in BAD_VARIANT_BACKWARD]
)
def test_lstm_variant_backward_refuses_bad_gradients_and_buffers(ops, mutate, message):
    # zoneout on c (rates[1]) is off in training, where keep_c carries the masks: drop the
    # mask so that the zoned-out cell states are absent and must come empty
    fwd = variant_args()
    fwd["keep_c"] = None
    args = variant_backward_args(ops, fwd)
    mutate(args)
    with pytest.raises(RuntimeError, match="rnnkit fused engine: .*" + message):
        ops.lstm_variant_backward(**args)

"""The fused CPU engine's bfloat16 layers (``engines/cpu/__init__.py``, ``csrc/bf16_gemm.h``).

Their products run one of three ways (``build.bf16_kernel``): AVX-512-BF16's dot products
(``native``, where the CPU has them), the same arithmetic in plain C++ (``portable``), or the
layer widened to float32 (``float32``). Here: the native kernel gives the portable one's bits;
the portable one computes what it says (bfloat16 products of h_{t-1} rounded to bfloat16, float32
sums), step by step against float64; the float32 route is the float32 call, rounded; every
route is as accurate as torch.nn's bfloat16 layer; and the weights cache sees in-place changes
of bfloat16 weights.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import rnnkit
from parity import engines_picked
from rnnkit.engines.cpu import build
from rnnkit.testing import compare


def _native_available() -> bool:
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RNNKIT_BF16_KERNEL", raising=False)
        return build.bf16_kernel() == "native"


NATIVE = _native_available()
needs_native = pytest.mark.skipif(not NATIVE, reason="this CPU has no AVX-512-BF16")
KERNELS = [
    pytest.param("native", marks=needs_native),
    "portable",
    "float32",
]


@pytest.fixture
def kernel(request, monkeypatch):
    """RNNKIT_BF16_KERNEL for the test: ``native`` is the default where the CPU has it."""
    if request.param == "native":
        monkeypatch.delenv("RNNKIT_BF16_KERNEL", raising=False)
    else:
        monkeypatch.setenv("RNNKIT_BF16_KERNEL", request.param)
    assert build.bf16_kernel() == request.param
    return request.param


BF16_LAYERS = [
    pytest.param("LSTM", dict(proj_size=3, bidirectional=True), id="LSTM-proj-bidir"),
    pytest.param("LSTM", dict(forget_bias=1.0, batch_first=True), id="LSTM-forget_bias-bf"),
    pytest.param("GRU", dict(bidirectional=True), id="GRU-bidir"),
    pytest.param("RNN", dict(nonlinearity="relu", bias=False), id="RNNrelu-nobias"),
]


def _run(module, x, hx, packed, grad=True):
    """Outputs, final states and (``grad``) every gradient of a call (of the float32 sum of
    them)."""
    xs = x.clone().requires_grad_(grad)
    hs = [h.clone().requires_grad_(grad) for h in hx]
    inp = xs
    if packed:
        bf = module.batch_first
        L, N = (x.size(1), x.size(0)) if bf else (x.size(0), x.size(1))
        lengths = torch.linspace(L, 1, N).round().long()
        inp = pack_padded_sequence(xs, lengths, batch_first=bf, enforce_sorted=False)
    with torch.set_grad_enabled(grad):
        out, state = module(inp, tuple(hs) if len(hs) == 2 else hs[0])
    if packed:
        out = out.data
    state = state if isinstance(state, tuple) else (state,)
    got = {"output": out, **{f"h{i}": s for i, s in enumerate(state)}}
    if grad:
        (out.float().sum() + sum(s.float().sum() for s in state)).backward()
        got["grad_x"] = xs.grad
        got.update({f"grad_h{i}": h.grad for i, h in enumerate(hs)})
        got.update({f"grad_{n}": p.grad for n, p in module.named_parameters()})
    return {k: v.detach() for k, v in got.items()}


def _inputs(module, L, N, H_in, seed=0):
    g = torch.Generator().manual_seed(seed)
    D = 2 if module.bidirectional else 1
    layers = module.num_layers
    H_out = getattr(module, "proj_size", 0) or module.hidden_size
    shape = (N, L, H_in) if module.batch_first else (L, N, H_in)
    x = torch.randn(shape, generator=g).bfloat16()
    hx = [torch.randn(D * layers, N, H_out, generator=g).bfloat16()]
    if isinstance(module, rnnkit.LSTM):
        hx.append(torch.randn(D * layers, N, module.hidden_size, generator=g).bfloat16())
    return x, hx


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("mode, kw", BF16_LAYERS)
def test_float32_route_is_the_float32_call(mode, kw, packed, monkeypatch):
    """RNNKIT_BF16_KERNEL=float32: a one-layer bfloat16 call is the float32 call on the same
    (bfloat16) values, rounded: outputs, states and every gradient, bit for bit."""
    monkeypatch.setenv("RNNKIT_BF16_KERNEL", "float32")
    torch.manual_seed(0)
    module = getattr(rnnkit, mode)(4, 6, engine="fused", **kw).bfloat16()
    wide = copy.deepcopy(module).float()
    x, hx = _inputs(module, 5, 3, 4)
    got = _run(module, x, hx, packed)
    want = _run(wide, x.float(), [h.float() for h in hx], packed)
    assert list(got) == list(want)
    for name, t in got.items():
        assert t.dtype == torch.bfloat16, name
        assert torch.equal(t, want[name].bfloat16()), name


# Sizes that reach every tile of the kernel: odd H_in and H (an odd k's last pair, columns past
# the last whole panel), batches of 1 to 13 rows (tiles of 6 rows and each remainder), one and
# two layers, both directions, projections, packed input; batch 1 at H = 128 is the LSTM's
# split of the hidden units over two threads.
NATIVE_CASES = [
    pytest.param("LSTM", dict(), 6, 13, 37, 45, id="LSTM-N13-Hin37-H45"),
    pytest.param("LSTM", dict(num_layers=2, bidirectional=True), 5, 7, 16, 33, id="LSTM-L2-bidir"),
    pytest.param("LSTM", dict(proj_size=11), 4, 5, 9, 20, id="LSTM-proj"),
    pytest.param("LSTM", dict(), 9, 1, 64, 128, id="LSTM-N1-H128"),
    pytest.param("GRU", dict(bidirectional=True), 5, 8, 21, 31, id="GRU-bidir"),
    pytest.param("GRU", dict(), 7, 1, 12, 64, id="GRU-N1"),
    pytest.param("RNN", dict(nonlinearity="relu"), 6, 11, 10, 70, id="RNNrelu"),
    pytest.param("RNN", dict(num_layers=2), 4, 2, 3, 17, id="RNN-L2"),
]


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("projection", ["step", "sequence"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("mode, kw, L, N, H_in, H", NATIVE_CASES)
def test_native_kernel_gives_the_portable_kernels_bits(
    mode, kw, L, N, H_in, H, packed, projection, threads, monkeypatch
):
    """Inference and training (outputs, states, every gradient), the input projected step by
    step or over the whole sequence first (RNNKIT_PROJECTION), one thread and two."""
    if packed and N == 1:
        pytest.skip("one sequence: packed is padded")
    torch.manual_seed(0)
    module = getattr(rnnkit, mode)(H_in, H, engine="fused", **kw).bfloat16()
    x, hx = _inputs(module, L, N, H_in)
    monkeypatch.setenv("RNNKIT_PROJECTION", projection)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        results = {}
        for kernel in ("native", "portable"):
            if kernel == "native":
                monkeypatch.delenv("RNNKIT_BF16_KERNEL", raising=False)
            else:
                monkeypatch.setenv("RNNKIT_BF16_KERNEL", kernel)
            module.zero_grad(set_to_none=True)
            results[kernel] = (_run(module, x, hx, packed, grad=False), _run(module, x, hx, packed))
    finally:
        torch.set_num_threads(previous)
    for native, portable in zip(results["native"], results["portable"], strict=True):
        assert list(native) == list(portable)
        for name in native:
            assert torch.equal(native[name], portable[name]), name


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("N", [1, 5])
@pytest.mark.parametrize("kernel", [k for k in KERNELS if k != "float32"], indirect=True)
def test_products_take_h_rounded_to_bfloat16_and_sum_in_float32(kernel, N, grad):
    """An Elman layer, step by step against float64 on its own previous output: each step's
    h_{t-1} rounded to bfloat16 (the output the layer returns for step t-1) times the bfloat16
    weights, plus x_t's product and the biases, through tanh, is step t's output, to within
    its rounding to bfloat16 (one unit in the last place)."""
    torch.manual_seed(0)
    H_in, H, L = 33, 70, 6
    module = rnnkit.RNN(H_in, H, engine="fused").bfloat16()
    x, (h0,) = _inputs(module, L, N, H_in)
    out = _run(module, x, [h0], False, grad=grad)["output"]
    w_ih, w_hh, b_ih, b_hh = (p.double() for p in module.parameters())
    prev = h0[0].double()
    for t in range(L):
        want = torch.tanh(x[t].double() @ w_ih.T + b_ih + prev @ w_hh.T + b_hh)
        got = out[t].double()
        # a bfloat16 value's unit in the last place: 2^-7 of the power of two below it
        ulp = torch.exp2(torch.floor(torch.log2(want.abs().clamp_min(2**-60))) - 7)
        assert ((got - want).abs() <= ulp + 1e-7).all(), f"step {t}: {(got - want).abs().max()}"
        prev = out[t].double()


@pytest.mark.parametrize("kernel", KERNELS, indirect=True)
@pytest.mark.parametrize("mode, kw", BF16_LAYERS)
def test_bfloat16_is_as_accurate_as_torch_nn(mode, kw, kernel):
    """Two layers in bfloat16 against torch.nn's bfloat16 layer (its ATen path: oneDNN's
    bfloat16 GEMMs can die on CPUs that list AMX without enabling it), both against a float64
    run: at least about as close to it, outputs, states and every gradient."""
    torch.manual_seed(0)
    kw = {k: v for k, v in kw.items() if k != "forget_bias"}
    ref = getattr(torch.nn, mode)(4, 6, num_layers=2, **kw).bfloat16()
    module = getattr(rnnkit, mode)(4, 6, num_layers=2, engine="fused", **kw).bfloat16()
    module.load_state_dict(ref.state_dict())
    truth_module = copy.deepcopy(ref).double()
    x, hx = _inputs(module, 7, 3, 4)
    with torch.backends.mkldnn.flags(enabled=False):
        got = _run(module, x, hx, False)
        want = _run(ref, x, hx, False)
    truth = _run(truth_module, x.double(), [h.double() for h in hx], False)
    results = [compare(got[k], want[k], torch.bfloat16, k, truth=truth[k]) for k in want]
    assert all(r.ok for r in results), [str(r) for r in results if not r.ok]


@pytest.mark.parametrize("kernel", [k for k in KERNELS if k != "float32"], indirect=True)
@pytest.mark.parametrize("mode, N", [("LSTM", 1), ("LSTM", 4), ("GRU", 3), ("RNN", 1)])
def test_weights_cache_sees_in_place_changes_of_bfloat16_weights(kernel, mode, N):
    """Inference packs a bfloat16 layer's weights once and keeps them between calls; changed in
    place (as optimizer.step() does), they are packed again: the next call is a fresh copy's."""
    torch.manual_seed(0)
    module = getattr(rnnkit, mode)(16, 128, engine="fused").bfloat16().eval()
    x, hx = _inputs(module, 3, N, 16)
    _run(module, x, hx, False, grad=False)
    with torch.no_grad():
        module.weight_hh_l0.mul_(0.5)
        module.weight_ih_l0.add_(0.25)
    got = _run(module, x, hx, False, grad=False)
    want = _run(copy.deepcopy(module), x, hx, False, grad=False)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_auto_picks_fused_for_plain_bfloat16(monkeypatch):
    picked = engines_picked(monkeypatch)
    x = torch.randn(3, 2, 4, dtype=torch.bfloat16)
    # oneDNN's bfloat16 GEMMs can die on CPUs that list AMX without enabling it (README)
    with torch.backends.mkldnn.flags(enabled=False):
        rnnkit.GRU(4, 5, dtype=torch.bfloat16)(x)
        rnnkit.LSTM(4, 5, dtype=torch.bfloat16, layer_norm=True)(x)
    assert picked == ["fused", "reference"]

"""The compiled int8 op (``rnnkit_int8::direction_forward``) against rnnkit.quantized.reference.

The reference repeats the kernel's op order on torch ops: quantization, integer sums and the
input projection agree bit for bit; what differs is the last bits of the kernel's vectorized
sigmoid and tanh, carried through the steps."""

from __future__ import annotations

import os

import pytest
import torch

from rnnkit.engines.cpu import build
from rnnkit.modes import MODES
from rnnkit.quantized import kernel
from rnnkit.quantized import reference as R
from rnnkit.quantized.weights import QWeight

# a few ulps of states of magnitude <= 1, far below a quantization step (~1e-3 here)
ATOL = 2e-6

CASES = [
    pytest.param("LSTM", 64, 128, 1, 1, 0, None, False, id="lstm-step"),
    pytest.param("LSTM", 37, 53, 5, 7, 0, None, False, id="lstm-odd"),
    pytest.param("LSTM", 37, 53, 5, 7, 11, None, False, id="lstm-proj"),
    pytest.param("LSTM", 37, 53, 3, 0, 0, [3, 3, 2, 1, 1], True, id="lstm-packed-reverse"),
    pytest.param("LSTM", 37, 53, 3, 0, 5, [3, 2, 2, 1], False, id="lstm-packed-proj"),
    pytest.param("GRU", 37, 53, 5, 7, 0, None, False, id="gru-odd"),
    pytest.param("GRU", 16, 33, 3, 0, 0, [3, 3, 2, 1, 1], False, id="gru-packed"),
    pytest.param("RNN_TANH", 37, 53, 5, 7, 0, None, True, id="tanh-reverse"),
    pytest.param("RNN_RELU", 20, 64, 4, 9, 0, None, False, id="relu"),
    pytest.param("LSTM", 8, 16, 0, 3, 0, None, False, id="N0"),
]


def _case(mode, H_in, H, N, L, proj, bs, bias=True):
    G = MODES[mode].gates
    H_out = proj or H
    wi = QWeight.quantize(torch.randn(G * H, H_in) / H_in**0.5)
    wh = QWeight.quantize(torch.randn(G * H, H_out) / H**0.5)
    wr = QWeight.quantize(torch.randn(H_out, H) / H**0.5) if proj else None
    bi, bh = (torch.randn(G * H), torch.randn(G * H)) if bias else (None, None)
    rows = sum(bs) if bs else L * N
    x, h0 = torch.randn(rows, H_in), torch.randn(N, H_out)
    c0 = torch.randn(N, H) if mode == "LSTM" else None
    return x, h0, c0, wi, wh, bi, bh, wr


def _op(mode, x, h0, c0, wi, wh, bi, bh, wr, bs, reverse):
    build.kernels()
    parts = (wr.panels, wr.scale, wr.sum) if wr is not None else (None, None, None)
    return torch.ops.rnnkit_int8.direction_forward(
        MODES[mode].code, x, h0, c0, wi.panels, wi.scale, wi.sum, wh.panels, wh.scale, wh.sum,
        bi, bh, *parts, bs or [-1], reverse,
    )  # fmt: skip


@pytest.fixture(params=["native", "portable"])
def int8_kernel(request, monkeypatch):
    if request.param == "portable":
        monkeypatch.setenv("RNNKIT_INT8_KERNEL", "portable")
    return request.param


@pytest.mark.parametrize("mode,H_in,H,N,L,proj,bs,reverse", CASES)
def test_kernel_matches_the_reference(int8_kernel, mode, H_in, H, N, L, proj, bs, reverse):
    torch.manual_seed(0)
    args = _case(mode, H_in, H, N, L, proj, bs)
    out, h, c = _op(mode, *args, bs, reverse)
    ref = R.direction_forward(mode, *args, tuple(bs or ()), reverse)
    torch.testing.assert_close(out, ref[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(h, ref[1], atol=ATOL, rtol=0)
    if mode == "LSTM":
        torch.testing.assert_close(c, ref[2], atol=ATOL, rtol=0)


def test_without_bias_matches_the_reference():
    torch.manual_seed(1)
    args = _case("GRU", 9, 21, 2, 4, 0, None, bias=False)
    out, h, _ = _op("GRU", *args, None, False)
    ref = R.direction_forward("GRU", *args, (), False)
    torch.testing.assert_close(out, ref[0], atol=ATOL, rtol=0)


def test_the_input_projection_is_bitwise_the_reference():
    # an Elman step from h0 = 0 with relu: no activation to round, so every bit must agree
    torch.manual_seed(2)
    x, _, _, wi, wh, bi, bh, _ = _case("RNN_RELU", 45, 70, 6, 1, 0, None)
    h0 = torch.zeros(6, 70)
    out, _, _ = _op("RNN_RELU", x, h0, None, wi, wh, bi, bh, None, None, False)
    ref = R.direction_forward("RNN_RELU", x, h0, None, wi, wh, bi, bh, None, (), False)
    assert torch.equal(out, ref[0])


def test_vnni_and_portable_agree_bit_for_bit(monkeypatch):
    if kernel() != "vnni":
        pytest.skip("this CPU has no AVX-512 VNNI: only the portable kernel runs")
    torch.manual_seed(3)
    args = _case("LSTM", 70, 96, 7, 6, 0, None)
    native = _op("LSTM", *args, None, False)
    monkeypatch.setenv("RNNKIT_INT8_KERNEL", "portable")
    assert kernel() == "portable"
    portable = _op("LSTM", *args, None, False)
    for a, b in zip(native, portable, strict=True):
        assert torch.equal(a, b)


def test_threads_do_not_change_a_bit():
    # large enough for the product to split its panels over the threads
    torch.manual_seed(4)
    args = _case("LSTM", 256, 256, 8, 4, 0, None)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _op("LSTM", *args, None, False)
        torch.set_num_threads(max(2, os.cpu_count() or 2))
        many = _op("LSTM", *args, None, False)
    finally:
        torch.set_num_threads(saved)
    for a, b in zip(one, many, strict=True):
        assert torch.equal(a, b)


def test_non_finite_input_gives_nan_rows_not_garbage():
    torch.manual_seed(5)
    x, h0, c0, wi, wh, bi, bh, _ = _case("LSTM", 8, 16, 2, 3, 0, None)
    x[1, 3] = float("inf")  # step 0, row 1
    out, _, _ = _op("LSTM", x, h0, c0, wi, wh, bi, bh, None, None, False)
    assert out[1::2].isnan().all() and out[0::2].isfinite().all()


def test_op_rejects_inconsistent_arguments():
    torch.manual_seed(6)
    x, h0, c0, wi, wh, bi, bh, _ = _case("LSTM", 8, 16, 2, 3, 0, None)
    with pytest.raises(RuntimeError, match="x must be contiguous float32"):
        _op("LSTM", x.double(), h0, c0, wi, wh, bi, bh, None, None, False)
    with pytest.raises(RuntimeError, match="LSTM needs c0"):
        _op("LSTM", x, h0, None, wi, wh, bi, bh, None, None, False)
    with pytest.raises(RuntimeError, match="weight_ih must be contiguous int8 panels"):
        _op("LSTM", x[:, :4].contiguous(), h0, c0, wi, wh, bi, bh, None, None, False)

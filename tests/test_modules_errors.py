"""Bad inputs to LSTM, GRU and RNN: the same exception type and message as torch.nn.

Each case runs torch.nn and rnnkit on the same bad input. Where torch's message comes from deep
inside ATen and says little (a broadcasting or GEMM failure, a oneDNN dtype complaint), only the
exception type must match: ``message=False``.
"""

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import rnnkit
from parity import same_outcome


def randn(*shape, dtype=torch.float32):
    return torch.randn(shape, dtype=dtype)


def packed(L, N, H_in):
    return pack_padded_sequence(randn(L, N, H_in), torch.arange(L, L - N, -1))


def states(mode, h_shape, c_shape=None):
    if mode == "LSTM":
        return (randn(*h_shape), randn(*(c_shape or h_shape)))
    return randn(*h_shape)


# (id, modes, constructor kwargs, input, hx (per mode) or None, message must match)
# modules: input_size 5, hidden_size 7, num_layers 2, so h_0 is [2, N, 7]
ALL = ("LSTM", "GRU", "RNN")
CASES = [
    ("input-1d", ALL, {}, lambda: randn(5), None, True),
    ("input-4d", ALL, {}, lambda: randn(2, 4, 3, 5), None, True),
    ("features-batched", ALL, {}, lambda: randn(4, 3, 6), None, True),
    ("features-unbatched", ALL, {}, lambda: randn(4, 6), None, True),
    ("features-batch-first", ALL, dict(batch_first=True), lambda: randn(3, 4, 4), None, True),
    ("input-float64", ALL, {}, lambda: randn(4, 3, 5, dtype=torch.float64), None, True),
    ("input-int", ALL, {}, lambda: torch.ones(4, 3, 5, dtype=torch.long), None, True),
    ("h-batch", ALL, {}, lambda: randn(4, 3, 5), lambda m: states(m, (2, 4, 7)), True),
    ("h-layers", ALL, {}, lambda: randn(4, 3, 5), lambda m: states(m, (1, 3, 7)), True),
    ("h-hidden", ALL, {}, lambda: randn(4, 3, 5), lambda m: states(m, (2, 3, 8)), True),
    (
        "h-batch-first",
        ALL,
        dict(batch_first=True),
        lambda: randn(3, 4, 5),
        lambda m: states(m, (2, 4, 7)),
        True,
    ),
    (
        "c-hidden",
        ("LSTM",),
        {},
        lambda: randn(4, 3, 5),
        lambda m: states(m, (2, 3, 7), (2, 3, 6)),
        True,
    ),
    (
        "h-not-proj",
        ("LSTM",),
        dict(proj_size=3),
        lambda: randn(4, 3, 5),
        lambda m: states(m, (2, 3, 7)),
        True,
    ),
    (
        "c-proj",
        ("LSTM",),
        dict(proj_size=3),
        lambda: randn(4, 3, 5),
        lambda m: states(m, (2, 3, 3)),
        True,
    ),
    (
        "h-bidirectional",
        ALL,
        dict(bidirectional=True),
        lambda: randn(4, 3, 5),
        lambda m: states(m, (2, 3, 7)),
        True,
    ),
    ("unbatched-3d-h", ALL, {}, lambda: randn(4, 5), lambda m: states(m, (2, 1, 7)), True),
    ("batched-2d-h", ALL, {}, lambda: randn(4, 3, 5), lambda m: states(m, (2, 7)), True),
    ("unbatched-h-layers", ALL, {}, lambda: randn(4, 5), lambda m: states(m, (3, 7)), True),
    (
        "batched-3d-2d-hc",
        ("LSTM",),
        {},
        lambda: randn(4, 3, 5),
        lambda m: (randn(2, 3, 7), randn(2, 7)),
        True,
    ),
    (
        "unbatched-2d-3d-hc",
        ("LSTM",),
        {},
        lambda: randn(4, 5),
        lambda m: (randn(2, 7), randn(2, 1, 7)),
        True,
    ),
    ("empty-sequence", ALL, {}, lambda: randn(0, 3, 5), None, True),
    ("empty-sequence-batch-first", ALL, dict(batch_first=True), lambda: randn(3, 0, 5), None, True),
    ("empty-sequence-unbatched", ALL, {}, lambda: randn(0, 5), None, True),
    (
        "empty-sequence-with-h",
        ALL,
        {},
        lambda: randn(0, 3, 5),
        lambda m: states(m, (2, 3, 7)),
        True,
    ),
    ("packed-features", ("GRU", "RNN"), {}, lambda: packed(4, 3, 6), None, True),
    (
        "packed-h-batch",
        ("GRU", "RNN"),
        {},
        lambda: packed(4, 3, 5),
        lambda m: states(m, (2, 2, 7)),
        True,
    ),
    # torch.nn.LSTM skips its shape checks on packed input; ATen then fails on a GEMM or a
    # broadcast with a message that does not say what is wrong
    ("packed-features", ("LSTM",), {}, lambda: packed(4, 3, 6), None, False),
    (
        "packed-h-batch",
        ("LSTM",),
        {},
        lambda: packed(4, 3, 5),
        lambda m: states(m, (2, 2, 7)),
        False,
    ),
    # the state's dtype is not checked by torch.nn; ATen's (or oneDNN's) GEMM complains
    (
        "h-float64",
        ALL,
        {},
        lambda: randn(4, 3, 5),
        lambda m: (
            tuple(s.double() for s in states(m, (2, 3, 7)))
            if m == "LSTM"
            else states(m, (2, 3, 7)).double()
        ),
        False,
    ),
    # an LSTM given one tensor for (h_0, c_0): torch indexes it and reports odd dims
    ("lstm-h-not-tuple", ("LSTM",), {}, lambda: randn(4, 3, 5), lambda m: randn(2, 3, 7), False),
]


def _params():
    for id_, modes, kwargs, make_input, make_hx, message in CASES:
        for mode in modes:
            yield pytest.param(mode, kwargs, make_input, make_hx, message, id=f"{mode}-{id_}")


@pytest.mark.parametrize("mode,kwargs,make_input,make_hx,message", list(_params()))
def test_forward_error_matches_torch(mode, kwargs, make_input, make_hx, message):
    torch.manual_seed(0)
    ref = getattr(nn, mode)(5, 7, 2, **kwargs)
    ours = getattr(rnnkit, mode)(5, 7, 2, **kwargs)
    ours.load_state_dict(ref.state_dict())
    x = make_input()
    hx = make_hx(mode) if make_hx is not None else None
    error = same_outcome(lambda: ref(x, hx), lambda: ours(x, hx), message=message)
    assert error is not None, "the case is meant to be an error in torch.nn"

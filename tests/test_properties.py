"""Property-based: random configurations and inputs, rnnkit against torch's ATen path.

Hypothesis draws the layer options, the sizes (bounded, so that each example stays cheap), the
packing and the dtype; ``derandomize`` and no example database keep every run the same. The
reference engine must be bit-identical to torch, the default engine to rounding.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grid import ModuleCase
from parity import ENGINES, assert_parity
from rnnkit.testing import aten_path

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@st.composite
def module_cases(draw):
    mode = draw(st.sampled_from(["LSTM", "GRU", "RNN_TANH", "RNN_RELU"]))
    batched = draw(st.booleans())
    L = draw(st.integers(1, 12))
    N = draw(st.integers(1, 4))
    H = draw(st.integers(1, 9))
    return ModuleCase(
        mode=mode,
        bias=draw(st.booleans()),
        batch_first=draw(st.booleans()),
        bidirectional=draw(st.booleans()),
        num_layers=draw(st.integers(1, 3)),
        proj=mode == "LSTM" and H > 1 and draw(st.booleans()),
        batched=batched,
        h0=draw(st.booleans()),
        packed=draw(st.sampled_from(["none", "sorted", "unsorted"])) if batched else "none",
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        size=(L, N, draw(st.integers(1, 9)), H),
        dropout=draw(st.sampled_from([0.0, 0.0, 0.5])),
    )


@pytest.mark.parametrize("engine", ENGINES)
@SETTINGS
@given(case=module_cases(), seed=st.integers(0, 2**16))
def test_random_configurations_match_torch(engine, case, seed):
    ref, ours = case.modules(engine, seed)
    # dropout only acts in training; eval with it set checks that it really is off
    training = case.dropout > 0 and seed % 2 == 0
    ref.train(training)
    ours.train(training)
    inp = case.inputs(seed)
    with aten_path():
        torch.manual_seed(seed)
        expected, expected_structure = case.run(ref, inp)
    torch.manual_seed(seed)
    actual, structure = case.run(ours, inp)
    assert structure.keys() == expected_structure.keys()
    assert_parity(expected, actual, engine, truth=case.truth(ref, inp, seed))


@st.composite
def scaled_inputs(draw):
    """Large and tiny input scales: saturated gates, ReLU growth, denormal-adjacent values."""
    return draw(st.sampled_from([1e-6, 1e-2, 1.0, 30.0, 1e4]))


@pytest.mark.parametrize("engine", ENGINES)
@SETTINGS
@given(
    mode=st.sampled_from(["LSTM", "GRU", "RNN_TANH", "RNN_RELU"]),
    scale=scaled_inputs(),
    seed=st.integers(0, 2**16),
)
def test_extreme_input_scales_match_torch(engine, mode, scale, seed):
    case = ModuleCase(mode, num_layers=2, bidirectional=True, h0=True, size=(6, 2, 3, 5))
    ref, ours = case.modules(engine, seed)
    inp = case.inputs(seed)
    with torch.no_grad():
        inp.x.mul_(scale)
    with aten_path():
        expected, _ = case.run(ref, inp)
    actual, _ = case.run(ours, inp)
    # another summation order rounds relative to the magnitudes it sums (ReLU at 1e4 cancels
    # them into entries near zero): both sides against float64 round alike
    assert_parity(expected, actual, engine, truth=case.truth(ref, inp))

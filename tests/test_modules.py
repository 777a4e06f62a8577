"""LSTM, GRU and RNN against torch.nn: outputs, final states and every gradient.

The default engine (``engine="auto"``) within tolerance of torch's ATen and default (oneDNN)
paths over the covering grid of ``grid.MODULE_CASES`` (``tests/engines/test_reference.py`` runs
the same grid bit for bit on the reference engine); plus dropout, empty batches, odd layouts and
half precision, on the reference engine bit for bit and on the default to rounding.
"""

import dataclasses

import pytest
import torch
from torch import nn

from grid import ModuleCase, check_module_case, module_params
from parity import (
    ENGINES,
    assert_bitwise,
    assert_close,
    assert_parity,
    assert_same_structure,
    truth_of,
)
from rnnkit.testing import aten_path


@pytest.mark.parametrize("case", module_params())
def test_matches_torch(case):
    check_module_case(case)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    "case",
    module_params(
        [
            ModuleCase(mode, num_layers=3, bidirectional=bidir, packed=packed, dropout=0.4)
            for mode in ("LSTM", "GRU", "RNN_TANH")
            for bidir, packed in ((False, "none"), (True, "unsorted"))
        ]
        + [ModuleCase("LSTM", num_layers=2, proj=True, h0=True, dropout=1.0)]
    ),
)
def test_dropout_masks_match_torch(case, engine):
    """Inter-layer dropout in training draws torch's masks under the same seed."""
    check_module_case(case, engine)


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_RELU"])
def test_dropout_is_active_in_training_only(mode):
    case = ModuleCase(mode, num_layers=2, dropout=0.5)
    no_dropout = dataclasses.replace(case, dropout=0.0)
    _, ours = case.modules()
    _, plain = no_dropout.modules()
    plain.load_state_dict(ours.state_dict())
    inp = case.inputs()
    ours.eval()
    plain.eval()
    assert_bitwise(case.forward(plain, inp)[0], case.forward(ours, inp)[0])
    ours.train()
    train_out = case.forward(ours, inp)[0]["output"]
    assert not torch.equal(train_out, case.forward(plain, inp)[0]["output"])


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    "case",
    module_params(
        [
            ModuleCase(mode, size=(4, 0, 3, 5), bidirectional=True, num_layers=2, h0=h0)
            for mode in ("LSTM", "GRU", "RNN_TANH")
            for h0 in (False, True)
        ]
    ),
)
def test_empty_batch(case, engine):
    """N=0 runs in torch.nn, so it runs in rnnkit, with the same (empty) results."""
    check_module_case(case, engine)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_non_contiguous_input_and_states(mode, batch_first, engine):
    case = ModuleCase(mode, batch_first=batch_first, h0=True, bidirectional=True)
    ref, ours = case.modules(engine)
    inp = case.inputs()
    # same values, other strides: transposed storage for the input, strided states
    inp.x = inp.x.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    inp.states = {
        k: v.detach().repeat(1, 1, 2)[..., ::2].requires_grad_() for k, v in inp.states.items()
    }
    assert not inp.x.is_contiguous() and not inp.states["h0"].is_contiguous()
    with aten_path():
        expected, _ = case.run(ref, inp)
    assert_parity(expected, case.run(ours, inp)[0], engine, truth=case.truth(ref, inp))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH"])
def test_no_grad_and_inference_mode(mode, engine):
    case = ModuleCase(mode, num_layers=2, h0=True)
    ref, ours = case.modules(engine)
    inp = case.inputs()
    with aten_path():
        expected, _ = case.forward(ref, inp)
    truth = truth_of(lambda m, i: case.forward(m, i)[0], ref, inp)
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            actual, _ = case.forward(ours, inp)
        assert not any(t.requires_grad for t in actual.values())
        assert_parity({k: v.detach() for k, v in expected.items()}, actual, engine, truth=truth)


# Low precision. The meaningful reference is torch in float32 on the same (exactly
# representable) weights and inputs: rnnkit in bf16/fp16 must stay within the dtype's tolerance
# of it. Both sides also run on ATen's loops, where the reference engine must equal torch's own
# bf16/fp16 run bit for bit (and the default engine be within tolerance of it). Everything runs
# with oneDNN off: this torch build's oneDNN bf16 GEMM cannot create a primitive (or dies on an
# illegal instruction) on some CPUs, for torch.nn itself too.
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    "low",
    module_params(
        [
            dataclasses.replace(case, dtype=dtype)
            for dtype in (torch.bfloat16, torch.float16)
            for case in (
                ModuleCase("LSTM", size=(12, 3, 5, 16), num_layers=2, bidirectional=True, h0=True),
                ModuleCase("LSTM", size=(12, 3, 5, 16), proj=True, packed="unsorted"),
                ModuleCase("GRU", size=(12, 3, 5, 16), num_layers=2, batch_first=True),
                ModuleCase("RNN_TANH", size=(12, 3, 5, 16), bidirectional=True, h0=True),
                ModuleCase("RNN_RELU", size=(12, 3, 5, 16), batched=False),
            )
        ]
    ),
)
def test_low_precision(low, engine):
    case = dataclasses.replace(low, dtype=torch.float32)
    # Not seed 0: under a few inits (seed 0 among them) torch's own bf16 ReLU RNN, which the
    # reference equals bit for bit, has gradients beyond bf16's tolerance of float32's (rounding
    # moves pre-activations across ReLU's kink, where the gradient jumps).
    ref32, _ = case.modules(seed=1)
    ref32.to(low.dtype).float()  # weights rounded to low.dtype: both sides hold the same values
    ref_low, ours = low.modules(engine)
    ref_low.load_state_dict(ref32.state_dict())
    ours.load_state_dict(ref32.state_dict())
    inp_low = low.inputs()
    inp32 = dataclasses.replace(
        inp_low,
        x=inp_low.x.detach().float().requires_grad_(),
        states={k: v.detach().float().requires_grad_() for k, v in inp_low.states.items()},
    )
    with aten_path():
        expected32, _ = case.run(ref32, inp32)
        expected_low, _ = low.run(ref_low, inp_low)
        actual, _ = low.run(ours, inp_low)
    assert_parity(expected_low, actual, engine)
    assert_close(expected32, {k: v.float() for k, v in actual.items()}, low.dtype)


def test_output_types_match_torch():
    for mode in ("LSTM", "GRU", "RNN_RELU"):
        case = ModuleCase(mode, packed="sorted")
        ref, ours = case.modules()
        inp = case.inputs()
        _, expected = case.forward(ref, inp)
        _, actual = case.forward(ours, inp)
        assert_same_structure(expected, actual)
        assert isinstance(ours, nn.Module)

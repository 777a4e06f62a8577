"""Streaming: chunks carrying the state equal the whole run; ``step`` is a length-1 forward.

Chunks are compared with the whole run to rounding (a chunk's input projection is a matrix
product over fewer rows, which BLAS may sum in another order), both measured against the whole
run in float64, forward and every gradient, on each engine.
"""

from __future__ import annotations

import doctest

import pytest
import torch

import rnnkit
from grid import ModuleCase, module_params
from parity import ENGINES, assert_bitwise, assert_close, grads, truth_of
from rnnkit import streaming

# chunk sizes over L=23 steps: uneven, a single step among them, and one step at a time
SPLITS = {"uneven": [5, 1, 10, 7], "steps": [1] * 23}

CASES = [
    ModuleCase("LSTM", size=(23, 3, 4, 6), num_layers=2, h0=True),
    ModuleCase("LSTM", size=(23, 3, 4, 6), num_layers=3, proj=True, batch_first=True),
    ModuleCase("GRU", size=(23, 3, 4, 6), num_layers=2, h0=True, batch_first=True),
    ModuleCase("RNN_TANH", size=(23, 3, 4, 6), num_layers=2, dtype=torch.float64),
    ModuleCase("RNN_RELU", size=(23, 1, 4, 6), h0=True, bias=False),
    ModuleCase("LSTM", size=(23, 3, 4, 6), batched=False, h0=True),
]


def run_chunked(case: ModuleCase, module, inp, sizes: list[int] | None, use_step: bool = False):
    """The whole sequence (``sizes=None``) or its chunks of ``sizes`` steps in turn, each from
    the previous chunk's final state; outputs, final states and every gradient."""
    time_dim = 1 if case.batch_first and case.batched else 0
    hx = case.hx(inp.states)
    if sizes is None:
        output, hx = module(inp.x, hx)
    else:
        outputs = []
        for chunk in inp.x.split(sizes, dim=time_dim):
            if use_step:
                out, hx = module.step(chunk.squeeze(time_dim), hx)
                out = out.unsqueeze(time_dim)
            else:
                out, hx = module(chunk, hx)
            outputs.append(out)
        output = torch.cat(outputs, time_dim)
    tensors = case.named(output, hx)
    leaves = {"input": inp.x, **inp.states, **dict(module.named_parameters())}
    return {**tensors, **grads(tensors, leaves)}


def whole_in_float64(case: ModuleCase, module, inp):
    """The truth of chunked and whole runs: the whole sequence in float64 (None in float64)."""
    return truth_of(lambda m, i: run_chunked(case, m, i, None), module, inp)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("case", module_params(CASES))
def test_chunks_equal_whole_run(case, split, engine):
    _, module = case.modules(engine)
    inp = case.inputs()
    expected = run_chunked(case, module, inp, None)
    truth = whole_in_float64(case, module, inp)
    assert_close(expected, run_chunked(case, module, inp, SPLITS[split]), truth=truth)
    if split == "steps":
        chunks = run_chunked(case, module, inp, SPLITS[split], use_step=True)
        assert_close(expected, chunks, truth=truth)


@pytest.mark.parametrize("engine", ENGINES)
def test_variants_stream_in_eval(engine):
    """Variants with random masks in training use their eval form, which streams too."""
    case = ModuleCase("LSTM", size=(23, 3, 4, 6), num_layers=2, h0=True)
    variants = dict(layer_norm=True, zoneout=(0.2, 0.1), recurrent_dropout=0.3, peephole=True)
    torch.manual_seed(0)
    module = rnnkit.LSTM(4, 6, num_layers=2, engine=engine, **variants).eval()
    inp = case.inputs()
    expected = run_chunked(case, module, inp, None)
    truth = whole_in_float64(case, module, inp)
    assert_close(expected, run_chunked(case, module, inp, SPLITS["uneven"]), truth=truth)


STEP_CASES = [
    ModuleCase(mode, size=(1, 3, 4, 6), batch_first=bf, batched=batched, h0=h0, num_layers=2)
    for mode in ("LSTM", "GRU", "RNN_TANH")
    for bf, batched, h0 in ((False, True, True), (True, True, False), (False, False, True))
] + [ModuleCase("LSTM", size=(1, 2, 4, 6), proj=True, h0=True, batch_first=True)]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", module_params(STEP_CASES))
def test_step_is_a_length_one_forward(case, engine):
    _, module = case.modules(engine)
    inp = case.inputs()
    time_dim = 1 if case.batch_first and case.batched else 0
    hx = case.hx(inp.states)
    x_t = inp.x.squeeze(time_dim)  # [N, H_in] or [H_in]
    out_t, hidden = module.step(x_t, hx)
    out, expected_hidden = module(inp.x, hx)
    expected_out = out.squeeze(time_dim)
    assert out_t.shape == expected_out.shape == (*x_t.shape[:-1], case.H_out)
    assert_bitwise(case.named(expected_out, expected_hidden), case.named(out_t, hidden))


@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
def test_step_refuses_bidirectional(name):
    module = getattr(rnnkit, name)(4, 6, bidirectional=True)
    with pytest.raises(ValueError, match=f"{name}.step .* bidirectional: its reverse direction"):
        module.step(torch.randn(3, 4))


@pytest.mark.parametrize("shape", [(), (1, 3, 4)])
def test_step_refuses_other_ranks(shape):
    module = rnnkit.GRU(4, 6)
    with pytest.raises(
        ValueError, match=f"2-D \\[N, H_in\\] or 1-D \\[H_in\\].*got {len(shape)}-D"
    ):
        module.step(torch.randn(shape))
    with pytest.raises(TypeError, match="input must be a Tensor, got list"):
        module.step([1.0, 2.0, 3.0, 4.0])


def test_step_runs_forward_hooks():
    module = rnnkit.LSTM(4, 6)
    calls = []
    module.register_forward_hook(lambda m, args, out: calls.append(args[0].shape))
    module.step(torch.randn(3, 4))
    assert calls == [torch.Size([1, 3, 4])]


def test_detach_state_truncates_backprop():
    module = rnnkit.LSTM(4, 6)
    x = torch.randn(10, 2, 4, requires_grad=True)
    _, hx = module(x[:5])
    out, _ = module(x[5:], streaming.detach_state(hx))
    out.sum().backward()
    assert x.grad[:5].eq(0).all() and x.grad[5:].ne(0).any()
    assert streaming.detach_state(None) is None
    h = torch.randn(1, 2, 6, requires_grad=True)
    assert not streaming.detach_state(h * 2).requires_grad


@pytest.mark.parametrize("obj", [streaming, rnnkit.RNNBase.step], ids=["module", "step"])
def test_examples_run(obj):
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tests = finder.find(obj, globs={"torch": torch, "rnnkit": rnnkit})
    assert sum(len(t.examples) for t in tests) > 0
    for test in tests:
        runner.run(test)
    assert runner.failures == 0

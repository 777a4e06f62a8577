"""``forward(input, hx, lengths=...)``: a padded batch with its lengths, against the packed path.

The packed path is ``pack_padded_sequence(enforce_sorted=False)`` -> layer ->
``pad_packed_sequence(total_length=L)``. With ``lengths`` rnnkit gives its outputs, final
states and every gradient bit for bit, on each engine; against ``torch.nn``'s packed path
(ATen's loops) bit for bit on the reference engine and to rounding on the default one.
"""

from __future__ import annotations

import dataclasses
import doctest

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnkit
from grid import ModuleCase, module_params
from parity import ENGINES, assert_bitwise, assert_close, assert_parity, grads, truth_of
from rnnkit.testing import aten_path

CASES = [
    ModuleCase(mode, size=(9, 4, 3, 5), bidirectional=bidir, num_layers=layers, **extra)
    for mode in ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")
    for bidir, layers, extra in (
        (False, 1, {}),
        (True, 2, dict(h0=True)),
        (False, 2, dict(batch_first=True, h0=True, dtype=torch.float64)),
        (True, 1, dict(batch_first=True, bias=False)),
    )
] + [
    ModuleCase("LSTM", size=(9, 4, 3, 6), proj=True, bidirectional=True, num_layers=2, h0=True),
    ModuleCase("LSTM", size=(7, 5, 3, 6), proj=True, batch_first=True, dtype=torch.float64),
    ModuleCase("GRU", size=(1, 3, 2, 4), h0=True),
    ModuleCase("LSTM", size=(63, 1, 3, 5), h0=True),
]


def run_packed(case: ModuleCase, module, inp) -> dict:
    """The packed path on the padded input: outputs, final states and every gradient."""
    L = inp.x.size(1 if case.batch_first else 0)
    packed = pack_padded_sequence(inp.x, inp.lengths, case.batch_first, enforce_sorted=False)
    output, hidden = module(packed, case.hx(inp.states))
    output, _ = pad_packed_sequence(output, case.batch_first, total_length=L)
    tensors = case.named(output, hidden)
    leaves = {"input": inp.x, **inp.states, **dict(module.named_parameters())}
    return {**tensors, **grads(tensors, leaves)}


def run_lengths(case: ModuleCase, module, inp, lengths) -> dict:
    output, hidden = module(inp.x, case.hx(inp.states), lengths=lengths)
    tensors = case.named(output, hidden)
    leaves = {"input": inp.x, **inp.states, **dict(module.named_parameters())}
    return {**tensors, **grads(tensors, leaves)}


def _inputs(case: ModuleCase, seed: int = 0):
    # the grid's packed lengths (unsorted, one of them L), for an unpacked case
    return dataclasses.replace(case, packed="unsorted").inputs(seed)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", module_params(CASES))
def test_equals_packed_path(case, engine):
    ref, ours = case.modules(engine)
    inp = _inputs(case)
    with aten_path():
        expected = run_packed(case, ref, inp)
    actual = run_lengths(case, ours, inp, inp.lengths)
    truth = truth_of(lambda m, i: run_packed(case, m, i), ref, inp)
    assert_parity(expected, actual, engine, truth=truth)
    # rnnkit's own packed path on the same engine: the same numbers, bit for bit
    assert_bitwise(run_packed(case, ours, inp), actual)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH"])
def test_padded_positions_are_zero(mode, engine):
    case = ModuleCase(mode, size=(8, 4, 3, 5), bidirectional=True, batch_first=True)
    _, ours = case.modules(engine)
    x = torch.randn(4, 8, 3, requires_grad=True)
    lengths = [3, 8, 1, 5]
    output, _ = ours(x, lengths=lengths)
    output.sum().backward()
    for n, length in enumerate(lengths):
        assert output[n, :length].ne(0).any()
        assert output[n, length:].eq(0).all()
        assert x.grad[n, length:].eq(0).all()
        assert x.grad[n, :length].ne(0).any()


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda ls: ls, id="list"),
        pytest.param(tuple, id="tuple"),
        pytest.param(torch.tensor, id="int64"),
        pytest.param(lambda ls: torch.tensor(ls, dtype=torch.int32), id="int32"),
        pytest.param(lambda ls: torch.tensor(ls, dtype=torch.uint8), id="uint8"),
        pytest.param(
            lambda ls: torch.tensor(ls, device="cuda"),
            id="cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
        ),
    ],
)
def test_lengths_forms(make):
    case = ModuleCase("GRU", size=(6, 3, 3, 4), num_layers=2)
    _, ours = case.modules("reference")
    inp = _inputs(case)
    lengths = inp.lengths.tolist()
    expected = run_packed(case, ours, inp)
    assert_bitwise(expected, run_lengths(case, ours, inp, make(lengths)))


@pytest.mark.parametrize("engine", ENGINES)
def test_final_states_follow_input_order(engine):
    """Final states come back in the input's batch order, not the sorted one."""
    case = ModuleCase("LSTM", size=(6, 3, 3, 4), h0=True)
    _, ours = case.modules(engine)
    inp = _inputs(case)
    lengths = [2, 6, 4]
    _, (h_n, _) = ours(inp.x, case.hx(inp.states), lengths=lengths)

    def alone(module, x, states, n: int, length: int) -> dict:
        """Row ``n``'s final state, run alone on its ``length`` steps."""
        states = tuple(s[:, n : n + 1] for s in states.values())
        _, (h, _) = module(x[:length, n : n + 1], states)
        return {"h_n": h}

    for n, length in enumerate(lengths):
        expected = alone(ours, inp.x, inp.states, n, length)
        truth = truth_of(alone, ours, inp.x, inp.states, n, length)
        assert_close(expected, {"h_n": h_n[:, n : n + 1]}, truth=truth)


def test_empty_batch():
    case = ModuleCase("LSTM", size=(4, 0, 3, 5), bidirectional=True)
    _, ours = case.modules("reference")
    x = torch.randn(4, 0, 3)
    output, (h_n, c_n) = ours(x, lengths=[])
    expected, (h_e, c_e) = ours(x)
    assert output.shape == expected.shape and h_n.shape == h_e.shape and c_n.shape == c_e.shape
    with pytest.raises(ValueError, match=r"expected 0 \(the batch size\), got 1"):
        ours(x, lengths=[1])


# (lengths, exception, message) for a batch of N=3 sequences of L=5 steps
BAD_LENGTHS = [
    pytest.param([1, 2], ValueError, r"lengths .* expected 3 \(the batch size\), got 2", id="few"),
    pytest.param(
        torch.tensor([1, 2, 3, 4]), ValueError, r"expected 3 \(the batch size\), got 4", id="many"
    ),
    pytest.param([0, 2, 3], ValueError, r"lengths must be in \[1, 5\] .* got 0 at index 0", id="0"),
    pytest.param([1, 6, 3], ValueError, r"lengths must be in \[1, 5\] .* got 6 at index 1", id="L+1"),
    pytest.param(
        torch.tensor([1, 2, -3]), ValueError, r"in \[1, 5\] .* got -3 at index 2", id="negative"
    ),
    pytest.param(torch.tensor([1.0, 2.0, 3.0]), TypeError, "integer tensor, got dtype torch.float32", id="float"),
    pytest.param(torch.tensor([True, True, True]), TypeError, "got dtype torch.bool", id="bool"),
    pytest.param([1, 2.0, 3], TypeError, "lengths must hold ints, got float at index 1", id="float-in-list"),
    pytest.param([1, True, 3], TypeError, "got bool at index 1", id="bool-in-list"),
    pytest.param(torch.tensor([[1, 2, 3]]), ValueError, r"1-D tensor of N=3 .* got a 2-D", id="2d"),
    pytest.param(torch.tensor(3), ValueError, "got a 0-D tensor", id="0d"),
    pytest.param("123", TypeError, "list of ints, got str", id="str"),
]  # fmt: skip


@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize(("lengths", "error", "message"), BAD_LENGTHS)
def test_bad_lengths_raise(name, lengths, error, message):
    case = ModuleCase(name if name != "RNN" else "RNN_TANH", size=(5, 3, 2, 4))
    _, ours = case.modules()
    with pytest.raises(error, match=message):
        ours(torch.randn(5, 3, 2), lengths=lengths)


@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN_RELU"])
def test_lengths_with_packed_or_unbatched_input_raise(name):
    case = ModuleCase(name, size=(5, 3, 2, 4))
    _, ours = case.modules()
    x = torch.randn(5, 3, 2)
    packed = pack_padded_sequence(x, [5, 4, 2])
    label = "RNN" if name.startswith("RNN") else name
    with pytest.raises(ValueError, match=f"{label}: lengths cannot be given with a PackedSequence"):
        ours(packed, lengths=[5, 4, 2])
    with pytest.raises(ValueError, match=rf"{label}: lengths needs a batched 3-D input, got a 2-D"):
        ours(x[:, 0], lengths=[5])


def test_other_errors_are_the_layers():
    """What is wrong besides lengths raises as it does without them."""
    _, ours = ModuleCase("GRU", size=(5, 3, 2, 4)).modules()
    with pytest.raises(RuntimeError, match="Expected sequence length to be larger than 0"):
        ours(torch.randn(0, 3, 2), lengths=[1, 1, 1])
    with pytest.raises(ValueError, match="Expected input to be 2D or 3D, got 4D"):
        ours(torch.randn(5, 3, 2, 1), lengths=[1, 1, 1])
    with pytest.raises(RuntimeError, match="input.size\\(-1\\) must be equal to input_size"):
        ours(torch.randn(5, 3, 7), lengths=[1, 1, 1])
    with pytest.raises(RuntimeError, match=r"Expected hidden size \(1, 3, 4\), got \[1, 2, 4\]"):
        ours(torch.randn(5, 3, 2), torch.zeros(1, 2, 4), lengths=[1, 1, 1])
    with pytest.raises(RuntimeError, match="hx should also be 3-D but got 2-D"):
        ours(torch.randn(5, 3, 2), torch.zeros(1, 4), lengths=[1, 1, 1])


def test_examples_run():
    globs = {"torch": torch, "rnnkit": rnnkit}
    runner = doctest.DocTestRunner()
    tests = doctest.DocTestFinder().find(rnnkit.lengths, globs=globs)
    tests += doctest.DocTestFinder().find(rnnkit.LSTM, globs=globs)
    assert sum(len(t.examples) for t in tests) > 0
    for test in tests:
        runner.run(test)
    assert runner.failures == 0

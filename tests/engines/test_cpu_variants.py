"""The fused CPU engine's LSTM variants against the reference engine's.

A covering design crosses every variant the engine runs with every core option (bias,
batch_first, bidirectional, layers, proj_size, packing, given states, dtype, train/eval), and
compares outputs, final states and every gradient, the variant parameters' included. In
training both engines draw their masks from one seed: equal results mean equal masks. Then
gradcheck and gradgradcheck in float64 with every variant at once, and the dispatch.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import rnnkit
from covering import all_pairs
from grid import SIZES, CaseInputs, ModuleCase
from parity import assert_same_structure, engines_picked, randomize_variant_parameters
from rnnkit.testing import as_accurate, compare, engine_tolerance

VARIANTS = {
    "layer_norm": dict(layer_norm=True),
    "peephole": dict(peephole=True),
    "zoneout": dict(zoneout=(0.3, 0.2)),
    "zoneout_h": dict(zoneout=(0.4, 0.0)),
    "recurrent_dropout": dict(recurrent_dropout=0.4),
    "weight_dropout": dict(weight_dropout=0.3),
    "forget_bias": dict(forget_bias=1.0),
    "clip": dict(gate_clip=0.5, cell_clip=0.3),
    "proj_clip": dict(proj_clip=0.2),
    "cifg": dict(coupled_input_forget=True),
    "all": dict(
        layer_norm=True,
        peephole=True,
        zoneout=(0.2, 0.1),
        recurrent_dropout=0.3,
        weight_dropout=0.2,
        gate_clip=2.0,
        cell_clip=1.5,
        coupled_input_forget=True,
    ),  # fmt: skip
}


@dataclass(frozen=True)
class VariantCase:
    """A core :class:`ModuleCase` (LSTM) with a variant, run in train or eval mode."""

    core: ModuleCase
    variant: str
    training: bool

    @property
    def id(self) -> str:
        return f"{self.variant}-{'train' if self.training else 'eval'}-{self.core.id}"

    def module(self, engine: str) -> torch.nn.Module:
        kw = self.core.kwargs()
        kw.pop("dtype")
        torch.manual_seed(0)
        m = rnnkit.LSTM(**kw, **VARIANTS[self.variant], engine=engine, dtype=self.core.dtype)
        return randomize_variant_parameters(m).train(self.training)


FACTORS = {
    "variant": tuple(VARIANTS),
    "training": (True, False),
    "bias": (True, False),
    "batch_first": (False, True),
    "bidirectional": (False, True),
    "num_layers": (1, 2),
    "proj": (False, True),
    "h0": (False, True),
    "packed": ("none", "sorted", "unsorted"),
    "dtype": (torch.float32, torch.float64),
    "size": SIZES,
}


def _valid(row: dict) -> bool:
    needs = {"proj_clip": "proj", "forget_bias": "bias"}.get(row.get("variant"))
    return needs is None or row.get(needs, True)


def _case(row: dict) -> VariantCase:
    core = {k: v for k, v in row.items() if k not in ("variant", "training")}
    return VariantCase(ModuleCase("LSTM", **core), row["variant"], row["training"])


CASES = list(
    {c.id: c for seed in (0, 1) for c in map(_case, all_pairs(FACTORS, _valid, seed=seed))}.values()
)
# Inter-layer dropout between variant layers: its masks come after each layer's own.
CASES += [
    VariantCase(ModuleCase("LSTM", num_layers=3, bidirectional=True, dropout=0.4), "all", True),
    VariantCase(
        ModuleCase("LSTM", num_layers=2, proj=True, packed="unsorted", dropout=0.5, h0=True),
        "zoneout",
        True,
    ),  # fmt: skip
    # a step wide enough for BLAS threads, H over several vectors plus a partial one
    VariantCase(ModuleCase("LSTM", size=(4, 48, 20, 200), h0=True), "all", True),
    VariantCase(ModuleCase("LSTM", size=(4, 48, 20, 200), proj=True), "layer_norm", False),
]


def _run(case: VariantCase, module: torch.nn.Module, dtype: torch.dtype, seed: int):
    inp = case.core.inputs(seed)
    if dtype != case.core.dtype:
        # the same values, cast: a float64 run of the float32 case
        module = copy.deepcopy(module).to(dtype)
        inp = CaseInputs(
            inp.x.detach().to(dtype).requires_grad_(),
            {k: v.detach().to(dtype).requires_grad_() for k, v in inp.states.items()},
            inp.lengths,
        )
    torch.manual_seed(seed)
    return case.core.run(module, inp)


def assert_matches_reference(case: VariantCase, seed: int = 0) -> None:
    """Fused and reference agree within the plain engine's tolerance; or, in float32, the
    fused result is about as accurate as the reference's own against float64
    (:func:`rnnkit.testing.as_accurate`). The float64 cases hold the fused engine to the plain
    tolerance."""
    fused = case.module("fused")
    reference = copy.deepcopy(fused)
    reference.engine = "reference"
    dtype = case.core.dtype
    (expected, expected_structure), (actual, structure) = (
        _run(case, m, dtype, seed) for m in (reference, fused)
    )
    assert_same_structure(expected_structure, structure)
    failures = []
    truth = None
    for name, e in expected.items():
        result = compare(actual[name], e, what=name, tol=engine_tolerance(e, name))
        if result.ok:
            continue
        if dtype == torch.float32:
            if truth is None:
                truth = _run(case, reference, torch.float64, seed)[0]
            ok, error, own = as_accurate(actual[name], e, truth[name])
            if ok:
                continue
            result = f"{result}; against float64: fused {error:.3e}, reference {own:.3e}"
        failures.append(str(result))
    assert not failures, "fused differs from reference:\n  " + "\n  ".join(failures)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_matches_reference(case):
    assert_matches_reference(case)


def test_masks_differ_between_calls_and_match_under_one_seed():
    """Training draws new masks each call (results differ), the same under one seed."""
    case = VariantCase(ModuleCase("LSTM", dtype=torch.float64), "all", True)
    module = case.module("fused")
    x = case.core.inputs().x.detach()
    first, second = module(x)[0], module(x)[0]
    assert not torch.equal(first, second)
    torch.manual_seed(3)
    again = module(x)[0]
    torch.manual_seed(3)
    assert torch.equal(again, module(x)[0])


def _fn(module, lengths, seed):
    names = [name for name, _ in module.named_parameters()]

    def fn(x, h0, c0, *weights):
        # the same masks at every evaluation: the function gradcheck differentiates is fixed
        torch.manual_seed(seed)
        inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if lengths is not None else x
        out, (h_n, c_n) = torch.func.functional_call(
            module, dict(zip(names, weights, strict=True)), (inp, (h0, c0))
        )
        return (out.data if lengths is not None else out), h_n, c_n

    return fn


def _gradcheck_inputs(module, L=4, N=3):
    D = 2 if module.bidirectional else 1
    H_out = module.proj_size or module.hidden_size
    lead = (D * module.num_layers, N)
    x = torch.randn(L, N, module.input_size, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(*lead, H_out, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(*lead, module.hidden_size, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in module.parameters()]
    return (x, h0, c0, *params)


GRADCHECK = [
    pytest.param("all", dict(bidirectional=True), True, id="all-bidir-packed"),
    pytest.param("all", dict(proj_size=2, num_layers=2), False, id="all-proj2-l2"),
    pytest.param("proj_clip", dict(proj_size=3), False, id="proj_clip"),
    pytest.param("layer_norm", dict(bias=False), True, id="layer_norm-nobias-packed"),
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("variant, kw, packed", GRADCHECK)
def test_gradcheck(variant, kw, packed, training):
    """The hand-written backward against finite differences (clip bounds set so that no
    pre-activation sits at a kink of the clamp)."""
    torch.manual_seed(0)
    module = rnnkit.LSTM(
        3, 4, **kw, **VARIANTS[variant], engine="fused", dtype=torch.float64
    ).train(training)
    lengths = torch.tensor([4, 2, 3]) if packed else None
    inputs = _gradcheck_inputs(module)
    assert torch.autograd.gradcheck(_fn(module, lengths, 5), inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("variant, kw, packed", GRADCHECK[:2])
def test_double_backward(variant, kw, packed):
    """create_graph=True rebuilds each direction from torch ops with the same masks."""
    torch.manual_seed(0)
    module = rnnkit.LSTM(3, 4, **kw, **VARIANTS[variant], engine="fused", dtype=torch.float64)
    lengths = torch.tensor([4, 2, 3]) if packed else None
    inputs = _gradcheck_inputs(module)
    assert torch.autograd.gradgradcheck(_fn(module, lengths, 5), inputs, fast_mode=True)


def test_inference_keeps_nothing_and_matches_training_forward():
    """no_grad runs the kernel without saving; same values as the graph-building forward."""
    case = VariantCase(ModuleCase("LSTM", bidirectional=True, proj=True), "all", False)
    module = case.module("fused")
    x = case.core.inputs().x
    with torch.no_grad():
        inference = module(x.detach())
    training = module(x)
    assert torch.equal(inference[0], training[0])
    assert all(torch.equal(a, b) for a, b in zip(inference[1], training[1], strict=True))


@pytest.mark.parametrize(
    "cls, kw, reason",
    [
        ("GRU", dict(layer_norm=True), "variant layer_norm=True not supported"),
        ("RNN", dict(zoneout=0.2), r"variant zoneout=\(0\.2, 0\.0\) not supported"),
        ("LSTM", dict(activations=("hard_sigmoid", "tanh", "tanh")), "variant activations=.* not"),
    ],
)
def test_variants_it_leaves_to_the_reference(cls, kw, reason):
    """Named, the engine raises why; auto runs the reference, bit for bit."""
    x = torch.randn(3, 2, 4)
    with pytest.raises(RuntimeError, match=f"fused: {reason}"):
        getattr(rnnkit, cls)(4, 5, **kw, engine="fused")(x)
    auto = getattr(rnnkit, cls)(4, 5, **kw)
    reference = copy.deepcopy(auto)
    reference.engine = "reference"
    outputs = []
    for module in (auto, reference):
        torch.manual_seed(0)
        outputs.append(module(x)[0])
    assert torch.equal(*outputs)


def test_auto_picks_fused_for_lstm_variants(monkeypatch):
    picked = engines_picked(monkeypatch)
    rnnkit.LSTM(4, 5, layer_norm=True, zoneout=0.1)(torch.randn(3, 2, 4))
    assert picked == ["fused"]


def test_variant_parameters_of_another_dtype_are_refused():
    module = rnnkit.LSTM(4, 5, peephole=True, engine="fused")
    module.peephole_l0.data = module.peephole_l0.data.double()
    with pytest.raises(RuntimeError, match="one dtype"):
        module(torch.randn(3, 2, 4))


def test_sizes_cover_the_grid():
    assert {c.core.size for c in CASES} >= set(SIZES)
    assert {c.variant for c in CASES} == set(VARIANTS)
    assert replace(CASES[0], training=not CASES[0].training).id != CASES[0].id

"""The Triton engine's LSTM variants against the reference engine's.

A covering design crosses every variant with every core option (bias, batch_first,
bidirectional, layers, proj_size, packing, given states, dtype, train/eval) and compares
outputs, final states and every gradient, the variant parameters' included. In training both
engines draw their masks from one seed: equal results mean equal masks. Then gradcheck and
gradgradcheck in float64, tiles smaller than a step, and what the engine leaves to the
reference. Without a GPU the kernels run in Triton's interpreter (``conftest.py``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import rnnkit
from covering import all_pairs
from grid import SIZES, CaseInputs, ModuleCase
from parity import assert_same_structure
from rnnkit.testing import compare, engine_tolerance

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("triton_interpreter")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

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
        dtype = kw.pop("dtype")
        torch.manual_seed(0)
        m = rnnkit.LSTM(**kw, **VARIANTS[self.variant], engine=engine, dtype=dtype)
        with torch.no_grad():
            # non-trivial variant parameters, so that a wrong use of one shows
            for name, p in m.named_parameters():
                if name.startswith(("peephole", "layer_norm_c_bias")):
                    p.uniform_(-0.5, 0.5)
                elif name.startswith("layer_norm"):
                    p.uniform_(0.5, 1.5)
        return m.to(DEVICE).train(self.training)


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
    # the core grid's sizes with L=17 for L=63: the interpreter's time grows with the steps
    "size": tuple((min(L, 17), N, H_in, H) for L, N, H_in, H in SIZES),
}


def _valid(row: dict) -> bool:
    needs = {"proj_clip": "proj", "forget_bias": "bias"}.get(row.get("variant"))
    return needs is None or row.get(needs, True)


def _case(row: dict) -> VariantCase:
    core = {k: v for k, v in row.items() if k not in ("variant", "training")}
    return VariantCase(ModuleCase("LSTM", **core), row["variant"], row["training"])


CASES = [_case(row) for row in all_pairs(FACTORS, _valid, seed=0)]
# Inter-layer dropout between variant layers: its masks come after each layer's own.
CASES += [
    VariantCase(ModuleCase("LSTM", num_layers=3, bidirectional=True, dropout=0.4), "all", True),
    VariantCase(
        ModuleCase("LSTM", num_layers=2, proj=True, packed="unsorted", dropout=0.5, h0=True),
        "zoneout",
        True,
    ),  # fmt: skip
]


def _run(case: VariantCase, module, dtype: torch.dtype, seed: int):
    """Forward and the gradients of a fixed random-weighted sum, on ``dtype`` copies of the
    case's input and weights, from one seed (the masks)."""
    module = copy.deepcopy(module).to(dtype)
    inp = case.core.inputs(seed)

    def leaf(t):
        return t.detach().to(DEVICE, dtype).requires_grad_()

    inp = CaseInputs(leaf(inp.x), {k: leaf(v) for k, v in inp.states.items()}, inp.lengths)
    torch.manual_seed(seed)
    tensors, structure = case.core.forward(module, inp)
    leaves = {"input": inp.x, **inp.states, **dict(module.named_parameters())}
    gen = torch.Generator().manual_seed(1)
    outs = list(tensors.values())
    weights = [torch.randn(o.shape, generator=gen).to(o) for o in outs]
    got = torch.autograd.grad(outs, list(leaves.values()), weights, allow_unused=True)
    grads = {f"grad_{name}": g for name, g in zip(leaves, got, strict=True)}
    return {**tensors, **grads}, structure


def assert_matches_reference(case: VariantCase, seed: int = 0) -> None:
    """Triton and reference agree within the engine tolerance; or, in float32, the Triton
    result is about as accurate as the reference's own float32 result, both measured against
    the reference in float64 (LayerNorm of a few nearly equal units divides by a standard
    deviation near sqrt(eps), where float32 rounding grows in every implementation)."""
    module = case.module("triton")
    reference = copy.deepcopy(module)
    reference.engine = "reference"
    dtype = case.core.dtype
    (expected, expected_structure), (actual, structure) = (
        _run(case, m, dtype, seed) for m in (reference, module)
    )
    assert_same_structure(expected_structure, structure)
    failures = []
    truth = None
    for name, e in expected.items():
        if e is None or actual[name] is None:
            if (e is None) != (actual[name] is None):
                failures.append(f"{name}: reference gives {e}, triton {actual[name]}")
            continue
        result = compare(actual[name], e, what=name, tol=engine_tolerance(e, name))
        if result.ok:
            continue
        if dtype == torch.float32:
            if truth is None:
                truth = _run(case, reference, torch.float64, seed)[0]
            error = (actual[name].double() - truth[name]).abs().max().item()
            own = (e.double() - truth[name]).abs().max().item()
            if error <= 16 * own:
                continue
            result = f"{result}; against float64: triton {error:.3e}, reference {own:.3e}"
        failures.append(str(result))
    assert not failures, "triton differs from reference:\n  " + "\n  ".join(failures)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_matches_reference(case):
    assert_matches_reference(case)


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, id=c.id)
        for c in (
            VariantCase(ModuleCase("LSTM", size=(4, 5, 3, 9), bidirectional=True), "all", True),
            VariantCase(ModuleCase("LSTM", size=(4, 5, 3, 9), proj=True), "peephole", False),
        )
    ],
)
def test_tiles_smaller_than_a_step(case, monkeypatch):
    """Several programs per step (whole rows each where layer_norm normalizes c)."""
    from rnnkit.engines.triton import launch

    monkeypatch.setattr(launch, "_MAX_BLOCK_H", 4)
    monkeypatch.setattr(launch, "_TILE", 8)
    assert_matches_reference(case)


def test_masks_differ_between_calls_and_match_under_one_seed():
    case = VariantCase(ModuleCase("LSTM", dtype=torch.float64), "all", True)
    module = case.module("triton")
    x = case.core.inputs().x.detach().to(DEVICE)
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

    def f64(*shape):
        return torch.randn(*shape, dtype=torch.float64, device=DEVICE, requires_grad=True)

    x = f64(L, N, module.input_size)
    h0, c0 = f64(*lead, H_out), f64(*lead, module.hidden_size)
    params = [p.detach().clone().requires_grad_() for p in module.parameters()]
    return (x, h0, c0, *params)


GRADCHECK = [
    pytest.param("all", dict(), True, True, id="all-packed-train"),
    pytest.param("all", dict(proj_size=2), False, False, id="all-proj2-eval"),
    pytest.param("proj_clip", dict(proj_size=3), False, True, id="proj_clip-train"),
    pytest.param("layer_norm", dict(bias=False), True, False, id="layer_norm-nobias-packed-eval"),
]


@pytest.mark.parametrize("variant, kw, packed, training", GRADCHECK)
def test_gradcheck(variant, kw, packed, training):
    """The hand-written backward against finite differences (clip bounds set so that no
    pre-activation sits at a kink of the clamp); interpreted, in gradcheck's fast mode."""
    torch.manual_seed(0)
    module = rnnkit.LSTM(3, 4, **kw, **VARIANTS[variant], engine="triton", dtype=torch.float64)
    module = module.to(DEVICE).train(training)
    lengths = torch.tensor([4, 2, 3]) if packed else None
    inputs = _gradcheck_inputs(module)
    fn = _fn(module, lengths, 5)
    assert torch.autograd.gradcheck(
        fn, inputs, eps=1e-6, atol=1e-7, fast_mode=not CUDA, check_undefined_grad=CUDA
    )


def test_double_backward():
    """create_graph=True rebuilds each direction from torch ops with the same masks."""
    torch.manual_seed(0)
    module = rnnkit.LSTM(3, 4, **VARIANTS["all"], engine="triton", dtype=torch.float64)
    module = module.to(DEVICE)
    inputs = _gradcheck_inputs(module, L=3, N=2)
    assert torch.autograd.gradgradcheck(_fn(module, None, 5), inputs, fast_mode=True)


@pytest.mark.parametrize(
    "cls, kw, dtype, reason",
    [
        ("GRU", dict(layer_norm=True), torch.float32, "variant layer_norm=True not supported"),
        ("RNN", dict(zoneout=0.2), torch.float32, r"variant zoneout=\(0\.2, 0\.0\) not"),
        (
            "LSTM",
            dict(activations=("hard_sigmoid", "tanh", "tanh")),
            torch.float32,
            "variant activations=.* not supported",
        ),
        (
            "LSTM",
            dict(peephole=True),
            torch.bfloat16,
            "variant peephole=True not supported, or torch.bfloat16",
        ),
    ],
)
def test_variants_it_leaves_to_the_reference(cls, kw, dtype, reason):
    """Named, the engine raises why; it never falls back."""
    x = torch.randn(3, 2, 4, dtype=dtype, device=DEVICE)
    module = getattr(rnnkit, cls)(4, 5, **kw, engine="triton", dtype=dtype).to(DEVICE)
    with pytest.raises(RuntimeError, match=f"triton: {reason}"):
        module(x)

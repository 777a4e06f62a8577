"""Every fast engine's LSTM variants (``engines.ENGINES``) against the reference engine's.

A covering design crosses every variant with every core option (bias, batch_first,
bidirectional, layers, proj_size, packing, given states, dtype, train/eval) and compares
outputs, final states and every gradient, the variant parameters' included. In training both
engines draw their masks from one seed: equal results mean equal masks. Then gradcheck and
gradgradcheck in float64 with every variant at once, and what the engines leave to the
reference. Triton's kernels run in its interpreter without a GPU (``conftest.py``).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import rnnkit
from covering import all_pairs
from engines import (
    VARIANTS,
    Engine,
    VariantCase,
    check_variant_case,
    each_engine,
    engine_params,
    randn64,
    with_reference,
)
from grid import SIZES, ModuleCase


def _sizes(engine: Engine) -> tuple[tuple[int, int, int, int], ...]:
    """The core grid's sizes, at most ``engine.max_steps`` long."""
    return tuple((min(L, engine.max_steps or L), N, H_in, H) for L, N, H_in, H in SIZES)


def _factors(engine: Engine) -> dict:
    return {
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
        "size": _sizes(engine),
    }


def _valid(row: dict) -> bool:
    needs = {"proj_clip": "proj", "forget_bias": "bias"}.get(row.get("variant"))
    return needs is None or row.get(needs, True)


def _case(row: dict) -> VariantCase:
    core = {k: v for k, v in row.items() if k not in ("variant", "training")}
    return VariantCase(ModuleCase("LSTM", **core), row["variant"], row["training"])


# Inter-layer dropout between variant layers: its masks come after each layer's own. Every
# variant at once in float32 and, where the float32 check of LayerNorm is wide
# (check_variant_case), in float64.
DROPOUT_CASES = [
    *(
        VariantCase(
            ModuleCase("LSTM", num_layers=3, bidirectional=True, dropout=0.4, dtype=dt), "all", True
        )
        for dt in (torch.float32, torch.float64)
    ),
    VariantCase(
        ModuleCase("LSTM", num_layers=2, proj=True, packed="unsorted", dropout=0.5, h0=True),
        "zoneout",
        True,
    ),  # fmt: skip
]


def variant_cases(engine: Engine) -> list[VariantCase]:
    """``engine.designs`` covering designs of the variants and the core options (two: every
    pair twice, in different company), and inter-layer dropout."""
    factors = _factors(engine)
    rows = (row for seed in range(engine.designs) for row in all_pairs(factors, _valid, seed=seed))
    return list({c.id: c for c in map(_case, rows)}.values()) + DROPOUT_CASES


@pytest.mark.parametrize("engine, case", engine_params(variant_cases))
def test_matches_reference(engine, case):
    check_variant_case(engine, case)


@pytest.mark.parametrize("engine", each_engine())
def test_masks_differ_between_calls_and_match_under_one_seed(engine):
    """Training draws new masks each call (results differ), the same under one seed."""
    case = VariantCase(ModuleCase("LSTM", dtype=torch.float64), "all", True)
    module = case.module(engine)
    x = case.core.inputs().x.detach().to(engine.device)
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


def _gradcheck_inputs(engine, module, L=4, N=3):
    D = 2 if module.bidirectional else 1
    H_out = module.proj_size or module.hidden_size
    lead = (D * module.num_layers, N)
    x = randn64(engine, L, N, module.input_size)
    h0, c0 = randn64(engine, *lead, H_out), randn64(engine, *lead, module.hidden_size)
    params = [p.detach().clone().requires_grad_() for p in module.parameters()]
    return (x, h0, c0, *params)


def _module(engine, variant, kw, training=True):
    torch.manual_seed(0)
    module = rnnkit.LSTM(3, 4, **kw, **VARIANTS[variant], engine=engine.name, dtype=torch.float64)
    return module.to(engine.device).train(training)


GRADCHECK = [
    pytest.param("all", dict(bidirectional=True), True, id="all-bidir-packed"),
    pytest.param("all", dict(proj_size=2, num_layers=2), False, id="all-proj2-l2"),
    pytest.param("proj_clip", dict(proj_size=3), False, id="proj_clip"),
    pytest.param("layer_norm", dict(bias=False), True, id="layer_norm-nobias-packed"),
]
# the stand-ins that Triton's interpreter affords: one direction, one layer, train or eval
GRADCHECK_LIGHT = [
    pytest.param("all", dict(), True, True, id="all-packed-train"),
    pytest.param("all", dict(proj_size=2), False, False, id="all-proj2-eval"),
    pytest.param("proj_clip", dict(proj_size=3), False, True, id="proj_clip-train"),
    pytest.param("layer_norm", dict(bias=False), True, False, id="layer_norm-nobias-packed-eval"),
]


@pytest.mark.parametrize(
    "engine, variant, kw, packed, training",
    engine_params(
        [
            pytest.param(*p.values, training, id=f"{p.id}-{'train' if training else 'eval'}")
            for p in GRADCHECK
            for training in (True, False)
        ],
        light=GRADCHECK_LIGHT,
    ),
)
def test_gradcheck(engine, variant, kw, packed, training):
    """The hand-written backward against finite differences (clip bounds set so that no
    pre-activation sits at a kink of the clamp); interpreted, in gradcheck's fast mode (one
    random direction per input) and without its undefined-gradient pass."""
    module = _module(engine, variant, kw, training)
    lengths = torch.tensor([4, 2, 3]) if packed else None
    inputs = _gradcheck_inputs(engine, module)
    assert torch.autograd.gradcheck(
        _fn(module, lengths, 5),
        inputs,
        eps=1e-6,
        atol=1e-7,
        fast_mode=engine.interpreted,
        check_undefined_grad=not engine.interpreted,
    )


@pytest.mark.parametrize(
    "engine, variant, kw, packed, L, N",
    engine_params(
        [pytest.param(*p.values, 4, 3, id=p.id) for p in GRADCHECK[:2]],
        light=[pytest.param("all", dict(), False, 3, 2, id="all-L3")],
    ),
)
def test_double_backward(engine, variant, kw, packed, L, N):
    """create_graph=True rebuilds each direction from torch ops with the same masks."""
    module = _module(engine, variant, kw)
    lengths = torch.tensor([4, 2, 3]) if packed else None
    inputs = _gradcheck_inputs(engine, module, L=L, N=N)
    assert torch.autograd.gradgradcheck(_fn(module, lengths, 5), inputs, fast_mode=True)


@pytest.mark.parametrize("engine", each_engine())
def test_inference_keeps_nothing_and_matches_training_forward(engine):
    """no_grad runs the kernel without saving; same values as the graph-building forward."""
    case = VariantCase(ModuleCase("LSTM", bidirectional=True, proj=True), "all", False)
    module = case.module(engine)
    x = case.core.inputs().x.detach().to(engine.device).requires_grad_()
    with torch.no_grad():
        inference = module(x.detach())
    training = module(x)
    assert torch.equal(inference[0], training[0])
    assert all(torch.equal(a, b) for a, b in zip(inference[1], training[1], strict=True))


GRU_RNN = r"variant \w+=.* not supported"
LEFT_TO_THE_REFERENCE = [
    pytest.param("GRU", dict(layer_norm=True), torch.float32, GRU_RNN, id="GRU-layer_norm"),
    pytest.param("GRU", dict(gate_clip=0.5), torch.float32, GRU_RNN, id="GRU-gate_clip"),
    pytest.param("RNN", dict(zoneout=0.2), torch.float32, GRU_RNN, id="RNN-zoneout"),
    pytest.param(
        "LSTM",
        dict(activations=("hard_sigmoid", "tanh", "tanh")),
        torch.float32,
        "variant activations=.* not supported",
        id="LSTM-activations",
    ),
    pytest.param(
        "LSTM",
        dict(peephole=True),
        torch.bfloat16,
        r"(variant peephole=True not supported, or )?torch.bfloat16 not supported",
        id="LSTM-peephole-bf16",
    ),
]


@pytest.mark.parametrize("engine, cls, kw, dtype, reason", engine_params(LEFT_TO_THE_REFERENCE))
def test_variants_it_leaves_to_the_reference(engine, cls, kw, dtype, reason):
    """Named, the engine raises why; it never falls back. auto runs the reference, bit for
    bit."""
    x = torch.randn(3, 2, 4, dtype=dtype, device=engine.device)
    named = getattr(rnnkit, cls)(4, 5, **kw, engine=engine.name, dtype=dtype).to(engine.device)
    with pytest.raises(RuntimeError, match=f"{engine.name}: {reason}"):
        named(x)
    auto, reference = with_reference(getattr(rnnkit, cls)(4, 5, **kw, dtype=dtype))
    outputs = []
    for module in (auto.to(engine.device), reference.to(engine.device)):
        torch.manual_seed(0)
        outputs.append(module(x)[0])
    assert torch.equal(*outputs)


@pytest.mark.parametrize("engine", each_engine())
def test_sizes_cover_the_grid(engine):
    cases = variant_cases(engine)
    assert {c.core.size for c in cases} >= set(_sizes(engine))
    assert {c.variant for c in cases} == set(VARIANTS)
    assert replace(cases[0], training=not cases[0].training).id != cases[0].id

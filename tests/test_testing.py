"""rnnkit.testing: the comparison and the case runner that the suite, ``rnnkit check`` and the
benchmark's parity gate rely on. A comparison that cannot fail would hide every bug."""

import pytest
import torch

import rnnkit
from rnnkit.testing import (
    EXACT,
    FLOAT64_ACCURACY_FACTOR,
    FLOAT64_ACCURACY_ULPS,
    MODULES,
    TOLERANCES,
    Case,
    aten_path,
    compare,
    compare_all,
    float64_copy,
    run,
    run_pair,
    run_truth,
    tolerance,
)

F32, F64 = torch.float32, torch.float64


def test_compare_exact_and_within_tolerance():
    e = torch.linspace(-2, 2, 11, dtype=F64)
    assert compare(e.clone(), e, tol=EXACT).bitwise
    nudged = e.clone()
    nudged[3] = torch.nextafter(nudged[3], torch.tensor(10.0, dtype=F64))
    assert not compare(nudged, e, tol=EXACT).ok
    result = compare(nudged, e, what="output")
    assert result.ok and not result.bitwise and result.max_abs > 0
    far = e + 1e-9
    result = compare(far, e, what="output")
    assert not result.ok and result.max_abs == pytest.approx(1e-9, rel=1e-3)


def test_float32_needs_a_truth():
    e = torch.linspace(-2, 2, 11)
    with pytest.raises(ValueError, match="float64 truth"):
        compare(e.clone(), e)
    with pytest.raises(ValueError, match="float64 truth"):
        tolerance(F32)
    # bits need no truth, and neither do integers
    assert compare(e.clone(), e, tol=EXACT).ok
    assert compare(torch.arange(3), torch.arange(3)).bitwise
    assert not compare(torch.tensor([0, 1, 3]), torch.arange(3), truth=torch.zeros(3)).ok


def _noisy(truth: torch.Tensor, ulps: float, seed: int) -> torch.Tensor:
    """``truth`` in float32 with a random error of up to ``ulps`` units of eps at each entry."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.rand(truth.shape, generator=gen, dtype=F64) * 2 - 1
    return (truth * (1 + ulps * torch.finfo(F32).eps * noise)).float()


def test_the_float64_rule():
    truth = torch.randn(50, 7, generator=torch.Generator().manual_seed(0), dtype=F64)
    expected = _noisy(truth, 100, seed=1)
    own = (expected.double() - truth).abs().max().item()
    # as accurate as expected, or a few times less: a match; far less: a failure
    for ulps, ok in ((100, True), (300, True), (100 * FLOAT64_ACCURACY_FACTOR * 2, False)):
        result = compare(_noisy(truth, ulps, seed=2), expected, truth=truth)
        assert result.ok == ok, str(result)
        assert result.expected_vs_truth == own and result.vs_truth > 0
        assert "against float64" in str(result) and ("ok" if ok else "FAIL") in str(result)
    # where the other side rounds exactly, a few ulps of the tensor's scale are the floor
    exact = truth.float()
    scale = truth.abs().max().item()
    floor = FLOAT64_ACCURACY_ULPS * torch.finfo(F32).eps * scale
    assert compare(exact + 0, exact, truth=exact.double()).ok
    off = exact.clone()
    off[0, 0] += floor / 2
    assert compare(off, exact, truth=exact.double()).ok
    off[0, 0] += floor
    assert not compare(off, exact, truth=exact.double()).ok
    # the bound, in what the comparison reports
    result = compare(expected, expected, truth=truth)
    assert result.atol == pytest.approx(FLOAT64_ACCURACY_FACTOR * own + floor, rel=1e-12)
    assert result.rtol == 0.0 and result.bitwise


def test_the_float64_rule_checks_nan_infinities_and_shapes():
    truth = torch.tensor([1.0, float("nan"), float("inf"), 2.0], dtype=F64)
    expected = truth.float()
    assert compare(expected.clone(), expected, truth=truth).ok
    for bad in ([1.0, 0.0, float("inf"), 2.0], [1.0, float("nan"), 3.0e38, 2.0]):
        assert not compare(torch.tensor(bad), expected, truth=truth).ok
    result = compare(expected.clone(), expected, truth=truth[:3])
    assert not result.ok and "float64 truth" in result.problem
    # half precision takes the rule too, with its own eps
    half = truth.half()
    assert compare(half.clone(), half, truth=truth).ok


def test_gradients_get_the_grad_row():
    e = torch.ones(4, dtype=F64)
    a = e + 1e-11
    assert not compare(a, e, what="h_n").ok
    assert compare(a, e, what="grad_input").ok


def test_tolerance_table():
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        fwd, grad = tolerance(dtype, "fwd"), tolerance(dtype, "grad")
        assert 0 < fwd.atol <= grad.atol and TOLERANCES[dtype]["fwd"] == fwd
    assert F32 not in TOLERANCES
    # finer dtypes, tighter tolerances
    assert tolerance(torch.float64).atol < tolerance(torch.float16).atol
    with pytest.raises(ValueError):
        tolerance(torch.int32)
    with pytest.raises(ValueError):
        tolerance(torch.float64, "backward")


def test_compare_all_reports_missing_names():
    t = torch.ones(2)
    truth = {"a": t.double(), "b": t.double(), "extra": t.double()}
    results = compare_all({"a": t}, {"a": t, "b": t}, F32, truth=truth)
    assert [r.ok for r in results] == [True, False]
    results = compare_all({"a": t, "extra": t}, {"a": t}, F32, truth=truth)
    assert [r.ok for r in results] == [True, False]
    results = compare_all({"a": t, "b": t}, {"a": t, "b": t}, F32, truth={"a": t.double()})
    assert [r.ok for r in results] == [True, False]
    assert "missing from the float64 truth" in str(results[1])


def test_float64_copy():
    module = rnnkit.LSTM(3, 4, engine="fused")
    x = torch.randn(5, 2, 3, requires_grad=True)
    lengths = torch.tensor([5, 3])
    copied = float64_copy({"module": module, "leaves": [x, lengths], "flag": True})
    assert copied["module"].engine == "reference" and module.engine == "fused"
    assert {p.dtype for p in copied["module"].parameters()} == {F64}
    y, n = copied["leaves"]
    assert y.dtype == F64 and y.is_leaf and y.requires_grad and torch.equal(y, x.double())
    assert n is lengths and copied["flag"] is True


@pytest.mark.parametrize("case", [Case("LSTM", num_layers=2), Case("GRU", dtype=F64)])
def test_run_truth(case):
    truth = run_truth(case)
    if case.dtype == F64:
        assert truth is None
        return
    actual, expected = run_pair(case)
    assert list(truth) == list(expected)
    assert {t.dtype for t in truth.values()} == {F64}
    results = compare_all(actual, expected, case.dtype, truth=truth)
    assert all(r.ok and r.vs_truth is not None for r in results), "\n".join(map(str, results))


def _perturbed(module: torch.nn.Module, how: str) -> None:
    with torch.no_grad():
        if how == "weight":
            # one recurrent weight off by one part in a thousand
            module.weight_hh_l0[1, 2] *= 1 + 1e-3
        elif how == "gates":
            # the input and forget gates of the input weights swapped
            H = module.hidden_size
            w = module.weight_ih_l0
            w[: 2 * H] = torch.cat([w[H : 2 * H], w[:H]])
        else:
            # one bias shifted by 1e-4
            module.bias_hh_l0[0] += 1e-4


@pytest.mark.parametrize("how", ["weight", "gates", "bias"])
@pytest.mark.parametrize("engine", ["reference", "fused"])
def test_the_float64_rule_fails_a_real_bug(how, engine):
    """A slightly wrong weight or bias, or two gates swapped: beyond the rounding the rule
    allows (4x the bound and more, for the slight ones), whichever engine it is on."""
    case = Case("LSTM", L=20, N=3, H_in=4, H=6, num_layers=2)
    torch_module, module = case.modules(engine)
    leaves = case.inputs()
    truth = run_truth(case)
    with aten_path():
        expected = run(case, torch_module, leaves)
    assert all(r.ok for r in compare_all(run(case, module, leaves), expected, F32, truth=truth))
    _perturbed(module, how)
    results = compare_all(run(case, module, leaves), expected, F32, truth=truth)
    failed = {r.what for r in results if not r.ok}
    assert {"h_n", "c_n", "grad_input", "grad_weight_hh_l0"} <= failed, "\n".join(map(str, results))


CASES = [
    Case(module, **options)
    for module in MODULES
    for options in (
        {},
        {"batched": False, "h0": False},
        {"dtype": torch.float64, "bias": False},
    )
] + [
    Case("LSTM", num_layers=2, bidirectional=True, proj_size=3, packed=True),
    Case("GRU", batch_first=True, packed=True, num_layers=3),
    Case("RNN(relu)", L=63, N=1, H=7, bidirectional=True),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_run_pair_is_bitwise_on_the_aten_path(case):
    actual, expected = run_pair(case, engine="reference", torch_path="aten")
    assert "output" in expected and "grad_input" in expected
    assert any(name.startswith("grad_weight") for name in expected)
    results = compare_all(actual, expected, case.dtype, exact=True)
    assert all(r.ok for r in results), "\n".join(map(str, results))


def test_case_rejects_impossible_options():
    for kwargs in (
        {"module": "GRU", "proj_size": 2},
        {"module": "LSTMCell", "num_layers": 2},
        {"module": "LSTM", "packed": True, "batched": False},
        {"module": "Transformer"},
    ):
        with pytest.raises(ValueError):
            Case(**kwargs)
    with pytest.raises(ValueError):
        run_pair(Case("GRU"), torch_path="cudnn")

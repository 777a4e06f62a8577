"""rnnkit.testing: the comparison and the case runner that the suite, ``rnnkit check`` and the
benchmark's parity gate rely on. A comparison that cannot fail would hide every bug."""

import pytest
import torch

from rnnkit.testing import (
    EXACT,
    MODULES,
    TOLERANCES,
    Case,
    compare,
    compare_all,
    run_pair,
    tolerance,
)


def test_compare_exact_and_within_tolerance():
    e = torch.linspace(-2, 2, 11)
    assert compare(e.clone(), e, tol=EXACT).bitwise
    nudged = e.clone()
    nudged[3] = torch.nextafter(nudged[3], torch.tensor(10.0))
    assert not compare(nudged, e, tol=EXACT).ok
    result = compare(nudged, e, what="output")
    assert result.ok and not result.bitwise and result.max_abs > 0
    far = e + 1e-3
    result = compare(far, e, what="output")
    assert not result.ok and result.max_abs == pytest.approx(1e-3, rel=1e-3)


def test_compare_nan_shape_dtype_and_missing():
    e = torch.tensor([1.0, float("nan"), 3.0])
    assert compare(e.clone(), e, tol=EXACT).ok
    assert not compare(torch.tensor([1.0, 2.0, float("nan")]), e).ok
    assert not compare(torch.tensor([1.0, 2.0, 3.0]), e).ok
    assert not compare(torch.zeros(2), torch.zeros(3)).ok
    assert not compare(torch.zeros(3, dtype=torch.float64), torch.zeros(3)).ok
    assert not compare(None, torch.zeros(3)).ok and not compare(torch.zeros(3), None).ok
    assert compare(None, None).ok


def test_compare_infinities():
    e = torch.tensor([1.0, float("inf"), float("-inf")])
    assert compare(e.clone(), e, tol=EXACT).ok
    assert compare(e.clone(), e).ok
    assert not compare(torch.tensor([1.0, float("inf"), 3.0]), e).ok
    assert not compare(torch.tensor([1.0, float("-inf"), float("-inf")]), e, tol=EXACT).ok


def test_gradients_get_the_grad_row():
    e = torch.ones(4)
    a = e + 1e-5
    assert not compare(a, e, what="h_n").ok
    assert compare(a, e, what="grad_input").ok


def test_tolerance_table():
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        fwd, grad = tolerance(dtype, "fwd"), tolerance(dtype, "grad")
        assert 0 < fwd.atol <= grad.atol and TOLERANCES[dtype]["fwd"] == fwd
    # finer dtypes, tighter tolerances
    assert (
        tolerance(torch.float64).atol
        < tolerance(torch.float32).atol
        < tolerance(torch.float16).atol
    )
    with pytest.raises(ValueError):
        tolerance(torch.int32)
    with pytest.raises(ValueError):
        tolerance(torch.float32, "backward")


def test_compare_all_reports_missing_names():
    t = torch.ones(2)
    results = compare_all({"a": t}, {"a": t, "b": t}, torch.float32)
    assert [r.ok for r in results] == [True, False]
    results = compare_all({"a": t, "extra": t}, {"a": t}, torch.float32)
    assert [r.ok for r in results] == [True, False]


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

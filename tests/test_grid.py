"""The grids themselves: the covering design really covers every feasible pair."""

import torch

from covering import all_pairs, feasible_pairs, row_pairs
from grid import CELL_CASES, MODULE_CASES, MODULE_FACTORS, _valid


def _row(case):
    row = {name: getattr(case, name) for name in MODULE_FACTORS}
    return {**row, "mode": "LSTM_PROJ" if case.proj else case.mode}


def test_module_grid_covers_every_feasible_pair():
    rows = [_row(case) for case in MODULE_CASES]
    covered = set().union(*(row_pairs(MODULE_FACTORS, row) for row in rows))
    missing = feasible_pairs(MODULE_FACTORS, _valid) - covered
    assert not missing


def test_module_grid_has_no_invalid_combination():
    for case in MODULE_CASES:
        assert not (case.proj and case.mode != "LSTM"), case.id
        assert not (case.is_packed and not case.batched), case.id


def test_grids_are_big_enough():
    # two seeds of a strength-two design over 5 modes x 5 sizes: at least 2 * 25 rows
    assert len(MODULE_CASES) >= 50
    assert len(CELL_CASES) == 160


def test_grid_ids_are_unique():
    for cases in (MODULE_CASES, CELL_CASES):
        ids = [case.id for case in cases]
        assert len(set(ids)) == len(ids)


def test_all_pairs_is_deterministic_and_respects_constraints():
    factors = {"a": (1, 2, 3), "b": ("x", "y"), "c": (True, False), "d": (0, 1, 2, 3)}

    def valid(row):
        return not (row.get("a") == 3 and row.get("b") == "y")

    rows = all_pairs(factors, valid, seed=7)
    assert rows == all_pairs(factors, valid, seed=7)
    assert all(valid(row) for row in rows)
    covered = set().union(*(row_pairs(factors, row) for row in rows))
    assert covered == feasible_pairs(factors, valid)
    # far fewer rows than the 48 of the full product
    assert len(rows) <= 16


def test_module_grid_mixes_dtypes():
    assert {case.dtype for case in MODULE_CASES} == {torch.float32, torch.float64}

"""The reference engine, named explicitly, on the module and cell grids against torch.nn.

Every other engine is tested against the same grids (``grid.py``); this is the first link of
the chain of trust: the reference is bit-identical to torch's ATen path.
"""

import pytest
import torch

import rnnkit
import rnnkit.functional as RF
from grid import ModuleCase, cell_params, check_cell_case, check_module_case, module_params
from rnnkit import fast
from rnnkit.engines.base import CellCall, RNNCall


@pytest.mark.parametrize("case", module_params())
def test_module_grid(case):
    check_module_case(case, engine="reference")


@pytest.mark.parametrize("case", cell_params())
def test_cell_grid(case):
    check_cell_case(case, engine="reference")


@pytest.mark.parametrize(
    "case",
    module_params(
        [
            ModuleCase("LSTM", num_layers=3, bidirectional=True, packed="unsorted", dropout=0.5),
            ModuleCase("GRU", num_layers=2, h0=True, dropout=0.2),
        ]
    ),
)
def test_dropout(case):
    check_module_case(case, engine="reference")


@pytest.mark.parametrize("engine", ["reference", "auto"])
def test_reference_supports_every_call(monkeypatch, engine):
    """Every call reaches an engine; the reference declares that it can run each of them.
    (The fast path of small calls, which runs the same step without asking the dispatch, is
    off: what is checked here is the dispatch.)"""
    monkeypatch.setattr(fast, "enabled", False)
    calls = []
    original = RF.select_engine

    def recording(name, call):
        calls.append(call)
        return original(name, call)

    monkeypatch.setattr(RF, "select_engine", recording)
    x = torch.randn(3, 2, 4)
    rnnkit.LSTM(4, 5, 2, proj_size=2, bidirectional=True, engine=engine)(x)
    rnnkit.GRU(4, 5, batch_first=True, engine=engine).double()(x.double())
    rnnkit.RNN(4, 5, nonlinearity="relu", engine=engine)(x[:, 0])
    rnnkit.LSTMCell(4, 5, engine=engine)(x[0])
    rnnkit.RNNCell(4, 5, bias=False, engine=engine).half()(x[0].half())
    assert [type(c) for c in calls] == [RNNCall] * 3 + [CellCall] * 2
    reference = RF.ENGINES["reference"]()
    assert reference.name == "reference"
    for call in calls:
        assert reference.unsupported(call) is None
        if engine == "reference":
            assert original("reference", call) is reference

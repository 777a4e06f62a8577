"""The one driver: its step plan, mirrored by the compiled kernels, and its layer output.

Every engine runs under ``engines/driver.py`` (the parity grids of ``test_engines.py`` and
``test_engine_variants.py`` check what it computes); here, the pieces it hands the engines.
"""

from __future__ import annotations

import pytest
import torch

from rnnkit.engines.driver import StepPlan

PLANS = [(5,), (3, 3, 3), (4, 3, 3, 1), (2, 2, 1, 1, 1), (1,) * 7, (6, 0)]


@pytest.mark.parametrize("batch_sizes", PLANS, ids=lambda b: "-".join(map(str, b)))
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_step_plan_walks_the_rows(batch_sizes, reverse):
    plan = StepPlan.of(batch_sizes, reverse)
    starts = [sum(batch_sizes[:t]) for t in range(len(batch_sizes))]
    order = list(range(len(batch_sizes)))[:: -1 if reverse else 1]
    assert plan.off == tuple(starts[t] for t in order)
    assert plan.bs == tuple(batch_sizes[t] for t in order)
    assert plan.rows == sum(batch_sizes) and plan.N == max(batch_sizes)
    assert plan.uniform == (len(set(batch_sizes)) == 1)
    # every row once
    rows = sorted(r for o, b in zip(plan.off, plan.bs, strict=True) for r in range(o, o + b))
    assert rows == list(range(plan.rows))
    assert plan.prev(0) == (0, 0)
    for s in range(1, len(plan.bs)):
        assert plan.prev(s) == (plan.off[s - 1], plan.bs[s - 1])


@pytest.mark.parametrize("batch_sizes", PLANS, ids=lambda b: "-".join(map(str, b)))
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_the_compiled_kernels_walk_the_same_plan(batch_sizes, reverse):
    from rnnkit.engines.cpu.build import build_error

    if build_error() is not None:
        pytest.skip(build_error())
    plan = StepPlan.of(batch_sizes, reverse)
    rows, N, uniform, *rest = torch.ops.rnnkit_cpu_plan.step_plan(list(batch_sizes), reverse)
    T = len(batch_sizes)
    assert (rows, N, bool(uniform)) == (plan.rows, plan.N, plan.uniform)
    assert (tuple(rest[:T]), tuple(rest[T:])) == (plan.off, plan.bs)


def test_the_fused_engine_runs_the_table_of_modes():
    """The kernels take each mode's code and gate blocks from ``rnnkit.modes``: a layer of
    each mode gives the reference's output shapes and values (rounding aside)."""
    import rnnkit
    from rnnkit.modes import MODES

    for name in MODES:
        cls = "RNN" if name.startswith("RNN") else name
        kw = {"nonlinearity": name[4:].lower()} if cls == "RNN" else {}
        fused = getattr(rnnkit, cls)(3, 4, engine="fused", dtype=torch.float64, **kw)
        reference = getattr(rnnkit, cls)(3, 4, engine="reference", dtype=torch.float64, **kw)
        reference.load_state_dict(fused.state_dict())
        x = torch.randn(5, 2, 3, dtype=torch.float64)
        torch.testing.assert_close(fused(x)[0], reference(x)[0], rtol=1e-10, atol=1e-12)

"""``rnnkit bench --resets`` on tiny shapes: the reset masks, the options, the report, the parity
gate against the reference engine.

Stand-in engines are copies of the reference engine registered for one test: an exact copy,
one that ignores the resets (it must fail parity), one that does not run ``reset=``.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from rnnkit import functional as RF
from rnnkit.bench import resets as bench_resets
from rnnkit.bench.runner import REFERENCE, TORCH_NN, BenchConfig, build_workloads, unsupported
from rnnkit.bench.shapes import GPU_SHAPES, QUICK_SHAPES, SHAPES
from rnnkit.bench.variants import PARITY_RESETS, check_parity, parity_reset
from rnnkit.cli.bench import format_resets_table
from rnnkit.cli.main import main

TINY = "lstm-L8-N2-H16"
PROJ = "lstm2-bidir-proj-L5-N3-H12-P6"
FAST = ["--repeats", "2", "--warmup", "0", "--no-progress"]
ALL_SHAPES = {**SHAPES, **GPU_SHAPES, **QUICK_SHAPES}


@pytest.fixture
def register(monkeypatch):
    """``register(name, **changes)``: the reference engine under ``name``, with ``changes``,
    in ``rnnkit.functional.ENGINES`` for the test."""
    reference = RF.ENGINES[REFERENCE]()

    def add(name: str, **changes) -> str:
        engine = dataclasses.replace(reference, name=name, **changes)
        monkeypatch.setitem(RF.ENGINES, name, lambda: engine)
        return name

    return add


@pytest.fixture
def ignores_resets(register):
    """An engine that declares reset= and runs every call as if it had none."""
    reference = RF.ENGINES[REFERENCE]()
    return register(
        "ignores_resets", layer=lambda lc: reference.layer(dataclasses.replace(lc, restart=None))
    )


@pytest.fixture
def no_resets(register):
    """An engine that does not run reset=."""
    refuse = lambda call: None if call.reset is None else "no resets"  # noqa: E731
    return register("no_resets", rnn_unsupported=refuse)


def _bench(tmp_path, *args: str) -> tuple[int, dict]:
    path = tmp_path / "bench.json"
    rc = main(["bench", *FAST, "--json", str(path), *args])
    return rc, json.loads(path.read_text())


def test_shapes_with_resets():
    shape = QUICK_SHAPES[TINY]
    s = shape.with_resets(50)
    assert s.name == f"{TINY}+resets50" and s.resets == 50
    assert s.as_dict() == {**shape.as_dict(), "name": s.name, "resets": 50}
    # a plain shape's data is what it was before resets existed
    assert "resets" not in shape.as_dict() and shape.reset_mask() is None
    mask = s.reset_mask()
    assert mask.dtype == torch.bool and mask.shape == (shape.L, shape.N)
    assert torch.equal(mask, s.reset_mask()) and not torch.equal(mask, s.reset_mask(seed=1))
    batch_first = dataclasses.replace(s, batch_first=True)
    assert torch.equal(batch_first.reset_mask(), mask.t())
    # about one reset per EVERY entries
    long = SHAPES["lstm-L100-N32-H256"].with_resets(10).reset_mask()
    assert 0.07 < long.float().mean().item() < 0.13
    assert SHAPES["lstm-L100-N32-H256"].with_resets(1).reset_mask().all()
    with pytest.raises(ValueError, match="at least 1"):
        shape.with_resets(0)
    with pytest.raises(ValueError, match="already has resets"):
        s.with_resets(5)


@pytest.mark.parametrize("name", list(ALL_SHAPES))
def test_the_parity_check_sees_resets_inside_the_sequences(name):
    """However rare the timed resets, the short run of the parity check restarts a sequence
    after its first step (a reset at step 0 of a zero state changes nothing)."""
    shape = ALL_SHAPES[name].with_resets(1000)
    short = shape.with_length(min(shape.L, BenchConfig.parity_max_L))
    reset = parity_reset(short, BenchConfig())
    assert reset.shape == short.reset_mask().shape
    time_major = reset.t() if short.batch_first else reset
    assert time_major[1:].any()
    dense = dataclasses.replace(short, resets=PARITY_RESETS).reset_mask()
    assert (reset | dense).equal(reset)


def test_workloads_and_support_see_the_reset_mask(no_resets):
    shape = QUICK_SHAPES[TINY].with_resets(4)
    config = BenchConfig()
    work = build_workloads(shape, config, [TORCH_NN, REFERENCE])
    assert torch.equal(work[REFERENCE].keywords["reset"], shape.reset_mask())
    assert work[TORCH_NN].keywords == {}
    assert unsupported(shape, no_resets, config) == "no resets"
    assert unsupported(QUICK_SHAPES[TINY], no_resets, config) is None


@pytest.mark.parametrize("name", [TINY, PROJ, "gru-L8-N2-H16", "rnn-relu-L8-N2-H16"])
def test_parity_against_the_reference(register, ignores_resets, name):
    """An exact copy of the reference engine passes, bitwise; one that ignores the resets fails
    on the outputs, the final states and the gradients, in training and inference."""
    shape = QUICK_SHAPES[name].with_resets(50)
    results = check_parity(shape, register("twin"), BenchConfig())
    assert results and all(r.ok and r.bitwise for r in results), [str(r) for r in results]
    names = {r.what for r in results}
    assert {"output", "h_n", "grad_input", "grad_weight_hh_l0", "eval_output", "eval_h_n"} <= names
    failed = {r.what for r in check_parity(shape, ignores_resets, BenchConfig()) if not r.ok}
    assert {"output", "h_n", "grad_input", "grad_weight_ih_l0", "eval_output"} <= failed


def test_json_report(tmp_path, capsys):
    rc, report = _bench(tmp_path, "--quick", "--resets", "4", "--threads", "1")
    assert rc == 0 and report["ok"], format_resets_table(report)
    assert report["resets"] == 4 and "--quick --resets 4 " in report["command"]
    assert {"cpu", "threads", "torch", "load_average_1min_after"} <= set(report["machine"])
    names = [n for s in QUICK_SHAPES for n in (s, f"{s}+resets4")]
    assert [r["shape"]["name"] for r in report["results"]] == names
    for plain, reset in zip(report["results"][::2], report["results"][1::2], strict=True):
        assert "resets" not in plain["shape"] and reset["shape"]["resets"] == 4
        shape = QUICK_SHAPES[plain["shape"]["name"]]
        assert reset["reset_mask"] == {
            "every": 4,
            "resets": int(shape.with_resets(4).reset_mask().sum()),
            "entries": shape.L * shape.N,
        }
        plain_rows = {r["impl"]: r for r in plain["rows"]}
        reset_rows = {r["impl"]: r for r in reset["rows"]}
        # the fused engine does not run reset= yet, or does: never a failed row
        assert list(plain_rows)[:2] == list(reset_rows)[:2] == [TORCH_NN, REFERENCE]
        assert list(plain_rows) == list(reset_rows)
        # torch.nn's plain layer is measured once per shape
        assert plain_rows[TORCH_NN] | {"ratios": None} == reset_rows[TORCH_NN] | {"ratios": None}
        for row in [*plain_rows.values(), *reset_rows.values()]:
            assert row["status"] == "ok", row["detail"]
            assert len(row["fwd_ms"]["samples"]) == len(row["train_ms"]["samples"]) == 2
        # the plain rows are checked against torch.nn, the reference's with resets not at all
        assert plain_rows[REFERENCE]["parity"] and reset_rows[REFERENCE]["parity"] == []
        for impl, row in reset_rows.items():
            if impl == TORCH_NN:
                continue
            r, base = row["ratios"], plain_rows[impl]
            assert r["fwd_vs_plain"] == pytest.approx(
                row["fwd_ms"]["median"] / base["fwd_ms"]["median"]
            )
            assert r["train_vs_plain"] == pytest.approx(
                row["train_ms"]["median"] / base["train_ms"]["median"]
            )
            assert r["peak_vs_plain"] == pytest.approx(row["train_peak_mb"] / base["train_peak_mb"])
            assert r["train_vs_torch"] == pytest.approx(
                row["train_ms"]["median"] / plain_rows[TORCH_NN]["train_ms"]["median"]
            )
    out = capsys.readouterr().out
    assert "| fwd ms | fwd ms reset | fwd reset vs plain | fwd reset vs torch.nn |" in out
    assert "| fwd+bwd ms | fwd+bwd ms reset | fwd+bwd reset vs plain |" in out
    assert out.count(f"| {TINY} | torch.nn |") == 1 and f"| {TINY} | reference | " in out
    assert "probability 1/4" in out


def test_failed_parity_is_reported_and_gets_no_timings(tmp_path, capsys, ignores_resets):
    rc, report = _bench(tmp_path, "--shapes", TINY, "--resets", "3")
    assert rc == 1 and not report["ok"]
    plain, reset = ({r["impl"]: r for r in res["rows"]} for res in report["results"])
    row = reset[ignores_resets]
    assert row["status"] == "failed parity"
    assert row["fwd_ms"] is None and row["train_ms"] is None and row["train_peak_mb"] is None
    assert {"output", "eval_output"} <= {p["what"] for p in row["parity"] if not p["ok"]}
    # without resets it is the reference engine, and timed as such
    assert plain[ignores_resets]["status"] == "ok" and plain[ignores_resets]["train_ms"]
    assert reset[REFERENCE]["status"] == "ok" and reset[REFERENCE]["train_ms"]
    captured = capsys.readouterr()
    assert f"| {TINY} | {ignores_resets} | FAILED PARITY with resets: output: FAIL" in captured.out
    assert "rnnkit bench: FAILED (parity failure" in captured.err


def test_engines_without_resets(tmp_path, no_resets):
    args = ["--shapes", TINY, "--resets", "5"]
    # named explicitly, an engine that cannot run reset= fails the run
    rc, report = _bench(tmp_path, *args, "--engines", no_resets)
    plain, reset = ({r["impl"]: r for r in res["rows"]} for res in report["results"])
    assert rc == 1 and reset[no_resets]["status"] == "unsupported"
    assert reset[no_resets]["detail"] == "no resets"
    assert plain[no_resets]["status"] == "ok" and plain[no_resets]["train_ms"]
    # by default it is left out, of both entries
    rc, report = _bench(tmp_path, *args)
    impls = [[r["impl"] for r in res["rows"]] for res in report["results"]]
    assert rc == 0 and all(no_resets not in i and REFERENCE in i for i in impls)


def test_progress_adds_up(ignores_resets, no_resets):
    config = BenchConfig(repeats=2, warmup=1)
    for engines in ([ignores_resets, no_resets], None):
        steps = []
        bench_resets.run_reset_bench([QUICK_SHAPES[TINY]], 4, engines, config, steps.append)
        n = 1 + len(engines or [e for e in RF.available_engines() if e != REFERENCE])
        assert sum(steps) == bench_resets.steps_per_reset_shape(n, config)


def test_bad_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--resets", "0"])
    assert e.value.code == 2 and "must be at least 1" in capsys.readouterr().err
    assert main(["bench", "--resets", "5", "--variants", "zoneout", "--no-progress"]) == 2
    assert "--variants and --resets are separate runs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "--resets EVERY" in capsys.readouterr().out


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "ratios.png"
    assert main(["bench", *FAST, "--shapes", TINY, "--resets", "4", "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""``rnnkit bench`` and its runner on tiny shapes: the report, the parity gate, the arithmetic.

No timing is asserted: only the structure of the numbers, the ratios computed from them, and
that an engine which fails parity (a deliberately broken one) gets no timings.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from rnnkit import functional as RF
from rnnkit.bench import runner
from rnnkit.bench.runner import TORCH_NN, BenchConfig
from rnnkit.bench.shapes import GPU_SHAPES, QUICK_SHAPES, SHAPES, BenchShape, resolve_shapes
from rnnkit.cli.bench import format_table
from rnnkit.cli.main import main

TINY = "lstm-L8-N2-H16"
FAST = ["--repeats", "2", "--warmup", "0", "--no-progress"]


def _reference_copy(name: str, **changes):
    """A loader for ``ENGINES``: the reference engine under ``name``, with ``changes``."""
    reference = RF.ENGINES["reference"]()
    return lambda: dataclasses.replace(reference, name=name, **changes)


@pytest.fixture
def broken(monkeypatch):
    """An engine whose outputs are off by 1e-3: it must fail parity in every dtype."""
    reference = RF.ENGINES["reference"]()

    def layer(lc):
        output, *hidden = reference.layer(lc)
        return (output + 1e-3, *hidden)

    monkeypatch.setitem(RF.ENGINES, "broken", _reference_copy("broken", layer=layer))
    return "broken"


@pytest.fixture
def no_gru(monkeypatch):
    """An engine that declares it cannot run GRU."""
    unsupported = lambda call: "no GRU" if call.mode == "GRU" else None  # noqa: E731
    monkeypatch.setitem(
        RF.ENGINES, "no_gru", _reference_copy("no_gru", rnn_unsupported=unsupported)
    )
    return "no_gru"


def _bench(tmp_path, *args: str) -> tuple[int, dict]:
    path = tmp_path / "bench.json"
    rc = main(["bench", *FAST, "--json", str(path), *args])
    return rc, json.loads(path.read_text())


def test_json_report(tmp_path, capsys):
    rc, report = _bench(tmp_path, "--shapes", f"{TINY},gru-L8-N2-H16", "--threads", "1")
    assert rc == 0 and report["ok"]
    assert report["command"].startswith("rnnkit bench --shapes lstm-L8-N2-H16,gru-L8-N2-H16")
    machine = report["machine"]
    for key in ("cpu", "cores", "threads", "torch", "dtype"):
        assert machine[key] not in (None, "")
    assert machine["threads"] == 1 and machine["dtype"] == "float32"
    assert report["config"]["repeats"] == 2
    assert [r["shape"]["name"] for r in report["results"]] == [TINY, "gru-L8-N2-H16"]
    for result in report["results"]:
        rows = result["rows"]
        assert [r["impl"] for r in rows][:2] == [TORCH_NN, "reference"]
        for row in rows:
            assert row["status"] == "ok", row["detail"]
            for key in ("fwd_ms", "train_ms"):
                stats = row[key]
                assert len(stats["samples"]) == 2
                assert stats["min"] <= stats["q1"] <= stats["median"] <= stats["q3"]
                assert stats["q3"] <= stats["max"]
            assert row["train_peak_mb"] > 0
        reference = rows[1]
        assert reference["parity"] and all(p["ok"] for p in reference["parity"])
        names = {p["what"] for p in reference["parity"]}
        assert {"output", "grad_input", "grad_weight_hh_l0", "eval_output"} <= names
        assert rows[0]["ratios"]["fwd_vs_torch"] == 1.0
    table = capsys.readouterr().out
    assert f"| {TINY} | reference |" in table and "FAILED" not in table


def test_broken_engine_fails_parity_and_gets_no_timings(tmp_path, capsys, broken):
    rc, report = _bench(tmp_path, "--shapes", TINY, "--engines", broken)
    assert rc == 1 and not report["ok"]
    rows = {r["impl"]: r for r in report["results"][0]["rows"]}
    assert set(rows) == {TORCH_NN, "reference", broken}
    row = rows[broken]
    assert row["status"] == "failed parity"
    assert row["fwd_ms"] is None and row["train_ms"] is None and row["train_peak_mb"] is None
    failed = {p["what"] for p in row["parity"] if not p["ok"]}
    assert "output" in failed and "eval_output" in failed
    # the others are still measured
    assert rows["reference"]["status"] == "ok" and rows["reference"]["train_ms"]
    out = capsys.readouterr().out
    assert f"| {TINY} | {broken} | FAILED PARITY: output: FAIL" in out


def test_unsupported_engine(tmp_path, no_gru):
    shapes = ["--shapes", f"{TINY},gru-L8-N2-H16"]
    # named explicitly, an engine that cannot run a shape fails the run
    rc, report = _bench(tmp_path, *shapes, "--engines", no_gru)
    gru_rows = {r["impl"]: r for r in report["results"][1]["rows"]}
    assert rc == 1 and gru_rows[no_gru]["status"] == "unsupported"
    assert gru_rows[no_gru]["detail"] == "no GRU"
    # by default it is left out where it cannot run
    rc, report = _bench(tmp_path, *shapes)
    impls = [[r["impl"] for r in res["rows"]] for res in report["results"]]
    assert rc == 0 and no_gru in impls[0] and no_gru not in impls[1]


def test_ratios():
    def row(impl, fwd, train, peak):
        return {
            "impl": impl,
            "fwd_ms": {"median": fwd},
            "train_ms": {"median": train},
            "train_peak_mb": peak,
        }

    rows = runner.with_ratios(
        [
            row(TORCH_NN, 2.0, 8.0, 10.0),
            row("reference", 4.0, 32.0, 30.0),
            row("fast", 1.0, 4.0, 5.0),
        ]
    )
    ratios = {r["impl"]: r["ratios"] for r in rows}
    assert ratios["fast"] == {
        "fwd_vs_torch": 0.5,
        "train_vs_torch": 0.5,
        "peak_vs_torch": 0.5,
        "train_speedup_vs_reference": 8.0,
    }
    assert ratios["reference"]["train_vs_torch"] == 4.0
    assert ratios[TORCH_NN]["train_speedup_vs_reference"] == 4.0
    # a row without timings (failed parity) has no ratios, and breaks none of the others
    failed = {"impl": "reference", "fwd_ms": None, "train_ms": None, "train_peak_mb": None}
    rows = runner.with_ratios([row(TORCH_NN, 2.0, 8.0, 10.0), failed])
    assert set(rows[1]["ratios"].values()) == {None}
    assert rows[0]["ratios"]["train_speedup_vs_reference"] is None


def test_summarize():
    stats = runner.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (stats["min"], stats["q1"], stats["median"], stats["q3"], stats["max"]) == (
        1.0, 2.0, 3.0, 4.0, 5.0,
    )  # fmt: skip
    assert stats["samples"] == [5.0, 1.0, 3.0, 2.0, 4.0]
    one = runner.summarize([7.0])
    assert one["q1"] == one["median"] == one["q3"] == 7.0


def test_peak_memory_counts_what_the_step_allocates():
    mib = 2**20
    kept = torch.ones(8 * mib // 4)  # live before the step: not counted

    def one_buffer():
        return torch.ones(mib // 4).sum()  # 1 MiB, freed at return

    def two_in_turn():
        torch.ones(mib // 4).sum()
        return torch.ones(2 * mib // 4).sum()

    def two_at_once():
        a = torch.ones(mib // 4)
        b = torch.ones(2 * mib // 4)
        return (a.sum() + b.sum()).item()

    cpu = torch.device("cpu")
    assert 1.0 <= runner._peak_mb(one_buffer, cpu) < 1.01
    assert 2.0 <= runner._peak_mb(two_in_turn, cpu) < 2.01
    assert 3.0 <= runner._peak_mb(two_at_once, cpu) < 3.01
    assert kept.numel()


def test_registry():
    required = {
        "lstm-L100-N32-H256": ("LSTM", 100, 32, 256, 256, 1, False),
        "lstm-L1000-N1-H128": ("LSTM", 1000, 1, 128, 128, 1, False),
        "lstm-L200-N16-H64": ("LSTM", 200, 16, 64, 64, 1, False),
        "lstm2-L50-N64-H512": ("LSTM", 50, 64, 512, 512, 2, False),
        "lstm-bidir-L100-N16-H128": ("LSTM", 100, 16, 128, 128, 1, True),
        "gru-L100-N32-H256": ("GRU", 100, 32, 256, 256, 1, False),
    }
    for name, config in required.items():
        s = SHAPES[name]
        assert (s.mode, s.L, s.N, s.H_in, s.H, s.num_layers, s.bidirectional) == config
    assert resolve_shapes(None) == list(SHAPES.values())
    assert resolve_shapes(None, quick=True) == list(QUICK_SHAPES.values())
    assert resolve_shapes(None, device="cuda") == list(GPU_SHAPES.values())
    assert resolve_shapes(["lstm-L1024-N16-H768"])[0] is GPU_SHAPES["lstm-L1024-N16-H768"]
    assert resolve_shapes([TINY, "gru-L100-N32-H256"])[1] is SHAPES["gru-L100-N32-H256"]
    with pytest.raises(ValueError, match="unknown shape"):
        resolve_shapes(["lstm-L1-N1-H1"])
    with pytest.raises(ValueError, match="proj_size"):
        BenchShape("x", "GRU", L=1, N=1, H_in=1, H=2, proj_size=1)


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported")
@pytest.mark.parametrize("shape", list(QUICK_SHAPES.values()), ids=list(QUICK_SHAPES))
def test_output_shapes(shape):
    torch_module, _ = shape.case(torch.float32).modules()
    x = shape.case(torch.float32).inputs()["input"]
    output, hidden = torch_module(x)
    outs = [output, *(hidden if isinstance(hidden, tuple) else (hidden,))]
    assert [tuple(o.shape) for o in outs] == shape.output_shapes()


def test_parity_runs_a_short_version(monkeypatch):
    lengths = []

    def run_pair(case, *args, **kwargs):
        lengths.append(case.L)
        return run_pair_(case, *args, **kwargs)

    run_pair_ = runner.run_pair
    monkeypatch.setattr(runner, "run_pair", run_pair)
    shape = SHAPES["lstm-L1000-N1-H128"]
    results = runner.check_parity(shape, "reference", BenchConfig(parity_max_L=3))
    assert lengths == [3] and all(r.ok for r in results)


def test_bad_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--engines", "nonesuch"])
    assert e.value.code == 2 and "unknown engine(s) nonesuch" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--shapes", "lstm-L1-N1-H1"])
    assert "unknown shape(s) lstm-L1-N1-H1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--repeats", "0"])


def test_plot_without_matplotlib(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    assert main(["bench", "--quick", "--plot", str(tmp_path / "p.png")]) == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "ratios.png"
    assert main(["bench", *FAST, "--shapes", TINY, "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_of_report():
    shape = QUICK_SHAPES[TINY]
    report = runner.run_bench([shape], None, BenchConfig(repeats=1, warmup=0))
    table = format_table(report).splitlines()
    assert table[0].startswith("| shape | engine | fwd ms | fwd vs torch.nn |")
    assert table[2].startswith(f"| {TINY} | torch.nn | ") and "| 1.00x |" in table[2]


def test_the_report_names_the_cpu_and_the_gemm_of_the_fused_engine():
    """The CPU's vendor, family, model and ISA flags go into the JSON and the header line, and
    the fused kernels' entry says which GEMM runs their products on this CPU."""
    from rnnkit.cli.bench import machine_line

    machine = runner.machine_info(BenchConfig())
    with open("/proc/cpuinfo") as f:
        vendor = next(line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id"))
    assert machine["cpu_vendor"] == vendor
    assert isinstance(machine["cpu_family"], int) and isinstance(machine["cpu_model"], int)
    assert set(machine["cpu_flags"]) <= set(runner._ISA_FLAGS)
    line = machine_line(machine)
    assert f"family {machine['cpu_family']}, model {machine['cpu_model']}" in line
    expected = "own" if vendor != "GenuineIntel" else "own step products below"
    assert machine["fused_kernels"]["gemm"].startswith(expected)
    assert f"GEMM: {machine['fused_kernels']['gemm']}" in line

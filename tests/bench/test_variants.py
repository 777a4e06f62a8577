"""``rnnkit bench --variants`` on tiny shapes: the registry, the options, the report, the parity
gate against the reference engine.

Stand-in engines are copies of the reference engine registered for one test: an exact copy
(which must pass parity even where the variants draw random masks), one that draws its masks
from another seed, one whose variant outputs are off, one that cannot run variants.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from rnnkit import functional as RF
from rnnkit.bench import variants as bench_variants
from rnnkit.bench.runner import REFERENCE, TORCH_NN, BenchConfig
from rnnkit.bench.shapes import QUICK_SHAPES, SHAPES, VARIANTS, BenchShape, resolve_variants
from rnnkit.cli.bench import format_table
from rnnkit.cli.main import main
from rnnkit.variants import make_variant

TINY = "lstm-L8-N2-H16"
PROJ = "lstm2-bidir-proj-L5-N3-H12-P6"
FAST = ["--repeats", "1", "--warmup", "0", "--no-progress"]
# the variants whose training run draws random masks
RANDOM = ("zoneout", "recurrent_dropout", "weight_dropout")


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


def _bench(tmp_path, *args: str) -> tuple[int, dict]:
    path = tmp_path / "bench.json"
    rc = main(["bench", *FAST, "--json", str(path), *args])
    return rc, json.loads(path.read_text())


def test_registry():
    assert {
        "layer_norm",
        "peephole",
        "zoneout",
        "recurrent_dropout",
        "weight_dropout",
        "forget_bias",
        "clip",
    } <= set(VARIANTS)
    lstm = [s for s in [*SHAPES.values(), *QUICK_SHAPES.values()] if s.mode == "LSTM"]
    for name, keywords in VARIANTS.items():
        variant = make_variant("LSTM", **keywords)
        # forget_bias changes the init only: every other entry must change the math
        assert variant.is_plain == (name == "forget_bias"), name
        for shape in lstm:
            s = shape.with_variant(name)
            assert s.name == f"{shape.name}+{name}"
            assert s.as_dict()["variant"] == name
    clip = QUICK_SHAPES[TINY].with_variant("clip").as_dict()["variant_keywords"]
    assert clip == {"gate_clip": 3.0, "cell_clip": 3.0}
    clip = QUICK_SHAPES[PROJ].with_variant("clip").as_dict()["variant_keywords"]
    assert clip == {"gate_clip": 3.0, "cell_clip": 3.0, "proj_clip": 3.0}
    # a plain shape's data is what it was before variants existed
    assert "variant" not in QUICK_SHAPES[TINY].as_dict()
    assert resolve_variants(None) == list(VARIANTS)
    assert resolve_variants(["zoneout", "clip", "zoneout"]) == ["zoneout", "clip"]
    with pytest.raises(ValueError, match="unknown variant"):
        resolve_variants(["zoneout", "nonesuch"])
    with pytest.raises(ValueError, match="LSTM"):
        SHAPES["gru-L100-N32-H256"].with_variant("layer_norm")
    with pytest.raises(ValueError, match="unknown variant"):
        QUICK_SHAPES[TINY].with_variant("nonesuch")
    with pytest.raises(ValueError, match="only supported for LSTM"):
        BenchShape("x", "GRU", L=1, N=1, H_in=1, H=2, variant_keywords=(("peephole", True),))


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported")
@pytest.mark.parametrize("variant", ["forget_bias", "layer_norm", "peephole"])
def test_variant_module_has_torch_weights(variant):
    shape = QUICK_SHAPES[PROJ].with_variant(variant)
    torch_module, module = shape.modules(REFERENCE, torch.float32)
    assert module.variant == make_variant("LSTM", **VARIANTS[variant])
    theirs = dict(torch_module.named_parameters())
    H = shape.H
    for name, p in module.named_parameters():
        if name in theirs:
            expected = theirs[name].detach().clone()
            if variant == "forget_bias" and name.startswith("bias_ih"):
                expected[H : 2 * H] += 1.0
            assert torch.equal(p, expected), name
        else:
            # moved off the constant init (0 or 1) so that parity sees them at work
            assert p.unique().numel() == p.numel() > 1, name
    _, again = shape.modules("fused", torch.float32)
    assert all(
        torch.equal(a, b) for a, b in zip(module.parameters(), again.parameters(), strict=True)
    )


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parity_against_the_reference(register, variant):
    """An exact copy of the reference engine passes on every variant, masks included; every
    gradient is compared, the variant's own parameters' too."""
    twin = register("twin")
    shape = QUICK_SHAPES[PROJ].with_variant(variant)
    results = bench_variants.check_parity(shape, twin, BenchConfig())
    assert results and all(r.ok and r.bitwise for r in results), [str(r) for r in results]
    names = {r.what for r in results}
    assert {"output", "c_n", "grad_input", "grad_weight_hh_l1_reverse", "eval_output"} <= names
    if variant == "layer_norm":
        assert {"grad_layer_norm_ih_l0", "grad_layer_norm_c_bias_l1_reverse"} <= names
    if variant == "peephole":
        assert "grad_peephole_l1" in names


@pytest.mark.parametrize("variant", ["layer_norm", *RANDOM])
def test_parity_needs_the_same_masks(register, variant):
    """An engine that draws its masks from another seed fails in training, not in eval."""
    reference = RF.ENGINES[REFERENCE]()

    def layer(lc):
        torch.rand(1)
        return reference.layer(lc)

    other = register("other_seed", layer=layer)
    results = bench_variants.check_parity(
        QUICK_SHAPES[TINY].with_variant(variant), other, BenchConfig()
    )
    failed = {r.what for r in results if not r.ok}
    if variant in RANDOM:
        assert "output" in failed and "grad_weight_hh_l0" in failed
    else:
        assert not failed
    assert not {f for f in failed if f.startswith("eval_")}


def test_parity_runs_a_short_version(register, monkeypatch):
    lengths = []
    run = bench_variants.run

    def spy(case, *args, **kwargs):
        lengths.append(case.L)
        return run(case, *args, **kwargs)

    monkeypatch.setattr(bench_variants, "run", spy)
    shape = SHAPES["lstm-L1000-N1-H128"].with_variant("zoneout")
    results = bench_variants.check_parity(shape, register("twin"), BenchConfig(parity_max_L=3))
    # the reference, the engine, and the reference in float64 (the truth of both)
    assert lengths == [3, 3, 3] and all(r.ok for r in results)


def test_json_report(tmp_path, capsys):
    rc, report = _bench(tmp_path, "--quick", "--variants", "layer_norm,zoneout", "--threads", "1")
    assert rc == 0 and report["ok"], format_table(report)
    assert "--variants layer_norm,zoneout --quick" in report["command"]
    assert report["variants"] == {
        "layer_norm": {"layer_norm": True},
        "zoneout": {"zoneout": [0.1, 0.1]},
    }
    lstm = [s for s in QUICK_SHAPES.values() if s.mode == "LSTM"]
    names = [f"{s.name}+{v}" for s in lstm for v in ("layer_norm", "zoneout")]
    assert [r["shape"]["name"] for r in report["results"]] == names
    for result in report["results"]:
        shape = result["shape"]
        assert shape["variant"] in ("layer_norm", "zoneout") and shape["variant_keywords"]
        rows = {r["impl"]: r for r in result["rows"]}
        # the fused engine runs these variants or is left out; never a failed row
        assert list(rows)[:2] == [TORCH_NN, REFERENCE]
        for row in rows.values():
            assert row["status"] == "ok", row["detail"]
            assert row["fwd_ms"]["samples"] and row["train_ms"]["samples"]
            assert row["train_peak_mb"] > 0
        # the reference engine is the spec of a variant: no parity check of its own
        assert rows[REFERENCE]["parity"] == []
        assert all(p["ok"] for row in rows.values() for p in row["parity"])
        base, ref = rows[TORCH_NN], rows[REFERENCE]
        assert base["ratios"]["fwd_vs_torch"] == 1.0
        assert base["ratios"]["train_speedup_vs_reference"] is None
        assert ref["ratios"]["train_vs_torch"] == pytest.approx(
            ref["train_ms"]["median"] / base["train_ms"]["median"]
        )
        assert ref["ratios"]["train_speedup_vs_reference"] == 1.0
    # torch.nn's plain layer is measured once per shape, the same numbers in each variant
    first, second = report["results"][:2]
    assert first["rows"][0] == second["rows"][0]
    table = capsys.readouterr().out
    assert table.count(f"| {TINY} | torch.nn |") == 1 and f"| {TINY}+zoneout | reference |" in table
    assert "zoneout: zoneout=(0.1, 0.1)" in table


def test_failed_parity_gets_no_timings(tmp_path, capsys, register):
    reference = RF.ENGINES[REFERENCE]()

    def layer(lc):
        output, *hidden = reference.layer(lc)
        off = 0.0 if lc.variant.is_plain else 1e-3
        return (output + off, *hidden)

    broken = register("broken", layer=layer)
    rc, report = _bench(tmp_path, "--shapes", TINY, "--variants", "peephole,forget_bias")
    assert rc == 1 and not report["ok"]
    peephole, forget_bias = ({r["impl"]: r for r in res["rows"]} for res in report["results"])
    row = peephole[broken]
    assert row["status"] == "failed parity"
    assert row["fwd_ms"] is None and row["train_ms"] is None and row["train_peak_mb"] is None
    failed = {p["what"] for p in row["parity"] if not p["ok"]}
    assert {"output", "eval_output"} <= failed
    # the others are still measured; forget_bias is torch's math, which the engine gets right
    assert peephole[REFERENCE]["status"] == "ok" and peephole[REFERENCE]["train_ms"]
    assert forget_bias[broken]["status"] == "ok" and forget_bias[broken]["train_ms"]
    out = capsys.readouterr().out
    assert f"| {TINY}+peephole | {broken} | FAILED PARITY: output: FAIL" in out


def test_unsupported_variants(tmp_path, register):
    plain_only = register(
        "plain_only",
        rnn_unsupported=lambda call: None if call.variant.is_plain else "no variants",
    )
    args = ["--shapes", TINY, "--variants", "layer_norm,forget_bias"]
    # named explicitly, an engine that cannot run a variant fails the run
    rc, report = _bench(tmp_path, *args, "--engines", plain_only)
    layer_norm, forget_bias = ({r["impl"]: r for r in res["rows"]} for res in report["results"])
    assert rc == 1 and layer_norm[plain_only]["status"] == "unsupported"
    assert layer_norm[plain_only]["detail"] == "no variants"
    assert forget_bias[plain_only]["status"] == "ok"
    # by default it is left out where it cannot run
    rc, report = _bench(tmp_path, *args)
    impls = [[r["impl"] for r in res["rows"]] for res in report["results"]]
    assert rc == 0 and plain_only not in impls[0] and plain_only in impls[1]


def test_progress_adds_up(register):
    reference = RF.ENGINES[REFERENCE]()

    def layer(lc):
        output, *hidden = reference.layer(lc)
        return (output + 1, *hidden)

    broken = register("broken", layer=layer)
    plain_only = register(
        "plain_only",
        rnn_unsupported=lambda call: None if call.variant.is_plain else "no variants",
    )
    config = BenchConfig(repeats=2, warmup=1)
    steps = []
    engines = [broken, plain_only]
    report = bench_variants.run_variant_bench(
        [QUICK_SHAPES[TINY]], ["zoneout", "forget_bias"], engines, config, steps.append
    )
    assert not report["ok"]
    assert sum(steps) == bench_variants.steps_per_variant_shape(3, 2, config)


def test_bad_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--variants", "layer_norm,nonesuch"])
    assert e.value.code == 2 and "unknown variant(s) nonesuch" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--variants", ","])
    assert "unknown variant(s)" in capsys.readouterr().err
    assert main(["bench", "--variants", "--shapes", f"{TINY},gru-L8-N2-H16"]) == 2
    assert "--variants runs LSTM shapes, not gru-L8-N2-H16" in capsys.readouterr().err


def test_variants_without_names_means_all(monkeypatch):
    seen = {}

    def run_variant_bench(shapes, variants, *args, **kwargs):
        seen.update(shapes=[s.name for s in shapes], variants=variants)
        raise SystemExit(0)

    monkeypatch.setattr(bench_variants, "run_variant_bench", run_variant_bench)
    with pytest.raises(SystemExit):
        main(["bench", "--variants", "--no-progress"])
    assert seen["variants"] == list(VARIANTS)
    assert seen["shapes"] == [s.name for s in SHAPES.values() if s.mode == "LSTM"]
    with pytest.raises(SystemExit):
        main(["bench", "--quick", "--variants", "clip", "--no-progress"])
    assert seen == {"shapes": [TINY, PROJ], "variants": ["clip"]}


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "ratios.png"
    assert (
        main(["bench", *FAST, "--shapes", TINY, "--variants", "peephole", "--plot", str(path)]) == 0
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

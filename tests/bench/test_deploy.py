"""``rnnkit bench --deploy``: the rows of its report, its parity gate. No timing is asserted."""

from __future__ import annotations

import importlib.util
import json

import pytest
from torch import nn

from rnnkit import fast
from rnnkit.bench import deploy
from rnnkit.cli.main import main

FAST = ["--repeats", "2", "--warmup", "0", "--no-progress"]


def _bench(tmp_path, *args: str) -> tuple[int, dict]:
    path = tmp_path / "deploy.json"
    rc = main(["bench", "--deploy", *FAST, "--json", str(path), *args])
    return rc, json.loads(path.read_text())


def test_deploy_report(tmp_path, capsys):
    rc, report = _bench(tmp_path, "--threads", "1")
    assert rc == 0 and report["ok"]
    assert report["command"].startswith("rnnkit bench --deploy")
    assert report["machine"]["cpu"] and report["machine"]["isa"]
    rows = report["rows"]
    impls = ["torch.nn", "fused"]
    if all(importlib.util.find_spec(m) for m in ("onnxruntime", "onnxscript")):
        impls.append(deploy.ONNXRUNTIME)
    impls.append(deploy.INT8)
    if deploy._torch_ao_int8(nn.LSTM(2, 3)) is not None:
        impls.append(deploy.TORCH_AO)
    impls.append(deploy.BF16)
    skip = deploy.torch_bf16_skip()
    if skip is None:
        impls.append(deploy.TORCH_BF16)
    assert report.get("skipped", {}) == ({} if skip is None else {deploy.TORCH_BF16: skip})
    want = [(s.name, call, impl) for s in deploy.DEPLOY_SHAPES for call in deploy.CALLS
            for impl in impls]  # fmt: skip
    assert [(r["shape"], r["call"], r["impl"]) for r in rows] == want
    for row in rows:
        assert row["threads"] == 1 and row["weights_mb"] > 0
        us = row["us"]
        assert us["n"] == 2 and 0 < us["q1"] <= us["median"] <= us["q3"]
        if row["impl"] == "torch.nn":
            assert row["vs_torch_nn"] == 1.0
        if row["impl"] == deploy.ONNXRUNTIME:
            assert row["dtype"] == "float32" and row["vs_torch_nn"] > 0
        if row["impl"] == deploy.INT8:
            assert row["dtype"] == "int8" and row["vs_fused"] > 0
            assert ("vs_torch_ao" in row) == (deploy.TORCH_AO in impls)
        if row["impl"] in deploy.INT8_ROWS:
            # int8 weights: a quarter of float32's matrices; outputs near float32's
            fp32 = next(r for r in rows if r["shape"] == row["shape"] and r["impl"] == "fused")
            assert row["weights_mb"] < fp32["weights_mb"] / 3
            assert 0 < row["max_abs_error_vs_float32"] < 0.1
        if row["impl"] in deploy.BF16_ROWS:
            # bfloat16 weights: half of float32's; outputs near float32's
            fp32 = next(r for r in rows if r["shape"] == row["shape"] and r["impl"] == "fused")
            assert row["dtype"] == "bfloat16"
            assert row["weights_mb"] == pytest.approx(fp32["weights_mb"] / 2)
            assert 0 < row["max_abs_error_vs_float32"] < deploy.BF16_ERROR
        if row["impl"] == deploy.BF16:
            assert row["vs_fused"] > 0
            assert ("vs_torch_nn_bf16" in row) == (deploy.TORCH_BF16 in impls)
    assert "| lstm2-H640 | chunk32 | 1 | fused |" in capsys.readouterr().out


@pytest.fixture
def broken(monkeypatch):
    """Fast calls whose outputs are off by 1e-3."""
    call = fast.call

    def off(module, input, hx):
        out = call(module, input, hx)
        return None if out is None else (out[0] + 1e-3, out[1])

    monkeypatch.setattr(fast, "call", off)


def test_a_broken_engine_fails_parity_and_gets_no_timings(tmp_path, capsys, broken):
    rc, report = _bench(tmp_path, "--threads", "1")
    assert rc == 1 and not report["ok"]
    fused = [r for r in report["rows"] if r["impl"] == "fused"]
    assert fused and all("us" not in r and r["error"].startswith("FAILED PARITY") for r in fused)
    assert all("us" in r for r in report["rows"] if r["impl"] == "torch.nn")
    assert "FAILED PARITY" in capsys.readouterr().out


@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("onnxruntime", "onnxscript")),
    reason="needs onnxruntime and onnxscript",
)
def test_a_wrong_onnxruntime_result_fails_parity(tmp_path, monkeypatch):
    run = deploy._Onnxruntime.__call__

    def off(self, x, state):
        y, state = run(self, x, state)
        return y, (state[0], state[1] + 1e-3)

    monkeypatch.setattr(deploy._Onnxruntime, "__call__", off)
    rc, report = _bench(tmp_path, "--threads", "1")
    assert rc == 1 and not report["ok"]
    rows = [r for r in report["rows"] if r["impl"] == deploy.ONNXRUNTIME]
    assert rows and all(r["error"].startswith("FAILED PARITY") for r in rows)
    assert all("us" in r for r in report["rows"] if r["impl"] == "fused")


def test_deploy_refuses_other_options(capsys):
    assert main(["bench", "--deploy", "--dtype", "float64", "--no-progress"]) == 2
    assert "--deploy runs its own shapes" in capsys.readouterr().err

"""``rnnkit bench --deploy``: per-call latency of layers as deployed on CPU, against torch.nn.

A deployed LSTM runs at batch 1, one step at a time (a transducer's prediction network, an RL
actor) or in short chunks (streaming speech, 32 steps of a 32 ms window), carrying its state
from call to call, under ``torch.no_grad()``. Each row is one such call on one shape, the
state fed back from the previous call, at one thread and at all of them:

- ``DEPLOY_SHAPES``: ``LSTM(64, 128)`` (a voice-activity detector's width) and
  ``LSTM(640, 640, num_layers=2)`` (an RNN-T prediction network's);
- calls: one step (``[1, 1, H_in]``) and a 32-step chunk (``[32, 1, H_in]``);
- implementations: ``torch.nn`` (float32; its oneDNN LSTM), rnnkit's ``fused`` engine
  (float32), onnxruntime running rnnkit's ONNX export of the fused layer (float32; where
  onnxruntime and onnxscript are installed; one session per thread count), rnnkit's
  ``quantize_dynamic`` of the fused layer (int8) and torch.ao's dynamic int8 LSTM (where this
  torch still has it), all with the same weights.

Each float32 rnnkit row (fused, onnxruntime) first passes a parity check: three chained calls against torch.nn's, outputs
and final states, with the tolerance rule of :mod:`rnnkit.testing` (a float64 run of the same
calls as the truth); one that fails gets no timings and the command exits 1. Timings are the
median and quartiles of per-call wall times in microseconds, the implementations called in
turn (round-robin) so that both see the same machine; ``weights_mb`` is the layer's parameter
memory. The int8 rows (rnnkit's ``quantize_dynamic`` of the fused layer, torch.ao's) report
their largest output difference from torch.nn's float32 instead of a parity check; rnnkit's
gets no timings when that difference is above the documented bound
(``rnnkit.quantized.FLOAT32_ERROR``), and its row says how its time compares with the fused
float32 layer's and torch.ao's. Not measured yet: bfloat16 rows.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import rnnkit
from rnnkit.bench.runner import BenchConfig, machine_info, ratio
from rnnkit.testing import compare_all, float64_copy

__all__ = ["CALLS", "DEPLOY_SHAPES", "DeployShape", "run_deploy_bench"]


@dataclass(frozen=True)
class DeployShape:
    name: str
    input_size: int
    hidden_size: int
    num_layers: int


DEPLOY_SHAPES = (
    DeployShape("lstm-H128", 64, 128, 1),
    DeployShape("lstm2-H640", 640, 640, 2),
)
# call name -> steps per call
CALLS = {"step": 1, "chunk32": 32}


TORCH_AO = "torch.ao int8"
INT8 = "rnnkit int8"
INT8_ROWS = (TORCH_AO, INT8)
ONNXRUNTIME = "onnxruntime"
# the rows held to float32's parity rule against torch.nn
PARITY_ROWS = ("fused", ONNXRUNTIME)


class _Onnxruntime:
    """onnxruntime running rnnkit's ONNX export of a float32 LSTM, called as the layer is:
    ``(x, (h0, c0) or None) -> (output, (h_n, c_n))``; the length is dynamic, and each thread
    count (``torch.get_num_threads()`` at the call) gets its own session with that many
    intra-op threads."""

    def __init__(self, layer: rnnkit.LSTM) -> None:
        import onnxruntime
        from torch.export import Dim

        L, H = layer.num_layers, layer.hidden_size
        x = torch.zeros(2, 1, layer.input_size)
        state = (torch.zeros(L, 1, H), torch.zeros(L, 1, H))
        self.shape = state[0].shape
        # the exporter logs each torchvision op it skips when torchvision is not installed
        log = logging.getLogger("torch.onnx._internal.exporter._registration")
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                proto = rnnkit.onnx.export(
                    layer, (x, state), input_names=["x", "h0", "c0"],
                    output_names=["y", "h_n", "c_n"],
                    dynamic_shapes={"input": {0: Dim("L")}, "hx": ({}, {})},
                )  # fmt: skip
        finally:
            log.setLevel(level)
        self.model = proto.SerializeToString()
        self.ort = onnxruntime
        self.sessions: dict[int, object] = {}

    def session(self):
        n = torch.get_num_threads()
        if n not in self.sessions:
            options = self.ort.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = n, 1
            self.sessions[n] = self.ort.InferenceSession(
                self.model, options, providers=["CPUExecutionProvider"]
            )
        return self.sessions[n]

    def __call__(self, x: torch.Tensor, state):
        if state is None:
            state = (torch.zeros(self.shape), torch.zeros(self.shape))
        feed = {"x": x.numpy(), "h0": state[0].numpy(), "c0": state[1].numpy()}
        y, h, c = (torch.from_numpy(a) for a in self.session().run(None, feed))
        return y, (h, c)


def _onnxruntime(layer: rnnkit.LSTM) -> _Onnxruntime | None:
    """The onnxruntime row's layer; None where onnxruntime or the exporter's onnxscript is
    not installed."""
    try:
        return _Onnxruntime(layer)
    except ImportError:
        return None


def _layers(shape: DeployShape) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    ref = nn.LSTM(shape.input_size, shape.hidden_size, shape.num_layers).eval()
    fused = rnnkit.LSTM(
        shape.input_size, shape.hidden_size, shape.num_layers, engine="fused"
    ).eval()
    fused.load_state_dict(ref.state_dict())
    layers = {"torch.nn": ref, "fused": fused}
    exported = _onnxruntime(fused)
    if exported is not None:
        layers[ONNXRUNTIME] = exported
    layers[INT8] = rnnkit.quantize_dynamic(fused)
    quantized = _torch_ao_int8(ref)
    if quantized is not None:
        layers[TORCH_AO] = quantized
    return layers


def _torch_ao_int8(ref: nn.LSTM) -> nn.Module | None:
    """torch.ao's dynamic int8 LSTM of ``ref``'s weights (per-tensor int8 weights, activations
    quantized per call), the baseline an int8 rnnkit layer is to beat; None where this torch
    has none (torch deprecates it)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapped = torch.ao.quantization.quantize_dynamic(
                nn.Sequential(copy.deepcopy(ref)), {nn.LSTM}, dtype=torch.qint8
            )
    except (AttributeError, RuntimeError, ImportError):
        return None
    layer = wrapped[0]
    return layer if type(layer) is not nn.LSTM else None


def _weights_mb(name: str, layers: dict[str, nn.Module]) -> float:
    """The layer's parameter memory; torch.ao's int8 layer: int8 weight matrices and float32
    biases (what its packed weights hold, less their per-tensor scales)."""
    params = list(layers["torch.nn"].named_parameters())
    if name == INT8:
        return layers[INT8].weight_nbytes() / 2**20
    if name == TORCH_AO:
        return sum(p.numel() * (1 if "weight" in n else 4) for n, p in params) / 2**20
    return sum(p.numel() * p.element_size() for _, p in params) / 2**20


def _max_error(shape: DeployShape, steps: int, layers: dict[str, nn.Module], name: str) -> float:
    """The largest difference of ``name``'s outputs from torch.nn's float32 ones over three
    chained calls (int8 is not held to float32's parity rule; its error is reported)."""
    xs = [torch.randn(steps, 1, shape.input_size) for _ in range(3)]
    worst = 0.0
    with torch.no_grad():
        states = {"torch.nn": None, name: None}
        for x in xs:
            outs = {}
            for key in states:
                outs[key], states[key] = layers[key](x, states[key])
            worst = max(worst, (outs[name] - outs["torch.nn"]).abs().max().item())
    return worst


def _parity(shape: DeployShape, steps: int, layers: dict) -> dict[str, str]:
    """What failed, for each float32 rnnkit row whose three chained calls do not match
    torch.nn's."""
    xs = [torch.randn(steps, 1, shape.input_size) for _ in range(3)]
    truth_layer = float64_copy(layers["torch.nn"])
    runs = {}
    with torch.no_grad():
        for name, layer in (*layers.items(), ("truth", truth_layer)):
            hx, outs = None, {}
            for i, x in enumerate(xs):
                y, hx = layer(x.double() if name == "truth" else x, hx)
                outs[f"output{i}"] = y
            outs["h_n"], outs["c_n"] = hx
            runs[name] = outs
    failures = {}
    for name in PARITY_ROWS:
        if name in runs:
            results = compare_all(runs[name], runs["torch.nn"], torch.float32, truth=runs["truth"])
            failed = [str(r) for r in results if not r.ok]
            if failed:
                failures[name] = "; ".join(failed)
    return failures


def _time_calls(
    fns: dict[str, Callable[[], None]], repeats: int, warmup: int
) -> dict[str, list[float]]:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t) * 1e6)
    return samples


def _stats(us: list[float]) -> dict:
    s = sorted(us)
    n = len(s)
    return {"median": s[n // 2], "q1": s[n // 4], "q3": s[(3 * n) // 4], "n": n}


def _caller(layer: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """One call of ``layer`` on ``x`` carrying the state from the previous call."""
    state = [None]

    def call() -> None:
        _, state[0] = layer(x, state[0])

    return call


def run_deploy_bench(
    threads: list[int], repeats: int, warmup: int, advance: Callable[[int], None] | None = None
) -> dict:
    """Every shape and call at each thread count: the report (rows, machine, ok)."""
    saved = torch.get_num_threads()
    rows, ok = [], True
    try:
        for shape in DEPLOY_SHAPES:
            layers = _layers(shape)
            for call, steps in CALLS.items():
                failures = _parity(shape, steps, layers)
                ok = ok and not failures
                errors = {
                    name: _max_error(shape, steps, layers, name)
                    for name in layers
                    if name in INT8_ROWS
                }
                bad_int8 = errors.get(INT8, 0.0) > rnnkit.quantized.FLOAT32_ERROR
                ok = ok and not bad_int8
                for n in threads:
                    torch.set_num_threads(n)
                    base = {"shape": shape.name, "call": call, "steps": steps, "threads": n}
                    x = torch.randn(steps, 1, shape.input_size)
                    fns = {name: _caller(layer, x) for name, layer in layers.items()}
                    for name in failures:
                        del fns[name]
                    if bad_int8:
                        del fns[INT8]
                    with torch.no_grad():
                        samples = _time_calls(fns, repeats, warmup)
                    stats = {name: _stats(us) for name, us in samples.items()}
                    for name in layers:
                        dtype = "int8" if name in INT8_ROWS else "float32"
                        row = {**base, "impl": name, "dtype": dtype}
                        row["weights_mb"] = _weights_mb(name, layers)
                        if name in errors:
                            row["max_abs_error_vs_float32"] = errors[name]
                        if name in stats:
                            row["us"] = stats[name]
                            row["vs_torch_nn"] = ratio(
                                stats[name]["median"], stats["torch.nn"]["median"]
                            )
                            for other, key in (("fused", "vs_fused"), (TORCH_AO, "vs_torch_ao")):
                                if name == INT8 and other in stats:
                                    row[key] = ratio(stats[name]["median"], stats[other]["median"])
                        elif name == INT8:
                            row["error"] = (
                                f"FAILED ACCURACY: {errors[INT8]:.1e} from float32 > "
                                f"{rnnkit.quantized.FLOAT32_ERROR}"
                            )
                        else:
                            row["error"] = f"FAILED PARITY: {failures[name]}"
                        rows.append(row)
                    if advance is not None:
                        advance(1)
    finally:
        torch.set_num_threads(saved)
    machine = machine_info(BenchConfig())
    return {"deploy": True, "rows": rows, "machine": machine, "ok": ok}


def format_deploy_table(report: dict) -> str:
    """The report as a Markdown table: per-call µs (median ± half the interquartile range)."""
    lines = [
        "| shape | call | threads | impl | µs per call | vs torch.nn | vs fused / torch.ao "
        "| weights MB | max error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        if "us" in r:
            us = r["us"]
            cell = f"{us['median']:.1f} ± {(us['q3'] - us['q1']) / 2:.1f}"
            vs = f"{r['vs_torch_nn']:.2f}x" if r["impl"] != "torch.nn" else ""
        else:
            cell, vs = r["error"][:60], ""
        error = r.get("max_abs_error_vs_float32")
        others = " / ".join(f"{r[k]:.2f}x" for k in ("vs_fused", "vs_torch_ao") if k in r)
        lines.append(
            f"| {r['shape']} | {r['call']} | {r['threads']} | {r['impl']} | {cell} | {vs} "
            f"| {others} | {r['weights_mb']:.2f} | {'' if error is None else f'{error:.1e}'} |"
        )
    return "\n".join(lines)

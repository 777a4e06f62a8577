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
float32 layer's and torch.ao's. The bfloat16 rows: rnnkit's fused layer in bfloat16 (its
products in bfloat16 where the CPU has AVX-512-BF16) and torch.nn's bfloat16 LSTM (oneDNN's
bfloat16 kernels), fed the same input rounded to bfloat16; they too report their largest
difference from torch.nn's float32 output, rnnkit's gated at :data:`BF16_ERROR`. torch.nn's
bfloat16 row is timed only where oneDNN can run it safely (:func:`torch_bf16_skip`): on a CPU
without bfloat16 instructions it has no kernel, and on one that lists AMX it can die where the
system does not enable AMX, unless ``ONEDNN_MAX_CPU_ISA`` caps oneDNN's choice.
"""

from __future__ import annotations

import copy
import logging
import os
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
BF16 = "rnnkit bf16"
TORCH_BF16 = "torch.nn bf16"
BF16_ROWS = (BF16, TORCH_BF16)
# rows that report their largest difference from torch.nn's float32 output
ERROR_ROWS = (*INT8_ROWS, *BF16_ROWS)
# The bound on a bfloat16 layer's largest output difference from float32 over three chained
# calls: a few units of bfloat16's precision (2^-8) at the outputs' scale (|y| < 1).
BF16_ERROR = 5e-2


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def torch_bf16_skip() -> str | None:
    """Why torch.nn's bfloat16 row is not timed on this machine, or None when it is."""
    flags = _cpu_flags()
    if "avx512_bf16" not in flags and "amx_bf16" not in flags:
        return "no bfloat16 instructions: oneDNN has no bfloat16 LSTM kernel here"
    if "amx_bf16" in flags and not os.environ.get("ONEDNN_MAX_CPU_ISA"):
        return (
            "this CPU lists AMX, which oneDNN's bfloat16 kernels use and which dies where the "
            "system does not enable it; ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 times it"
        )
    return None


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
    layers[BF16] = copy.deepcopy(fused).bfloat16()
    if torch_bf16_skip() is None:
        layers[TORCH_BF16] = copy.deepcopy(ref).bfloat16()
    return layers


def _input(name: str, x: torch.Tensor) -> torch.Tensor:
    """A call's input as ``name``'s layer takes it: bfloat16 for the bfloat16 rows."""
    return x.bfloat16() if name in BF16_ROWS else x


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
    if name in BF16_ROWS:
        return sum(p.numel() * 2 for _, p in params) / 2**20
    return sum(p.numel() * p.element_size() for _, p in params) / 2**20


def _max_error(shape: DeployShape, steps: int, layers: dict[str, nn.Module], name: str) -> float:
    """The largest difference of ``name``'s outputs from torch.nn's float32 ones over three
    chained calls (int8 and bfloat16 are not held to float32's parity rule; their error is
    reported)."""
    xs = [torch.randn(steps, 1, shape.input_size) for _ in range(3)]
    worst = 0.0
    with torch.no_grad():
        states = {"torch.nn": None, name: None}
        for x in xs:
            outs = {}
            for key in states:
                outs[key], states[key] = layers[key](_input(key, x), states[key])
            worst = max(worst, (outs[name].float() - outs["torch.nn"]).abs().max().item())
    return worst


def _parity(shape: DeployShape, steps: int, layers: dict) -> dict[str, str]:
    """What failed, for each float32 rnnkit row whose three chained calls do not match
    torch.nn's."""
    xs = [torch.randn(steps, 1, shape.input_size) for _ in range(3)]
    truth_layer = float64_copy(layers["torch.nn"])
    runs = {}
    float_layers = {k: v for k, v in layers.items() if k not in BF16_ROWS}
    with torch.no_grad():
        for name, layer in (*float_layers.items(), ("truth", truth_layer)):
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


# what else a row's time is compared with: (row, key of the ratio)
_COMPARED = {
    INT8: (("fused", "vs_fused"), (TORCH_AO, "vs_torch_ao")),
    BF16: (("fused", "vs_fused"), (TORCH_BF16, "vs_torch_nn_bf16")),
}


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
                    if name in ERROR_ROWS
                }
                bad = {
                    name
                    for name, bound in ((INT8, rnnkit.quantized.FLOAT32_ERROR), (BF16, BF16_ERROR))
                    if not errors.get(name, 0.0) <= bound
                }
                ok = ok and not bad
                for n in threads:
                    torch.set_num_threads(n)
                    base = {"shape": shape.name, "call": call, "steps": steps, "threads": n}
                    x = torch.randn(steps, 1, shape.input_size)
                    fns = {name: _caller(layer, _input(name, x)) for name, layer in layers.items()}
                    for name in (*failures, *bad):
                        del fns[name]
                    with torch.no_grad():
                        samples = _time_calls(fns, repeats, warmup)
                    stats = {name: _stats(us) for name, us in samples.items()}
                    for name in layers:
                        dtype = (
                            "int8"
                            if name in INT8_ROWS
                            else "bfloat16"
                            if name in BF16_ROWS
                            else "float32"
                        )
                        row = {**base, "impl": name, "dtype": dtype}
                        row["weights_mb"] = _weights_mb(name, layers)
                        if name in errors:
                            row["max_abs_error_vs_float32"] = errors[name]
                        if name in stats:
                            row["us"] = stats[name]
                            row["vs_torch_nn"] = ratio(
                                stats[name]["median"], stats["torch.nn"]["median"]
                            )
                            for other, key in _COMPARED.get(name, ()):
                                if other in stats:
                                    row[key] = ratio(stats[name]["median"], stats[other]["median"])
                        elif name in bad:
                            bound = BF16_ERROR if name == BF16 else rnnkit.quantized.FLOAT32_ERROR
                            row["error"] = (
                                f"FAILED ACCURACY: {errors[name]:.1e} from float32 > {bound}"
                            )
                        else:
                            row["error"] = f"FAILED PARITY: {failures[name]}"
                        rows.append(row)
                    if advance is not None:
                        advance(1)
    finally:
        torch.set_num_threads(saved)
    machine = machine_info(BenchConfig())
    report = {"deploy": True, "rows": rows, "machine": machine, "ok": ok}
    skip = torch_bf16_skip()
    if skip is not None:
        report["skipped"] = {TORCH_BF16: skip}
    return report


def format_deploy_table(report: dict) -> str:
    """The report as a Markdown table: per-call µs (median ± half the interquartile range)."""
    lines = [
        "| shape | call | threads | impl | µs per call | vs torch.nn "
        "| vs fused / torch.ao or torch.nn bf16 | weights MB | max error |",
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
        keys = ("vs_fused", "vs_torch_ao", "vs_torch_nn_bf16")
        others = " / ".join(f"{r[k]:.2f}x" for k in keys if k in r)
        lines.append(
            f"| {r['shape']} | {r['call']} | {r['threads']} | {r['impl']} | {cell} | {vs} "
            f"| {others} | {r['weights_mb']:.2f} | {'' if error is None else f'{error:.1e}'} |"
        )
    for name, why in report.get("skipped", {}).items():
        lines.append(f"\n{name}: not timed ({why})")
    return "\n".join(lines)

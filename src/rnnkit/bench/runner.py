"""What ``rnnkit bench`` measures, and how: parity first, then timings and peak memory.

For every shape the runner builds one ``torch.nn`` layer (torch's default init, seeded) and,
with the same weights, one rnnkit layer per engine. Each engine must first pass a parity check
against ``torch.nn`` on a short version of the shape (``L`` capped at ``parity_max_L``): the
no-grad forward, the training forward and every gradient (input and parameters), to rounding
by ``rnnkit.testing.compare``'s rule (below float64: about as close to a float64 run of
torch on the same values as torch is). An engine that fails gets no timings. The LSTM
variants (``rnnkit bench --variants``, :mod:`rnnkit.bench.variants`) run on the same machinery,
but their math is not torch's: each engine is checked against the reference engine on the same
variant instead, and the reference engine's own row, the spec of the variants, is not checked;
so are the calls with resets of ``--resets`` (:mod:`rnnkit.bench.resets`).

Two workloads are timed, each ``warmup`` times untimed then ``repeats`` times, round-robin over
the implementations so that drifts in clock speed hit them all alike:

* ``fwd``: inference, the layer's forward in ``eval()`` mode under ``torch.no_grad()``;
* ``train``: a training step: the forward with autograd, ``loss = sum_k (out_k * w_k).sum()``
  over the output and final states with fixed random ``w_k``, and ``loss.backward()`` into
  fresh (``None``) gradients of the input and every parameter.

CPU time is wall time (``time.perf_counter``); CUDA time is measured with CUDA events. Peak
memory is the highest amount of memory allocated *by the step itself* above what was live
before it (weights, input), in one extra run of each workload: on CUDA from the caching
allocator's statistics (``torch.cuda.max_memory_allocated``), on CPU from the allocation and
free events that ``torch.profiler`` records with ``profile_memory=True`` for torch's CPU
allocator. Memory a library allocates past torch's allocator (oneDNN's or MKL's internal
scratch space) is not seen on CPU, nor the fused engine's packed copy of each W_hh in float32
(MKL's layout, in mapped pages: about the weight's own size resident, see ``csrc/blas.h``).
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

import rnnkit
from rnnkit import functional as RF
from rnnkit.bench.shapes import BenchShape
from rnnkit.engines.base import RNNCall
from rnnkit.engines.cpu import build
from rnnkit.resets import check_reset
from rnnkit.testing import Result, compare, compare_all, run_pair, run_truth

__all__ = [
    "REFERENCE",
    "TORCH_NN",
    "BenchConfig",
    "engine_names",
    "machine_info",
    "ratio",
    "report",
    "run_bench",
    "steps_per_shape",
    "summarize",
    "with_ratios",
]

# The name of torch.nn's row, beside the engine names.
TORCH_NN = "torch.nn"
REFERENCE = "reference"
_MiB = 2**20


@dataclass(frozen=True)
class BenchConfig:
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    repeats: int = 10
    warmup: int = 3
    parity_max_L: int = 20
    seed: int = 0

    def as_dict(self) -> dict:
        return {**asdict(self), "dtype": str(self.dtype).removeprefix("torch.")}


@dataclass
class Row:
    """One implementation on one shape: its status and, if it ran, its numbers."""

    impl: str  # TORCH_NN or an engine name
    status: str = "ok"  # "ok", "failed parity", "unsupported"
    detail: str = ""  # why not ok
    parity: list[dict] = field(default_factory=list)  # rnnkit.testing.Result.as_dict()
    fwd_ms: dict | None = None
    train_ms: dict | None = None
    fwd_peak_mb: float | None = None
    train_peak_mb: float | None = None
    ratios: dict = field(default_factory=dict)


def summarize(samples_ms: Sequence[float]) -> dict:
    """Median, quartiles, extremes and the raw samples of a list of timings."""
    ordered = sorted(samples_ms)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return {
        "median": statistics.median(ordered),
        "q1": q1,
        "q3": q3,
        "min": ordered[0],
        "max": ordered[-1],
        "samples": list(samples_ms),
    }


def ratio(num: float | None, den: float | None) -> float | None:
    """``num / den``, or None where either is missing (or ``den`` is 0)."""
    return None if num is None or not den else num / den


def with_ratios(rows: list[dict]) -> list[dict]:
    """Fill each row's ``ratios``: time and peak over torch.nn's (lower is better), and the
    training-step speedup over the reference engine (higher is better), all from this run."""
    by_impl = {r["impl"]: r for r in rows}
    base = by_impl.get(TORCH_NN, {})
    ref = by_impl.get(REFERENCE, {})

    def median(row: dict, key: str) -> float | None:
        return row[key]["median"] if row.get(key) else None

    for row in rows:
        row["ratios"] = {
            "fwd_vs_torch": ratio(median(row, "fwd_ms"), median(base, "fwd_ms")),
            "train_vs_torch": ratio(median(row, "train_ms"), median(base, "train_ms")),
            "peak_vs_torch": ratio(row.get("train_peak_mb"), base.get("train_peak_mb")),
            "train_speedup_vs_reference": ratio(median(ref, "train_ms"), median(row, "train_ms")),
        }
    return rows


class _Workload:
    """A layer, its input, its loss weights and its ``reset=`` (or None); the two timed steps."""

    def __init__(
        self,
        module: torch.nn.Module,
        x: Tensor,
        loss_weights: list[Tensor],
        reset: Tensor | None = None,
    ):
        self.module, self.x, self.loss_weights = module, x, loss_weights
        self.leaves = [x, *module.parameters()]
        # torch.nn's layers take no reset=: the plain call unless there is one
        self.keywords = {} if reset is None else {"reset": reset}

    def outputs(self) -> list[Tensor]:
        output, hidden = self.module(self.x, **self.keywords)
        return [output, *(hidden if isinstance(hidden, tuple) else (hidden,))]

    def forward(self) -> list[Tensor]:
        self.module.eval()
        with torch.no_grad():
            return self.outputs()

    def reset_grads(self) -> None:
        for t in self.leaves:
            t.grad = None

    def train_step(self) -> list[Tensor]:
        self.module.train()
        outs = self.outputs()
        loss = sum((o * w).sum() for o, w in zip(outs, self.loss_weights, strict=True))
        loss.backward()
        return outs


def build_workloads(
    shape: BenchShape, config: BenchConfig, impls: Sequence[str]
) -> dict[str, _Workload]:
    """Workloads for torch.nn and each engine, on identical weights, input and loss weights;
    the engines' with the shape's :meth:`~BenchShape.reset_mask`, if it has one."""
    case = shape.case(config.dtype)
    x = case.inputs(config.device, config.seed)["input"]
    # Drawn on the CPU in float64, then cast: the same numbers on every device and dtype.
    gen = torch.Generator().manual_seed(config.seed + 1)
    weights = [
        torch.randn(s, generator=gen, dtype=torch.float64).to(config.device, config.dtype)
        for s in shape.output_shapes()
    ]
    reset = shape.reset_mask(config.device, config.seed)
    workloads = {}
    for impl in impls:
        expected, actual = shape.modules(_engine_of(impl), config.dtype, config.device, config.seed)
        if impl == TORCH_NN:
            workloads[impl] = _Workload(expected, x, weights)
        else:
            workloads[impl] = _Workload(actual, x, weights, reset)
    return workloads


def _engine_of(impl: str) -> str:
    # torch.nn's row builds its (unused) rnnkit twin on the reference engine
    return REFERENCE if impl == TORCH_NN else impl


def unsupported(shape: BenchShape, engine: str, config: BenchConfig) -> str | None:
    """Why ``engine`` cannot run ``shape`` (inference or training) on this device and dtype,
    or None if it can."""
    factory = {"device": config.device, "dtype": config.dtype}
    _, module = shape.modules(engine, config.dtype, config.device, config.seed)
    x = shape.case(config.dtype).inputs(config.device, config.seed)["input"].detach()
    D, H_out = shape.D, shape.proj_size or shape.H
    h0 = torch.zeros(shape.num_layers * D, shape.N, H_out, **factory)
    c0 = torch.zeros(shape.num_layers * D, shape.N, shape.H, **factory)
    # the call rnnkit.functional would build for this layer, asked of the engine directly
    params = RF.gather_params(
        shape.mode, module._flat_weights, True, shape.num_layers, D, module.variant
    )
    reset = shape.reset_mask(config.device, config.seed)
    if reset is not None:
        reset = check_reset("", reset, x, shape.batch_first)
    for train in (False, True):
        call = RNNCall(
            mode=shape.mode,
            input=x,
            batch_sizes=None,
            hx=(h0, c0) if shape.mode == "LSTM" else h0,
            params=params,
            num_layers=shape.num_layers,
            dropout=0.0,
            train=train,
            bidirectional=shape.bidirectional,
            batch_first=shape.batch_first,
            variant=module.variant,
            reset=reset,
        )
        reason = RF.ENGINES[engine]().unsupported(call)
        if reason is not None:
            return reason
    return None


def check_parity(shape: BenchShape, engine: str, config: BenchConfig) -> list[Result]:
    """Compare ``engine`` with torch.nn's default path on ``shape`` cut to ``parity_max_L``
    steps: the training run's outputs and every gradient (``rnnkit.testing.run_pair``), and
    the outputs of the inference run that ``fwd`` times (``eval()``, ``torch.no_grad()``)."""
    short = shape.with_length(min(shape.L, config.parity_max_L))
    case = short.case(config.dtype)
    actual, expected = run_pair(case, engine, config.device, seed=config.seed)
    # torch's training forward in float64 is its inference forward too (no dropout here)
    truth = run_truth(case, config.seed)
    results = compare_all(actual, expected, config.dtype, truth=truth)
    work = build_workloads(short, config, [TORCH_NN, engine])
    names = ["output", "h_n", "c_n"]
    inference = {impl: dict(zip(names, w.forward(), strict=False)) for impl, w in work.items()}
    for name, e in inference[TORCH_NN].items():
        t = None if truth is None else truth[name]
        results.append(compare(inference[engine][name], e, config.dtype, f"eval_{name}", truth=t))
    return results


def _time_ms(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2: the profiler's backend logs each start and stop there."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _peak_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory allocated by ``fn`` above what was allocated before it, in MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / _MiB
    prof = torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    )
    with _quiet_stderr():
        prof.start()
    try:
        fn()
    finally:
        with _quiet_stderr():
            prof.stop()
    # "[memory]" events carry signed sizes: + allocation, - free (of blocks allocated while
    # profiling; frees of older blocks are not reported, so the running sum never undercounts).
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / _MiB


def steps_per_shape(n_engines: int, config: BenchConfig) -> int:
    """Progress units for one shape: a parity check per engine, then per implementation the
    warm-up, the timed repeats and the memory run."""
    return n_engines + (n_engines + 1) * (config.warmup + config.repeats + 1)


def gate(
    shape: BenchShape,
    engine: str,
    config: BenchConfig,
    explicit: bool,
    check: Callable[[BenchShape, str, BenchConfig], list[Result]],
    advance: Callable[[int], None],
) -> Row | None:
    """``engine``'s row on ``shape`` before any timing: ``"unsupported"`` (or, unless
    ``explicit``, None: left out) when the engine cannot run the shape, ``"failed parity"`` when
    a result of ``check`` is not ok, else ``"ok"``. Advances past the timings it rules out."""
    reason = unsupported(shape, engine, config)
    if reason is not None:
        advance(1 + config.warmup + config.repeats + 1)
        return Row(engine, status="unsupported", detail=reason) if explicit else None
    row = Row(engine)
    parity = check(shape, engine, config)
    row.parity = [r.as_dict() for r in parity]
    failed = [r for r in parity if not r.ok]
    if failed:
        row.status = "failed parity"
        row.detail = "; ".join(str(r) for r in failed)
        advance(config.warmup + config.repeats + 1)
    advance(1)
    return row


def measure(
    work: dict[object, _Workload],
    rows: dict[object, Row],
    config: BenchConfig,
    advance: Callable[[int], None],
) -> None:
    """Time each workload and measure its peak memory into the row of the same key."""
    device = torch.device(config.device)
    for w in work.values():
        for _ in range(config.warmup):
            w.forward()
            w.reset_grads()
            w.train_step()
            advance(1)
    samples = {key: ([], []) for key in work}
    for _ in range(config.repeats):
        for key, w in work.items():
            samples[key][0].append(_time_ms(w.forward, device))
            w.reset_grads()
            samples[key][1].append(_time_ms(w.train_step, device))
            advance(1)
    for key, w in work.items():
        row = rows[key]
        row.fwd_ms, row.train_ms = (summarize(s) for s in samples[key])
        row.fwd_peak_mb = _peak_mb(w.forward, device)
        w.reset_grads()
        row.train_peak_mb = _peak_mb(w.train_step, device)
        advance(1)


def run_shape(
    shape: BenchShape,
    engines: Sequence[str],
    config: BenchConfig,
    explicit: bool,
    advance: Callable[[int], None] = lambda n: None,
) -> list[dict]:
    """The rows of one shape: torch.nn's, then each engine's. With ``explicit``, an engine
    that cannot run the shape is a failed row; otherwise it is left out."""
    rows = {TORCH_NN: Row(TORCH_NN)}
    for engine in engines:
        row = gate(shape, engine, config, explicit, check_parity, advance)
        if row is not None:
            rows[engine] = row
    timed = [impl for impl, row in rows.items() if row.status == "ok"]
    gc.collect()
    measure(build_workloads(shape, config, timed), rows, config, advance)
    return with_ratios([asdict(r) for r in rows.values()])


def _load_average() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


# The instruction-set flags that decide which kernels MKL, oneDNN and rnnkit run.
_ISA_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)


def cpu_info() -> dict:
    """The CPU as /proc/cpuinfo names it: model name, vendor, family and model, ISA flags."""
    fields: dict[str, str] = {}
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor says it for all
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    flags = set(fields.get("flags", "").split())
    return {
        "cpu": fields.get("model name") or platform.processor() or platform.machine(),
        "cpu_vendor": fields.get("vendor_id"),
        "cpu_family": int(fields["cpu family"]) if "cpu family" in fields else None,
        "cpu_model": int(fields["model"]) if fields.get("model", "").isdigit() else None,
        "cpu_flags": [f for f in _ISA_FLAGS if f in flags],
    }


def machine_info(config: BenchConfig) -> dict:
    """What the numbers were measured on."""
    info = {
        **cpu_info(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        # the vector width torch dispatches to, which the fused kernels are built for
        "isa": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "rnnkit": rnnkit.__version__,
        "mkldnn_enabled": torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled,
        # Other work on the machine skews timings: recorded (and again after the run, where
        # the benchmark's own threads count) so that a reader can tell.
        "load_average_1min": _load_average(),
        "device": config.device,
        "dtype": str(config.dtype).removeprefix("torch."),
    }
    if config.device == "cpu":
        # built (or loaded) before anything is timed; the build's seconds are reported apart
        info["fused_kernels"] = build.summary()
    if config.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(config.device))
        info["cuda"] = torch.version.cuda
    return info


def engine_names(engines: Sequence[str] | None) -> list[str]:
    """The engines to run: those named, else every registered one; the reference engine, the
    baseline of the speedup column, always and first."""
    names = RF.available_engines() if engines is None else list(engines)
    return [REFERENCE, *(n for n in names if n != REFERENCE)]


def report(
    names: list[str], config: BenchConfig, results: Callable[[], list[dict]], **extra
) -> dict:
    """The whole report as plain data (what ``--json`` writes): ``machine``, ``config``,
    ``engines``, ``extra``'s entries, ``results`` (the list ``results()`` computes, one entry
    per shape with its ``rows``) and ``ok`` (False when a row is not ok)."""
    machine = machine_info(config)
    with warnings.catch_warnings():
        # torch.nn says so on every call of an LSTM with proj_size; its fallback is what we time
        warnings.filterwarnings("ignore", message="LSTM with projections is not supported")
        entries = results()
    ok = all(r["status"] == "ok" for res in entries for r in res["rows"])
    machine["load_average_1min_after"] = _load_average()
    return {
        "machine": machine,
        "config": config.as_dict(),
        "engines": names,
        **extra,
        "results": entries,
        "ok": ok,
    }


def run_bench(
    shapes: Sequence[BenchShape],
    engines: Sequence[str] | None,
    config: BenchConfig,
    advance: Callable[[int], None] = lambda n: None,
) -> dict:
    """Run every shape; ``engines=None`` means every registered engine that supports it.

    Returns :func:`report`'s data; ``ok`` is False when an engine failed parity or, named
    explicitly, could not run a shape.
    """
    names = engine_names(engines)

    def results() -> list[dict]:
        return [
            {
                "shape": s.as_dict(),
                "rows": run_shape(s, names, config, engines is not None, advance),
            }
            for s in shapes
        ]

    return report(names, config, results)

"""``rnnkit bench``: time rnnkit's engines against torch.nn on the shape registry.

Every engine first passes a parity check against ``torch.nn`` on each shape; an engine that
fails gets ``FAILED PARITY`` in the table instead of timings, and the command exits 1. What is
timed and how memory is measured is documented in :mod:`rnnkit.bench.runner`. With
``--variants``, the LSTM shapes run with each named variant, on every engine that supports it,
against the plain ``torch.nn.LSTM``; parity is then checked against the reference engine
(:mod:`rnnkit.bench.variants`). With ``--resets EVERY``, every engine that runs ``reset=`` is
timed with a seeded reset mask of one reset per ``EVERY`` steps on average and without, and the
table gives the ratio of the two (:mod:`rnnkit.bench.resets`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from rnnkit import functional as RF
from rnnkit.bench import deploy, resets, runner, variants
from rnnkit.bench.runner import TORCH_NN, BenchConfig
from rnnkit.bench.shapes import (
    GPU_SHAPES,
    QUICK_SHAPES,
    SHAPES,
    VARIANTS,
    resolve_shapes,
    resolve_variants,
)
from rnnkit.cli import progress

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
# --quick: the tiny shapes, a few repeats; a smoke test of the whole pipeline.
_QUICK_REPEATS, _QUICK_WARMUP = 3, 1


def _engine_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    known = RF.available_engines()
    unknown = [n for n in names if n not in known]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown engine(s) {', '.join(unknown) or repr(text)}; available: {', '.join(known)}"
        )
    return names


def _shape_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    try:
        resolve_shapes(names)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return names


def _variant_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    try:
        return resolve_variants(names or [text])
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _count(minimum: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _output_path(text: str) -> str:
    # checked before the run, which would otherwise end in a traceback after all its timings
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"no such directory: {folder}")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a directory, not a file")
    return text


_output_path.__name__ = "path"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench",
        help="time rnnkit's engines against torch.nn (parity-checked first)",
        description="Time rnnkit's engines against torch.nn, inference (fwd) and a training "
        "step (fwd+bwd), on the shape registry. Every engine first passes a parity check "
        "against torch.nn on each shape; one that fails gets FAILED PARITY instead of timings "
        "and the command exits 1. What is timed and measured: rnnkit.bench.runner; with "
        "--variants: rnnkit.bench.variants; with --resets: rnnkit.bench.resets; with "
        "--deploy: rnnkit.bench.deploy. "
        f"Registered shapes: {', '.join(SHAPES)}; with --device cuda: {', '.join(GPU_SHAPES)};"
        f" with --quick: {', '.join(QUICK_SHAPES)}.",
    )
    p.add_argument(
        "--engines",
        type=_engine_list,
        default=None,
        help="comma-separated engines to time (default: every engine that supports the shape "
        "on this device; the reference engine is always timed as the speedup baseline)",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument(
        "--threads",
        type=_count(1),
        default=None,
        help=f"torch.set_num_threads (default: torch's current, {torch.get_num_threads()})",
    )
    p.add_argument("--repeats", type=_count(1), default=None, help="timed runs (default 10)")
    p.add_argument("--warmup", type=_count(0), default=None, help="untimed runs (default 3)")
    p.add_argument(
        "--shapes", type=_shape_list, default=None, help="comma-separated registered shape names"
    )
    p.add_argument(
        "--variants",
        type=_variant_list,
        nargs="?",
        const=list(VARIANTS),
        default=None,
        metavar="NAMES",
        help="time the LSTM shapes with each of these comma-separated variants (all without "
        "NAMES) on every engine that supports it, against the plain torch.nn.LSTM; parity is "
        f"checked against the reference engine. Registered: {', '.join(VARIANTS)}",
    )
    p.add_argument(
        "--resets",
        type=_count(1),
        default=None,
        metavar="EVERY",
        help="time every engine that runs reset= with a seeded reset mask (each step of each "
        "sequence a reset with probability 1/EVERY) and without, and report the ratio (reset "
        "vs plain); the calls with resets are parity-checked against the reference engine",
    )
    p.add_argument(
        "--deploy",
        action="store_true",
        help="per-call latency as deployed on CPU (batch 1, one step and 32-step chunks "
        "carrying the state, one thread and all of them), the fused engine against torch.nn, "
        "parity-checked first: rnnkit.bench.deploy",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"tiny shapes, {_QUICK_REPEATS} repeats, {_QUICK_WARMUP} warm-up (a smoke test)",
    )
    p.add_argument(
        "--json",
        metavar="PATH",
        type=_output_path,
        help="write every number and the machine here",
    )
    p.add_argument(
        "--plot",
        metavar="PATH",
        type=_output_path,
        help="bar chart of the ratios to torch.nn (needs matplotlib)",
    )
    progress.add_argument(p)
    return p


def run(args: argparse.Namespace) -> int:
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print(
                "rnnkit bench: --plot needs matplotlib; install it with "
                "pip install 'rnnkit[bench]'",
                file=sys.stderr,
            )
            return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("rnnkit bench: --device cuda, but CUDA is not available", file=sys.stderr)
        return 2
    default_repeats, default_warmup = (
        (_QUICK_REPEATS, _QUICK_WARMUP) if args.quick else (BenchConfig.repeats, BenchConfig.warmup)
    )
    config = BenchConfig(
        device=args.device,
        dtype=DTYPES[args.dtype],
        repeats=default_repeats if args.repeats is None else args.repeats,
        warmup=default_warmup if args.warmup is None else args.warmup,
    )
    if args.deploy:
        return _run_deploy(args)
    shapes = resolve_shapes(args.shapes, quick=args.quick, device=args.device)
    if args.variants is not None and args.resets is not None:
        print("rnnkit bench: --variants and --resets are separate runs", file=sys.stderr)
        return 2
    if args.variants is not None:
        if args.shapes:
            others = [s.name for s in shapes if s.mode != "LSTM"]
            if others:
                print(
                    f"rnnkit bench: --variants runs LSTM shapes, not {', '.join(others)}",
                    file=sys.stderr,
                )
                return 2
        shapes = [s for s in shapes if s.mode == "LSTM"]
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        n_engines = 1 + len([e for e in args.engines or RF.available_engines() if e != "reference"])
        if args.variants is not None:
            steps = variants.steps_per_variant_shape(n_engines, len(args.variants), config)
        elif args.resets is not None:
            steps = resets.steps_per_reset_shape(n_engines, config)
        else:
            steps = runner.steps_per_shape(n_engines, config)
        with progress.progress(
            len(shapes) * steps, "bench", enabled=args.progress, unit="run"
        ) as bar:
            if args.variants is not None:
                report = variants.run_variant_bench(
                    shapes, args.variants, args.engines, config, advance=bar.update
                )
            elif args.resets is not None:
                report = resets.run_reset_bench(
                    shapes, args.resets, args.engines, config, advance=bar.update
                )
            else:
                report = runner.run_bench(shapes, args.engines, config, advance=bar.update)
    finally:
        torch.set_num_threads(threads)
    report["command"] = command_line(args)
    print(machine_line(report["machine"]))
    print(format_resets_table(report) if "resets" in report else format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    if args.plot:
        plot_ratios(report, args.plot)
    if not report["ok"]:
        print(
            "rnnkit bench: FAILED (parity failure or unsupported engine, see above)",
            file=sys.stderr,
        )
        return 1
    return 0


def _run_deploy(args: argparse.Namespace) -> int:
    if args.device != "cpu" or args.dtype != "float32" or args.shapes or args.variants:
        print(
            "rnnkit bench: --deploy runs its own shapes, float32 on CPU "
            "(no --device, --dtype, --shapes or --variants)",
            file=sys.stderr,
        )
        return 2
    threads = [args.threads] if args.threads else sorted({1, torch.get_num_threads()})
    repeats = args.repeats or (20 if args.quick else 1000)
    warmup = args.warmup if args.warmup is not None else (5 if args.quick else 100)
    total = len(deploy.DEPLOY_SHAPES) * len(deploy.CALLS) * len(threads)
    with progress.progress(total, "bench", enabled=args.progress, unit="row") as bar:
        report = deploy.run_deploy_bench(threads, repeats, warmup, advance=bar.update)
    report["command"] = command_line(args)
    print(machine_line(report["machine"]))
    print(deploy.format_deploy_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    if not report["ok"]:
        print("rnnkit bench: FAILED (parity failure, see above)", file=sys.stderr)
        return 1
    return 0


def machine_line(machine: dict) -> str:
    """What the numbers were measured on, and what the fused kernels' build cost apart."""
    cpu = machine["cpu"]
    if machine.get("cpu_family") is not None:
        cpu += f" (family {machine['cpu_family']}, model {machine['cpu_model']}; {machine['isa']})"
    else:
        cpu += f" ({machine['isa']})"
    line = f"{cpu}, {machine['threads']} thread(s), torch {machine['torch']}"
    kernels = machine.get("fused_kernels")
    if kernels is None:
        return line
    if "error" in kernels:
        return f"{line}; fused kernels unavailable: {kernels['error']}"
    how = f"built in {kernels['build_s']:.1f} s" if kernels["build_s"] else "loaded from the cache"
    gemm = f", GEMM: {kernels['gemm']}" if "gemm" in kernels else ""
    return f"{line}; fused kernels {how}, before any timing{gemm}"


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run, with the options that were given."""
    words = ["rnnkit", "bench"]
    for name in ("engines", "shapes", "variants"):
        if getattr(args, name):
            words += [f"--{name}", ",".join(getattr(args, name))]
    if args.deploy:
        words.append("--deploy")
    if args.quick:
        words.append("--quick")
    for name in ("resets", "device", "dtype", "threads", "repeats", "warmup", "json", "plot"):
        value = getattr(args, name)
        if value is not None:
            words += [f"--{name}", str(value)]
    return " ".join(words)


def _ms(stats: dict | None) -> str:
    if stats is None:
        return ""
    return f"{stats['median']:.3f} ± {(stats['q3'] - stats['q1']) / 2:.3f}"


def _mb(value: float) -> str:
    return f"{value:.1f}" if value >= 10 else f"{value:.3f}"


def _x(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def format_table(report: dict) -> str:
    """The report as a Markdown table, one row per shape and implementation."""
    head = [
        "shape",
        "engine",
        "fwd ms",
        "fwd vs torch.nn",
        "fwd+bwd ms",
        "fwd+bwd vs torch.nn",
        "peak MB",
        "peak vs torch.nn",
        "fwd+bwd speedup vs reference",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    plain_rows = set()
    for result in report["results"]:
        shape = result["shape"]
        for row in result["rows"]:
            name = shape["name"]
            if row["impl"] == TORCH_NN and "variant" in shape:
                # the plain layer, one measurement shared by the variants of its shape
                name = name.removesuffix(f"+{shape['variant']}")
                if name in plain_rows:
                    continue
                plain_rows.add(name)
            r = row["ratios"]
            if row["status"] == "ok":
                cells = [
                    _ms(row["fwd_ms"]),
                    _x(r["fwd_vs_torch"]),
                    _ms(row["train_ms"]),
                    _x(r["train_vs_torch"]),
                    _mb(row["train_peak_mb"]),
                    _x(r["peak_vs_torch"]),
                    _x(r["train_speedup_vs_reference"]),
                ]
            else:
                cells = [f"{_label(row)}: {row['detail']}"] + [""] * 6
            lines.append("| " + " | ".join([name, row["impl"], *cells]) + " |")
    config = report["config"]
    lines.append("")
    lines.append(
        f"ms: median ± half the interquartile range of {config['repeats']} runs after "
        f"{config['warmup']} warm-up runs; fwd: inference (eval(), torch.no_grad()); fwd+bwd: a "
        "training step (forward, weighted-sum loss, backward into the input and parameters); "
        "peak MB: memory allocated by the training step above what was live before it; "
        "vs torch.nn: ratio to torch.nn's row (lower is faster/smaller); speedup vs reference: "
        "the reference engine's fwd+bwd time over this row's."
    )
    if "variants" in report:
        lines.append("")
        lines.append(_variants_note(report["variants"]))
    return "\n".join(lines)


def format_resets_table(report: dict) -> str:
    """A ``--resets`` report as a Markdown table, one row per shape and implementation: each
    engine's times without and with resets and their ratio, torch.nn's plain times."""
    head = [
        "shape",
        "engine",
        "fwd ms",
        "fwd ms reset",
        "fwd reset vs plain",
        "fwd reset vs torch.nn",
        "fwd+bwd ms",
        "fwd+bwd ms reset",
        "fwd+bwd reset vs plain",
        "fwd+bwd reset vs torch.nn",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    results = report["results"]
    for plain, reset in zip(results[::2], results[1::2], strict=True):
        name = plain["shape"]["name"]
        plain_rows = {r["impl"]: r for r in plain["rows"]}
        for row in reset["rows"]:
            impl = row["impl"]
            if impl == TORCH_NN:
                cells = [_ms(row["fwd_ms"]), "", "", "", _ms(row["train_ms"]), "", "", ""]
            else:
                off = [
                    f"{_label(r)}{what}: {r['detail']}"
                    for r, what in ((plain_rows.get(impl), ""), (row, " with resets"))
                    if r is not None and r["status"] != "ok"
                ]
                if off:
                    cells = ["; ".join(off)] + [""] * 7
                else:
                    base, r = plain_rows[impl], row["ratios"]
                    cells = [
                        _ms(base["fwd_ms"]),
                        _ms(row["fwd_ms"]),
                        _x(r["fwd_vs_plain"]),
                        _x(r["fwd_vs_torch"]),
                        _ms(base["train_ms"]),
                        _ms(row["train_ms"]),
                        _x(r["train_vs_plain"]),
                        _x(r["train_vs_torch"]),
                    ]
            lines.append("| " + " | ".join([name, impl, *cells]) + " |")
    config = report["config"]
    lines.append("")
    lines.append(
        f"ms: median ± half the interquartile range of {config['repeats']} runs after "
        f"{config['warmup']} warm-up runs; fwd: inference (eval(), torch.no_grad()); fwd+bwd: a "
        "training step (forward, weighted-sum loss, backward into the input and parameters); "
        "reset: the same layer called with reset=, a seeded mask with each step of each "
        f"sequence a reset with probability 1/{report['resets']}; reset vs plain: the engine's "
        "time with resets over its own without (the cost of the resets); reset vs torch.nn: "
        "over torch.nn's plain layer. Engines that do not run reset= are left out unless named; "
        "the calls with resets are parity-checked against the reference engine."
    )
    return "\n".join(lines)


def _label(row: dict) -> str:
    return "FAILED PARITY" if row["status"] == "failed parity" else "UNSUPPORTED"


def _variants_note(variants: dict[str, dict]) -> str:
    keywords = "; ".join(f"{v}: {_keywords(kw)}" for v, kw in variants.items())
    if any("proj_clip" in kw for kw in variants.values()):
        keywords += "; proj_clip only where the shape has proj_size"
    return (
        f"<shape>+<variant>: rnnkit's LSTM with the variant's keywords ({keywords}). torch.nn: "
        "the plain torch.nn.LSTM with the weights the variants start from, timed once per "
        "shape, the baseline of the vs torch.nn columns. Engines other than the reference are "
        "parity-checked against the reference engine on the same variant and seed; speedup vs "
        "reference: over the reference engine running the same variant."
    )


def _keywords(keywords: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in keywords.items())


# up to this many shapes, the fwd and fwd+bwd plots stand side by side
_SIDE_BY_SIDE = 8


def plot_ratios(report: dict, path: str) -> None:
    """Bars of each engine's time over torch.nn's, per shape; fwd and fwd+bwd side by side, or
    one above the other when there are many shapes (as with ``--variants``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = [res["shape"]["name"] for res in report["results"]]
    engines = report["engines"]
    if len(shapes) > _SIDE_BY_SIDE:
        size = (max(8, 0.5 * len(shapes)), 9)
        fig, axes = plt.subplots(2, 1, figsize=size, sharex=True, sharey=True)
    else:
        fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(shapes)), 4.5), sharey=True)
    baseline = f"{TORCH_NN} (plain LSTM)" if "variants" in report else TORCH_NN
    width = 0.8 / max(1, len(engines))
    for ax, key, title in zip(
        axes, ("fwd_vs_torch", "train_vs_torch"), ("fwd", "fwd+bwd"), strict=True
    ):
        for k, engine in enumerate(engines):
            values = []
            for res in report["results"]:
                row = next((r for r in res["rows"] if r["impl"] == engine), None)
                value = row["ratios"].get(key) if row else None
                values.append(float("nan") if value is None else value)
            xs = [i + (k - (len(engines) - 1) / 2) * width for i in range(len(shapes))]
            # bars grow from 1 (torch.nn): up where slower, down where faster
            ax.bar(xs, [v - 1 for v in values], width, bottom=1, label=engine)
        ax.axhline(1.0, color="black", linewidth=1, label=baseline)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xticks(range(len(shapes)), shapes, rotation=30, ha="right", fontsize=8)
        if ax is axes[0] or len(shapes) > _SIDE_BY_SIDE:
            ax.set_ylabel("time / torch.nn's time (log; below 1: faster)")
    axes[1].legend()
    machine = report["machine"]
    fig.suptitle(
        f"{machine['cpu']}, {machine['threads']} threads, torch {machine['torch']}, "
        f"{machine['dtype']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

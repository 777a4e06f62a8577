"""``rnnkit check``: rnnkit against ``torch.nn`` on this machine, case by case.

Every case builds the ``torch.nn`` module, loads its ``state_dict`` into rnnkit's, runs both on
the same input and initial state, backpropagates the same random-weighted sum of the output and
final states, and compares the output, the final states and every gradient (input, initial
state, each parameter). Each case is compared twice:

* ``aten``: torch on ATen's native loops (oneDNN off; cuDNN off on CUDA). The reference engine
  on CPU must be bit-identical to it; other engines and devices must agree to rounding.
* ``default``: torch as it runs by default (oneDNN or cuDNN where torch uses them), to
  rounding.

"To rounding" is :func:`rnnkit.testing.compare`'s rule: in float64 a fixed tolerance; in
float32 rnnkit's error against a float64 run of torch on the same values
(:func:`rnnkit.testing.run_truth`, once per case) within a small factor of torch's own.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import traceback
from dataclasses import dataclass, field

import torch

from rnnkit import functional
from rnnkit.cli.progress import add_argument as add_progress_argument
from rnnkit.cli.progress import progress
from rnnkit.testing import Case, Result, compare_all, kind_of, run_pair, run_truth

_DESCRIPTION = """\
Compare rnnkit with torch.nn on this machine. Each case builds the torch.nn module, loads its
state_dict into rnnkit's, runs both on the same input and initial state, backpropagates the
same random-weighted sum of the output and final states, and compares the output, the final
states and every gradient (input, initial state, each parameter), twice:

  vs aten     torch with oneDNN off (cuDNN off on CUDA); the reference engine on CPU must be
              bit-identical to it, other engines agree to rounding
  vs default  torch as it runs by default, to rounding

To rounding: in float64 within a fixed tolerance; in float32 both sides are measured against
a float64 run of torch on the same values, and rnnkit's error must stay within a small factor
of torch's own (rnnkit.testing.compare).

Exits 1 if any comparison fails."""

LAYERS = ("LSTM", "GRU", "RNN(tanh)", "RNN(relu)")
CELLS = ("LSTMCell", "GRUCell", "RNNCell(tanh)", "RNNCell(relu)")
DTYPES = (torch.float32, torch.float64)
PATHS = ("aten", "default")

# Keyword sets for Case, beside the module and dtype. The quick grid keeps the plain case, the
# one that combines every option and the unbatched one.
_LAYER_CONFIGS = {
    "base": {},
    "L1-N1": {"L": 1, "N": 1},
    "l2": {"num_layers": 2},
    "bidir": {"bidirectional": True},
    "l2-bidir": {"num_layers": 2, "bidirectional": True},
    "bf": {"batch_first": True},
    "packed": {"packed": True},
    "all": {"num_layers": 2, "bidirectional": True, "batch_first": True, "packed": True},
    "unbatched": {"batched": False},
    "no-h0": {"h0": False},
    "nobias": {"bias": False},
    "large": {"L": 40, "N": 8, "H_in": 16, "H": 32},
}
_LSTM_CONFIGS = {
    "proj": {"proj_size": 3},
    "all-proj": {**_LAYER_CONFIGS["all"], "proj_size": 3},
}
_CELL_CONFIGS = {
    "base": {},
    "N1": {"N": 1},
    "unbatched": {"batched": False},
    "no-h0": {"h0": False},
    "nobias": {"bias": False},
    "large": {"L": 20, "N": 8, "H_in": 16, "H": 32},
}
# How rnnkit.functional's dispatch refuses a call that the named engine cannot run.
_REFUSAL = "no rnnkit engine can run this call"

_QUICK = ("base", "all", "all-proj", "unbatched")


def cases(quick: bool = False) -> list[Case]:
    """The grid: every module, option set and dtype (a few option sets when ``quick``)."""
    grid = []
    for module, dtype in itertools.product(LAYERS + CELLS, DTYPES):
        if module in CELLS:
            configs = _CELL_CONFIGS
        elif module == "LSTM":
            configs = {**_LAYER_CONFIGS, **_LSTM_CONFIGS}
        else:
            configs = _LAYER_CONFIGS
        for name, kwargs in configs.items():
            if not quick or name in _QUICK:
                grid.append(Case(module, dtype=dtype, **kwargs))
    return grid


@dataclass
class Row:
    """One comparison of one case: the table's line, and what failed."""

    device: str
    case: Case
    path: str
    exact: bool
    results: list[Result] = field(default_factory=list)
    error: str | None = None
    # the engine declined the case (a named fast engine may; "reference" and "auto" may not)
    unsupported: bool = False

    @property
    def ok(self) -> bool:
        return self.unsupported or (self.error is None and all(r.ok for r in self.results))

    @property
    def bitwise(self) -> bool:
        return self.error is None and all(r.bitwise for r in self.results)

    def max_err(self, kind: str) -> float:
        errs = [r.max_abs for r in self.results if kind_of(r.what) == kind]
        return max(errs, default=float("nan"))


def check_case(case: Case, engine: str, device: str) -> list[Row]:
    """Both comparisons of one case on ``device``: against ATen's path and torch's default."""
    rows = []
    truth = None
    for path in PATHS:
        # only the reference engine promises torch's bits, and only on ATen's CPU path
        exact = path == "aten" and engine == "reference" and device == "cpu"
        row = Row(device, case, path, exact)
        try:
            actual, expected = run_pair(case, engine, device, torch_path=path)
            if truth is None and not exact:
                truth = run_truth(case)
        except Exception as e:  # an engine that raises fails the case, with its reason shown
            row.error = "".join(traceback.format_exception_only(type(e), e)).strip()
            row.unsupported = engine not in ("reference", "auto") and _REFUSAL in str(e)
        else:
            row.results = compare_all(actual, expected, case.dtype, exact=exact, truth=truth)
        rows.append(row)
    return rows


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "check",
        help="compare rnnkit with torch.nn on this machine (outputs, states, every gradient)",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--engine",
        default="reference",
        help="rnnkit engine to check: 'auto' or a name from rnnkit.functional.ENGINES "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--device",
        action="append",
        choices=("cpu", "cuda"),
        help="device to check on, may repeat (default: cpu, and cuda when available)",
    )
    parser.add_argument("--quick", action="store_true", help="a few cases per module only")
    add_progress_argument(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    engines = functional.available_engines()
    if args.engine != "auto" and args.engine not in engines:
        print(
            f"rnnkit check: unknown engine {args.engine!r}; choose from auto, {', '.join(engines)}",
            file=sys.stderr,
        )
        return 2
    devices = args.device or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if "cuda" in devices and not torch.cuda.is_available():
        print("rnnkit check: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    devices = list(dict.fromkeys(devices))
    grid = cases(args.quick)
    rows: list[Row] = []
    bar = progress(len(grid) * len(devices), "check", enabled=args.progress, unit="case")
    with bar:
        for device, case in itertools.product(devices, grid):
            bar.set_postfix_str(f"{device} {case.id}")
            rows.extend(check_case(case, args.engine, device))
            bar.update()
    print(f"rnnkit check: engine {args.engine!r} against torch {torch.__version__}")
    print(format_table(rows))
    failed = [row for row in rows if not row.ok]
    for row in failed:
        print(f"\nFAIL {row.device} {row.case.id} vs {row.path}:")
        problems = [row.error] if row.error else [str(r) for r in row.results if not r.ok]
        print("\n".join(f"  {p}" for p in problems))
    n = len(rows)
    skipped = sum(row.unsupported for row in rows)
    if skipped:
        print(
            f"\n{skipped} of {n} comparisons not run: engine {args.engine!r} does not support them"
        )
    if failed:
        print(f"\n{len(failed)} of {n} comparisons FAILED")
        return 1
    print(
        f"\nall {n - skipped} comparisons run passed ({len(grid)} cases x {len(PATHS)} paths x "
        f"{len(devices)} device(s))"
    )
    return 0


def format_table(rows: list[Row]) -> str:
    header = (
        "device",
        "module",
        "config",
        "dtype",
        "vs",
        "fwd err",
        "grad err",
        "bitwise",
        "result",
    )
    lines = [header]
    for row in rows:
        if row.unsupported:
            result = "unsupported"
        elif row.ok:
            result = "pass (bitwise)" if row.exact else "pass"
        else:
            result = "ERROR" if row.error else "FAIL"
        lines.append(
            (
                row.device,
                row.case.module,
                row.case.config,
                str(row.case.dtype).removeprefix("torch."),
                row.path,
                _err(row.max_err("fwd")),
                _err(row.max_err("grad")),
                "-" if row.error else "yes" if row.bitwise else "no",
                result,
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    ]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def _err(value: float) -> str:
    if value != value:  # NaN: nothing was compared
        return "-"
    return "0" if value == 0 else f"{value:.1e}"

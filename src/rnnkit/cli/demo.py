"""``rnnkit demo``: an ``rnnkit.LSTM`` learns the adding problem, in seconds on a CPU.

The adding problem (Hochreiter & Schmidhuber, 1997, experiment 4) needs a memory over the
whole sequence: each of the ``T`` steps carries a value drawn from U[0, 1) and a marker, which
is 1 at exactly two steps (one in each half of the sequence) and 0 elsewhere; the target is the
sum of the two marked values. Always answering 1.0 scores a mean squared error of
``Var(U1 + U2) = 1/6``; the demo trains until the validation error is ten times lower, which no
model can reach without remembering the first marked value across at least ``T/2`` steps.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import rnnkit
from rnnkit.cli.progress import add_argument as add_progress_argument
from rnnkit.cli.progress import progress
from rnnkit.engines.cpu import build

# The mean squared error of the constant prediction 1.0: the variance of a sum of two U[0, 1).
TRIVIAL_MSE = 1 / 6
GOAL_MSE = TRIVIAL_MSE / 10

_VALIDATION_SEED = 1997

# --variant NAME -> the rnnkit.LSTM keywords it trains with (rnnkit.variants documents each)
VARIANTS: dict[str, dict] = {
    "none": {},
    "layer_norm": dict(layer_norm=True),
    "peephole": dict(peephole=True),
    "zoneout": dict(zoneout=(0.1, 0.05)),
    "recurrent_dropout": dict(recurrent_dropout=0.1),
    "weight_dropout": dict(weight_dropout=0.1),
    "forget_bias": dict(forget_bias=1.0),
    "clip": dict(gate_clip=20.0, cell_clip=10.0),
    "coupled_input_forget": dict(coupled_input_forget=True),
    "activations": dict(activations=("hard_sigmoid", "tanh", "softsign")),
}

# (input_size, hidden_size) -> an LSTM with torch.nn.LSTM's interface
LSTMFactory = Callable[[int, int], nn.Module]


@dataclass(frozen=True)
class DemoConfig:
    seq_len: int = 50
    hidden_size: int = 64
    engine: str = "auto"
    variant: str = "none"
    seed: int = 0
    max_steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-2
    val_size: int = 1000
    eval_every: int = 25
    progress: bool = True


@dataclass(frozen=True)
class DemoResult:
    solved: bool
    val_mse: float
    steps: int
    samples: int
    seconds: float


def adding_batch(n: int, T: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` sequences of the adding problem: input ``[T, n, 2]`` (value, marker), target ``[n]``."""
    values = torch.rand(T, n, generator=gen)
    rows = torch.arange(n)
    first = torch.randint(0, T // 2, (n,), generator=gen)
    second = torch.randint(T // 2, T, (n,), generator=gen)
    markers = torch.zeros(T, n)
    markers[first, rows] = 1.0
    markers[second, rows] = 1.0
    target = values[first, rows] + values[second, rows]
    return torch.stack([values, markers], dim=-1), target


class AddingModel(nn.Module):
    """An LSTM over the sequence, then a linear read-out of its last output."""

    def __init__(self, lstm: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.lstm = lstm
        self.head = nn.Linear(hidden_size, 1)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(x)  # [T, N, H]
        return self.head(out[-1]).squeeze(-1)  # [N]


def train(config: DemoConfig, make_lstm: LSTMFactory | None = None) -> DemoResult:
    """Train until the validation MSE is below :data:`GOAL_MSE` or ``max_steps`` have run.

    ``make_lstm`` builds the recurrent layer (default: ``rnnkit.LSTM`` on ``config.engine``);
    passing ``torch.nn.LSTM`` runs the same demo on torch's layer.
    """
    if make_lstm is None:

        def make_lstm(input_size: int, hidden_size: int) -> nn.Module:
            return rnnkit.LSTM(
                input_size, hidden_size, engine=config.engine, **VARIANTS[config.variant]
            )

    torch.manual_seed(config.seed)
    model = AddingModel(make_lstm(2, config.hidden_size), config.hidden_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    # the held-out batch has a stream of its own: the same for every --seed
    val_gen = torch.Generator().manual_seed(_VALIDATION_SEED)
    val_x, val_y = adding_batch(config.val_size, config.seq_len, val_gen)
    gen = torch.Generator().manual_seed(config.seed)

    def validate() -> float:
        model.eval()
        with torch.no_grad():
            mse = nn.functional.mse_loss(model(val_x), val_y).item()
        model.train()
        return mse

    start = time.perf_counter()
    val_mse = validate()
    step = 0
    bar = progress(config.max_steps, "adding problem", enabled=config.progress, unit="step")
    with bar:
        bar.set_postfix(val_mse=f"{val_mse:.4f}")
        while step < config.max_steps and val_mse >= GOAL_MSE:
            x, y = adding_batch(config.batch_size, config.seq_len, gen)
            loss = nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # at this learning rate, unclipped steps spike the loss and cost ~40% more steps
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            bar.update()
            if step % config.eval_every == 0 or step == config.max_steps:
                val_mse = validate()
                bar.set_postfix(val_mse=f"{val_mse:.4f}")
    seconds = time.perf_counter() - start
    return DemoResult(
        solved=val_mse < GOAL_MSE,
        val_mse=val_mse,
        steps=step,
        samples=step * config.batch_size,
        seconds=seconds,
    )


def add_parser(subparsers) -> argparse.ArgumentParser:
    defaults = DemoConfig()
    parser = subparsers.add_parser(
        "demo",
        help="train an rnnkit.LSTM on the adding problem",
        description=(
            "Train rnnkit.LSTM on the adding problem (Hochreiter & Schmidhuber, 1997) until its "
            f"validation MSE is below {GOAL_MSE:.4f}, ten times better than always answering "
            "1.0. Exits 1 if --max-steps run out first."
        ),
    )
    add = parser.add_argument
    add(
        "--seq-len",
        type=_at_least(2),
        default=defaults.seq_len,
        help="steps per sequence, T (default: %(default)s)",
    )
    add(
        "--hidden-size",
        type=_at_least(1),
        default=defaults.hidden_size,
        help="the LSTM's hidden size (default: %(default)s)",
    )
    add(
        "--engine",
        default=defaults.engine,
        choices=["auto", *rnnkit.functional.available_engines()],
        help="rnnkit engine of the LSTM (default: %(default)s)",
    )
    add(
        "--variant",
        choices=list(VARIANTS),
        default=defaults.variant,
        help="train an LSTM variant of rnnkit.variants (default: %(default)s)",
    )
    add(
        "--seed",
        type=_seed,
        default=defaults.seed,
        help="seed of the init and the training data (default: %(default)s)",
    )
    add(
        "--max-steps",
        type=_at_least(1),
        default=defaults.max_steps,
        help="give up (exit 1) after this many steps (default: %(default)s)",
    )
    add(
        "--batch-size",
        type=_at_least(1),
        default=defaults.batch_size,
        help="sequences per step (default: %(default)s)",
    )
    add(
        "--lr",
        type=_positive_float,
        default=defaults.lr,
        help="Adam's learning rate (default: %(default)s)",
    )
    # The demo's matrices (64 sequences of 64 units) are too small for intra-op threads to
    # pay for their synchronisation; on a busy machine, threads waiting on each other make
    # each step several times slower. One thread is the fast and steady default.
    add(
        "--threads",
        type=_at_least(1),
        default=1,
        help="torch.set_num_threads for the run (default: %(default)s)",
    )
    add_progress_argument(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    config = DemoConfig(
        seq_len=args.seq_len,
        hidden_size=args.hidden_size,
        engine=args.engine,
        variant=args.variant,
        seed=args.seed,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        progress=args.progress,
    )
    keywords = "".join(f", {k}={v!r}" for k, v in VARIANTS[config.variant].items())
    print(
        f"rnnkit demo: rnnkit.LSTM(2, {config.hidden_size}, engine={config.engine!r}{keywords}) "
        f"on the adding problem, T={config.seq_len}, {torch.get_num_threads()} thread(s)"
    )
    if config.engine in ("auto", "fused"):
        print(kernels_line())
    result = train(config)
    print(report(result))
    return 0 if result.solved else 1


def kernels_line() -> str:
    """The fused kernels made ready before training, so that their build (once per
    environment) is not in the training time."""
    kernels = build.summary()
    if "error" in kernels:
        return f"fused CPU kernels unavailable: {kernels['error']}"
    if kernels["build_s"]:
        return (
            f"fused CPU kernels: built in {kernels['build_s']:.1f} s (once; not in the time below)"
        )
    return f"fused CPU kernels: loaded in {1000 * kernels['load_s']:.0f} ms (built before)"


def report(result: DemoResult) -> str:
    verdict = (
        f"solved in {result.steps} steps"
        if result.solved
        else f"NOT solved: the goal was not reached in {result.steps} steps (--max-steps)"
    )
    return (
        f"{verdict} ({result.samples} sequences seen, {result.seconds:.1f} s)\n"
        f"validation MSE {result.val_mse:.4f} = {result.val_mse / TRIVIAL_MSE:.3f} x the trivial "
        f"predictor's {TRIVIAL_MSE:.4f} (goal: below {GOAL_MSE:.4f})"
    )


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    # argparse names the type in its message for a non-number: "invalid int value"
    parse.__name__ = "int"
    return parse


def _positive_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


_positive_float.__name__ = "float"


def _seed(text: str) -> int:
    value = int(text)
    # what torch.manual_seed accepts
    if not -(2**63) <= value < 2**64:
        raise argparse.ArgumentTypeError(f"must be in [-2**63, 2**64), got {value}")
    return value


_seed.__name__ = "int"

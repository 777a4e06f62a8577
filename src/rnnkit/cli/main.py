"""The ``rnnkit`` command: parses the arguments and runs the subcommand.

Each subcommand is a module of this package that exposes ``add_parser(subparsers)``, which adds
its parser and returns it, and ``run(args) -> int``, which does the work and returns the exit
status. Adding a subcommand is adding its module and its name to :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

import rnnkit

# In the order ``rnnkit --help`` lists them.
COMMANDS = ("demo", "check", "bench", "build")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rnnkit",
        description="PyTorch's recurrent layers rebuilt in Python: exact drop-ins for torch.nn.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {rnnkit.__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        command = importlib.import_module(f"rnnkit.cli.{name}")
        command.add_parser(subparsers).set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``rnnkit`` with ``argv`` (default: the command line); returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`rnnkit check | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141

"""Progress bars for the long-running subcommands: on stderr, and only for a person to watch.

A bar is drawn only when stderr is a terminal and the user did not pass ``--no-progress``, so
logs and pipes get the results alone.
"""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm


def add_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--no-progress`` to a subcommand's parser (read back as ``args.progress``)."""
    parser.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="do not draw a progress bar (none is drawn when stderr is not a terminal)",
    )


def progress(total: int | None, desc: str, *, enabled: bool = True, unit: str = "it") -> tqdm:
    """A tqdm bar on stderr, silent (every method a no-op) unless enabled and on a terminal.

    The bar is cleared when closed, so that the results printed after it stand alone.
    """
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        disable=not (enabled and sys.stderr.isatty()),
        dynamic_ncols=True,
        leave=False,
    )

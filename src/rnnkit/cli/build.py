"""``rnnkit build``: build the fused CPU engine's kernels now, not at their first use.

Prints where the library is, whether it was built or found, and in how many seconds; with
``--json``, that as data. Exit status 1 when the kernels cannot be had (the message says why).
"""

from __future__ import annotations

import argparse
import json
import sys

from rnnkit.engines.cpu import build


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "build",
        help="build the fused CPU engine's kernels ahead of their first use",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument(
        "--force", action="store_true", help="build anew even when a finished build is cached"
    )
    parser.add_argument(
        "--json", action="store_true", help="print the build's folder, key and timing as JSON"
    )
    return parser


def run(args: argparse.Namespace) -> int:
    try:
        loaded = build.prepare(force=args.force)
    except build.BuildError as e:
        print(f"rnnkit build: {e}", file=sys.stderr)
        return 1
    if args.json:
        info = {**build.describe(), "build_s": loaded.build_s, "load_s": loaded.load_s}
        print(json.dumps(info, indent=1))
    elif loaded.build_s:
        print(f"rnnkit build: built {loaded.path} in {loaded.build_s:.1f} s")
    else:
        print(f"rnnkit build: up to date, {loaded.path}")
    return 0

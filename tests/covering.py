"""A deterministic all-pairs covering design for the parametrized grids.

The full product of the grid's factors is far too big to run, but most bugs need at most two
factors to line up (bidirectional with packing, proj_size with a given h0, ...). A covering
design of strength two holds every feasible pair of factor values in at least one row, in a few
dozen rows. The generator is the greedy one of AETG (Cohen et al., 1997): each new row starts
from a pair not yet covered and fills the other factors with the value that covers the most
new pairs, keeping the best of a few random candidates. A fixed seed makes it reproducible.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

Row = dict[str, Any]
# ((factor index, value index), (factor index, value index)), first factor index smaller
Pair = tuple[tuple[int, int], tuple[int, int]]


def row_pairs(factors: Mapping[str, Sequence[Any]], row: Row) -> set[Pair]:
    """The pairs of factor values that ``row`` covers."""
    names = list(factors)
    picks = [(i, list(factors[n]).index(row[n])) for i, n in enumerate(names) if n in row]
    return set(itertools.combinations(picks, 2))


def feasible_pairs(factors: Mapping[str, Sequence[Any]], valid: Callable[[Row], bool]) -> set[Pair]:
    """Every pair of factor values that the constraints allow in one row."""
    names = list(factors)
    pairs = set()
    for (i, a), (j, b) in itertools.combinations(enumerate(names), 2):
        for vi, va in enumerate(factors[a]):
            for vj, vb in enumerate(factors[b]):
                if valid({a: va, b: vb}):
                    pairs.add(((i, vi), (j, vj)))
    return pairs


def all_pairs(
    factors: Mapping[str, Sequence[Any]],
    valid: Callable[[Row], bool],
    *,
    seed: int = 0,
    candidates: int = 20,
) -> list[Row]:
    """Rows (factor name -> value) covering every feasible pair of values at least once.

    ``valid`` receives partial rows and must return False as soon as the factors present break
    a constraint; the constraints must be pairwise, so that a row can always be completed.
    """
    names = list(factors)
    rng = random.Random(seed)
    uncovered = feasible_pairs(factors, valid)
    rows: list[Row] = []
    while uncovered:
        best_row, best_gain = None, -1
        for _ in range(candidates):
            (i, vi), (j, vj) = rng.choice(sorted(uncovered))
            row = {names[i]: factors[names[i]][vi], names[j]: factors[names[j]][vj]}
            rest = [n for n in names if n not in row]
            rng.shuffle(rest)
            for name in rest:
                options = [v for v in factors[name] if valid({**row, name: v})]
                gains = [len(row_pairs(factors, {**row, name: v}) & uncovered) for v in options]
                top = max(gains)
                row[name] = rng.choice([v for v, g in zip(options, gains, strict=True) if g == top])
            gain = len(row_pairs(factors, row) & uncovered)
            if gain > best_gain:
                best_row, best_gain = row, gain
        rows.append({n: best_row[n] for n in names})
        uncovered -= row_pairs(factors, best_row)
    return rows

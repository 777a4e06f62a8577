"""The shape registry of ``rnnkit bench``: named layer configurations, each timed as one layer.

A name spells its configuration (``lstm2-L50-N64-H512`` is a 2-layer LSTM over ``L=50`` steps
of a batch of ``N=64`` with ``H_in = H = 512``), so a table row reads without a legend. Adding a
shape is one line in :data:`SHAPES` (or :data:`QUICK_SHAPES`, the tiny set for smoke tests).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

from rnnkit.testing import Case

__all__ = ["QUICK_SHAPES", "SHAPES", "BenchShape", "resolve_shapes"]

# mode (rnnkit.functional's name) -> module key of rnnkit.testing.Case
_CASE_MODULES = {"LSTM": "LSTM", "GRU": "GRU", "RNN_TANH": "RNN(tanh)", "RNN_RELU": "RNN(relu)"}


@dataclass(frozen=True)
class BenchShape:
    """One benchmarked layer: ``mode`` is ``"LSTM"``, ``"GRU"``, ``"RNN_TANH"`` or ``"RNN_RELU"``."""

    name: str
    mode: str
    L: int
    N: int
    H_in: int
    H: int
    num_layers: int = 1
    bidirectional: bool = False
    proj_size: int = 0
    batch_first: bool = False

    def __post_init__(self) -> None:
        if self.mode not in _CASE_MODULES:
            raise ValueError(f"mode must be one of {', '.join(_CASE_MODULES)}, got {self.mode!r}")
        if self.proj_size and self.mode != "LSTM":
            raise ValueError("proj_size is only supported by LSTM")

    @property
    def D(self) -> int:
        return 2 if self.bidirectional else 1

    def with_length(self, L: int) -> BenchShape:
        """The same layer over ``L`` steps (the parity check runs a short version)."""
        return replace(self, L=L)

    def as_dict(self) -> dict:
        return asdict(self)

    def case(self, dtype: torch.dtype) -> Case:
        """This layer as an ``rnnkit.testing.Case``, with the default zero initial state."""
        return Case(
            _CASE_MODULES[self.mode],
            L=self.L,
            N=self.N,
            H_in=self.H_in,
            H=self.H,
            num_layers=self.num_layers,
            batch_first=self.batch_first,
            bidirectional=self.bidirectional,
            proj_size=self.proj_size,
            h0=False,
            dtype=dtype,
        )

    def output_shapes(self) -> list[tuple[int, ...]]:
        """Shapes of the layer's output and final states (``h_n``, then ``c_n`` for LSTM)."""
        H_out = self.proj_size or self.H
        seq = (self.N, self.L) if self.batch_first else (self.L, self.N)
        states = [(self.D * self.num_layers, self.N, H_out)]
        if self.mode == "LSTM":
            states.append((self.D * self.num_layers, self.N, self.H))
        return [(*seq, self.D * H_out), *states]


def _registry(*shapes: BenchShape) -> dict[str, BenchShape]:
    return {s.name: s for s in shapes}


# The default registry: the shapes the recorded benchmarks report.
SHAPES: dict[str, BenchShape] = _registry(
    BenchShape("lstm-L100-N32-H256", "LSTM", L=100, N=32, H_in=256, H=256),
    BenchShape("lstm-L1000-N1-H128", "LSTM", L=1000, N=1, H_in=128, H=128),
    BenchShape("lstm-L200-N16-H64", "LSTM", L=200, N=16, H_in=64, H=64),
    BenchShape("lstm2-L50-N64-H512", "LSTM", L=50, N=64, H_in=512, H=512, num_layers=2),
    BenchShape(
        "lstm-bidir-L100-N16-H128", "LSTM", L=100, N=16, H_in=128, H=128, bidirectional=True
    ),
    BenchShape("gru-L100-N32-H256", "GRU", L=100, N=32, H_in=256, H=256),
    BenchShape("rnn-tanh-L100-N32-H256", "RNN_TANH", L=100, N=32, H_in=256, H=256),
)

# Tiny shapes for ``--quick``: every mode and option once, seconds in all.
QUICK_SHAPES: dict[str, BenchShape] = _registry(
    BenchShape("lstm-L8-N2-H16", "LSTM", L=8, N=2, H_in=16, H=16),
    BenchShape("gru-L8-N2-H16", "GRU", L=8, N=2, H_in=16, H=16),
    BenchShape("rnn-relu-L8-N2-H16", "RNN_RELU", L=8, N=2, H_in=16, H=16),
    BenchShape(
        "lstm2-bidir-proj-L5-N3-H12-P6",
        "LSTM",
        L=5,
        N=3,
        H_in=12,
        H=12,
        num_layers=2,
        bidirectional=True,
        proj_size=6,
    ),  # fmt: skip
)


def resolve_shapes(names: list[str] | None, quick: bool = False) -> list[BenchShape]:
    """The shapes to run: ``names`` from either registry, else the quick or the default set."""
    if not names:
        return list((QUICK_SHAPES if quick else SHAPES).values())
    known = {**SHAPES, **QUICK_SHAPES}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown shape(s) {', '.join(unknown)}; registered: {', '.join(known)}")
    return [known[n] for n in names]

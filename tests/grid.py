"""The parametrized grids of module and cell cases, and how one case runs on torch and rnnkit.

``MODULE_CASES`` is a covering design (see ``covering.py``) over every option of LSTM/GRU/RNN;
``CELL_CASES`` is the full product for the cells, which are cheap. Each engine's tests run the
same grids: ``tests/test_modules.py`` with ``engine="auto"``, ``tests/engines/test_*.py`` with
their engine named.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass, field

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import rnnkit
from covering import all_pairs
from parity import (
    assert_close,
    assert_parity,
    assert_same_structure,
    default_path,
    grads,
    truth_of,
)
from rnnkit.testing import aten_path

MODES = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")
MODE_IDS = {"LSTM": "LSTM", "GRU": "GRU", "RNN_TANH": "RNNtanh", "RNN_RELU": "RNNrelu"}
DTYPE_IDS = {
    torch.float64: "f64",
    torch.float32: "f32",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
}

# (L, N, H_in, H): awkward sizes (L=1, L=63, odd H, N=1, H=2) next to a round one
SIZES = ((1, 3, 4, 8), (63, 3, 5, 7), (6, 1, 3, 5), (7, 5, 3, 2), (9, 4, 16, 16))


def module_class(lib, mode: str) -> type[nn.Module]:
    """``nn.LSTM`` or ``rnnkit.LSTM`` & co. for ``lib`` in (torch.nn, rnnkit)."""
    return getattr(lib, {"RNN_TANH": "RNN", "RNN_RELU": "RNN"}.get(mode, mode))


@dataclass(frozen=True)
class ModuleCase:
    mode: str = "LSTM"
    bias: bool = True
    batch_first: bool = False
    bidirectional: bool = False
    num_layers: int = 1
    proj: bool = False
    batched: bool = True
    h0: bool = False
    packed: str = "none"  # "none", "sorted", "unsorted"
    dtype: torch.dtype = torch.float32
    size: tuple[int, int, int, int] = (5, 3, 4, 6)
    dropout: float = 0.0

    @property
    def D(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def proj_size(self) -> int:
        return self.size[3] // 2 if self.proj else 0

    @property
    def H_out(self) -> int:
        return self.proj_size or self.size[3]

    @property
    def id(self) -> str:
        L, N, _, H = self.size
        parts = [MODE_IDS[self.mode], f"L{L}", f"N{N}" if self.batched else "unbatched", f"H{H}"]
        parts += ["nobias"] if not self.bias else []
        parts += ["bf"] if self.batch_first else []
        parts += ["bidir"] if self.bidirectional else []
        parts += [f"l{self.num_layers}"]
        parts += [f"proj{self.proj_size}"] if self.proj else []
        parts += ["h0"] if self.h0 else []
        parts += {"none": [], "sorted": ["packedS"], "unsorted": ["packedU"]}[self.packed]
        parts += [f"drop{self.dropout}"] if self.dropout else []
        return "-".join(parts + [DTYPE_IDS[self.dtype]])

    @property
    def is_packed(self) -> bool:
        return self.packed != "none"

    def kwargs(self) -> dict:
        """Constructor keywords, the same for torch.nn and rnnkit."""
        _, _, H_in, H = self.size
        kw = dict(
            input_size=H_in,
            hidden_size=H,
            num_layers=self.num_layers,
            bias=self.bias,
            batch_first=self.batch_first,
            dropout=self.dropout,
            bidirectional=self.bidirectional,
            dtype=self.dtype,
        )
        if self.mode == "LSTM":
            kw["proj_size"] = self.proj_size
        if self.mode.startswith("RNN"):
            kw["nonlinearity"] = self.mode[4:].lower()
        return kw

    def modules(self, engine: str = "auto", seed: int = 0) -> tuple[nn.Module, nn.Module]:
        """A torch.nn module and the rnnkit one holding the same weights.

        The weights are torch's init under ``seed``, whatever the test order (the global
        generator is left as it was), so that a failure reproduces when its test runs alone.
        """
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            # dropout on a single layer is legal, and both libraries say it does nothing
            warnings.filterwarnings("ignore", message="dropout option adds dropout")
            torch.manual_seed(seed)
            ref = module_class(nn, self.mode)(**self.kwargs())
            ours = module_class(rnnkit, self.mode)(**self.kwargs(), engine=engine)
        ours.load_state_dict(ref.state_dict(), strict=True)
        return ref, ours

    def inputs(self, seed: int = 0) -> CaseInputs:
        """The input (a leaf, padded when packed), the given states and the packed lengths."""
        gen = torch.Generator().manual_seed(seed)
        L, N, H_in, H = self.size

        def randn(*shape: int) -> Tensor:
            return torch.randn(shape, generator=gen, dtype=self.dtype).requires_grad_()

        if not self.batched:
            x = randn(L, H_in)
        else:
            x = randn(N, L, H_in) if self.batch_first else randn(L, N, H_in)
        states = {}
        if self.h0:
            lead = (self.D * self.num_layers, N) if self.batched else (self.D * self.num_layers,)
            states["h0"] = randn(*lead, self.H_out)
            if self.mode == "LSTM":
                states["c0"] = randn(*lead, H)
        lengths = None
        if self.is_packed:
            lengths = torch.randint(1, L + 1, (N,), generator=gen)
            lengths[torch.randint(0, N, (1,), generator=gen)] = L
            lengths = lengths.sort(descending=True).values
            if self.packed == "unsorted":
                # the longest last, so that sorting really permutes the batch
                lengths = lengths.roll(-1)
        return CaseInputs(x, states, lengths)

    def hx(self, states: dict[str, Tensor]):
        """The ``hx`` argument for the given initial states (None without any)."""
        if not states:
            return None
        return tuple(states.values()) if self.mode == "LSTM" else states["h0"]

    def named(self, output: Tensor, hidden) -> dict[str, Tensor]:
        """A layer's results by name: ``output``, ``h_n`` and for LSTM ``c_n``."""
        tensors = {"output": output}
        if self.mode == "LSTM":
            tensors["h_n"], tensors["c_n"] = hidden
        else:
            tensors["h_n"] = hidden
        return tensors

    def forward(self, module: nn.Module, inp: CaseInputs) -> tuple[dict[str, Tensor], dict]:
        """Run ``module``; returns its tensors by name and the structure to compare exactly."""
        x = inp.x
        if self.is_packed:
            enforce_sorted = self.packed == "sorted"
            x = pack_padded_sequence(x, inp.lengths, self.batch_first, enforce_sorted)
        out, hidden = module(x, self.hx(inp.states))
        structure = {"output_type": type(out).__name__, "hidden_type": type(hidden).__name__}
        if isinstance(out, PackedSequence):
            for name in ("batch_sizes", "sorted_indices", "unsorted_indices"):
                structure[name] = getattr(out, name)
            out = out.data
        if self.mode == "LSTM":
            structure["hidden_len"] = len(hidden)
        return self.named(out, hidden), structure

    def run(self, module: nn.Module, inp: CaseInputs) -> tuple[dict[str, Tensor], dict]:
        """Forward and backward: outputs, final states and every gradient, by name."""
        tensors, structure = self.forward(module, inp)
        leaves = {"input": inp.x, **inp.states, **dict(module.named_parameters())}
        return {**tensors, **grads(tensors, leaves)}, structure

    def truth(self, module: nn.Module, inp: CaseInputs, seed: int | None = None) -> dict | None:
        """The float64 truth of :meth:`run` of ``module`` on ``inp`` (None in float64), from
        ``torch.manual_seed(seed)`` if given (:func:`parity.truth_of`)."""
        return truth_of(lambda m, i: self.run(m, i)[0], module, inp, seed=seed)


@dataclass
class CaseInputs:
    x: Tensor
    states: dict[str, Tensor] = field(default_factory=dict)
    lengths: Tensor | None = None


def _valid(row: dict) -> bool:
    # packing needs a batch
    return row.get("packed", "none") == "none" or row.get("batched", True)


# LSTM with and without projection are two values of one factor, so that each pairs with every
# other option (plain float32 LSTM is the case torch sends to oneDNN).
MODULE_FACTORS = {
    "mode": ("LSTM", "LSTM_PROJ", "GRU", "RNN_TANH", "RNN_RELU"),
    "bias": (True, False),
    "batch_first": (False, True),
    "bidirectional": (False, True),
    "num_layers": (1, 2, 3),
    "batched": (True, False),
    "h0": (False, True),
    "packed": ("none", "sorted", "unsorted"),
    "dtype": (torch.float32, torch.float64),
    "size": SIZES,
}


def _module_case(row: dict) -> ModuleCase:
    proj = row["mode"] == "LSTM_PROJ"
    return ModuleCase(**{**row, "mode": "LSTM" if proj else row["mode"], "proj": proj})


# Two covering designs from two seeds: every pair twice, in different company.
MODULE_CASES = list(
    {
        case.id: case
        for seed in (0, 1)
        for case in map(_module_case, all_pairs(MODULE_FACTORS, _valid, seed=seed))
    }.values()
)


def module_params(cases=MODULE_CASES):
    return [pytest.param(case, id=case.id) for case in cases]


@dataclass(frozen=True)
class CellCase:
    mode: str = "LSTM"
    bias: bool = True
    batched: bool = True
    hx: bool = True
    dtype: torch.dtype = torch.float32
    size: tuple[int, int, int] = (3, 4, 5)  # (N, H_in, H)

    @property
    def id(self) -> str:
        N, _, H = self.size
        parts = [MODE_IDS[self.mode] + "Cell", f"N{N}" if self.batched else "unbatched", f"H{H}"]
        parts += ["nobias"] if not self.bias else []
        parts += ["hx"] if self.hx else []
        return "-".join(parts + [DTYPE_IDS[self.dtype]])

    def kwargs(self) -> dict:
        _, H_in, H = self.size
        kw = dict(input_size=H_in, hidden_size=H, bias=self.bias, dtype=self.dtype)
        if self.mode.startswith("RNN"):
            kw["nonlinearity"] = self.mode[4:].lower()
        return kw

    def modules(self, engine: str = "auto", seed: int = 0) -> tuple[nn.Module, nn.Module]:
        """As :meth:`ModuleCase.modules`, for the cell."""
        name = {"RNN_TANH": "RNNCell", "RNN_RELU": "RNNCell"}.get(self.mode, self.mode + "Cell")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            ref = getattr(nn, name)(**self.kwargs())
            ours = getattr(rnnkit, name)(**self.kwargs(), engine=engine)
        ours.load_state_dict(ref.state_dict(), strict=True)
        return ref, ours

    def inputs(self, seed: int = 0) -> CaseInputs:
        gen = torch.Generator().manual_seed(seed)
        N, H_in, H = self.size
        lead = (N,) if self.batched else ()

        def randn(*shape: int) -> Tensor:
            return torch.randn(shape, generator=gen, dtype=self.dtype).requires_grad_()

        x = randn(*lead, H_in)
        states = {}
        if self.hx:
            states["h0"] = randn(*lead, H)
            if self.mode == "LSTM":
                states["c0"] = randn(*lead, H)
        return CaseInputs(x, states)

    def run(self, module: nn.Module, inp: CaseInputs) -> tuple[dict[str, Tensor], dict]:
        hx = None
        if inp.states:
            hx = tuple(inp.states.values()) if self.mode == "LSTM" else inp.states["h0"]
        out = module(inp.x, hx)
        structure = {"type": type(out).__name__}
        if self.mode == "LSTM":
            structure["len"] = len(out)
            tensors = {"h": out[0], "c": out[1]}
        else:
            tensors = {"h": out}
        leaves = {"input": inp.x, **inp.states, **dict(module.named_parameters())}
        return {**tensors, **grads(tensors, leaves)}, structure

    def truth(self, module: nn.Module, inp: CaseInputs) -> dict | None:
        """As :meth:`ModuleCase.truth`, for one step of the cell."""
        return truth_of(lambda m, i: self.run(m, i)[0], module, inp)


# (N, H_in, H): N=1, N=0 (torch allows an empty batch for cells), odd and round sizes
CELL_SIZES = ((1, 3, 5), (0, 4, 3), (4, 7, 9), (8, 16, 16))
CELL_CASES = [
    CellCase(mode, bias, batched, hx, dtype, size)
    for mode, bias, batched, hx, dtype, size in itertools.product(
        MODES,
        (True, False),
        (True, False),
        (True, False),
        (torch.float32, torch.float64),
        CELL_SIZES,
    )
    # an unbatched input has no batch size to vary
    if batched or size == CELL_SIZES[0]
]


def cell_params(cases=CELL_CASES):
    return [pytest.param(case, id=case.id) for case in cases]


def check_module_case(case: ModuleCase, engine: str = "auto", *, seed: int = 0) -> None:
    """rnnkit on ``case`` against torch's ATen path, and to rounding against its default path.

    Against the ATen path the reference engine is bit-identical and any other engine (or
    ``"auto"``) within rounding (:func:`parity.assert_parity`); both float32 comparisons
    measure each side against one float64 run of torch on the case's values. With
    ``case.dropout`` the modules train, and every run starts from the same seed (the masks do
    not depend on the dtype).
    """
    ref, ours = case.modules(engine)
    ref.train(case.dropout > 0)
    ours.train(case.dropout > 0)
    inp = case.inputs(seed)
    with aten_path():
        torch.manual_seed(seed)
        expected, expected_structure = case.run(ref, inp)
    torch.manual_seed(seed)
    actual, structure = case.run(ours, inp)
    assert_same_structure(expected_structure, structure)
    truth = case.truth(ref, inp, seed)
    assert_parity(expected, actual, engine, truth=truth)
    with default_path():
        torch.manual_seed(seed)
        default, _ = case.run(ref, inp)
    assert_close(default, actual, truth=truth)


def check_cell_case(case: CellCase, engine: str = "auto") -> None:
    """As :func:`check_module_case`, for one step of a cell."""
    ref, ours = case.modules(engine)
    inp = case.inputs()
    with aten_path():
        expected, expected_structure = case.run(ref, inp)
    actual, structure = case.run(ours, inp)
    assert structure == expected_structure
    truth = case.truth(ref, inp)
    assert_parity(expected, actual, engine, truth=truth)
    with default_path():
        default, _ = case.run(ref, inp)
    assert_close(default, actual, truth=truth)

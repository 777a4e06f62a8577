"""The registries of ``rnnkit bench``: named layer configurations, each timed as one layer, and
the named variants that ``--variants`` times on the LSTM shapes.

A name spells its configuration (``lstm2-L50-N64-H512`` is a 2-layer LSTM over ``L=50`` steps
of a batch of ``N=64`` with ``H_in = H = 512``; ``lstm-L100-N32-H256+layer_norm`` is that layer
with the variant ``layer_norm``; ``lstm-L100-N32-H256+resets50`` is that layer called with a
seeded reset mask of about one reset per 50 steps of each sequence, as ``--resets 50`` times
it), so a table row reads without a legend. Adding a shape is one line in :data:`SHAPES` (or
:data:`QUICK_SHAPES`, the tiny set for smoke tests); adding a variant is one line in
:data:`VARIANTS`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from torch import Tensor, nn

import rnnkit
from rnnkit.testing import Case
from rnnkit.variants import make_variant

__all__ = [
    "GPU_SHAPES",
    "QUICK_SHAPES",
    "SHAPES",
    "VARIANTS",
    "BenchShape",
    "resolve_shapes",
    "resolve_variants",
]

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
    # the name of a VARIANTS entry and its keywords for this layer; "" and () for the plain layer
    variant: str = ""
    variant_keywords: tuple[tuple[str, object], ...] = ()
    # EVERY of ``--resets``: called with reset=, each (step, sequence) a reset with
    # probability 1/EVERY (reset_mask); 0 for a call without
    resets: int = 0

    def __post_init__(self) -> None:
        if self.mode not in _CASE_MODULES:
            raise ValueError(f"mode must be one of {', '.join(_CASE_MODULES)}, got {self.mode!r}")
        if self.proj_size and self.mode != "LSTM":
            raise ValueError("proj_size is only supported by LSTM")
        if self.variant_keywords:
            make_variant(self.mode, **dict(self.variant_keywords))
        if self.resets < 0:
            raise ValueError(f"resets must be at least 1 (or 0 for none), got {self.resets}")

    @property
    def D(self) -> int:
        return 2 if self.bidirectional else 1

    def with_length(self, L: int) -> BenchShape:
        """The same layer over ``L`` steps (the parity check runs a short version)."""
        return replace(self, L=L)

    def with_variant(self, variant: str) -> BenchShape:
        """This layer with the registered variant ``variant``, named ``<name>+<variant>``.

        Keywords that act on a projection (``proj_clip``) are dropped where the layer has none.
        """
        if self.variant:
            raise ValueError(f"{self.name} already has a variant")
        if self.mode != "LSTM":
            raise ValueError(f"variants are benchmarked on LSTM shapes; {self.name} is {self.mode}")
        (variant,) = resolve_variants([variant])
        keywords = {
            k: v for k, v in VARIANTS[variant].items() if self.proj_size or k not in _NEEDS_PROJ
        }
        return replace(
            self,
            name=f"{self.name}+{variant}",
            variant=variant,
            variant_keywords=tuple(keywords.items()),
        )

    def with_resets(self, every: int) -> BenchShape:
        """This layer called with :meth:`reset_mask` of probability ``1/every``, named
        ``<name>+resets<every>``."""
        if self.resets:
            raise ValueError(f"{self.name} already has resets")
        if every < 1:
            raise ValueError(f"resets must be at least 1, got {every}")
        return replace(self, name=f"{self.name}+resets{every}", resets=every)

    def reset_mask(self, device: torch.device | str = "cpu", seed: int = 0) -> Tensor | None:
        """The ``reset=`` of this layer's call, in its layout (``[L, N]``, ``[N, L]`` with
        ``batch_first``): each entry true with probability ``1/resets``, drawn on the CPU from
        ``seed``, so that every device and dtype sees the same mask; None without resets."""
        if not self.resets:
            return None
        gen = torch.Generator().manual_seed(seed + 3)
        mask = torch.rand(self.L, self.N, generator=gen, dtype=torch.float64) < 1 / self.resets
        return (mask.t() if self.batch_first else mask).contiguous().to(device)

    def as_dict(self) -> dict:
        """The fields as plain data; ``variant`` and ``variant_keywords`` only for a variant,
        ``resets`` only for a call with resets."""
        fields = asdict(self)
        keywords = dict(fields.pop("variant_keywords"))
        if fields.pop("variant"):
            fields.update(variant=self.variant, variant_keywords=keywords)
        if not fields.pop("resets"):
            return fields
        return {**fields, "resets": self.resets}

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

    def modules(
        self, engine: str, dtype: torch.dtype, device: torch.device | str = "cpu", seed: int = 0
    ) -> tuple[nn.Module, nn.Module]:
        """``torch.nn``'s plain layer (torch's init, seeded) and rnnkit's on ``engine``.

        Without a variant, rnnkit's layer has torch's weights (``Case.modules``). With one, it is
        built under the same seed, so that torch's parameters get the same numbers (but for the
        shift of ``forget_bias``); the variant's own parameters (peepholes, layer-norm gains
        and shifts) are moved off their constant init by seeded noise of torch's init scale,
        so that a parity check sees them at work.
        """
        case = self.case(dtype)
        expected, actual = case.modules(engine, device, seed)
        if not self.variant:
            return expected, actual
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            actual = rnnkit.LSTM(
                **case.kwargs(), dtype=dtype, engine=engine, **dict(self.variant_keywords)
            )
        torch_names = set(expected.state_dict())
        gen = torch.Generator().manual_seed(seed + 2)
        stdv = self.H**-0.5
        with torch.no_grad():
            for name, p in actual.named_parameters():
                if name not in torch_names:
                    noise = torch.rand(p.shape, generator=gen, dtype=torch.float64) * 2 - 1
                    p.add_(noise.mul_(stdv).to(p.dtype))
        return expected, actual.to(device)


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

# The default set with ``--device cuda``: the Triton engine's targets against cuDNN, FlashRNN's
# published shape (N=16, L=1024, H_in=H=768) and small batches and hidden sizes, where the
# persistent kernels save a launch per step.
GPU_SHAPES: dict[str, BenchShape] = _registry(
    BenchShape("lstm-L1024-N16-H768", "LSTM", L=1024, N=16, H_in=768, H=768),
    BenchShape("lstm-L1024-N16-H256", "LSTM", L=1024, N=16, H_in=256, H=256),
    BenchShape("lstm-L1024-N8-H128", "LSTM", L=1024, N=8, H_in=128, H=128),
    BenchShape("lstm-L1024-N1-H64", "LSTM", L=1024, N=1, H_in=64, H=64),
    BenchShape("gru-L1024-N16-H256", "GRU", L=1024, N=16, H_in=256, H=256),
    BenchShape("rnn-tanh-L1024-N16-H256", "RNN_TANH", L=1024, N=16, H_in=256, H=256),
    BenchShape("lstm-L200-N64-H512", "LSTM", L=200, N=64, H_in=512, H=512),
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


# Variants for ``--variants``: each timed on the LSTM shapes against the plain torch.nn.LSTM.
VARIANTS: dict[str, dict[str, object]] = {
    "layer_norm": {"layer_norm": True},
    "peephole": {"peephole": True},
    "zoneout": {"zoneout": (0.1, 0.1)},
    "recurrent_dropout": {"recurrent_dropout": 0.25},
    "weight_dropout": {"weight_dropout": 0.25},
    "forget_bias": {"forget_bias": 1.0},
    "clip": {"gate_clip": 3.0, "cell_clip": 3.0, "proj_clip": 3.0},
    "coupled_input_forget": {"coupled_input_forget": True},
}
# keywords that act on the projection: left out of a variant where the layer has proj_size=0
_NEEDS_PROJ = frozenset({"proj_clip"})


def resolve_variants(names: list[str] | None) -> list[str]:
    """The variants to run: ``names`` from :data:`VARIANTS`, else all of them."""
    if not names:
        return list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(
            f"unknown variant(s) {', '.join(unknown)}; registered: {', '.join(VARIANTS)}"
        )
    return list(dict.fromkeys(names))


def resolve_shapes(
    names: list[str] | None, quick: bool = False, device: str = "cpu"
) -> list[BenchShape]:
    """The shapes to run: ``names`` from any registry, else the quick set, or the default set
    of the device (:data:`GPU_SHAPES` on CUDA)."""
    if not names:
        if quick:
            return list(QUICK_SHAPES.values())
        return list((GPU_SHAPES if device.startswith("cuda") else SHAPES).values())
    known = {**SHAPES, **GPU_SHAPES, **QUICK_SHAPES}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown shape(s) {', '.join(unknown)}; registered: {', '.join(known)}")
    return [known[n] for n in names]

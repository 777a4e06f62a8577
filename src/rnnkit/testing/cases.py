"""The cases that rnnkit and ``torch.nn`` run alike: a layer or cell, its input, the
forward and backward that give every tensor to compare, and the float64 truth of a case."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import rnnkit
from rnnkit.testing.comparison import below_float64, float64_copy


@contextlib.contextmanager
def aten_path(device: torch.device | str = "cpu") -> Iterator[None]:
    """Run torch's recurrent layers on ATen's native loops: oneDNN off (cuDNN off on CUDA)."""
    with contextlib.ExitStack() as stack:
        # Toggling oneDNN warns about an Intel-GPU-only TF32 setting on every CPU build.
        stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
        stack.enter_context(torch.backends.mkldnn.flags(enabled=False))
        if torch.device(device).type == "cuda":
            stack.enter_context(torch.backends.cudnn.flags(enabled=False))
        yield


# module key -> (class name in torch.nn and rnnkit, extra constructor keywords)
MODULES: dict[str, tuple[str, dict]] = {
    "LSTM": ("LSTM", {}),
    "GRU": ("GRU", {}),
    "RNN(tanh)": ("RNN", {"nonlinearity": "tanh"}),
    "RNN(relu)": ("RNN", {"nonlinearity": "relu"}),
    "LSTMCell": ("LSTMCell", {}),
    "GRUCell": ("GRUCell", {}),
    "RNNCell(tanh)": ("RNNCell", {"nonlinearity": "tanh"}),
    "RNNCell(relu)": ("RNNCell", {"nonlinearity": "relu"}),
}


@dataclass(frozen=True)
class Case:
    """One layer or cell and its input: ``L`` steps of a batch of ``N``, ``H_in`` -> ``H``.

    A cell runs ``L`` steps in a Python loop, its state fed back, so that the gradients go
    through time as a layer's do. ``packed`` feeds the layer a ``PackedSequence`` of random
    lengths (``enforce_sorted=False``); ``batched=False`` drops the batch dimension; ``h0``
    passes a random initial state (else the default zeros).
    """

    module: str
    L: int = 5
    N: int = 3
    H_in: int = 4
    H: int = 6
    num_layers: int = 1
    bias: bool = True
    batch_first: bool = False
    bidirectional: bool = False
    proj_size: int = 0
    packed: bool = False
    batched: bool = True
    h0: bool = True
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.module not in MODULES:
            raise ValueError(f"module must be one of {', '.join(MODULES)}, got {self.module!r}")
        if self.is_cell and (
            self.num_layers != 1 or self.batch_first or self.bidirectional or self.packed
        ):
            raise ValueError(f"{self.module} takes no num_layers/batch_first/bidirectional/packing")
        if self.proj_size and self.module != "LSTM":
            raise ValueError("proj_size is only supported by LSTM")
        if self.packed and not self.batched:
            raise ValueError("a packed input needs a batch")

    @property
    def is_cell(self) -> bool:
        return self.module.endswith(("Cell", "Cell(tanh)", "Cell(relu)"))

    @property
    def is_lstm(self) -> bool:
        return self.module.startswith("LSTM")

    @property
    def D(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def H_out(self) -> int:
        return self.proj_size or self.H

    @property
    def config(self) -> str:
        """The configuration in a few words, e.g. ``L5-N3-H6-l2-bidir-proj3-packed``."""
        parts = [f"L{self.L}", f"N{self.N}" if self.batched else "unbatched", f"H{self.H}"]
        parts += [f"l{self.num_layers}"] if self.num_layers != 1 else []
        parts += ["bidir"] if self.bidirectional else []
        parts += [f"proj{self.proj_size}"] if self.proj_size else []
        parts += ["bf"] if self.batch_first else []
        parts += ["packed"] if self.packed else []
        parts += ["nobias"] if not self.bias else []
        parts += [] if self.h0 else ["no-h0"]
        return "-".join(parts)

    @property
    def id(self) -> str:
        return f"{self.module}-{self.config}-{str(self.dtype).removeprefix('torch.')}"

    def with_dtype(self, dtype: torch.dtype) -> Case:
        return replace(self, dtype=dtype)

    def kwargs(self) -> dict:
        """Constructor keywords, the same for torch.nn and rnnkit."""
        _, extra = MODULES[self.module]
        kw = {"input_size": self.H_in, "hidden_size": self.H, "bias": self.bias, **extra}
        if not self.is_cell:
            kw.update(
                num_layers=self.num_layers,
                batch_first=self.batch_first,
                bidirectional=self.bidirectional,
            )
        if self.proj_size:
            kw["proj_size"] = self.proj_size
        return kw

    def modules(
        self, engine: str = "auto", device: torch.device | str = "cpu", seed: int = 0
    ) -> tuple[nn.Module, nn.Module]:
        """The ``torch.nn`` module (torch's init, seeded) and rnnkit's with the same weights."""
        name, _ = MODULES[self.module]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            expected = getattr(nn, name)(**self.kwargs(), dtype=self.dtype)
            actual = getattr(rnnkit, name)(**self.kwargs(), dtype=self.dtype, engine=engine)
        actual.load_state_dict(expected.state_dict(), strict=True)
        return expected.to(device), actual.to(device)

    def inputs(self, device: torch.device | str = "cpu", seed: int = 0) -> dict[str, Tensor]:
        """The leaves: ``input`` (padded when packed), ``h_0`` (``c_0``); and ``lengths``.

        Drawn on the CPU in float64, then cast, so that every device and dtype sees the same
        numbers.
        """
        gen = torch.Generator().manual_seed(seed)

        def randn(*shape: int) -> Tensor:
            t = torch.randn(shape, generator=gen, dtype=torch.float64)
            return t.to(device=device, dtype=self.dtype).requires_grad_()

        batch = (self.N,) if self.batched else ()
        if self.is_cell:
            x = randn(self.L, *batch, self.H_in)
        elif self.batch_first and self.batched:
            x = randn(self.N, self.L, self.H_in)
        else:
            x = randn(self.L, *batch, self.H_in)
        leaves = {"input": x}
        if self.h0:
            layers = () if self.is_cell else (self.D * self.num_layers,)
            leaves["h_0"] = randn(*layers, *batch, self.H_out)
            if self.is_lstm:
                leaves["c_0"] = randn(*layers, *batch, self.H)
        if self.packed:
            lengths = torch.randint(1, self.L + 1, (self.N,), generator=gen)
            # the longest not first, so that sorting really permutes the batch
            lengths[-1] = self.L
            leaves["lengths"] = lengths
        return leaves


def _forward(case: Case, module: nn.Module, leaves: Mapping[str, Tensor]) -> dict[str, Tensor]:
    x = leaves["input"]
    hx = None
    if "h_0" in leaves:
        hx = (leaves["h_0"], leaves["c_0"]) if case.is_lstm else leaves["h_0"]
    if case.is_cell:
        outputs = []
        for x_t in x.unbind(0):
            hx = module(x_t, hx)
            outputs.append(hx[0] if case.is_lstm else hx)
        named = {"output": torch.stack(outputs)}
        hidden = hx
    else:
        if case.packed:
            x = pack_padded_sequence(x, leaves["lengths"], case.batch_first, enforce_sorted=False)
        # a bool mask, passed as it is: torch.nn's layers take no reset=
        reset = {"reset": leaves["reset"]} if "reset" in leaves else {}
        out, hidden = module(x, hx, **reset)
        named = {"output": out.data if isinstance(out, PackedSequence) else out}
    if case.is_lstm:
        named["h_n"], named["c_n"] = hidden
    else:
        named["h_n"] = hidden
    return named


def run(case: Case, module: nn.Module, leaves: Mapping[str, Tensor], seed: int = 0) -> dict:
    """Forward, then backward of ``sum_k (out_k * w_k).sum()``: every tensor to compare.

    The weights ``w_k`` depend only on ``seed`` and the shapes (drawn on the CPU in float64,
    rounded to ``case.dtype``), so torch's run, rnnkit's and a float64 run of the same case
    (:func:`run_truth`) get the same upstream gradients. Returns ``output``, ``h_n``
    (``c_n``), then ``grad_<leaf>`` for ``input``, ``h_0`` (``c_0``) and every parameter.
    A ``reset`` among ``leaves`` (a bool mask, not a leaf of the gradient) is the layer's
    ``reset=``.
    """
    named = _forward(case, module, leaves)
    gen = torch.Generator().manual_seed(seed + 1)
    # rounded to the case's dtype first: a float64 truth of the case gets the same weights
    weights = [
        torch.randn(t.shape, generator=gen, dtype=torch.float64).to(case.dtype).to(t)
        for t in named.values()
    ]
    loss = sum((t * w).sum() for t, w in zip(named.values(), weights, strict=True))
    wrt = {k: v for k, v in leaves.items() if k not in ("lengths", "reset")}
    wrt.update(module.named_parameters())
    grads = torch.autograd.grad(loss, list(wrt.values()), allow_unused=True)
    named = {k: v.detach() for k, v in named.items()}
    named.update({f"grad_{k}": g for k, g in zip(wrt, grads, strict=True)})
    return named


def run_pair(
    case: Case,
    engine: str = "auto",
    device: torch.device | str = "cpu",
    *,
    torch_path: str = "default",
    seed: int = 0,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(actual, expected)``: :func:`run` of rnnkit's module on ``engine`` and of torch's.

    ``torch_path`` is ``"aten"`` (torch under :func:`aten_path`) or ``"default"``.
    """
    if torch_path not in ("aten", "default"):
        raise ValueError(f"torch_path must be 'aten' or 'default', got {torch_path!r}")
    expected_module, actual_module = case.modules(engine, device, seed)
    leaves = case.inputs(device, seed)
    context = aten_path(device) if torch_path == "aten" else contextlib.nullcontext()
    with context, warnings.catch_warnings():
        # torch leaves LSTM with projections to ATen on CPU anyway, and says so
        warnings.filterwarnings("ignore", message="LSTM with projections is not supported")
        expected = run(case, expected_module, leaves, seed)
    actual = run(case, actual_module, leaves, seed)
    return actual, expected


def run_truth(case: Case, seed: int = 0) -> dict[str, Tensor] | None:
    """The float64 truth of ``case`` for :func:`compare_all`: :func:`run` of torch.nn's module
    on the same weights and inputs upcast to float64 (:func:`float64_copy`), on the CPU. None
    for a float64 case, which keeps its fixed tolerances."""
    if not below_float64(case.dtype):
        return None
    expected_module, _ = case.modules("reference", "cpu", seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LSTM with projections is not supported")
        return run(
            case, float64_copy(expected_module), float64_copy(case.inputs("cpu", seed)), seed
        )

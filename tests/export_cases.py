"""Models and inputs shared by the export tests (``torch.onnx.export(dynamo=True)``,
``torch.export`` with AOTInductor, ``rnnkit.portable()`` with ExecuTorch).

Each case is ``(model, inputs(L, N), dynamic_shapes)``: the tests export at ``L=10, N=3`` with
the sequence length and the batch symbolic and run at :data:`SIZES`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.export import Dim

import rnnkit
from parity import assert_engine_close
from rnnkit.testing import float64_copy

SIZES = [(13, 2), (5, 4)]  # (L, N) run; the export uses (10, 3)


class Head(nn.Module):
    """``Linear(layer(x, lengths=lengths))``, returning the head's output and the states."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        features = (layer.proj_size or layer.hidden_size) * (2 if layer.bidirectional else 1)
        self.head = nn.Linear(features, 2, dtype=layer.weight_ih_l0.dtype)

    def forward(self, x, lengths=None):
        y, hidden = self.layer(x, lengths=lengths)
        hidden = hidden if isinstance(hidden, tuple) else (hidden,)
        return (self.head(y), *hidden)


class WithResets(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x, reset):
        y, (h, c) = self.layer(x, reset=reset)
        return y, h, c


class Cells(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = rnnkit.LSTMCell(4, 8)
        self.gru = rnnkit.GRUCell(8, 8, layer_norm=True)

    def forward(self, x, h, c):
        h, c = self.lstm(x, (h, c))
        return self.gru(h), c


class Tagger(nn.Module):
    """Embedding -> LSTM(proj_size, bidirectional, 2 layers) -> Linear, tokens ``[N, L]``."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.lstm = rnnkit.LSTM(16, 32, 2, proj_size=8, bidirectional=True, batch_first=True)
        self.head = nn.Linear(16, 5)

    def forward(self, tokens):
        return self.head(self.lstm(self.embed(tokens))[0])


def random_lengths(L: int, N: int) -> torch.Tensor:
    lengths = torch.randint(1, L + 1, (N,))
    lengths[0] = L
    return lengths


def head_case(layer: nn.Module):
    dtype = layer.weight_ih_l0.dtype

    def inputs(L: int, N: int):
        shape = (N, L, 4) if layer.batch_first else (L, N, 4)
        return torch.randn(shape, dtype=dtype), random_lengths(L, N)

    x_dims = {0: Dim("N"), 1: Dim("L")} if layer.batch_first else {0: Dim("L"), 1: Dim("N")}
    return Head(layer), inputs, {"x": x_dims, "lengths": {0: Dim("N")}}


def reset_case():
    def inputs(L: int, N: int):
        return torch.randn(L, N, 4), torch.rand(L, N) < 0.3

    dims = {0: Dim("L"), 1: Dim("N")}
    return WithResets(rnnkit.LSTM(4, 8, bidirectional=True)), inputs, {"x": dims, "reset": dims}


def cells_case():
    def inputs(L: int, N: int):
        return torch.randn(N, 4), torch.randn(N, 8), torch.randn(N, 8)

    return Cells(), inputs, {name: {0: Dim("N")} for name in ("x", "h", "c")}


def tagger_case():
    def inputs(L: int, N: int):
        return (torch.randint(0, 50, (N, L)),)

    return Tagger(), inputs, {"tokens": {0: Dim("N"), 1: Dim("L")}}


def flat(out) -> list[torch.Tensor]:
    """The tensors of ``out`` (nested tuples), in order."""
    return list(torch.utils._pytree.tree_leaves(out))


def check(got: list[torch.Tensor], model: nn.Module, inputs: tuple, title: str) -> None:
    """``got`` to rounding of eager's outputs, against the float64 run as the truth."""
    with torch.no_grad():
        want = flat(model(*inputs))
        truth = flat(float64_copy(model)(*float64_copy(inputs)))
    names = [f"out{j}" for j in range(len(want))]
    float32 = want[0].dtype == torch.float32
    assert_engine_close(
        dict(zip(names, want, strict=True)),
        dict(zip(names, got, strict=True)),
        dict(zip(names, truth, strict=True)) if float32 else None,
        title,
    )

"""Dynamic int8 quantization of rnnkit's and torch.nn's recurrent layers for CPU inference.

:func:`quantize_dynamic` replaces every LSTM, GRU, RNN and cell of a model by one whose
weights are int8 per output channel (:mod:`rnnkit.quantized.weights`) and whose activations
are quantized per row as each product needs them, as torch.ao's dynamic LSTM quantizes them
per call; states and outputs stay float32 (:mod:`rnnkit.quantized.reference` has the math).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from rnnkit import cell_modules, modules
from rnnkit.quantized import layers as Q
from rnnkit.quantized.layers import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell, kernel
from rnnkit.quantized.weights import QWeight

__all__ = [
    "FLOAT32_ERROR", "GRU", "GRUCell", "LSTM", "LSTMCell", "QWeight", "RNN", "RNNCell", "kernel",
    "quantize_dynamic",
]  # fmt: skip

# The documented accuracy: on torch's init with inputs of unit scale, the outputs and final
# states of an int8 layer are within this of the float32 layer's (measured: 1e-3 to 7e-3 over
# the test grid and the deploy bench's shapes).
FLOAT32_ERROR = 2e-2

_TO_INT8: dict[type[nn.Module], type[nn.Module]] = {
    nn.LSTM: Q.LSTM, modules.LSTM: Q.LSTM,
    nn.GRU: Q.GRU, modules.GRU: Q.GRU,
    nn.RNN: Q.RNN, modules.RNN: Q.RNN,
    nn.LSTMCell: Q.LSTMCell, cell_modules.LSTMCell: Q.LSTMCell,
    nn.GRUCell: Q.GRUCell, cell_modules.GRUCell: Q.GRUCell,
    nn.RNNCell: Q.RNNCell, cell_modules.RNNCell: Q.RNNCell,
}  # fmt: skip


def _quantized(m: nn.Module, cls: type[nn.Module]) -> nn.Module:
    variant = getattr(m, "variant", None)
    if variant is not None and not variant.is_plain:
        raise NotImplementedError(
            f"quantize_dynamic: the int8 layers run the plain {type(m).__name__}; this one has "
            f"{variant.describe()}"
        )
    for p in m.parameters(recurse=False):
        if p.device.type != "cpu" and p.device.type != "meta":
            raise ValueError(f"quantize_dynamic: the int8 layers run on the CPU, got {p.device}")
    new = cls(m)
    for attr in ("_forward_hooks", "_forward_pre_hooks"):
        getattr(new, attr).update(getattr(m, attr))
    return new


def _replace(model: nn.Module, memo: dict) -> nn.Module:
    if id(model) in memo:
        return memo[id(model)]
    cls = _TO_INT8.get(type(model))
    memo[id(model)] = _quantized(model, cls) if cls is not None else model
    if cls is None:
        for name, child in list(model._modules.items()):
            if child is not None:
                replaced = _replace(child, memo)
                if replaced is not child:
                    setattr(model, name, replaced)
    return memo[id(model)]


def quantize_dynamic(
    model: nn.Module, dtype: torch.dtype = torch.qint8, *, inplace: bool = False
) -> nn.Module:
    """``model`` with every LSTM, GRU, RNN, LSTMCell, GRUCell and RNNCell (rnnkit's or
    ``torch.nn``'s, exact types) replaced by its dynamically quantized int8 version.

    Weights become int8 per output channel (symmetric, ``max |W_j| / 127``); each call
    quantizes the left side of every product (``x_t``, ``h_{t-1}``) per row to uint8 with a
    zero point, sums in int32 (AVX-512 VNNI where the CPU has it, portable C++ elsewhere:
    :func:`rnnkit.quantized.kernel`) and keeps states and outputs in float32. The layers take
    the same calls as the float ones (``lengths=``, packed input, ``step()``, a carried state)
    and are inference only. The rest of the model is left as it is. Variants other than
    ``forget_bias`` raise ``NotImplementedError``.

    Args:
        model: any module; a layer itself is replaced and returned.
        dtype: ``torch.qint8``, the only one.
        inplace: replace the children of ``model`` itself instead of a deep copy's.

    Examples::

        >>> lstm = rnnkit.LSTM(64, 128).eval()
        >>> q = rnnkit.quantize_dynamic(lstm)
        >>> with torch.no_grad():
        ...     out, (h, c) = q(torch.randn(32, 1, 64))
        >>> out.shape, out.dtype
        (torch.Size([32, 1, 128]), torch.float32)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_dynamic() expects a torch.nn.Module, got {type(model).__name__}")
    if dtype != torch.qint8:
        raise ValueError(f"quantize_dynamic: dtype must be torch.qint8, got {dtype}")
    if not inplace:
        model = copy.deepcopy(model)
    return _replace(model, {})

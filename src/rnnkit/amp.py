"""Automatic mixed precision: the dtypes that ``torch.nn``'s layers give under ``torch.autocast``.

``torch.nn``'s recurrent ops (``lstm``, ``gru``, ``rnn_tanh``, ``rnn_relu`` and the cells) are
in none of autocast's op lists, so on CPU they run ATen's native loops on the tensors as given,
and what autocasts is the ops those loops call, each by its own rule:

- ``linear`` and ``matmul`` (the input and recurrent projections, LSTM's ``proj_size``
  projection) run in the autocast dtype and return it;
- the rest promotes: LSTM's ``c' = f * c + i * g`` and ``h' = o * tanh(c')``, GRU's
  ``h' = (h - n) * z + n`` keep the dtype of the state they were given (float32 if the input
  or ``hx`` is float32), an Elman RNN's ``h'`` is its projection's dtype.

rnnkit's reference engine runs the same ops in the same order, so it gets the same dtypes op by
op, and bit-identical values on the same path. One ``torch.nn`` path differs:
:class:`torch.nn.LSTM` without ``proj_size`` on padded (not packed), non-empty float32 CPU
input runs oneDNN's LSTM when oneDNN is enabled, through ``mkldnn_rnn_layer``, which *is* in
autocast's lower-precision list: its input, states and weights are cast to the autocast dtype,
and the output and both final states come out in it. :func:`cast_like_torch` applies that same
rule to a call before an engine runs it, so rnnkit's outputs have torch's dtypes either way.

The fused CPU engine does not run under autocast; ``engine="auto"`` gives those calls to the
reference engine.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from rnnkit.cells import CellParams
from rnnkit.variants import Variant

__all__ = ["cast_like_torch", "torch_casts_lstm"]


def _onednn_takes(data: Tensor, tensors: Sequence[Tensor]) -> bool:
    """ATen's ``use_mkldnn`` (``aten/src/ATen/native/RNN.cpp``): oneDNN's LSTM runs the call."""
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    if any(t.device.type != "cpu" for t in (data, *tensors)) or data.numel() == 0:
        return False
    if data.dtype == torch.float32:
        return True
    if data.dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if data.dtype == torch.float16:
        return not torch.is_grad_enabled() and torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return False


def torch_casts_lstm(
    mode: str,
    data: Tensor,
    batch_sizes: Tensor | None,
    states: Sequence[Tensor],
    params: Sequence[CellParams],
    variant: Variant,
) -> torch.dtype | None:
    """The dtype that ``torch.nn`` casts a whole layer call to under CPU autocast, or None.

    Only plain LSTM without projections on padded CPU input taken by oneDNN (see the module
    docstring); the variants have no ``torch.nn`` counterpart and keep the per-op rule.
    """
    if mode != "LSTM" or batch_sizes is not None or not variant.is_plain:
        return None
    if params[0].w_hr is not None or not torch.is_autocast_enabled("cpu"):
        return None
    weights = [t for p in params for t in p if t is not None]
    if not _onednn_takes(data, [*states, *weights]):
        return None
    return torch.get_autocast_dtype("cpu")


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    # autocast's rule for an eligible tensor: floating point and not float64
    if t is None or not t.is_floating_point() or t.dtype in (torch.float64, dtype):
        return t
    return t.to(dtype)


def cast_like_torch(
    mode: str,
    data: Tensor,
    batch_sizes: Tensor | None,
    states: list[Tensor],
    params: tuple[CellParams, ...],
    variant: Variant,
) -> tuple[Tensor, list[Tensor], tuple[CellParams, ...]]:
    """``data``, ``states`` and ``params`` as ``torch.nn`` would hand them to its kernel under
    autocast: cast to the autocast dtype where :func:`torch_casts_lstm` says so, else as given.
    The casts are autograd ops, so gradients reach the float32 tensors in float32."""
    dtype = torch_casts_lstm(mode, data, batch_sizes, states, params, variant)
    if dtype is None:
        return data, states, params
    params = tuple(CellParams(*(_cast(t, dtype) for t in p)) for p in params)
    return _cast(data, dtype), [_cast(s, dtype) for s in states], params

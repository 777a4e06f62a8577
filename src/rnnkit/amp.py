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

On CUDA, ``torch.nn``'s layers run cuDNN wherever ``cudnn_is_acceptable`` holds (cuDNN
enabled, a float16/32/64 non-empty input), and cuDNN's autocast wrapper (``_cudnn_rnn`` in
``aten/src/ATen/cudnn/AutocastRNN.cpp``) casts input, states and weights to float16 — float16
whatever dtype autocast was given — for LSTM, GRU and RNN, packed or not, with or without
``proj_size``. :func:`cast_like_torch` applies that rule too. The cells' ops (``lstm_cell``,
``gru_cell``, ``rnn_tanh_cell``, ``rnn_relu_cell``) are in CUDA autocast's lower-precision list
(not CPU's): on CUDA a cell's input, state and weights go to the autocast dtype, which
:func:`cast_cell_like_torch` applies.

The fused CPU engine does not run under autocast; ``engine="auto"`` gives those calls to the
reference engine. The Triton engine runs a call that was cast whole (its tensors all in the
dtype torch's kernel would use), with autocast off inside.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from rnnkit.cells import CellParams
from rnnkit.variants import Variant

__all__ = ["cast_cell_like_torch", "cast_like_torch", "torch_casts_layer"]


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


def _cudnn_takes(data: Tensor, tensors: Sequence[Tensor]) -> bool:
    """ATen's ``cudnn_is_acceptable`` on the input, with everything on CUDA: cuDNN runs it."""
    if not (torch.backends.cudnn.is_available() and torch.backends.cudnn.enabled):
        return False
    if any(t.device.type != "cuda" for t in (data, *tensors)) or data.numel() == 0:
        return False
    return data.dtype in (torch.float16, torch.float32, torch.float64)


def torch_casts_layer(
    mode: str,
    data: Tensor,
    batch_sizes: Tensor | None,
    states: Sequence[Tensor],
    params: Sequence[CellParams],
    variant: Variant,
) -> torch.dtype | None:
    """The dtype that ``torch.nn`` casts a whole layer call to under autocast, or None.

    On CPU only plain LSTM without projections on padded input taken by oneDNN; on CUDA every
    plain layer that cuDNN takes (see the module docstring). The variants have no ``torch.nn``
    counterpart and keep the per-op rule.
    """
    if not variant.is_plain:
        return None
    weights = [t for p in params for t in p if t is not None]
    if data.device.type == "cuda":
        if torch.is_autocast_enabled("cuda") and _cudnn_takes(data, [*states, *weights]):
            return torch.float16
        return None
    if mode != "LSTM" or batch_sizes is not None:
        return None
    if params[0].w_hr is not None or not torch.is_autocast_enabled("cpu"):
        return None
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
    autocast: cast whole where :func:`torch_casts_layer` says so, else as given.
    The casts are autograd ops, so gradients reach the float32 tensors in float32."""
    dtype = torch_casts_layer(mode, data, batch_sizes, states, params, variant)
    if dtype is None:
        return data, states, params
    params = tuple(CellParams(*(_cast(t, dtype) for t in p)) for p in params)
    return _cast(data, dtype), [_cast(s, dtype) for s in states], params


def cast_cell_like_torch(
    input: Tensor, states: list[Tensor], params: CellParams, variant: Variant
) -> tuple[Tensor, list[Tensor], CellParams]:
    """A cell's tensors as CUDA autocast hands them to ``torch.nn``'s cell ops: in the autocast
    dtype when autocast is on for CUDA and the cell is plain and on CUDA, else as given."""
    tensors = [input, *states, *(t for t in params if t is not None)]
    if not variant.is_plain or any(t.device.type != "cuda" for t in tensors):
        return input, states, params
    if not torch.is_autocast_enabled("cuda"):
        return input, states, params
    dtype = torch.get_autocast_dtype("cuda")
    params = CellParams(*(_cast(t, dtype) for t in params))
    return _cast(input, dtype), [_cast(s, dtype) for s in states], params

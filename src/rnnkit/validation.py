"""The input checks of rnnkit's entry points that go beyond ``torch.nn``'s.

``functional`` (which the modules call) repeats ``torch.nn``'s and ATen's own checks, in their
order and with their messages. The checks here catch what torch lets through to a kernel, where
it then fails with a message about the kernel's internals (``mat1 and mat2 shapes cannot be
multiplied``), computes on a malformed input without a word (a ``PackedSequence`` whose
``batch_sizes`` hold a zero, a state with more batch rows than the input), or crashes the
process (``nn.LSTM`` on a ``PackedSequence`` with a ``c_0`` of the wrong number of layers).

Each raises the exception type torch raises for that kind of mistake — ``TypeError`` for an
argument of the wrong Python type, ``ValueError`` for an option out of range, ``RuntimeError``
for a tensor of the wrong shape, dtype, layout or device — with a message that names the
argument, what was expected and what it got.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from rnnkit.modes import MODES

__all__ = [
    "CELL_INPUT_LAYOUTS",
    "aten_dtype_mismatch",
    "autocast_on",
    "check_cell_matrices",
    "check_cell_parameters",
    "check_devices",
    "check_layer_options",
    "check_layer_parameters",
    "check_layer_weights",
    "check_packed",
    "check_states",
    "expect_dense",
    "expect_dtype",
    "expect_tensor",
    "expect_weight_list",
    "expect_weight_tensors",
    "layer_shapes",
    "weight_name",
]

# Layouts torch.nn's cells accept as input: F.linear multiplies a sparse matrix too.
CELL_INPUT_LAYOUTS = (torch.strided, torch.sparse_coo, torch.sparse_csr, torch.sparse_csc)


def autocast_on() -> bool:
    """torch.nn's condition for skipping its dtype checks: autocast on for any device."""
    return torch._C._is_any_autocast_enabled()


def expect_tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(value).__name__}")
    return value


def expect_dense(name: str, t: Tensor, allowed: tuple[torch.layout, ...] = (torch.strided,)):
    if t.layout not in allowed:
        raise RuntimeError(
            f"{name} must be a dense tensor (layout torch.strided), got layout {t.layout}; "
            "convert it with .to_dense()"
        )


def expect_dtype(name: str, t: Tensor, dtype: torch.dtype, of: str) -> None:
    if t.dtype != dtype:
        raise RuntimeError(f"{name} dtype ({t.dtype}) does not match {of} dtype ({dtype})")


def _aten_name(dtype: torch.dtype) -> str:
    # ATen's ScalarType name (Float, Double, Long, ComplexFloat, ...), as its messages print it
    return torch.empty(0, dtype=dtype).type().removeprefix("torch.").removesuffix("Tensor")


def aten_dtype_mismatch(mat1: Tensor, mat2: Tensor) -> str:
    """ATen's message for a matrix product of two dtypes, which torch's cells raise."""
    return (
        f"mat1 and mat2 must have the same dtype, but got {_aten_name(mat1.dtype)} and "
        f"{_aten_name(mat2.dtype)}"
    )


def check_devices(input: Tensor, hiddens: Sequence[Tensor], weights: Sequence[Tensor]) -> None:
    """ATen's ``check_attributes``, with its messages."""
    for name, tensors in (("hidden", hiddens), ("parameter", weights)):
        for t in tensors:
            if t.device != input.device:
                raise RuntimeError(
                    f"Input and {name} tensors are not at the same device, found input tensor "
                    f"at {input.device} and {name} tensor at {t.device}"
                )


def check_layer_options(num_layers: object, dropout: object) -> None:
    """The functional layers' options, with the messages of ``torch.nn.RNNBase``."""
    if not isinstance(num_layers, int) or isinstance(num_layers, bool):
        raise TypeError(f"num_layers should be of type int, got: {type(num_layers).__name__}")
    if num_layers <= 0:
        raise ValueError("num_layers must be greater than zero")
    if (
        not isinstance(dropout, numbers.Number)
        or isinstance(dropout, bool)
        or not 0 <= dropout <= 1
    ):
        raise ValueError(
            "dropout should be a number in range [0, 1] representing the probability of an "
            f"element being zeroed, got {dropout!r}"
        )


def expect_weight_list(weights: object) -> list:
    if isinstance(weights, Tensor) or not isinstance(weights, Sequence):
        raise TypeError(
            "weights must be a list of Tensors (the flat weight list), got "
            f"{type(weights).__name__}"
        )
    return list(weights)


def weight_name(role: str, k: int, D: int) -> str:
    """torch.nn's name of parameter ``role`` of layer-direction ``k`` (``bias_hh_l1_reverse``)."""
    layer, direction = divmod(k, D)
    return f"{role}_l{layer}{'_reverse' if direction else ''}"


def expect_weight_tensors(weights: Sequence[object], roles: Sequence[str], D: int) -> None:
    """Every entry of the flat weight list is a Tensor; ``roles`` name one layer-direction's."""
    for i, w in enumerate(weights):
        if not isinstance(w, Tensor):
            k, r = divmod(i, len(roles))
            name = weight_name(roles[r], k, D)
            raise TypeError(f"{name} (weights[{i}]) must be a Tensor, got {type(w).__name__}")


def _expect_weight(name: str, w: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    expect_dense(name, w)
    if not (w.is_floating_point() or w.is_complex()):
        raise RuntimeError(f"{name} must be a floating-point tensor, got dtype {w.dtype}")
    if w.dtype != dtype:
        raise RuntimeError(
            f"{name} dtype ({w.dtype}) does not match weight_ih_l0's ({dtype}): the weights "
            "of a layer must all have one dtype"
        )
    if tuple(w.shape) != shape:
        raise RuntimeError(f"{name} must have shape {shape}, got {tuple(w.shape)}")


@functools.lru_cache(maxsize=256)
def layer_shapes(
    mode: str,
    H_in: int,
    H: int,
    H_out: int,
    num_layers: int,
    D: int,
    bias: bool,
    proj: bool,
    variant,
) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """``(name, shape)`` of every weight of a stacked layer in ``_flat_weights`` order, as
    ``torch.nn`` names and shapes them, then the variant's parameters of each layer."""
    G = MODES[mode].gates
    extra = variant.extra_param_shapes(mode, H)
    named = []
    for k in range(num_layers * D):
        shapes = {"weight_ih": (G * H, H_in if k < D else D * H_out), "weight_hh": (G * H, H_out)}
        if bias:
            shapes.update(bias_ih=(G * H,), bias_hh=(G * H,))
        if proj:
            shapes["weight_hr"] = (H_out, H)
        shapes.update(extra)
        named += [(weight_name(role, k, D), shape) for role, shape in shapes.items()]
    return tuple(named)


def check_layer_weights(
    mode: str,
    weights: Sequence[Tensor],
    num_layers: int,
    D: int,
    bias: bool,
    proj: bool,
    variant,
) -> None:
    """Every weight of a stacked layer (the flat list, Tensors): dense, of one floating dtype,
    shaped as ``torch.nn``'s parameter in its place (``weight_hh_l1_reverse`` & co.).

    The sizes come from the first layer: ``H_in`` from ``weight_ih_l0``, ``G*H`` and ``H_out``
    from ``weight_hh_l0``, ``H`` from ``weight_hr_l0`` with projections.
    """
    G = MODES[mode].gates
    w_ih, w_hh = weights[0], weights[1]
    for role, w in (("weight_ih", w_ih), ("weight_hh", w_hh)):
        if w.dim() != 2:
            raise RuntimeError(f"{role}_l0 must be 2-D, got {w.dim()}-D")
    GH, H_out = w_hh.shape
    if GH % G or GH == 0:
        raise RuntimeError(
            f"weight_hh_l0 must have {G} * hidden_size rows, got {GH} (shape {tuple(w_hh.shape)})"
        )
    H = GH // G
    if not proj and H_out != H:
        raise RuntimeError(
            f"weight_hh_l0 must have shape {(GH, H)} (hidden_size {H} without projections), "
            f"got {tuple(w_hh.shape)}"
        )
    expected = layer_shapes(mode, w_ih.size(1), H, H_out, num_layers, D, bias, proj, variant)
    dtype = w_ih.dtype
    for (name, shape), w in zip(expected, weights, strict=True):
        if w.shape != shape or w.dtype != dtype or w.layout != torch.strided:
            _expect_weight(name, w, shape, dtype)
    if not (dtype.is_floating_point or dtype.is_complex):
        _expect_weight("weight_ih_l0", w_ih, expected[0][1], dtype)


def _expect_shape(owner: str, name: str, w: object, shape: tuple[int, ...]) -> None:
    expect_tensor(f"{owner}: {name}", w)
    if tuple(w.shape) != shape:
        raise RuntimeError(
            f"{owner}: {name} must have shape {shape} for the module's sizes, got {tuple(w.shape)}"
        )


def check_layer_parameters(m, weights: Sequence[object]) -> None:
    """An LSTM/GRU/RNN module's parameters (``weights``, its ``_flat_weights``) against the
    shapes its constructor gave them: a parameter assigned later (``m.weight_hh_l0 =
    Parameter(...)``) must fit the module."""
    H_out = m.proj_size or m.hidden_size
    D = 2 if m.bidirectional else 1
    expected = layer_shapes(
        m.mode, m.input_size, m.hidden_size, H_out, m.num_layers, D, m.bias, m.proj_size > 0,
        m.variant,
    )  # fmt: skip
    for (name, shape), w in zip(expected, weights, strict=True):
        if not isinstance(w, Tensor) or w.shape != shape:
            _expect_shape(type(m).__name__, name, w, shape)


@functools.lru_cache(maxsize=256)
def _cell_shapes(name: str, H_in: int, H: int, bias: bool, variant) -> tuple:
    mode = _CELL_MODES[name]
    G = MODES[mode].gates
    shapes = {"weight_ih": (G * H, H_in), "weight_hh": (G * H, H)}
    if bias:
        shapes.update(bias_ih=(G * H,), bias_hh=(G * H,))
    shapes.update(variant.extra_param_shapes(mode, H))
    return tuple(shapes.items())


def check_cell_parameters(m, name: str) -> None:
    """A cell module (``name``: its torch.nn class name) against the parameter shapes its
    constructor gave it."""
    for role, shape in _cell_shapes(name, m.input_size, m.hidden_size, m.bias, m.variant):
        w = getattr(m, role, None)
        if not isinstance(w, Tensor) or w.shape != shape:
            _expect_shape(name, role, w, shape)


# cell class -> the mode of its parameters (an RNNCell's are those of either nonlinearity)
_CELL_MODES = {"LSTMCell": "LSTM", "GRUCell": "GRU", "RNNCell": "RNN_TANH"}


def check_cell_matrices(w_ih: object, w_hh: object) -> None:
    """Types, layouts, dtypes and ranks of a cell's weight matrices (their sizes are ATen's
    checks)."""
    for name, w in (("weight_ih", w_ih), ("weight_hh", w_hh)):
        expect_tensor(name, w)
        expect_dense(name, w)
        if not (w.is_floating_point() or w.is_complex()):
            raise RuntimeError(f"{name} must be a floating-point tensor, got dtype {w.dtype}")
        if w.dim() != 2:
            raise RuntimeError(f"{name} must be 2-D, got {w.dim()}-D")


def check_states(mode: str, hx: object, shapes: Sequence[tuple[int, int, int]]) -> list[Tensor]:
    """The initial states of a stacked layer: their Python types, count, layout and shapes
    (with torch.nn's messages for the shapes). Returns them as a list."""
    if mode == "LSTM":
        if not isinstance(hx, (tuple, list)):
            raise TypeError(f"hx must be a tuple (h_0, c_0) of Tensors, got {type(hx).__name__}")
        if len(hx) != 2:
            raise RuntimeError("lstm expects two hidden states")
        states, names = list(hx), ["hx[0]", "hx[1]"]
    else:
        states, names = [hx], ["hx"]
    for i, (name, state, shape) in enumerate(
        zip(names, states, shapes[: len(states)], strict=True)
    ):
        expect_tensor(name, state)
        expect_dense(name, state)
        if tuple(state.shape) != shape:
            which = f"[{i}]" if mode == "LSTM" else ""
            raise RuntimeError(f"Expected hidden{which} size {shape}, got {list(state.shape)}")
    return states


def _first_bad(values: Tensor, bad: Tensor) -> str:
    t = int(bad.nonzero()[0])
    return f"{int(values[t])} at position {t}"


def check_packed(
    data: Tensor,
    batch_sizes: object,
    sorted_indices: object = None,
    unsorted_indices: object = None,
) -> int:
    """A packed sequence's fields against each other; returns its batch size N.

    ``batch_sizes``: a 1-D int64 CPU tensor of positive, non-increasing sizes that sum to the
    rows of ``data``. ``sorted_indices`` and ``unsorted_indices``: both None, or 1-D int64
    tensors on ``data``'s device, a permutation of ``range(N)`` and its inverse.
    """
    expect_tensor("batch_sizes", batch_sizes)
    for name, t in (("batch_sizes", batch_sizes), ("sorted_indices", sorted_indices)):
        if isinstance(t, Tensor) and torch._C._functorch.is_batchedtensor(t):
            # each sample would be a batch of another structure: one call cannot run them
            raise RuntimeError(
                f"a PackedSequence's {name} cannot be vmapped over: vmap over its data only, "
                "building the PackedSequence inside the vmapped function, or over a padded "
                "input with lengths="
            )
    if (
        batch_sizes.dim() != 1
        or batch_sizes.dtype != torch.int64
        or batch_sizes.device.type != "cpu"
        or batch_sizes.layout != torch.strided
    ):
        raise RuntimeError(
            "batch_sizes must be a 1-D int64 CPU tensor, got a "
            f"{batch_sizes.dim()}-D {batch_sizes.dtype} tensor on {batch_sizes.device}"
            + ("" if batch_sizes.layout == torch.strided else f" of layout {batch_sizes.layout}")
        )
    if batch_sizes.numel() == 0:
        raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
    not_positive = batch_sizes <= 0
    if not_positive.any():
        raise RuntimeError(
            f"batch_sizes must be positive, got {_first_bad(batch_sizes, not_positive)}"
        )
    growing = batch_sizes[1:] > batch_sizes[:-1]
    if growing.any():
        t = int(growing.nonzero()[0])
        raise RuntimeError(
            f"batch_sizes must be non-increasing, got {int(batch_sizes[t + 1])} at position "
            f"{t + 1} after {int(batch_sizes[t])}"
        )
    rows = int(batch_sizes.sum())
    if rows != data.size(0):
        raise RuntimeError(f"batch_sizes sum to {rows} but the packed data has {data.size(0)} rows")
    N = int(batch_sizes[0])
    if sorted_indices is None and unsorted_indices is None:
        return N
    if sorted_indices is None or unsorted_indices is None:
        raise RuntimeError(
            "sorted_indices and unsorted_indices must both be given or both be None, got "
            f"{type(sorted_indices).__name__} and {type(unsorted_indices).__name__}"
        )
    for name, idx in (("sorted_indices", sorted_indices), ("unsorted_indices", unsorted_indices)):
        expect_tensor(name, idx)
        if idx.dim() != 1 or idx.dtype != torch.int64 or idx.numel() != N:
            raise RuntimeError(
                f"{name} must be a 1-D int64 tensor of batch_sizes[0] = {N} entries, got a "
                f"{idx.dim()}-D {idx.dtype} tensor of {idx.numel()} entries"
            )
        if idx.device != data.device:
            raise RuntimeError(
                f"{name} must be on the packed data's device {data.device}, got {idx.device}"
            )
    arange = torch.arange(N, device=data.device)
    for name, idx in (("sorted_indices", sorted_indices), ("unsorted_indices", unsorted_indices)):
        if not torch.equal(idx.sort().values, arange):
            raise RuntimeError(f"{name} must be a permutation of range({N})")
    if not torch.equal(sorted_indices[unsorted_indices], arange):
        raise RuntimeError("unsorted_indices must be the inverse permutation of sorted_indices")
    return N


def check_layer_input(
    mode: str,
    data: Tensor,
    batch_sizes: Tensor | None,
    sorted_indices: Tensor | None,
    unsorted_indices: Tensor | None,
    hx,
    batch_first: bool,
    LD: int,
    H_in: int,
    H: int,
    H_out: int,
) -> tuple[int, list[Tensor]]:
    """torch.nn's checks of a layer's input after its dtype, in its order: rank, feature size,
    the packed batch (:func:`check_packed`), the states' shapes (``LD`` = layers times
    directions); the batch size and the states (zeros of ``data``'s dtype where ``hx`` is
    None). The states are checked before any permutation to the sorted order, which would hide
    a state with more batch rows than the input (torch.nn takes the first N)."""
    expected_dim = 2 if batch_sizes is not None else 3
    if data.dim() != expected_dim:
        raise RuntimeError(f"input must have {expected_dim} dimensions, got {data.dim()}")
    if data.size(-1) != H_in:
        raise RuntimeError(
            f"input.size(-1) must be equal to input_size. Expected {H_in}, got {data.size(-1)}"
        )
    if batch_sizes is not None:
        N = check_packed(data, batch_sizes, sorted_indices, unsorted_indices)
    else:
        N = data.size(0 if batch_first else 1)
    shapes = [(LD, N, H_out), (LD, N, H)]
    if hx is None:
        states = [data.new_zeros(s) for s in shapes[: 2 if mode == "LSTM" else 1]]
    else:
        states = check_states(mode, hx, shapes)
    return N, states

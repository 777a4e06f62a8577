"""``LSTM``, ``GRU`` and ``RNN``: drop-ins for ``torch.nn``'s, computed by ``rnnkit.functional``.

Constructor, validation, parameter names and order, init, ``repr`` and the shape handling of
``forward`` follow ``torch/nn/modules/rnn.py``; only the recurrence is ours.

The classes subclass ``nn.Module``, not ``torch.nn.RNNBase``, so ``isinstance(m,
torch.nn.LSTM)`` is False, by choice: dynamo refuses instances of ``torch.nn.RNN``/``GRU``/
``LSTM`` (``torch.compile(fullgraph=True)`` fails on them), dynamic quantization maps exact
types (a subclass would not be quantized either; ``rnnkit.revert`` first is the route), and
torch's ``_apply`` and ``__setstate__`` rebuild a ``_flat_weights`` list that rnnkit reads by
name. What code calls after such a check is here: ``flatten_parameters`` (a no-op),
``all_weights``, ``_flat_weights``, ``_flat_weights_names``.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.parameter import Parameter
from torch.nn.utils.rnn import PackedSequence
from torch.onnx._internal.exporter import _flags as _onnx_flags

from rnnkit import fast, streaming, traced
from rnnkit import functional as RF
from rnnkit.lengths import run_with_lengths
from rnnkit.modes import MODES
from rnnkit.resets import check_reset
from rnnkit.validation import check_layer_parameters, expect_dense, expect_tensor
from rnnkit.variants import check_keywords, init_parameters, make_variant

# A layer's call while torch.onnx.export traces it (rnnkit.onnx.export_traced_layer, which
# imports this module); the package sets it.
onnx_traced_call: Callable | None = None
_NAMES = {"LSTM": "LSTM", "GRU": "GRU", "RNN_TANH": "RNN", "RNN_RELU": "RNN"}
_FUNCTIONS = {"LSTM": RF.lstm, "GRU": RF.gru, "RNN_TANH": RF.rnn_tanh, "RNN_RELU": RF.rnn_relu}


def _check_type(name: str, value, kind: type) -> None:
    if not isinstance(value, kind):
        raise TypeError(f"{name} should be of type {kind.__name__}, got: {type(value).__name__}")


class RNNBase(nn.Module):
    """Shared construction of :class:`LSTM`, :class:`GRU` and :class:`RNN`.

    Takes ``torch.nn.RNNBase``'s arguments plus the keyword-only ``engine`` (``"auto"`` picks
    the first engine of ``rnnkit.functional.ENGINES`` that declares a call: the fused engine on
    CPU where it runs it, else the reference; ``"reference"`` is the plain-torch ground
    truth).
    """

    def __init__(
        self,
        mode: str,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
        *,
        engine: str = "auto",
        **variants,
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.mode = mode
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size
        RF.check_engine_name(engine)
        self.engine = engine

        if (
            not isinstance(dropout, numbers.Number)
            or isinstance(dropout, bool)
            or not 0 <= dropout <= 1
        ):
            raise ValueError(
                "dropout should be a number in range [0, 1] representing the probability of "
                "an element being zeroed"
            )
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                "dropout option adds dropout after all but last recurrent layer, so non-zero "
                "dropout expects num_layers greater than 1, but got "
                f"dropout={dropout} and num_layers={num_layers}",
                stacklevel=2,
            )
        _check_type("bias", bias, bool)
        _check_type("batch_first", batch_first, bool)
        _check_type("input_size", input_size, int)
        if input_size <= 0:
            raise ValueError("input_size must be greater than zero")
        _check_type("hidden_size", hidden_size, int)
        if hidden_size <= 0:
            raise ValueError("hidden_size must be greater than zero")
        if num_layers <= 0:
            raise ValueError("num_layers must be greater than zero")
        if proj_size < 0:
            raise ValueError(
                "proj_size should be a positive integer or zero to disable projections"
            )
        if proj_size >= hidden_size:
            raise ValueError("proj_size has to be smaller than hidden_size")
        if mode not in MODES:
            raise ValueError("Unrecognized RNN mode: " + mode)
        check_keywords("RNNBase", variants)
        self.variant = make_variant(mode, **variants)
        if self.variant.forget_bias is not None and not bias:
            raise ValueError("forget_bias needs bias=True")

        gate_size = MODES[mode].gates * hidden_size
        H_out = proj_size if proj_size > 0 else hidden_size
        D = 2 if bidirectional else 1
        self._flat_weights_names: list[str] = []
        self._all_weights: list[list[str]] = []
        for layer in range(num_layers):
            for direction in range(D):
                layer_input_size = input_size if layer == 0 else H_out * D
                shapes = {
                    "weight_ih": (gate_size, layer_input_size),
                    "weight_hh": (gate_size, H_out),
                }
                if bias:
                    shapes.update(bias_ih=(gate_size,), bias_hh=(gate_size,))
                if proj_size > 0:
                    shapes["weight_hr"] = (proj_size, hidden_size)
                suffix = "_reverse" if direction == 1 else ""
                names = []
                for role, shape in shapes.items():
                    name = f"{role}_l{layer}{suffix}"
                    setattr(self, name, Parameter(torch.empty(shape, **factory_kwargs)))
                    names.append(name)
                self._flat_weights_names.extend(names)
                self._all_weights.append(names)
        # Variant parameters come after all of torch.nn's, which keep torch's init and RNG use.
        variant_shapes = self.variant.extra_param_shapes(mode, hidden_size)
        self._variant_names: list[str] = []
        for k, names in enumerate(self._all_weights):
            layer, suffix = divmod(k, D)
            for role, shape in variant_shapes.items():
                name = f"{role}_l{layer}{'_reverse' if suffix else ''}"
                setattr(self, name, Parameter(torch.empty(shape, **factory_kwargs)))
                names.append(name)
                self._variant_names.append(name)
        self._flat_weights_names = [name for names in self._all_weights for name in names]
        self.reset_parameters()

    @property
    def _flat_weights(self) -> list[Tensor | None]:
        # Read by name on every call, so functional_call, parametrizations and .to() are seen.
        return [getattr(self, name, None) for name in self._flat_weights_names]

    @property
    def all_weights(self) -> list[list[Parameter]]:
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    def flatten_parameters(self) -> None:
        """A no-op kept for compatibility: rnnkit's engines need no flattened weight buffer."""

    def reset_parameters(self) -> None:
        """torch's init for torch's parameters; then the variants' (no random numbers)."""
        bias_ih = [names[2] for names in self._all_weights] if self.bias else []
        init_parameters(self, self.variant, self._variant_names, bias_ih)

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if self.proj_size != 0:
            s += ", proj_size={proj_size}"
        if self.num_layers != 1:
            s += ", num_layers={num_layers}"
        if self.bias is not True:
            s += ", bias={bias}"
        if self.batch_first is not False:
            s += ", batch_first={batch_first}"
        if self.dropout != 0:
            s += ", dropout={dropout}"
        if self.bidirectional is not False:
            s += ", bidirectional={bidirectional}"
        if self.engine != "auto":
            s += ", engine={engine!r}"
        s = s.format(**self.__dict__)
        variant = self.variant.describe()
        return f"{s}, {variant}" if variant else s

    def _forward(self, input, hx, reset, lengths):
        if reset is None and lengths is None:
            out = fast.call(self, input, hx)
            if out is not None:
                return out
        if torch.jit.is_tracing() and torch.onnx.is_in_onnx_export() and onnx_traced_call:
            # torch.onnx.export(dynamo=False) traces this layer: it exports as rnnkit.onnx's
            # graph of the layer, not as the engine's ops
            if reset is not None:
                raise NotImplementedError(
                    f"{_NAMES[self.mode]}: torch.onnx.export exports an rnnkit layer only where "
                    "ONNX's LSTM/GRU/RNN op computes it, and reset= runs as a Scan: "
                    "rnnkit.onnx.export(model, args, f) exports this call"
                )
            return onnx_traced_call(self, input, hx, lengths)
        onnx = torch.onnx.is_in_onnx_export() or _onnx_flags._is_onnx_exporting
        if onnx or traced.is_portable():
            # torch.onnx.export(dynamo=True) traces this layer (its flag is read too: under
            # the exporter's strict capture, dynamo's, is_in_onnx_export() reads false), or
            # rnnkit.portable() is on: ONNX nodes or a scan of the reference's step, whatever
            # the engine
            return traced.layer(self, input, hx, reset, lengths, _check_hx_dims, onnx)
        return self._eager_forward(input, hx, lengths, reset)

    def _eager_forward(self, input, hx, lengths, reset=None):
        name = _NAMES[self.mode]
        if reset is not None and isinstance(input, PackedSequence):
            raise ValueError(
                f"{name}: reset cannot be given with a PackedSequence input; pass the padded "
                "input with lengths= and reset= instead"
            )
        if lengths is None:
            return self._run(input, hx, reset)
        return run_with_lengths(self._run, name, input, hx, lengths, self.batch_first, reset)

    def step(self, input: Tensor, hx=None, *, reset=None):
        """One time step for online inference: ``forward`` on a length-1 sequence.

        ``input`` is ``[N, H_in]`` (``[H_in]`` unbatched) and ``hx`` as ``forward``'s (zeros
        if omitted); returns ``(output_t, hx)``, ``output_t`` ``[N, H_out]`` (``[H_out]``) and
        the new state. ``reset`` (bool ``[N]``, 0-D unbatched) starts the sequences where it is
        true over from zeros (:mod:`rnnkit.resets`). Unidirectional layers only: a
        bidirectional one raises ``ValueError``. See :mod:`rnnkit.streaming`.

        Examples::

            >>> gru = rnnkit.GRU(10, 20, num_layers=2)
            >>> h = None
            >>> for x_t in torch.randn(5, 3, 10):  # steps as they arrive, [N, H_in] each
            ...     out_t, h = gru.step(x_t, h)
            >>> out_t.shape, h.shape
            (torch.Size([3, 20]), torch.Size([2, 3, 20]))
        """
        return streaming.step(self, input, hx, reset)

    def _run(self, input, hx, reset=None):
        """Validate shapes as ``torch.nn`` does, then call the functional layer."""
        name = _NAMES[self.mode]
        is_lstm = self.mode == "LSTM"
        is_batched = True
        batch_dim = 0 if self.batch_first else 1
        if not isinstance(input, PackedSequence):
            if not isinstance(input, Tensor):
                raise TypeError(
                    f"{name}: input must be a Tensor or PackedSequence, got {type(input).__name__}"
                )
            expect_dense(f"{name}: input", input)
            if input.dim() not in (2, 3):
                tensor = " tensor" if self.mode.startswith("RNN") else ""
                raise ValueError(
                    f"{name}: Expected input to be 2D or 3D, got {input.dim()}D{tensor} instead"
                )
            is_batched = input.dim() == 3
            if reset is not None:
                reset = check_reset(name, reset, input, self.batch_first, batched=is_batched)
                # back in the input's layout, which the functional layer takes
                if not is_batched:
                    reset = reset.unsqueeze(batch_dim)
                elif self.batch_first:
                    reset = reset.t()
            if not is_batched:
                input = input.unsqueeze(batch_dim)
            if hx is not None:
                hx = _check_hx_dims(name, hx, is_lstm, is_batched)
        output, *hidden = self._call(input, hx, reset)
        if not is_batched:
            output = output.squeeze(batch_dim)
            hidden = [h.squeeze(1) for h in hidden]
        return output, tuple(hidden) if is_lstm else hidden[0]

    def _call(self, input, hx, reset):
        """The functional layer on validated, batched input: ``(output, h_n[, c_n])``."""
        weights = self._flat_weights
        check_layer_parameters(self, weights)
        return _FUNCTIONS[self.mode](
            input,
            weights,
            hx,
            has_biases=self.bias,
            num_layers=self.num_layers,
            dropout=self.dropout,
            train=self.training,
            bidirectional=self.bidirectional,
            batch_first=self.batch_first,
            engine=self.engine,
            variant=self.variant,
            reset=reset,
        )


def _check_hx_dims(name: str, hx, is_lstm: bool, is_batched: bool):
    """torch.nn's batched/unbatched checks on ``hx``; unbatched states get a batch dim."""
    want = 3 if is_batched else 2
    kind = "batched 3-D" if is_batched else "unbatched 2-D"
    if is_lstm:
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            got = type(hx).__name__ if not isinstance(hx, (tuple, list)) else f"{len(hx)} items"
            raise RuntimeError(f"LSTM expects hx to be a tuple (h_0, c_0), got {got}")
        expect_tensor(f"{name}: hx[0]", hx[0])
        expect_tensor(f"{name}: hx[1]", hx[1])
        if hx[0].dim() != want or hx[1].dim() != want:
            raise RuntimeError(
                f"For {kind} input, hx and cx should also be {want}-D but got "
                f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
            )
        return hx if is_batched else (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
    expect_tensor(f"{name}: hx", hx)
    if hx.dim() != want:
        raise RuntimeError(
            f"For {kind} input, hx should also be {want}-D but got {hx.dim()}-D tensor"
        )
    return hx if is_batched else hx.unsqueeze(1)


_SHAPES_DOC = r"""
    Inputs: input, hx, reset, lengths
        * **input**: ``[L, H_in]`` unbatched, ``[L, N, H_in]`` (``[N, L, H_in]`` with
          ``batch_first=True``), or a :class:`torch.nn.utils.rnn.PackedSequence`.
        * **hx**: {hx}; zeros when not given. ``batch_first`` does not apply to it.
        * **reset**: where the sequences start over, a bool tensor ``[L, N]`` (``[N, L]``
          with ``batch_first``, ``[L]`` unbatched; not with a ``PackedSequence``). The call
          equals cutting each sequence before every step where it is true and running the
          pieces as separate sequences, the first from ``hx``, the others from zeros (see
          :mod:`rnnkit.resets`). Best passed by keyword, as ``lengths``.
        * **lengths**: the length of each sequence of a padded batched
          ``input``, a 1-D integer tensor (any device) or a list of ``N`` ints in ``[1, L]``.
          The call then equals packing (``enforce_sorted=False``), the layer and unpacking
          (``total_length=L``): the output is zero past each length, the final states are
          each sequence's own (see :mod:`rnnkit.lengths`).

    Outputs: output, {out}
        * **output**: ``[L, N, D*H_out]`` (or a ``PackedSequence``), the last layer's h_t.
        * {h_n}
"""


class LSTM(RNNBase):
    r"""Multi-layer LSTM, a drop-in for :class:`torch.nn.LSTM`.

    .. math::
        \begin{array}{ll}
        i_t = \sigma(W_{ii} x_t + b_{ii} + W_{hi} h_{t-1} + b_{hi}) \\
        f_t = \sigma(W_{if} x_t + b_{if} + W_{hf} h_{t-1} + b_{hf}) \\
        g_t = \tanh(W_{ig} x_t + b_{ig} + W_{hg} h_{t-1} + b_{hg}) \\
        o_t = \sigma(W_{io} x_t + b_{io} + W_{ho} h_{t-1} + b_{ho}) \\
        c_t = f_t \odot c_{t-1} + i_t \odot g_t \\
        h_t = o_t \odot \tanh(c_t) \quad (\text{then } h_t W_{hr}^T \text{ if proj\_size} > 0)
        \end{array}

    Args:
        input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
        proj_size, device, dtype: exactly as :class:`torch.nn.LSTM`.
        engine: keyword-only; ``"auto"`` (default) or a name from
            :func:`rnnkit.functional.available_engines`.

    Examples::

        >>> lstm = rnnkit.LSTM(10, 20, num_layers=2)
        >>> output, (h_n, c_n) = lstm(torch.randn(5, 3, 10))
        >>> output.shape, h_n.shape
        (torch.Size([5, 3, 20]), torch.Size([2, 3, 20]))
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__("LSTM", *args, **kwargs)

    # no keyword-only parameters: torch.onnx.export(dynamo=False) passes every default
    # positionally
    def forward(self, input, hx=None, reset=None, lengths=None):
        return self._forward(input, hx, reset, lengths)


LSTM.__doc__ += _SHAPES_DOC.format(
    hx="``(h_0, c_0)``: ``[D*num_layers, N, H_out]`` and ``[D*num_layers, N, H]``",
    out="(h_n, c_n)",
    h_n="**h_n**, **c_n**: final states of every layer and direction, shaped as h_0, c_0.",
)


class GRU(RNNBase):
    r"""Multi-layer GRU, a drop-in for :class:`torch.nn.GRU`.

    .. math::
        \begin{array}{ll}
        r_t = \sigma(W_{ir} x_t + b_{ir} + W_{hr} h_{t-1} + b_{hr}) \\
        z_t = \sigma(W_{iz} x_t + b_{iz} + W_{hz} h_{t-1} + b_{hz}) \\
        n_t = \tanh(W_{in} x_t + b_{in} + r_t \odot (W_{hn} h_{t-1} + b_{hn})) \\
        h_t = (1 - z_t) \odot n_t + z_t \odot h_{t-1}
        \end{array}

    Args: as :class:`torch.nn.GRU`, plus keyword-only ``engine`` (see :class:`LSTM`).

    Examples::

        >>> gru = rnnkit.GRU(10, 20, batch_first=True)
        >>> output, h_n = gru(torch.randn(3, 5, 10))
        >>> output.shape
        torch.Size([3, 5, 20])
    """

    def __init__(self, *args, **kwargs) -> None:
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__("GRU", *args, **kwargs)

    # no keyword-only parameters: torch.onnx.export(dynamo=False) passes every default
    # positionally
    def forward(self, input, hx=None, reset=None, lengths=None):
        return self._forward(input, hx, reset, lengths)


class RNN(RNNBase):
    r"""Multi-layer Elman RNN, a drop-in for :class:`torch.nn.RNN`.

    .. math::
        h_t = \tanh(x_t W_{ih}^T + b_{ih} + h_{t-1} W_{hh}^T + b_{hh})
        \quad (\text{or } \mathrm{ReLU})

    Args: as :class:`torch.nn.RNN` (``nonlinearity`` is the fourth positional argument, after
    ``num_layers``), plus keyword-only ``engine`` (see :class:`LSTM`).

    Examples::

        >>> rnn = rnnkit.RNN(10, 20, 2, "relu")
        >>> output, h_n = rnn(torch.randn(5, 10))
        >>> output.shape, h_n.shape
        (torch.Size([5, 20]), torch.Size([2, 20]))
    """

    def __init__(self, *args, **kwargs) -> None:
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if len(args) > 3:
            self.nonlinearity = args[3]
            args = args[:3] + args[4:]
        else:
            self.nonlinearity = kwargs.pop("nonlinearity", "tanh")
        if self.nonlinearity == "tanh":
            mode = "RNN_TANH"
        elif self.nonlinearity == "relu":
            mode = "RNN_RELU"
        else:
            raise ValueError(
                f"Unknown nonlinearity '{self.nonlinearity}'. Select from 'tanh' or 'relu'."
            )
        super().__init__(mode, *args, **kwargs)

    # no keyword-only parameters: torch.onnx.export(dynamo=False) passes every default
    # positionally
    def forward(self, input, hx=None, reset=None, lengths=None):
        return self._forward(input, hx, reset, lengths)


for _cls in (GRU, RNN):
    _cls.__doc__ += _SHAPES_DOC.format(
        hx="``h_0`` ``[D*num_layers, N, H]``",
        out="h_n",
        h_n="**h_n**: final state of every layer and direction, shaped as h_0.",
    )

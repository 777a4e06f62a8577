"""``LSTMCell``, ``GRUCell`` and ``RNNCell``: one step, drop-ins for ``torch.nn``'s cells."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.parameter import Parameter

from rnnkit import fast
from rnnkit import functional as RF
from rnnkit.modes import MODES
from rnnkit.validation import (
    CELL_INPUT_LAYOUTS,
    check_cell_parameters,
    expect_dense,
    expect_tensor,
)
from rnnkit.variants import check_keywords, init_parameters, make_variant

# gate blocks -> the mode of a cell's parameters (an RNNCell's are those of either nonlinearity)
_MODES = {MODES[m].gates: m for m in ("LSTM", "GRU", "RNN_TANH")}


class RNNCellBase(nn.Module):
    """Parameters, init and ``repr`` shared by the cells, as ``torch.nn.RNNCellBase``."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool,
        num_chunks: int,
        device=None,
        dtype=None,
        *,
        engine: str = "auto",
        _mode: str | None = None,
        **variants,
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        RF.check_engine_name(engine)
        self.engine = engine
        self.weight_ih = Parameter(
            torch.empty((num_chunks * hidden_size, input_size), **factory_kwargs)
        )
        self.weight_hh = Parameter(
            torch.empty((num_chunks * hidden_size, hidden_size), **factory_kwargs)
        )
        if bias:
            self.bias_ih = Parameter(torch.empty(num_chunks * hidden_size, **factory_kwargs))
            self.bias_hh = Parameter(torch.empty(num_chunks * hidden_size, **factory_kwargs))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        check_keywords(type(self).__name__, variants)
        mode = _mode or _MODES[num_chunks]
        for name in ("recurrent_dropout", "weight_dropout"):
            if variants.get(name):
                raise ValueError(f"{name} masks a whole sequence; use the layer, not the cell")
        self.variant = make_variant(mode, **variants)
        if self.variant.forget_bias is not None and not bias:
            raise ValueError("forget_bias needs bias=True")
        # Variant parameters come after torch.nn's, which keep torch's init and RNG use.
        shapes = self.variant.extra_param_shapes(mode, hidden_size)
        self._variant_names = list(shapes)
        for name, shape in shapes.items():
            setattr(self, name, Parameter(torch.empty(shape, **factory_kwargs)))
        self.reset_parameters()

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if "bias" in self.__dict__ and self.bias is not True:
            s += ", bias={bias}"
        if "nonlinearity" in self.__dict__ and self.nonlinearity != "tanh":
            s += ", nonlinearity={nonlinearity}"
        if self.engine != "auto":
            s += ", engine={engine!r}"
        s = s.format(**self.__dict__)
        variant = self.variant.describe()
        return f"{s}, {variant}" if variant else s

    def reset_parameters(self) -> None:
        """torch's init for torch's parameters; then the variants' (no random numbers)."""
        bias_ih = ["bias_ih"] if self.bias else []
        init_parameters(self, self.variant, self._variant_names, bias_ih)

    def _step(self, fn, input: Tensor, hx, name: str, n_states: int):
        """torch.nn's unbatched handling and zero state around one functional step."""
        out = self._fast(input, hx)
        if out is not None:
            return out
        expect_tensor(f"{name}: input", input)
        expect_dense(f"{name}: input", input, CELL_INPUT_LAYOUTS)
        if hx is not None and n_states == 1:
            expect_tensor(f"{name}: hx", hx)
        if hx is not None and n_states == 2:
            if not isinstance(hx, (tuple, list)):
                raise TypeError(
                    f"{name}: hx must be a tuple (h, c) of Tensors, got {type(hx).__name__}"
                )
            for idx, value in enumerate(hx):
                expect_tensor(f"{name}: hx[{idx}]", value)
        if input.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None and n_states == 1 and hx.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected hidden to be 1D or 2D, got {hx.dim()}D instead")
        if hx is not None and n_states == 2:
            for idx, value in enumerate(hx):
                if value.dim() not in (1, 2):
                    raise ValueError(
                        f"{name}: Expected hx[{idx}] to be 1D or 2D, got {value.dim()}D instead"
                    )
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
        if hx is None:
            zeros = torch.zeros(
                input.size(0), self.hidden_size, dtype=input.dtype, device=input.device
            )
            hx = zeros if n_states == 1 else (zeros, zeros)
        elif not is_batched:
            hx = hx.unsqueeze(0) if n_states == 1 else tuple(h.unsqueeze(0) for h in hx)
        if fn is None:
            raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}")
        out = self._call(fn, input, hx, name)
        if not is_batched:
            out = out.squeeze(0) if n_states == 1 else tuple(h.squeeze(0) for h in out)
        return out

    def _fast(self, input: Tensor, hx):
        """The fast path's result of this call, or None where :meth:`_step` must run it."""
        return fast.cell_call(self, input, hx)

    def _call(self, fn, input: Tensor, hx, name: str):
        """The functional step ``fn`` on validated, batched input and state."""
        check_cell_parameters(self, name)
        # as torch's cells, a plain cell never reads self.training
        train = self.variant.draws_in_training and self.training
        return fn(
            input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh,
            engine=self.engine, variant=self.variant, train=train,
            extra_weights=[getattr(self, name) for name in self._variant_names],
        )  # fmt: skip


class RNNCell(RNNCellBase):
    r"""An Elman RNN cell, a drop-in for :class:`torch.nn.RNNCell`.

    .. math:: h' = \tanh(x W_{ih}^T + b_{ih} + h W_{hh}^T + b_{hh}) \quad (\text{or ReLU})

    Args: as :class:`torch.nn.RNNCell`, plus keyword-only ``engine``.

    Inputs: ``input`` ``[N, H_in]`` or ``[H_in]``; ``hx`` ``[N, H]`` or ``[H]`` (zeros if
    omitted). Output: ``h'`` shaped as ``hx``.

    Examples::

        >>> cell = rnnkit.RNNCell(10, 20)
        >>> cell(torch.randn(3, 10)).shape
        torch.Size([3, 20])
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        nonlinearity: str = "tanh",
        device=None,
        dtype=None,
        *,
        engine: str = "auto",
        **variants,
    ) -> None:
        super().__init__(
            input_size, hidden_size, bias, 1, device, dtype, engine=engine,
            _mode="RNN_RELU" if nonlinearity == "relu" else "RNN_TANH", **variants,
        )  # fmt: skip
        self.nonlinearity = nonlinearity

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        fn = {"tanh": RF.rnn_tanh_cell, "relu": RF.rnn_relu_cell}.get(self.nonlinearity)
        return self._step(fn, input, hx, "RNNCell", 1)


class LSTMCell(RNNCellBase):
    r"""An LSTM cell, a drop-in for :class:`torch.nn.LSTMCell`.

    .. math::
        i, f, g, o = \sigma, \sigma, \tanh, \sigma\,(x W_{ih}^T + b_{ih} + h W_{hh}^T + b_{hh})
        \qquad c' = f \odot c + i \odot g \qquad h' = o \odot \tanh(c')

    Args: as :class:`torch.nn.LSTMCell`, plus keyword-only ``engine``.

    Inputs: ``input`` ``[N, H_in]`` or ``[H_in]``; ``(h, c)`` each ``[N, H]`` or ``[H]``
    (zeros if omitted). Output: ``(h', c')``.

    Examples::

        >>> cell = rnnkit.LSTMCell(10, 20)
        >>> h, c = cell(torch.randn(3, 10))
        >>> h.shape
        torch.Size([3, 20])
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        engine: str = "auto",
        **variants,
    ) -> None:
        super().__init__(input_size, hidden_size, bias, 4, device, dtype, engine=engine, **variants)

    def forward(
        self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        return self._step(RF.lstm_cell, input, hx, "LSTMCell", 2)


class GRUCell(RNNCellBase):
    r"""A GRU cell, a drop-in for :class:`torch.nn.GRUCell`.

    .. math::
        r = \sigma(x_r + h_r) \quad z = \sigma(x_z + h_z) \quad
        n = \tanh(x_n + r \odot (h W_{hn}^T + b_{hn})) \quad h' = (1 - z) \odot n + z \odot h

    Args: as :class:`torch.nn.GRUCell`, plus keyword-only ``engine``.

    Inputs: ``input`` ``[N, H_in]`` or ``[H_in]``; ``hx`` ``[N, H]`` or ``[H]`` (zeros if
    omitted). Output: ``h'``.

    Examples::

        >>> cell = rnnkit.GRUCell(10, 20)
        >>> cell(torch.randn(20, 10)[0]).shape
        torch.Size([20])
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        engine: str = "auto",
        **variants,
    ) -> None:
        super().__init__(input_size, hidden_size, bias, 3, device, dtype, engine=engine, **variants)

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        return self._step(RF.gru_cell, input, hx, "GRUCell", 1)

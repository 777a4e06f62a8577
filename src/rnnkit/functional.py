"""Functional recurrent layers and the one dispatch table that picks their engine.

``lstm``/``gru``/``rnn_tanh``/``rnn_relu`` take what ``torch._VF.lstm`` & co. take — the flat
weight list in ``nn.LSTM._flat_weights`` order and time-major or ``batch_first`` input — plus
``PackedSequence`` input and a default zero state. The cells take what ``torch.lstm_cell`` &
co. take. Every function validates its input, builds an :class:`~rnnkit.engines.base.RNNCall`
(or ``CellCall``) and hands it to the engine that :func:`select_engine` picks.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from rnnkit import validation as V
from rnnkit.amp import cast_cell_like_torch, cast_like_torch
from rnnkit.cells import CellParams, State, split_flat
from rnnkit.engines.base import CellCall, Engine, RNNCall
from rnnkit.engines.driver import run_stack
from rnnkit.modes import MODES
from rnnkit.resets import check_reset
from rnnkit.variants import Variant, make_variant

__all__ = [
    "ENGINES",
    "available_engines",
    "gather_params",
    "gru",
    "gru_cell",
    "lstm",
    "lstm_cell",
    "rnn_relu",
    "rnn_relu_cell",
    "rnn_tanh",
    "rnn_tanh_cell",
    "select_engine",
]


def _fused() -> Engine:
    from rnnkit.engines.cpu import FUSED

    return FUSED


def _reference() -> Engine:
    from rnnkit.engines.reference import REFERENCE

    return REFERENCE


def _triton() -> Engine:
    from rnnkit.engines.triton import TRITON

    return TRITON


# The dispatch table: engine name -> loader, in the order ``engine="auto"`` tries them. Each
# engine declares as data which (mode, device, dtype, options, variant fields) it runs
# (``Engine.rnn_support``/``cell_support``). "triton" comes after the reference, which runs
# every call, so "auto" never picks it: on CUDA "auto" gets the reference engine until GPU
# measurements show where Triton beats it; ``engine="triton"`` names it.
ENGINES: dict[str, Callable[[], Engine]] = {
    "fused": _fused,
    "reference": _reference,
    "triton": _triton,
}


def available_engines() -> list[str]:
    """The names ``engine=`` accepts, besides ``"auto"``."""
    return list(ENGINES)


def check_engine_name(engine: str) -> None:
    if not isinstance(engine, str) or (engine != "auto" and engine not in ENGINES):
        choices = ", ".join(repr(e) for e in ["auto", *ENGINES])
        raise ValueError(f"engine must be one of {choices}, got {engine!r}")


def select_engine(engine: str, call: RNNCall | CellCall) -> Engine:
    """The engine that runs ``call``: the named one, or for ``"auto"`` the first of
    :data:`ENGINES` that can (:meth:`Engine.unsupported
    <rnnkit.engines.base.Engine.unsupported>`: what it declares, then its environment).

    An explicitly named engine that cannot run the call raises; it never falls back. ``"auto"``
    passing over an engine for a fault of the installation says so in one warning.
    """
    check_engine_name(engine)
    names = ENGINES if engine == "auto" else [engine]
    reasons, faulty = [], []
    for name in names:
        candidate = ENGINES[name]()
        reason = candidate.unsupported(call)
        if reason is None:
            for skipped, fault in faulty:
                _warn_fallback(skipped, fault, name)
            return candidate
        reasons.append(f"{name}: {reason}")
        if engine == "auto" and candidate.refused(call) is None and reason == candidate.fault():
            faulty.append((name, reason))
    raise RuntimeError(f"no rnnkit engine can run this call ({'; '.join(reasons)})")


_warned: set[tuple[str, str]] = set()


def _warn_fallback(skipped: str, fault: str, chosen: str) -> None:
    if (skipped, fault) not in _warned:
        _warned.add((skipped, fault))
        warnings.warn(
            f"rnnkit: {fault}; engine='auto' runs the slower {chosen} engine instead",
            RuntimeWarning,
            stacklevel=4,
        )


def gather_params(
    mode: str,
    weights: Sequence[Tensor],
    has_biases: bool,
    num_layers: int,
    D: int,
    variant: Variant,
) -> tuple[CellParams, ...]:
    """Split the flat weight list into one CellParams per layer and direction.

    Per layer and direction the list holds ``w_ih, w_hh[, b_ih, b_hh][, w_hr]`` as in
    ``torch.nn``, then the variant's parameters in ``Variant.extra_param_roles`` order. Every
    weight must have the shape of ``torch.nn``'s parameter in its place.
    """
    weights = V.expect_weight_list(weights)
    extras = variant.extra_param_roles(mode)
    n = len(weights) // (num_layers * D)
    has_proj = mode == "LSTM" and n - len(extras) == (5 if has_biases else 3)
    expected = (4 if has_biases else 2) + (1 if has_proj else 0) + len(extras)
    if n != expected or len(weights) != expected * num_layers * D:
        raise RuntimeError(
            f"got an incorrect number of RNN parameters: expected {expected} per layer and "
            f"direction for {num_layers} layer(s) and {D} direction(s), got {len(weights)}"
        )
    roles = ["weight_ih", "weight_hh"] + ["bias_ih", "bias_hh"] * has_biases
    V.expect_weight_tensors(weights, roles + ["weight_hr"] * has_proj + extras, D)
    V.check_layer_weights(mode, weights, num_layers, D, bool(has_biases), has_proj, variant)
    return split_flat(weights, num_layers * D, bool(has_biases), has_proj, extras)


def _variant(mode: str, variants: dict) -> Variant:
    """The call's Variant: a prebuilt one (``variant=``, as the modules pass) or keywords."""
    if "variant" in variants:
        variant = variants.pop("variant")
        if variants or not isinstance(variant, Variant):
            raise TypeError("pass either variant=Variant(...) or variant keywords, not both")
        return variant
    if "forget_bias" in variants:
        raise TypeError("forget_bias is an initialization option of the modules, not of a call")
    return make_variant(mode, **variants)


def _rnn(
    mode: str,
    input: Tensor | PackedSequence,
    weights: Sequence[Tensor],
    hx: Tensor | tuple[Tensor, Tensor] | None,
    batch_sizes: Tensor | None,
    has_biases: bool,
    num_layers: int,
    dropout: float,
    train: bool,
    bidirectional: bool,
    batch_first: bool,
    engine: str,
    variants: dict,
    reset: Tensor | PackedSequence | None = None,
):
    check_engine_name(engine)
    V.check_layer_options(num_layers, dropout)
    variant = _variant(mode, variants)
    D = 2 if bidirectional else 1
    params = gather_params(mode, weights, has_biases, num_layers, D, variant)
    packed = isinstance(input, PackedSequence)
    sorted_indices = unsorted_indices = None
    if packed:
        data, batch_sizes, sorted_indices, unsorted_indices = input
    else:
        data = input
    if not isinstance(data, Tensor):
        raise TypeError(f"input must be a Tensor or PackedSequence, got {type(data).__name__}")
    if batch_sizes is not None and torch.jit.is_tracing():
        raise RuntimeError(
            "torch.jit.trace cannot trace an rnnkit layer on packed input (a PackedSequence, "
            "batch_sizes or lengths=): its batch sizes are data, which the trace would keep "
            "as the example's; trace padded input, or export the model with "
            "rnnkit.onnx.export, which takes padded input with lengths="
        )
    V.expect_dense("input", data)
    # torch.nn's order: dtype, rank, feature size, hidden shapes; then ATen's empty sequence
    autocast = V.autocast_on()
    w_dtype = params[0].w_ih.dtype
    if not autocast and data.dtype != w_dtype:
        raise ValueError(
            f"RNN input dtype ({data.dtype}) does not match weight dtype ({w_dtype}). "
            f"Convert input: input.to({w_dtype}), or convert model: model.to({data.dtype})"
        )
    H = params[0].w_hh.size(0) // MODES[mode].gates
    _, states = V.check_layer_input(
        mode, data, batch_sizes, sorted_indices, unsorted_indices, hx, batch_first,
        num_layers * D, params[0].w_ih.size(1), H, params[0].w_hh.size(1),
    )  # fmt: skip
    V.check_devices(data, states, [w for p in params for w in p if w is not None])
    if batch_sizes is None and data.size(1 if batch_first else 0) == 0:
        raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
    if not autocast:
        for name, state in zip(
            ("hx[0]", "hx[1]") if mode == "LSTM" else ("hx",), states, strict=False
        ):
            V.expect_dtype(name, state, data.dtype, "input")
    if reset is not None:
        reset = _reset_rows(reset, data, batch_sizes, batch_first)
    if hx is not None and sorted_indices is not None:
        states = [s.index_select(1, sorted_indices) for s in states]
    data, states, params = cast_like_torch(mode, data, batch_sizes, states, params, variant)

    call = RNNCall(
        mode=mode,
        input=data,
        batch_sizes=batch_sizes,
        hx=tuple(states) if mode == "LSTM" else states[0],
        params=params,
        num_layers=num_layers,
        dropout=float(dropout),
        train=bool(train),
        bidirectional=bool(bidirectional),
        batch_first=bool(batch_first),
        variant=variant,
        reset=reset,
    )
    output, *hidden = run_stack(call, select_engine(engine, call).layer)
    if packed:
        output = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
        if unsorted_indices is not None:
            hidden = [h.index_select(1, unsorted_indices) for h in hidden]
    return (output, *hidden)


def _reset_rows(reset, data: Tensor, batch_sizes: Tensor | None, batch_first: bool) -> Tensor:
    """``reset`` as the driver takes it: time-major ``[L, N]``, or the packed rows of it for
    packed input, where only a ``reset`` packed alike (as ``forward(lengths=)`` packs it) fits."""
    if batch_sizes is None:
        return check_reset("", reset, data, batch_first)
    if not isinstance(reset, PackedSequence) or not torch.equal(reset.batch_sizes, batch_sizes):
        raise ValueError(
            "reset cannot be given with a packed input; pass the padded input with lengths= "
            "and reset= instead"
        )
    if reset.data.dtype != torch.bool or reset.data.shape != data.shape[:1]:
        raise RuntimeError(
            f"reset must be packed bool rows, one per input row ({data.size(0)}), got "
            f"{reset.data.dtype} of shape {list(reset.data.shape)}"
        )
    return reset.data


_RNN_DOC = """
    Args:
        input: ``[L, N, H_in]`` (``[N, L, H_in]`` if ``batch_first``), packed data
            ``[sum(batch_sizes), H_in]`` with ``batch_sizes``, or a ``PackedSequence``
            (then the output is one too, and ``hx``/``h_n`` follow its original order).
        weights: the flat weight list in ``nn.{cls}._flat_weights`` order.
        hx: {hx}; zeros when ``None``.
        batch_sizes: the ``batch_sizes`` of packed ``input`` data.
        has_biases, num_layers, dropout, bidirectional, batch_first: as on ``nn.{cls}``.
        train: apply inter-layer dropout.
        engine: ``"auto"`` or an engine name from :func:`available_engines`.
        reset: where sequences start over (see :mod:`rnnkit.resets`): bool ``[L, N]``
            (``[N, L]`` if ``batch_first``); not with packed input.
        **variants: the variant keywords of :mod:`rnnkit.variants` (``layer_norm``,
            ``zoneout``, ...); their parameters follow each layer's in ``weights``.
"""


def lstm(
    input: Tensor | PackedSequence,
    weights: Sequence[Tensor],
    hx: tuple[Tensor, Tensor] | None = None,
    *,
    batch_sizes: Tensor | None = None,
    has_biases: bool = True,
    num_layers: int = 1,
    dropout: float = 0.0,
    train: bool = False,
    bidirectional: bool = False,
    batch_first: bool = False,
    engine: str = "auto",
    reset: Tensor | None = None,
    **variants,
) -> tuple[Tensor | PackedSequence, Tensor, Tensor]:
    """Multi-layer LSTM over a sequence; returns ``(output, h_n, c_n)`` as ``nn.LSTM``."""
    return _rnn(
        "LSTM", input, weights, hx, batch_sizes, has_biases, num_layers, dropout, train,
        bidirectional, batch_first, engine, variants, reset,
    )  # fmt: skip


def _one_hidden(mode: str, cls: str):
    def fn(
        input: Tensor | PackedSequence,
        weights: Sequence[Tensor],
        hx: Tensor | None = None,
        *,
        batch_sizes: Tensor | None = None,
        has_biases: bool = True,
        num_layers: int = 1,
        dropout: float = 0.0,
        train: bool = False,
        bidirectional: bool = False,
        batch_first: bool = False,
        engine: str = "auto",
        reset: Tensor | None = None,
        **variants,
    ) -> tuple[Tensor | PackedSequence, Tensor]:
        return _rnn(
            mode, input, weights, hx, batch_sizes, has_biases, num_layers, dropout, train,
            bidirectional, batch_first, engine, variants, reset,
        )  # fmt: skip

    fn.__name__ = fn.__qualname__ = mode.lower()
    fn.__doc__ = f"Multi-layer {cls} ({mode}); returns ``(output, h_n)`` as ``nn.{cls}``.\n"
    fn.__doc__ += _RNN_DOC.format(cls=cls, hx="``h_0`` ``[D*num_layers, N, H]``")
    return fn


lstm.__doc__ += _RNN_DOC.format(
    cls="LSTM", hx="``(h_0, c_0)``: ``[D*num_layers, N, H_out]`` and ``[D*num_layers, N, H]``"
)
gru = _one_hidden("GRU", "GRU")
rnn_tanh = _one_hidden("RNN_TANH", "RNN")
rnn_relu = _one_hidden("RNN_RELU", "RNN")


def _cell(
    mode: str,
    input: Tensor,
    hx: State,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    engine: str,
    extra_weights: Sequence[Tensor],
    train: bool,
    variants: dict,
) -> State:
    # ATen's checks (lstm_cell, gru_cell, rnn_*_cell), in its order, with its messages
    check_engine_name(engine)
    for name in ("recurrent_dropout", "weight_dropout"):
        if variants.get(name):
            raise ValueError(f"{name} masks a whole sequence; use the layer, not the cell")
    variant = _variant(mode, variants)
    roles = variant.extra_param_roles(mode)
    if len(extra_weights) != len(roles):
        raise ValueError(
            f"extra_weights must hold {len(roles)} tensor(s) for these variants "
            f"({', '.join(roles) or 'none'}), got {len(extra_weights)}"
        )
    G = MODES[mode].gates
    V.expect_tensor("input", input)
    V.expect_dense("input", input, V.CELL_INPUT_LAYOUTS)
    if mode == "LSTM":
        if not isinstance(hx, (tuple, list)):
            raise TypeError(f"hx must be a tuple (h, c) of Tensors, got {type(hx).__name__}")
        states, names = list(hx), ("hx[0]", "hx[1]")
        if len(states) != 2:
            raise RuntimeError("lstm_cell expects two hidden states")
    else:
        states, names = [hx], ("hx",)
    for name, h in zip(names, states, strict=True):
        V.expect_tensor(name, h)
        V.expect_dense(name, h)
    V.check_cell_matrices(w_ih, w_hh)
    H = w_hh.size(1)

    def check_input() -> None:
        if input.dim() != 2:
            raise RuntimeError(f"input must be 2-D [N, H_in], got {input.dim()}-D")
        if input.size(1) != w_ih.size(1):
            raise RuntimeError(
                f"input has inconsistent input_size: got {input.size(1)} expected {w_ih.size(1)}"
            )

    def check_weights() -> None:
        for name, w in (("weight_ih", w_ih), ("weight_hh", w_hh)):
            if w.size(0) != G * H:
                raise RuntimeError(
                    f"{name} first dim must be {G} * hidden_size = {G * H}, but got {w.size(0)}"
                )

    def check_hidden() -> None:
        for label, h in enumerate(states):
            if h.dim() != 2:
                raise RuntimeError(f"hidden{label} must be 2-D [N, H], got {h.dim()}-D")
            if input.size(0) != h.size(0):
                raise RuntimeError(
                    f"Input batch size {input.size(0)} doesn't match hidden{label} batch size "
                    f"{h.size(0)}"
                )
            if h.size(1) != H:
                raise RuntimeError(
                    f"hidden{label} has inconsistent hidden_size: got {h.size(1)}, expected {H}"
                )

    order = {
        "LSTM": (check_input, check_weights, check_hidden),
        "GRU": (check_input, check_hidden, check_weights),
    }.get(mode, (check_weights, check_input, check_hidden))
    for check in order:
        check()
    shapes = {"bias_ih": (G * H,), "bias_hh": (G * H,), **variant.extra_param_shapes(mode, H)}
    named_weights = [
        (name, b) for name, b in (("bias_ih", b_ih), ("bias_hh", b_hh)) if b is not None
    ]
    named_weights += list(zip(roles, extra_weights, strict=True))
    for name, w in named_weights:
        V.expect_tensor(name, w)
        V.expect_dense(name, w)
        if tuple(w.shape) != shapes[name]:
            raise RuntimeError(f"{name} must have shape {shapes[name]}, got {tuple(w.shape)}")
    V.check_devices(input, states, [w_ih, w_hh, *(w for _, w in named_weights)])
    if not V.autocast_on():
        # ATen's message where torch's cells fail in a matrix product; its cells would promote
        # a c of another dtype, which rnnkit's layers refuse as well
        if input.dtype != w_ih.dtype:
            raise RuntimeError(V.aten_dtype_mismatch(input, w_ih))
        for name, w in [("weight_hh", w_hh), *named_weights]:
            V.expect_dtype(name, w, w_ih.dtype, "weight_ih")
        if states[0].dtype != w_hh.dtype:
            raise RuntimeError(V.aten_dtype_mismatch(states[0], w_hh))
        if mode == "LSTM":
            V.expect_dtype("hx[1]", states[1], input.dtype, "input")
    params = CellParams.from_flat([w_ih, w_hh, b_ih, b_hh, *extra_weights], True, False, roles)
    input, states, params = cast_cell_like_torch(input, list(states), params, variant)
    state = tuple(states) if mode == "LSTM" else states[0]
    call = CellCall(mode, input, state, params, variant=variant, train=bool(train))
    return select_engine(engine, call).run_cell(call)


def _cell_function(mode: str, summary: str):
    def fn(
        input: Tensor,
        hx: State,
        w_ih: Tensor,
        w_hh: Tensor,
        b_ih: Tensor | None = None,
        b_hh: Tensor | None = None,
        *,
        engine: str = "auto",
        extra_weights: Sequence[Tensor] = (),
        train: bool = False,
        **variants,
    ) -> State:
        return _cell(
            mode, input, hx, w_ih, w_hh, b_ih, b_hh, engine, extra_weights, train, variants
        )

    fn.__name__ = fn.__qualname__ = f"{mode.lower()}_cell"
    fn.__doc__ = f"""{summary}

    ``**variants`` are the pointwise variants of :mod:`rnnkit.variants` (not the sequence-wide
    ``recurrent_dropout``/``weight_dropout``); ``extra_weights`` holds their parameters in
    ``Variant.extra_param_roles`` order; ``train`` draws zoneout masks.
    """
    return fn


lstm_cell = _cell_function(
    "LSTM", "One LSTM step on ``[N, H_in]`` input and ``(h, c)`` ``[N, H]``; returns ``(h', c')``."
)
gru_cell = _cell_function(
    "GRU", "One GRU step on ``[N, H_in]`` input and ``h`` ``[N, H]``; returns ``h'``."
)
rnn_tanh_cell = _cell_function("RNN_TANH", "One Elman RNN step with tanh; returns ``h'``.")
rnn_relu_cell = _cell_function("RNN_RELU", "One Elman RNN step with ReLU; returns ``h'``.")

r"""The LSTM/GRU/RNN variants rnnkit adds to ``torch.nn``'s layers, all off by default.

Each is a keyword-only argument of the modules and of ``rnnkit.functional``; with every one at
its default the layers are bit-identical to ``torch.nn``'s. Below, ``x`` is the input
projection :math:`x_t W_{ih}^T`, ``r`` the recurrent one :math:`h_{t-1} W_{hh}^T`, ``LN`` a
layer norm over the feature dimension (eps 1e-5) and :math:`\sigma` the gate activation.

``layer_norm=True`` (Ba et al. 2016; as haste's ``LayerNormLSTM``)
    gates :math:`= LN_{ih}(x) + b_{ih} + LN_{hh}(r) + b_{hh}`, each LN over all ``G*H`` gate
    units with a gain and no shift (the biases shift); LSTM also
    :math:`h_t = o_t \odot \tanh(LN_c(c_t))` with gain and shift, while :math:`c_t` itself is
    carried unnormalized.
``peephole=True``, LSTM (Gers & Schmidhuber 2000; ONNX ``P``)
    :math:`i, f \mathrel{+}= p_{i,f} \odot c_{t-1}` and :math:`o \mathrel{+}= p_o \odot c_t`.
``zoneout=p`` or ``(p_h, p_c)`` for LSTM (Krueger et al. 2016)
    :math:`h_t = d \odot h_{t-1} + (1 - d) \odot \tilde h_t` with
    :math:`d \sim \mathrm{Bernoulli}(p)` drawn per unit and step in training; in eval
    :math:`d = p`. Likewise for :math:`c_t`. The layer outputs the zoned-out :math:`h_t`.
``recurrent_dropout=p`` (Gal & Ghahramani 2016; Keras)
    :math:`r = (h_{t-1} \odot m) W_{hh}^T` with one mask :math:`m` per sequence, fixed across
    steps, scaled by :math:`1/(1-p)`; training only.
``weight_dropout=p`` (DropConnect, Wan et al. 2013; AWD-LSTM; haste)
    ``weight_hh`` times one Bernoulli mask per forward call, scaled by :math:`1/(1-p)`;
    training only.
``forget_bias=v``, LSTM (Jozefowicz et al. 2015; Keras ``unit_forget_bias``)
    adds ``v`` to the forget slice of ``bias_ih`` at init; the math is torch's.
``gate_clip=v`` (ONNX ``clip``)
    every gate pre-activation clipped to ``[-v, v]`` before its activation.
``cell_clip=v``, ``proj_clip=v``, LSTM (TensorFlow ``LSTMCell``)
    :math:`c_t`, then the projected :math:`h_t`, clipped to ``[-v, v]``; the clipped
    :math:`c_t` feeds the output gate's peephole and the next step.
``coupled_input_forget=True``, LSTM (CIFG, Greff et al. 2017; ONNX ``input_forget``)
    :math:`f_t = 1 - i_t`; the forget rows of the weights are kept (torch's shapes) but unused.
``activations=(...)`` (ONNX ``activations``)
    LSTM ``(gate, cell, hidden)``, GRU ``(gate, hidden)``, RNN ``(hidden,)``, by name from
    :data:`ACTIVATIONS`; ``hard_sigmoid`` is ONNX's :math:`\max(0, \min(1, 0.2x + 0.5))`.

Extra parameters, per layer ``k`` and direction (``_reverse`` suffix; cells drop ``_l{k}``),
are registered after all of ``torch.nn``'s, which keep torch's names, order, init and random
number use: ``peephole_l{k}`` ``[3*H]`` (order i, f, o; init 0), ``layer_norm_ih_l{k}`` and
``layer_norm_hh_l{k}`` ``[G*H]`` (gains, init 1), and for LSTM ``layer_norm_c_weight_l{k}`` and
``layer_norm_c_bias_l{k}`` ``[H]`` (init 1 and 0).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnkit.modes import MODES


def _hard_sigmoid(x: Tensor) -> Tensor:
    # ONNX/Keras HardSigmoid (alpha 0.2, beta 0.5), not torch's x/6 + 1/2
    return torch.clamp(x * 0.2 + 0.5, 0.0, 1.0)


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "relu": torch.relu,
    "hard_sigmoid": _hard_sigmoid,
    "softsign": F.softsign,
    "softplus": F.softplus,
    "elu": F.elu,
    "identity": lambda x: x,
}

_DEFAULT_ACTIVATIONS = {
    "LSTM": ("sigmoid", "tanh", "tanh"),
    "GRU": ("sigmoid", "tanh"),
    "RNN_TANH": ("tanh",),
    "RNN_RELU": ("relu",),
}
_LSTM_ONLY = ("peephole", "forget_bias", "cell_clip", "proj_clip", "coupled_input_forget")


@dataclass(frozen=True)
class Variant:
    """The variant options of one layer; ``Variant()`` is the plain ``torch.nn`` layer."""

    layer_norm: bool = False
    peephole: bool = False
    zoneout: tuple[float, float] = (0.0, 0.0)  # (p_h, p_c)
    recurrent_dropout: float = 0.0
    weight_dropout: float = 0.0
    forget_bias: float | None = None
    gate_clip: float | None = None
    cell_clip: float | None = None
    proj_clip: float | None = None
    coupled_input_forget: bool = False
    activations: tuple[str, ...] | None = None

    @property
    def is_plain(self) -> bool:
        """True when the step math is torch's own (``forget_bias`` only changes the init)."""
        return self == Variant(forget_bias=self.forget_bias)

    @property
    def draws_in_training(self) -> bool:
        """True when training changes the math: masks drawn per call (zoneout, recurrent and
        weight dropout)."""
        return any(self.zoneout) or self.recurrent_dropout > 0 or self.weight_dropout > 0

    def activation_fns(self, mode: str) -> tuple[Callable[[Tensor], Tensor], ...]:
        return tuple(ACTIVATIONS[a] for a in self.activations or _DEFAULT_ACTIVATIONS[mode])

    def extra_param_roles(self, mode: str) -> list[str]:
        """Names (without the ``_l{k}`` suffix) of this variant's parameters, in flat order."""
        roles = ["peephole"] if self.peephole else []
        if self.layer_norm:
            roles += ["layer_norm_ih", "layer_norm_hh"]
            if mode == "LSTM":
                roles += ["layer_norm_c_weight", "layer_norm_c_bias"]
        return roles

    def extra_param_shapes(self, mode: str, hidden_size: int) -> dict[str, tuple[int, ...]]:
        """Role -> shape of this variant's parameters for one layer and direction, in order."""
        gates = MODES[mode].gates * hidden_size
        shapes = {
            "peephole": (3 * hidden_size,),
            "layer_norm_ih": (gates,),
            "layer_norm_hh": (gates,),
            "layer_norm_c_weight": (hidden_size,),
            "layer_norm_c_bias": (hidden_size,),
        }
        return {role: shapes[role] for role in self.extra_param_roles(mode)}

    def describe(self) -> str:
        """``key=value`` for the options that differ from the default, for ``repr``."""
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value != f.default:
                parts.append(f"{f.name}={value!r}")
        return ", ".join(parts)


# A whole saved module (``torch.save(model)``) holds its Variant, whose fields are plain
# values: torch.load's default unpickler (weights_only=True) may rebuild it, so a user
# allowlists only the public module classes, as for torch.nn's own.
if hasattr(torch.serialization, "add_safe_globals"):
    torch.serialization.add_safe_globals([Variant])


def _check_probability(name: str, p) -> float:
    if not isinstance(p, numbers.Real) or isinstance(p, bool) or not 0 <= p < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {p!r}")
    return float(p)


def _check_clip(name: str, v) -> float | None:
    if v is None:
        return None
    if not isinstance(v, numbers.Real) or isinstance(v, bool) or not v > 0:
        raise ValueError(f"{name} must be a positive number or None, got {v!r}")
    return float(v)


VARIANT_KEYWORDS = frozenset(
    {
        "layer_norm", "peephole", "zoneout", "recurrent_dropout", "weight_dropout",
        "forget_bias", "gate_clip", "cell_clip", "proj_clip", "coupled_input_forget",
        "activations",
    }
)  # fmt: skip


def check_keywords(owner: str, keywords: dict) -> None:
    """Python's own message for a keyword that is not a variant (``owner`` as torch names it)."""
    for name in keywords:
        if name not in VARIANT_KEYWORDS:
            raise TypeError(f"{owner}.__init__() got an unexpected keyword argument '{name}'")


def make_variant(
    mode: str,
    *,
    layer_norm: bool = False,
    peephole: bool = False,
    zoneout: float | tuple[float, float] = 0.0,
    recurrent_dropout: float = 0.0,
    weight_dropout: float = 0.0,
    forget_bias: float | None = None,
    gate_clip: float | None = None,
    cell_clip: float | None = None,
    proj_clip: float | None = None,
    coupled_input_forget: bool = False,
    activations: tuple[str, ...] | list[str] | None = None,
) -> Variant:
    """Validate the variant keywords for ``mode`` (``"LSTM"``, ``"GRU"``, ``"RNN_TANH"``, ...)."""
    for name, flag in (
        ("layer_norm", layer_norm),
        ("peephole", peephole),
        ("coupled_input_forget", coupled_input_forget),
    ):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} should be of type bool, got: {type(flag).__name__}")
    if mode != "LSTM":
        given = {
            "peephole": peephole,
            "forget_bias": forget_bias is not None,
            "cell_clip": cell_clip is not None,
            "proj_clip": proj_clip is not None,
            "coupled_input_forget": coupled_input_forget,
        }
        for name in _LSTM_ONLY:
            if given[name]:
                raise ValueError(f"{name} is only supported for LSTM")
    if isinstance(zoneout, (tuple, list)):
        if len(zoneout) != 2:
            raise ValueError(f"zoneout must be a float or a pair (p_h, p_c), got {zoneout!r}")
        if mode != "LSTM":
            raise ValueError("a pair of zoneout rates (p_h, p_c) is only supported for LSTM")
        zoneout = (
            _check_probability("zoneout", zoneout[0]),
            _check_probability("zoneout", zoneout[1]),
        )
    else:
        p = _check_probability("zoneout", zoneout)
        zoneout = (p, p if mode == "LSTM" else 0.0)
    if forget_bias is not None and (
        not isinstance(forget_bias, numbers.Real) or isinstance(forget_bias, bool)
    ):
        raise TypeError(f"forget_bias should be a number or None, got {forget_bias!r}")
    if activations is not None:
        activations = tuple(activations)
        want = len(_DEFAULT_ACTIVATIONS[mode])
        if len(activations) != want:
            raise ValueError(
                f"activations takes {want} names for this layer "
                f"({', '.join(_ACTIVATION_ROLES[mode])}), got {len(activations)}"
            )
        for a in activations:
            if a not in ACTIVATIONS:
                raise ValueError(f"unknown activation {a!r}; choose from {', '.join(ACTIVATIONS)}")
        if activations == _DEFAULT_ACTIVATIONS[mode]:
            activations = None
    return Variant(
        layer_norm=layer_norm,
        peephole=peephole,
        zoneout=zoneout,
        recurrent_dropout=_check_probability("recurrent_dropout", recurrent_dropout),
        weight_dropout=_check_probability("weight_dropout", weight_dropout),
        forget_bias=None if forget_bias is None else float(forget_bias),
        gate_clip=_check_clip("gate_clip", gate_clip),
        cell_clip=_check_clip("cell_clip", cell_clip),
        proj_clip=_check_clip("proj_clip", proj_clip),
        coupled_input_forget=coupled_input_forget,
        activations=activations,
    )


_ACTIVATION_ROLES = {
    "LSTM": ("gate", "cell", "hidden"),
    "GRU": ("gate", "hidden"),
    "RNN_TANH": ("hidden",),
    "RNN_RELU": ("hidden",),
}

PLAIN = Variant()


def init_parameters(
    module: nn.Module, variant: Variant, variant_names: Sequence[str], bias_ih_names: Sequence[str]
) -> None:
    """torch.nn's init (uniform in ``±1/sqrt(H)``, in registration order) for torch.nn's
    parameters; then the variants' parameters, drawing no random numbers: peepholes and the
    cell LayerNorm shift 0, LayerNorm gains 1; ``forget_bias`` added to each ``bias_ih``."""
    H = module.hidden_size
    stdv = 1.0 / math.sqrt(H) if H > 0 else 0
    for name, weight in module.named_parameters():
        if name not in variant_names:
            nn.init.uniform_(weight, -stdv, stdv)
    with torch.no_grad():
        for name in variant_names:
            zero = name.startswith(("peephole", "layer_norm_c_bias"))
            getattr(module, name).fill_(0.0 if zero else 1.0)
        if variant.forget_bias is not None:
            for name in bias_ih_names:
                getattr(module, name)[H : 2 * H] += variant.forget_bias

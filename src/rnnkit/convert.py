"""Swap ``torch.nn`` recurrent layers inside any model for rnnkit's, and back."""

from __future__ import annotations

import warnings

from torch import nn

from rnnkit.cell_modules import GRUCell, LSTMCell, RNNCell
from rnnkit.functional import check_engine_name
from rnnkit.modules import GRU, LSTM, RNN

_TO_RNNKIT: dict[type[nn.Module], type[nn.Module]] = {
    nn.LSTM: LSTM,
    nn.GRU: GRU,
    nn.RNN: RNN,
    nn.LSTMCell: LSTMCell,
    nn.GRUCell: GRUCell,
    nn.RNNCell: RNNCell,
}
_TO_TORCH = {v: k for k, v in _TO_RNNKIT.items()}
_HOOKS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def _config(m: nn.Module) -> dict:
    keys = ["input_size", "hidden_size", "bias"]
    if hasattr(m, "num_layers"):
        keys += ["num_layers", "batch_first", "dropout", "bidirectional"]
        if m.mode == "LSTM":
            keys.append("proj_size")
    if hasattr(m, "nonlinearity"):
        keys.append("nonlinearity")
    return {k: getattr(m, k) for k in keys}


def _check_revertible(m: nn.Module) -> None:
    variant = getattr(m, "variant", None)
    if type(m) in _TO_TORCH and variant is not None and not variant.is_plain:
        raise ValueError(f"torch.nn has no layer for {type(m).__name__}({variant.describe()})")


def _swap(m: nn.Module, cls: type[nn.Module], extra: dict) -> nn.Module:
    dtype = next(m.parameters()).dtype
    # Built on the meta device so that no memory is allocated and no random numbers are drawn.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        new = cls(**_config(m), device="meta", dtype=dtype, **extra)
    for name, param in m.named_parameters(recurse=False):
        setattr(new, name, param)
    if hasattr(new, "_init_flat_weights"):
        new._init_flat_weights()  # torch.nn's cached weight list
    for attr in _HOOKS:
        if hasattr(m, attr) and hasattr(new, attr):
            getattr(new, attr).update(getattr(m, attr))
    return new.train(m.training)


def _check_model(fn: str, model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}() expects a torch.nn.Module, got {type(model).__name__}")


def _replace(model: nn.Module, mapping: dict, extra: dict, memo: dict) -> nn.Module:
    if id(model) in memo:
        return memo[id(model)]
    cls = mapping.get(type(model))
    if cls is not None:
        memo[id(model)] = _swap(model, cls, extra)
        return memo[id(model)]
    memo[id(model)] = model
    # _modules, not named_children(): that skips a layer registered under a second name
    for name, child in list(model._modules.items()):
        if child is None:
            continue
        replaced = _replace(child, mapping, extra, memo)
        if replaced is not child:
            setattr(model, name, replaced)
    return model


def convert(model: nn.Module, *, engine: str = "auto") -> nn.Module:
    """Replace every ``torch.nn`` LSTM/GRU/RNN/LSTMCell/GRUCell/RNNCell in ``model`` by rnnkit's.

    The new layers share the old ones' ``Parameter`` objects (an optimizer built before the
    call keeps working), training mode and hooks; outputs are unchanged. Exact types only: a
    subclass of ``nn.LSTM`` may override ``forward`` and is left alone. Children are replaced in
    place; the return value is ``model``, or its replacement if ``model`` itself is a layer.

    Example::

        >>> model = rnnkit.convert(nn.Sequential(nn.LSTM(4, 8)))
        >>> type(model[0])
        <class 'rnnkit.modules.LSTM'>
    """
    # checked before anything is swapped, so that a bad call leaves the model as it was
    _check_model("convert", model)
    check_engine_name(engine)
    return _replace(model, _TO_RNNKIT, {"engine": engine}, {})


def revert(model: nn.Module) -> nn.Module:
    """The inverse of :func:`convert`: rnnkit layers back to ``torch.nn``'s."""
    _check_model("revert", model)
    for m in model.modules():
        _check_revertible(m)
    return _replace(model, _TO_TORCH, {}, {})

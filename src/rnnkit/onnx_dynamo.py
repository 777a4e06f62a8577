r"""``rnnkit.onnx.export(dynamo=True)``: torch's dynamo-based ONNX exporter on a model that holds
rnnkit layers.

While that exporter traces (``torch.onnx.export(..., dynamo=True)``, called by the user or by
:func:`export_model`), each rnnkit layer runs as ONNX ``LSTM``/``GRU``/``RNN`` nodes or an
ONNX ``Scan`` (:func:`rnnkit.traced.layer`), with nothing passed by the user.
"""

from __future__ import annotations

import inspect
import warnings

import onnx
import torch
from torch import Tensor, nn

__all__ = ["export_model"]


def export_model(
    model: nn.Module, args, opset_version: int, keep_training: bool, names: dict,
    shapes: dict, kwargs: dict,
) -> onnx.ModelProto:  # fmt: skip
    """``torch.onnx.export(model, args, dynamo=True, ...)``'s model, checked: what
    ``rnnkit.onnx.export(dynamo=True)`` returns. The model is traced in eval mode unless
    ``keep_training`` (every submodule's mode is restored after)."""
    kwargs = dict(kwargs)
    kwargs.pop("training", None)
    args = args if isinstance(args, tuple) else (args,)
    if shapes["dynamic_axes"] is not None and shapes["dynamic_shapes"] is None:
        shapes = dict(dynamic_shapes=_dynamic_shapes(model, args, names["input_names"],
                                                     shapes["dynamic_axes"]))  # fmt: skip
    kwargs.setdefault("verbose", False)
    modes = [(m, m.training) for m in model.modules()]
    if not keep_training:
        model.eval()
    try:
        with warnings.catch_warnings():
            # torch's note that the TorchScript-based exporter is gone from this route
            warnings.filterwarnings("ignore", ".*TorchScript.*")
            program = torch.onnx.export(
                model, args, dynamo=True,
                opset_version=opset_version, **names, **shapes, **kwargs,
            )  # fmt: skip
    except Exception as error:
        # what ONNX cannot express raises as itself, not inside torch's export error
        cause = error.__cause__
        while cause is not None and not isinstance(cause, NotImplementedError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise NotImplementedError(str(cause)) from error
    finally:
        for m, training in modes:
            m.training = training
    proto = program.model_proto
    onnx.checker.check_model(proto)
    return proto


def _dynamic_shapes(model: nn.Module, args: tuple, input_names, dynamic_axes) -> dict:
    """``dynamic_axes`` (``{input name: {axis: dim name}}`` or ``{input name: [axis, ...]}``)
    as ``torch.export``'s ``dynamic_shapes`` of the positional ``args``: one ``Dim`` per dim
    name, so axes of one name stay equal; outputs' axes follow from the graph."""
    dims: dict[str, torch.export.Dim] = {}

    def dim(label: str) -> torch.export.Dim:
        key = "".join(ch if ch.isalnum() else "_" for ch in label)
        if not key.isidentifier():
            key = f"d_{key}"
        return dims.setdefault(key, torch.export.Dim(key))

    # the exporters name the inputs' tensors in order, nested ones too (``(x, (h, c))`` is
    # ``x, h, c``); torch.export reads dynamic_shapes in the structure of forward's signature
    # (``*args`` as one tuple), each tensor's place holding its axes
    names = iter(input_names or [])

    def axes_of(leaf):
        if not isinstance(leaf, Tensor):
            return None
        name = next(names, None)
        axes = dynamic_axes.get(name) if name is not None else None
        if not axes:
            # {} (static), not None: torch.onnx reads a tuple of Nones as one tensor's axes
            return {}
        if not isinstance(axes, dict):
            axes = {a: f"{name}_{a}" for a in axes}
        return {a: dim(label) for a, label in axes.items()}

    bound = inspect.signature(model.forward).bind(*args)
    return {
        name: torch.utils._pytree.tree_map(axes_of, value)
        for name, value in bound.arguments.items()
    }

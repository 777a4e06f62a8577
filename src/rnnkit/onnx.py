r"""ONNX export of models that hold rnnkit layers: :func:`export`.

``export(model, args, f)`` exports the whole model, rnnkit's layers and cells included, to an
ONNX model that onnxruntime runs with a dynamic sequence length and batch. Each rnnkit layer
becomes ONNX ``LSTM``/``GRU``/``RNN`` nodes where ONNX's op computes it exactly, and a ``Scan``
over the step where it cannot (``proj_size``, most variants, calls with ``reset=``);
:mod:`rnnkit.onnx_layers` builds those graphs.

How: by default torch's dynamo-based exporter traces the model, each rnnkit layer running
as torch ops it translates (:mod:`rnnkit.onnx_dynamo`, :mod:`rnnkit.traced`). With
``dynamo=False``, while torch's TorchScript-based exporter traces the model, each rnnkit
module's call is one ``rnnkit::Layer`` placeholder node (its eager result keeps the trace going); the layer's
graph then replaces the placeholder. The rest of the model is torch's own export. The model is
exported in eval mode, as ``torch.onnx.export`` does by default: dropout, zoneout's random
masks, recurrent and weight dropout are the identity or zoneout's expected mix.

``torch.onnx.export(..., dynamo=False)`` on its own exports the layers that ONNX's nodes
compute: while it traces one, the layer's call (:func:`export_traced_layer`) is a placeholder
whose symbolic emits the layer's nodes into torch's graph.

Examples::

    >>> lstm = rnnkit.LSTM(8, 16, num_layers=2, proj_size=4).eval()
    >>> proto = rnnkit.onnx.export(
    ...     lstm, (torch.randn(5, 2, 8),), None,
    ...     input_names=["x"], output_names=["y", "h_n", "c_n"],
    ...     dynamic_axes={"x": {0: "L", 1: "N"}, "y": {0: "L", 1: "N"}},
    ... )
    >>> [node.op_type for node in proto.graph.node].count("Scan")  # one per layer
    2
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from rnnkit.cell_modules import LSTMCell, RNNCellBase
from rnnkit.modules import RNNBase
from rnnkit.onnx_layers import LayerSpec, OnnxGraph, build_layer, layer_spec, uses_onnx_node
from rnnkit.resets import check_reset

__all__ = ["export"]

_DOMAIN = "rnnkit"
DEFAULT_OPSET = 17
# torch.onnx.export(dynamo=True)'s own default
DEFAULT_DYNAMO_OPSET = 18
# ONNX's LSTM/GRU/RNN took their current form in opset 14, LayerNormalization came in 17
MIN_OPSET = 14
MIN_OPSET_LAYER_NORM = 17


def _is_random(module: nn.Module) -> bool:
    """True when ``module`` draws random numbers in training mode."""
    v = module.variant
    inter_layer = isinstance(module, RNNBase) and module.dropout > 0 and module.num_layers > 1
    return inter_layer or v.zoneout != (0.0, 0.0) or v.recurrent_dropout or v.weight_dropout


class _Layer(torch.autograd.Function):
    """One rnnkit module's call: eager in the trace, an ``rnnkit::Layer`` node in the graph.

    ``tensors`` are ``x`` ``[L, N, H_in]`` then those of ``h0``, ``c0``, ``lengths`` that
    ``present`` (a string of those names, comma-separated) lists; the results are ``output``
    ``[L, N, D*H_out]``, ``h_n`` and for LSTM ``c_n``, time-major and batched.
    """

    @staticmethod
    def forward(ctx, exporter: _Exporter, index: int, present: str, *tensors):
        # the trace records this call as one node, not the engine's ops inside it
        state = torch._C._get_tracing_state()
        torch._C._set_tracing_state(None)
        try:
            return exporter.eager(index, present, *tensors)
        finally:
            torch._C._set_tracing_state(state)

    @staticmethod
    def symbolic(g, exporter: _Exporter, index: int, present: str, *tensors):
        spec = exporter.specs[index]
        if exporter.direct:
            return exporter.emit(g, index, present, tensors)
        is_lstm = spec.mode == "LSTM"
        outs = g.op(
            f"{_DOMAIN}::Layer", *tensors, index_i=index, present_s=present,
            outputs=3 if is_lstm else 2,
        )  # fmt: skip
        x_type = tensors[0].type()
        D = spec.num_directions
        outs[0].setType(x_type.with_sizes([None, None, D * spec.H_out]))
        outs[1].setType(x_type.with_sizes([D * spec.num_layers, None, spec.H_out]))
        if is_lstm:
            outs[2].setType(x_type.with_sizes([D * spec.num_layers, None, spec.hidden_size]))
        return tuple(outs)


class _Exporter:
    """The rnnkit modules of a model, their placeholder forwards and the splice.

    A ``direct`` exporter holds one layer that ``torch.onnx.export`` traces: its placeholder's
    symbolic emits the layer's graph itself (:meth:`emit`), as there is no splice after
    torch's export.
    """

    def __init__(self, model: nn.Module, direct: bool = False):
        self.direct = direct
        self.modules: list[nn.Module] = []
        self.specs: list[LayerSpec] = []
        for name, module in model.named_modules():
            if isinstance(module, (RNNBase, RNNCellBase)):
                self.modules.append(module)
                self.specs.append(layer_spec(module, name))
            if direct:
                break

    @contextlib.contextmanager
    def placeholders(self):
        """Route each rnnkit module's calls to :class:`_Layer` for the duration."""
        for index, module in enumerate(self.modules):
            forward = self._cell_forward if isinstance(module, RNNCellBase) else self._forward
            module.forward = _bind(forward, index)
        try:
            yield
        finally:
            for module in self.modules:
                del module.forward

    def _forward(self, index: int, input, hx=None, reset=None, lengths=None):
        module = self.modules[index]
        name = type(module).__name__
        if isinstance(input, PackedSequence):
            raise NotImplementedError(
                f"ONNX export of {name} with a PackedSequence input is not supported: pass the "
                "padded tensor and its lengths as forward(input, hx, lengths=lengths)"
            )
        if not isinstance(input, Tensor) or input.dim() not in (2, 3):
            # the eager call raises torch's own error
            return module._eager_forward(input, hx, lengths)
        batched = input.dim() == 3
        x = input if batched else input.unsqueeze(1)
        if batched and module.batch_first:
            x = x.transpose(0, 1)
        tensors, present = [x], []
        if hx is not None:
            states = hx if module.mode == "LSTM" else (hx,)
            if not all(isinstance(s, Tensor) for s in states):
                return module._eager_forward(input, hx, lengths)
            tensors += [s if batched else s.unsqueeze(1) for s in states]
            present += ["h0", "c0"][: len(states)]
        if lengths is not None:
            if not batched:
                # the eager call raises rnnkit's own error
                return module._eager_forward(input, hx, lengths)
            if not isinstance(lengths, Tensor):
                lengths = torch.tensor(lengths)
            tensors.append(lengths.to(torch.int32))
            present.append("lengths")
        if reset is not None:
            # time-major [L, N], as x is here; the shape check compares sizes the trace records,
            # which holds for other sizes too (the graph reads them from x and reset)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                reset = check_reset(name, reset, input, module.batch_first, batched)
            tensors.append(reset if batched else reset.unsqueeze(1))
            present.append("reset")
        output, *states = _Layer.apply(self, index, ",".join(present), *tensors)
        if batched and module.batch_first:
            output = output.transpose(0, 1)
        if not batched:
            output = output.squeeze(1)
            states = [s.squeeze(1) for s in states]
        return (output, tuple(states)) if module.mode == "LSTM" else (output, states[0])

    def _cell_forward(self, index: int, input, hx=None):
        module = self.modules[index]
        is_lstm = isinstance(module, LSTMCell)
        if not isinstance(input, Tensor) or input.dim() not in (1, 2):
            return type(module).forward(module, input, hx)
        batched = input.dim() == 2
        # one step of a one-layer layer: [1, N, H_in]
        x = input.unsqueeze(0) if batched else input.view(1, 1, -1)
        tensors, present = [x], []
        if hx is not None:
            states = hx if is_lstm else (hx,)
            if not all(isinstance(s, Tensor) and s.dim() == input.dim() for s in states):
                return type(module).forward(module, input, hx)
            tensors += [s.unsqueeze(0) if batched else s.view(1, 1, -1) for s in states]
            present += ["h0", "c0"][: len(states)]
        _, *states = _Layer.apply(self, index, ",".join(present), *tensors)
        states = [s.squeeze(0) if batched else s.view(-1) for s in states]
        return tuple(states) if is_lstm else states[0]

    def eager(self, index: int, present: str, *tensors) -> tuple[Tensor, ...]:
        """The module's own result in ``_Layer``'s layout."""
        module = self.modules[index]
        named = dict(zip(_inputs(present), tensors, strict=True))
        x, lengths, reset = named["x"], named.get("lengths"), named.get("reset")
        hx = None
        if "h0" in named:
            hx = (named["h0"], named["c0"]) if "c0" in named else named["h0"]
        if isinstance(module, RNNCellBase):
            if hx is not None:
                hx = tuple(s[0] for s in hx) if isinstance(hx, tuple) else hx[0]
            states = type(module).forward(module, x[0], hx)
            states = states if isinstance(states, tuple) else (states,)
            states = [s.unsqueeze(0) for s in states]
            # distinct tensors: the trace maps each output to its own value
            return tuple(t.clone() for t in (states[0], *states))
        if module.batch_first:
            x = x.transpose(0, 1)
            reset = None if reset is None else reset.t()
        output, states = module._eager_forward(x, hx, lengths, reset)
        if module.batch_first:
            output = output.transpose(0, 1)
        states = states if isinstance(states, tuple) else (states,)
        return tuple(t.clone() for t in (output, *states))

    def emit(self, g, index: int, present: str, tensors) -> tuple:
        """The layer's graph as nodes of torch's graph ``g``, for ``_Layer.symbolic``."""
        spec = self.specs[index]
        dtype = next(iter(self.modules[index].parameters())).dtype
        built = OnnxGraph(f"{spec.name}layer", dtype, {})
        names = dict(zip(_inputs(present), (f"input{j}" for j in range(len(tensors))), strict=True))
        results = build_layer(
            built, spec, names["x"], names.get("h0"), names.get("c0"), names.get("lengths"),
            names.get("reset"),
        )  # fmt: skip
        values = dict(zip(names.values(), tensors, strict=True))
        for name, initializer in built.initializers.items():
            values[name] = g.op("Constant", value_t=torch.from_numpy(_array(initializer)))
        missing = None
        for node in built.nodes:
            inputs = []
            for name in node.input:
                if not name and missing is None:
                    missing = g.op("prim::Constant")
                    missing.setType(torch._C.OptionalType.ofTensor())
                inputs.append(values[name] if name else missing)
            attrs = {_ATTR_KEYS[a.type](a.name): _torch_attribute(a) for a in node.attribute}
            outs = g.op(node.op_type, *inputs, outputs=len(node.output), **attrs)
            outs = outs if len(node.output) > 1 else (outs,)
            values.update(zip(node.output, outs, strict=True))
        n_out = 3 if spec.mode == "LSTM" else 2
        return tuple(values[name] for name in results[:n_out])

    def splice(self, proto: onnx.ModelProto) -> None:
        """Replace every ``rnnkit::Layer`` node of ``proto`` by its layer's graph."""
        graph = proto.graph
        initializers: dict = {}
        nodes = []
        for count, node in enumerate(graph.node):
            if node.domain != _DOMAIN:
                nodes.append(node)
                continue
            attrs = {a.name: _attribute(a) for a in node.attribute}
            spec = self.specs[attrs["index"]]
            dtype = next(iter(self.modules[attrs["index"]].parameters())).dtype
            g = OnnxGraph(f"{spec.name}layer{count}", dtype, initializers)
            names = dict(zip(_inputs(attrs["present"]), node.input, strict=True))
            results = build_layer(
                g, spec, names["x"], names.get("h0"), names.get("c0"), names.get("lengths"),
                names.get("reset"),
            )  # fmt: skip
            results = results[: len(node.output)]
            renames = dict(zip(results, node.output, strict=True))
            for built in g.nodes:
                built.input[:] = [renames.get(v, v) for v in built.input]
                built.output[:] = [renames.get(v, v) for v in built.output]
            nodes.extend(g.nodes)
        del graph.node[:]
        graph.node.extend(nodes)
        graph.initializer.extend(initializers.values())
        kept = [o for o in proto.opset_import if o.domain != _DOMAIN]
        del proto.opset_import[:]
        proto.opset_import.extend(kept)


def _inputs(present: str) -> list[str]:
    """The names of a placeholder's inputs: ``x``, then those ``present`` lists."""
    return ["x", *filter(None, present.split(","))]


def _attribute(attribute: onnx.AttributeProto):
    value = onnx.helper.get_attribute_value(attribute)
    return value.decode() if isinstance(value, bytes) else value


# ONNX attribute type -> the key suffix of torch's g.op (a list value makes it a list)
_ATTR_KEYS = {
    onnx.AttributeProto.INT: lambda n: f"{n}_i",
    onnx.AttributeProto.INTS: lambda n: f"{n}_i",
    onnx.AttributeProto.FLOAT: lambda n: f"{n}_f",
    onnx.AttributeProto.FLOATS: lambda n: f"{n}_f",
    onnx.AttributeProto.STRING: lambda n: f"{n}_s",
    onnx.AttributeProto.STRINGS: lambda n: f"{n}_s",
    onnx.AttributeProto.TENSOR: lambda n: f"{n}_t",
}


def _array(tensor: onnx.TensorProto) -> np.ndarray:
    return onnx.numpy_helper.to_array(tensor).copy()


def _torch_attribute(attribute: onnx.AttributeProto):
    """An ONNX node's attribute as torch's ``g.op`` takes it."""
    value = onnx.helper.get_attribute_value(attribute)
    if attribute.type == onnx.AttributeProto.TENSOR:
        return torch.from_numpy(_array(value))
    if attribute.type == onnx.AttributeProto.STRING:
        return value.decode()
    if attribute.type == onnx.AttributeProto.STRINGS:
        return [v.decode() for v in value]
    return (
        list(value)
        if attribute.type in (onnx.AttributeProto.INTS, onnx.AttributeProto.FLOATS)
        else value
    )


def export_traced_layer(module: RNNBase, input, hx, lengths):
    """``module``'s call while ``torch.onnx.export(..., dynamo=False)`` traces it.

    The call is one placeholder whose symbolic emits the layer's ONNX graph (LSTM/GRU/RNN
    nodes), so torch's own exporter exports a model that holds rnnkit layers. A layer that
    needs a ``Scan`` (``proj_size``, most variants, float64) raises: :func:`export` exports it.
    """
    spec = layer_spec(module)
    dtype = next(iter(module.parameters())).dtype
    name = type(module).__name__
    if dtype != torch.float32 or not uses_onnx_node(spec):
        raise NotImplementedError(
            f"torch.onnx.export exports an rnnkit {name} only where ONNX's {spec.mode.split('_')[0]} "
            "op computes it (float32, no proj_size, the variants ONNX defines); "
            "rnnkit.onnx.export(model, args, f) exports this one"
        )
    if module.training and _is_random(module):
        raise NotImplementedError(
            f"{name} draws random numbers in training mode (dropout, zoneout, recurrent or "
            "weight dropout), which ONNX export cannot express; export in eval mode"
        )
    return _Exporter(module, direct=True)._forward(0, input, hx, lengths=lengths)


def _bind(forward, index: int):
    def bound(*args, **kwargs):
        return forward(index, *args, **kwargs)

    return bound


def export(
    model: nn.Module,
    args: tuple | Tensor,
    f: str | os.PathLike | io.IOBase | None = None,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: Mapping[str, Mapping[int, str] | Sequence[int]] | None = None,
    dynamic_shapes=None,
    opset_version: int | None = None,
    dynamo: bool = True,
    **kwargs,
) -> onnx.ModelProto:
    r"""Export ``model`` (rnnkit layers and cells anywhere inside) to ONNX.

    A thin helper on ``torch.onnx.export``: with ``dynamo=True`` (the default, as torch's)
    torch's dynamo-based exporter, which exports rnnkit's layers by itself
    (:mod:`rnnkit.onnx_dynamo`); with ``dynamo=False`` its TorchScript-based one, which torch
    deprecates, with rnnkit's graph of each layer spliced in. Either way the model is exported in eval mode and the
    result is an ``onnx.ModelProto``; the extra keywords go to ``torch.onnx.export``.
    ``forward(input, hx, lengths=...)`` of a layer exports ``lengths`` as ONNX's
    ``sequence_lens`` (or a step mask in a ``Scan``); make ``lengths`` a model input to keep it
    dynamic.

    Args:
        model: the ``nn.Module`` to export.
        args: the example inputs, as ``torch.onnx.export`` takes them.
        f: a path or a binary file to write the model to; ``None`` writes nothing.
        input_names, output_names, dynamic_axes, opset_version: as ``torch.onnx.export``'s;
            ``opset_version`` from 14 (17 for ``layer_norm``); by default 18 with
            ``dynamo=True`` (torch's default), 17 without.
        dynamic_shapes: as ``torch.onnx.export``'s (``dynamo=True`` only; ``dynamic_axes``
            works with both).
        dynamo: which of torch's exporters runs.

    Returns:
        The ``onnx.ModelProto`` (also written to ``f``).

    Raises:
        NotImplementedError: (itself, not inside torch's export error) for what ONNX export
            cannot express: a ``PackedSequence`` input,
            ``training=torch.onnx.TrainingMode.TRAINING`` with a layer that draws random
            numbers.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if opset_version is None:
        opset_version = DEFAULT_DYNAMO_OPSET if dynamo else DEFAULT_OPSET
    if not isinstance(opset_version, int) or opset_version < MIN_OPSET:
        raise ValueError(f"opset_version must be an int >= {MIN_OPSET}, got {opset_version!r}")
    if dynamic_shapes is not None and not dynamo:
        raise TypeError("dynamic_shapes needs dynamo=True; pass dynamic_axes to dynamo=False")
    exporter = _Exporter(model)
    if opset_version < MIN_OPSET_LAYER_NORM and any(s.variant.layer_norm for s in exporter.specs):
        raise ValueError(
            f"ONNX export of layer_norm needs opset_version >= {MIN_OPSET_LAYER_NORM}, "
            f"got {opset_version}"
        )
    training = kwargs.get("training", torch.onnx.TrainingMode.EVAL)
    keeps_training = training == torch.onnx.TrainingMode.TRAINING or (
        training == torch.onnx.TrainingMode.PRESERVE and model.training
    )
    random = [
        spec.name.rstrip(".") or type(module).__name__
        for spec, module in zip(exporter.specs, exporter.modules, strict=True)
        if _is_random(module)
    ]
    if random and keeps_training:
        raise NotImplementedError(
            f"{', '.join(random)} draw random numbers in training mode (dropout, zoneout, "
            "recurrent or weight dropout), which ONNX export cannot express; export in eval "
            "mode"
        )
    if random and model.training:
        warnings.warn(
            f"the model is in training mode: {', '.join(random)} are exported in eval mode, "
            "without their dropout and with zoneout's expected mix",
            stacklevel=2,
        )
    if dynamo:
        from rnnkit.onnx_dynamo import export_model

        names = dict(input_names=input_names, output_names=output_names)
        shapes = dict(dynamic_axes=dynamic_axes, dynamic_shapes=dynamic_shapes)
        proto = export_model(model, args, opset_version, keeps_training, names, shapes, kwargs)
        if f is not None:
            onnx.save(proto, f)
        return proto
    buffer = io.BytesIO()
    with exporter.placeholders(), warnings.catch_warnings(), torch.no_grad():
        # the TorchScript-based exporter is rnnkit's route here, not the caller's choice
        warnings.filterwarnings(
            "ignore", "You are using the legacy TorchScript", DeprecationWarning
        )
        warnings.filterwarnings("ignore", "The feature will be removed", DeprecationWarning)
        torch.onnx.export(
            model, args, buffer, input_names=input_names, output_names=output_names,
            dynamic_axes=dynamic_axes, opset_version=opset_version, dynamo=False,
            custom_opsets={_DOMAIN: 1}, **kwargs,
        )  # fmt: skip
    proto = onnx.load_from_string(buffer.getvalue())
    exporter.splice(proto)
    onnx.checker.check_model(proto)
    if f is not None:
        onnx.save(proto, f)
    return proto

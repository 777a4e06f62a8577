r"""rnnkit layers under torch's dynamo-based ONNX exporter (``torch.onnx.export(..., dynamo=True)``).

While that exporter traces a model, each rnnkit layer's call
(:func:`layer`) runs as torch ops that the exporter translates, not as an engine's ops: the
user passes nothing (no translation table) and the sequence length and batch stay symbolic.

- Where ONNX's ``LSTM``/``GRU``/``RNN`` op computes the layer exactly (torch's layers in
  float32, ``bias=False``, the variants ONNX defines: peepholes, ``gate_clip``,
  ``coupled_input_forget``, named activations; see :func:`rnnkit.onnx_layers.uses_onnx_node`),
  each layer is one such node (``torch.onnx.ops.symbolic_multi_out``), both directions in one,
  ``lengths=`` as its ``sequence_lens``. Its weights are the parameters reordered to ONNX's
  gate order by torch ops on the initializers (the exporter's optimizer folds them).
- Everything else (``proj_size``, layer norm, zoneout's eval mix, ``cell_clip``, float64,
  ``reset=``) runs each layer and direction as torch's ``scan`` over the reference engine's
  own step (:func:`rnnkit.cells.make_step`), which the exporter writes as an ONNX ``Scan``.
  A step past a sequence's length keeps the state and outputs zeros (so the reverse direction
  starts at each sequence's end, as the packed path does); a reset step selects zeros or the
  initial state (:func:`rnnkit.resets.restarts`).

The layer is exported in eval mode semantics: a layer in training mode that draws random
numbers (dropout between layers, zoneout, recurrent or weight dropout) raises, as ONNX cannot
express the draws. A ``PackedSequence`` raises too (its batch sizes are data): pass the padded
input with ``lengths=``.
"""

from __future__ import annotations

import inspect
import warnings

import onnx
import torch
from torch import Tensor, nn
from torch._higher_order_ops.scan import scan
from torch.nn.utils.rnn import PackedSequence

from rnnkit.cells import make_prepare, make_step
from rnnkit.functional import gather_params
from rnnkit.onnx_layers import (
    layer_spec,
    node_attributes,
    node_op,
    onnx_peephole,
    reorder_gates,
    uses_onnx_node,
)
from rnnkit.resets import INITIAL, ZERO, check_reset, restarts

__all__ = ["export_model", "layer"]


def _is_random(module: nn.Module) -> bool:
    v = module.variant
    inter_layer = module.dropout > 0 and module.num_layers > 1
    return inter_layer or v.zoneout != (0.0, 0.0) or v.recurrent_dropout or v.weight_dropout


def layer(module: nn.Module, input, hx, reset, lengths, check_hx):
    """``module(input, hx, reset, lengths)`` (an rnnkit ``LSTM``, ``GRU`` or ``RNN``) as
    torch ops the dynamo-based ONNX exporter translates; returns what ``forward`` returns.
    ``check_hx(name, hx, is_lstm, batched)`` is the module's check of ``hx``, which returns
    the states batched."""
    name = type(module).__name__
    if isinstance(input, PackedSequence):
        raise NotImplementedError(
            f"{name}: ONNX export takes padded input: a PackedSequence's batch sizes are data, "
            "which the exported graph would keep as the example's; pass the padded input with "
            "lengths="
        )
    if module.training and _is_random(module):
        raise NotImplementedError(
            f"{name} draws random numbers in training mode (dropout, zoneout, recurrent or "
            "weight dropout), which ONNX export cannot express; export the model in eval mode"
        )
    if not isinstance(input, Tensor) or input.dim() not in (2, 3):
        raise ValueError(f"{name}: Expected input to be 2D or 3D")
    if input.dtype not in (torch.float32, torch.float64):
        raise NotImplementedError(
            f"{name}: ONNX export supports float32 and float64 layers, got {input.dtype}"
        )
    is_lstm = module.mode == "LSTM"
    batched = input.dim() == 3
    batch_dim = 0 if module.batch_first else 1
    x = input if batched else input.unsqueeze(batch_dim)
    if module.batch_first:
        x = x.transpose(0, 1)
    # time-major from here: x [L, N, H_in]
    if reset is not None:
        reset = check_reset(name, reset, input, module.batch_first, batched=batched)
        if not batched:
            reset = reset.unsqueeze(1)
    if lengths is not None:
        if not batched:
            raise ValueError(f"{name}: lengths needs a batched 3-D input")
        lengths = torch.as_tensor(lengths, device=x.device).to(torch.int64)
    D = 2 if module.bidirectional else 1
    params = gather_params(
        module.mode, module._flat_weights, module.bias, module.num_layers, D, module.variant
    )
    N = x.size(1)
    H, H_out = module.hidden_size, module.proj_size or module.hidden_size
    if hx is None:
        h0 = x.new_zeros(module.num_layers * D, N, H_out)
        c0 = x.new_zeros(module.num_layers * D, N, H) if is_lstm else None
    else:
        hx = check_hx(name, hx, is_lstm, batched)
        h0, c0 = hx if is_lstm else (hx, None)
    spec = layer_spec(module)
    node = uses_onnx_node(spec) and x.dtype == torch.float32 and reset is None
    hs, cs = [], []
    for k in range(module.num_layers):
        rows = slice(k * D, (k + 1) * D)
        args = (x, h0[rows], None if c0 is None else c0[rows], params[rows], lengths)
        if node:
            x, h_k, c_k = _node_layer(spec, *args)
        else:
            x, h_k, c_k = _scan_layer(module, *args, reset)
        hs.append(h_k)
        cs.append(c_k)
    h_n = torch.cat(hs, 0)
    output = x.transpose(0, 1) if module.batch_first else x
    hidden = [h_n, torch.cat(cs, 0)] if is_lstm else [h_n]
    if not batched:
        output = output.squeeze(batch_dim)
        hidden = [h.squeeze(1) for h in hidden]
    return output, tuple(hidden) if is_lstm else hidden[0]


def _node_layer(spec, x, h0, c0, params, lengths):
    """One layer as one ONNX LSTM/GRU/RNN node: ``[L, N, D*H]`` output, ``[D, N, H]`` states."""
    mode, H = spec.mode, spec.hidden_size
    D = len(params)

    def stacked(fn) -> Tensor:
        return torch.stack([fn(p) for p in params])

    # ONNX's W [D, G*H, H_in], R [D, G*H, H], B [D, 2*G*H] (input biases, then recurrent)
    w = stacked(lambda p: reorder_gates(p.w_ih, mode, H))
    r = stacked(lambda p: reorder_gates(p.w_hh, mode, H))
    b = None
    if params[0].b_ih is not None:
        b = stacked(
            lambda p: torch.cat([reorder_gates(p.b_ih, mode, H), reorder_gates(p.b_hh, mode, H)])
        )
    peephole = None
    if params[0].peephole is not None:
        peephole = stacked(lambda p: onnx_peephole(p.peephole, H))
    seq_lens = None if lengths is None else lengths.to(torch.int32)
    inputs = [x, w, r, b, seq_lens, h0]
    if mode == "LSTM":
        inputs += [c0, peephole]
    L, N = x.size(0), x.size(1)
    shapes = [[L, D, N, H], [D, N, H], [D, N, H]][: 3 if mode == "LSTM" else 2]
    outs = torch.onnx.ops.symbolic_multi_out(
        node_op(mode),
        inputs,
        node_attributes(spec, D),
        dtypes=[x.dtype] * len(shapes),
        shapes=shapes,
    )
    # Y [L, D, N, H] -> [L, N, D*H]
    y = outs[0].permute(0, 2, 1, 3).reshape(L, N, D * H)
    return y, outs[1], outs[2] if mode == "LSTM" else None


def _scan_layer(module, x, h0, c0, params, lengths, reset):
    """One layer, each direction a ``scan`` over the reference's step."""
    mode, variant = module.mode, module.variant
    is_lstm = mode == "LSTM"
    prepare = make_prepare(mode, variant, False, out_of_place=True)
    step = make_step(mode, variant, out_of_place=True)
    L, N = x.size(0), x.size(1)
    mask = None
    if lengths is not None:
        # [L, N, 1]: step t of sequence n lies inside its length
        mask = (torch.arange(L, device=x.device).unsqueeze(1) < lengths.unsqueeze(0)).unsqueeze(2)
    ys, hs, cs = [], [], []
    for d, p in enumerate(params):
        seq, p = prepare(x, p, N)
        rest = seq[1:]
        xs = [seq[0]]
        if mask is not None:
            xs.append(mask)
        if reset is not None:
            codes = restarts(reset, lengths, d == 1).unsqueeze(2)  # [L, N, 1]
            xs += [codes == ZERO, codes == INITIAL]
        h_init = h0[d]
        c_init = c0[d] if is_lstm else None

        # what a restarting row reads: apart from the carry's initial value, which scan may
        # not see aliased among its other inputs
        h_first = h_init.clone() if reset is not None else None
        c_first = c_init.clone() if reset is not None and is_lstm else None

        def combine(carry, xs_t, p=p, rest=rest, h_first=h_first, c_first=c_first):
            h, c = carry if is_lstm else (carry, None)
            xs_t = list(xs_t)
            gx_t = xs_t.pop(0)
            m_t = xs_t.pop(0) if mask is not None else None
            if reset is not None:
                zero_t, initial_t = xs_t
                h = torch.where(initial_t, h_first, torch.where(zero_t, 0.0, h))
                if is_lstm:
                    c = torch.where(initial_t, c_first, torch.where(zero_t, 0.0, c))
            new = step((gx_t, *rest), (h, c) if is_lstm else h, p)
            h_new, c_new = new if is_lstm else (new, None)
            y = h_new
            if m_t is not None:
                # a step past the sequence's end keeps the state and outputs zeros
                h_new = torch.where(m_t, h_new, h)
                y = torch.where(m_t, y, 0.0)
                if is_lstm:
                    c_new = torch.where(m_t, c_new, c)
            # scan's outputs may not alias its carry
            return ((h_new, c_new) if is_lstm else h_new), y.clone()

        init = (h_init, c_init) if is_lstm else h_init
        final, y = scan(combine, init, xs, reverse=d == 1)
        ys.append(y)
        h_n, c_n = final if is_lstm else (final, None)
        hs.append(h_n)
        cs.append(c_n)
    y = ys[0] if len(ys) == 1 else torch.cat(ys, -1)
    return y, torch.stack(hs), torch.stack(cs) if is_lstm else None


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

    names = list(input_names or [])
    flat = []
    for i, arg in enumerate(args):
        axes = dynamic_axes.get(names[i]) if i < len(names) else None
        if not isinstance(arg, Tensor) or not axes:
            flat.append(None)
            continue
        if not isinstance(axes, dict):
            axes = {a: f"{names[i]}_{a}" for a in axes}
        flat.append({a: dim(label) for a, label in axes.items()})
    # torch.export reads dynamic_shapes in the structure of forward's signature (*args as one
    # tuple)
    bound = inspect.signature(model.forward).bind(*args)
    shapes, i = {}, 0
    for name, value in bound.arguments.items():
        kind = bound.signature.parameters[name].kind
        n = len(value) if kind == inspect.Parameter.VAR_POSITIONAL else 1
        shapes[name] = (
            tuple(flat[i : i + n]) if kind == inspect.Parameter.VAR_POSITIONAL else flat[i]
        )
        i += n
    return shapes

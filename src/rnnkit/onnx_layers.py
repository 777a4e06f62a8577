r"""The ONNX graph of one rnnkit layer or cell, built with ``onnx.helper``.

A layer becomes ONNX ``LSTM``/``GRU``/``RNN`` nodes, one per layer (both directions in one node,
``direction="bidirectional"``), when ONNX's op computes exactly what rnnkit computes: torch's
layers, ``bias=False``, and the variants ONNX defines (peepholes ``P``, ``clip``,
``input_forget``, ``activations``). ONNX's gate orders differ from torch's (LSTM ``i, o, f, c``
for torch's ``i, f, g, o``; GRU ``z, r, h`` for ``r, z, n``) and torch's GRU is ONNX's with
``linear_before_reset=1``. Everything else (``proj_size``, layer norm, zoneout's eval mix,
``cell_clip``, ``proj_clip``, the ``identity`` activation) runs as a ``Scan`` per layer and
direction over the step of :func:`rnnkit.cells.make_step`, with the input projection of all
steps computed before the loop.

Both keep the sequence length and batch dynamic. Variable lengths are ONNX's ``sequence_lens``
for the nodes, and a step mask for the ``Scan``: a masked step keeps the state and outputs
zeros, so the forward direction ends at each sequence's last step and the reverse one starts
there, as torch's packed path does.

Resets inside a sequence (``reset=``, :mod:`rnnkit.resets`) run as a ``Scan`` too: the graph
turns the mask into each direction's restart codes (as :func:`rnnkit.resets.restarts` does),
and the step selects zeros or the initial state for the rows that restart before it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor, nn

from rnnkit.cells import LN_EPS
from rnnkit.variants import Variant

__all__ = [
    "ONNX_ACTIVATIONS",
    "LayerSpec",
    "OnnxGraph",
    "build_layer",
    "layer_spec",
    "node_attributes",
    "node_op",
    "onnx_peephole",
    "reorder_gates",
    "uses_onnx_node",
]

# rnnkit activation -> (ONNX op, its attributes); ONNX's RNN nodes take the same names
ONNX_ACTIVATIONS: dict[str, tuple[str, dict[str, float]]] = {
    "sigmoid": ("Sigmoid", {}),
    "tanh": ("Tanh", {}),
    "relu": ("Relu", {}),
    "hard_sigmoid": ("HardSigmoid", {"alpha": 0.2, "beta": 0.5}),
    "softsign": ("Softsign", {}),
    "softplus": ("Softplus", {}),
    "elu": ("Elu", {"alpha": 1.0}),
    "identity": ("Identity", {}),
}
# activations an ONNX LSTM/GRU/RNN node accepts by name
_NODE_ACTIVATIONS = ("sigmoid", "tanh", "relu", "hard_sigmoid", "softsign", "softplus", "elu")
_DEFAULT_ACTIVATIONS = {
    "LSTM": ("sigmoid", "tanh", "tanh"),
    "GRU": ("sigmoid", "tanh"),
    "RNN_TANH": ("tanh",),
    "RNN_RELU": ("relu",),
}
# torch's gate blocks in ONNX's order
_ONNX_GATE_ORDER = {"LSTM": (0, 3, 1, 2), "GRU": (1, 0, 2), "RNN_TANH": (0,), "RNN_RELU": (0,)}
_DTYPES = {torch.float32: TensorProto.FLOAT, torch.float64: TensorProto.DOUBLE}
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


@dataclass(frozen=True)
class LayerSpec:
    """What the graph of a layer needs: its options and a getter of its parameters.

    ``param(role, layer, direction)`` returns the parameter of that role (``"weight_ih"``,
    ``"peephole"``, ...) or ``None`` where the layer has none; ``name`` prefixes the
    initializers.
    """

    name: str
    mode: str
    hidden_size: int
    proj_size: int
    num_layers: int
    num_directions: int
    variant: Variant
    param: Callable[[str, int, int], Tensor | None]

    @property
    def H_out(self) -> int:
        return self.proj_size or self.hidden_size

    @property
    def activations(self) -> tuple[str, ...]:
        return self.variant.activations or _DEFAULT_ACTIVATIONS[self.mode]


def layer_spec(module: nn.Module, name: str = "") -> LayerSpec:
    """The :class:`LayerSpec` of an rnnkit layer or cell; ``name`` is its qualified name.
    (Told apart by their attributes: the modules import this file's users, not it them.)"""
    prefix = f"{name}." if name else ""
    if hasattr(module, "num_layers"):

        def param(role: str, k: int, d: int) -> Tensor | None:
            return getattr(module, f"{role}_l{k}{'_reverse' if d else ''}", None)

        return LayerSpec(
            prefix, module.mode, module.hidden_size, module.proj_size, module.num_layers,
            2 if module.bidirectional else 1, module.variant, param,
        )  # fmt: skip

    def cell_param(role: str, k: int, d: int) -> Tensor | None:
        return getattr(module, role, None)

    # the gate blocks of the cell's weights: 4 LSTM, 3 GRU, 1 an Elman cell
    gates = module.weight_ih.size(0) // module.hidden_size
    mode = {4: "LSTM", 3: "GRU"}.get(gates)
    if mode is None:
        mode = "RNN_RELU" if module.nonlinearity == "relu" else "RNN_TANH"
    return LayerSpec(prefix, mode, module.hidden_size, 0, 1, 1, module.variant, cell_param)


def uses_onnx_node(spec: LayerSpec) -> bool:
    """True when ONNX's LSTM/GRU/RNN op computes this layer exactly; else (and in float64) it
    runs as a Scan."""
    v = spec.variant
    return (
        spec.proj_size == 0
        and not v.layer_norm
        and v.zoneout == (0.0, 0.0)
        and v.cell_clip is None
        and v.proj_clip is None
        and all(a in _NODE_ACTIVATIONS for a in spec.activations)
    )


class OnnxGraph:
    """Nodes under construction, with unique value names and shared initializers.

    ``initializers`` is shared by a graph and its ``Scan`` bodies (a body reads outer-scope
    values by name), and across the layers of one model, keyed by name.
    """

    def __init__(self, prefix: str, dtype: torch.dtype, initializers: dict, counter=None):
        if dtype not in _DTYPES:
            raise ValueError(f"ONNX export supports float32 and float64 layers, got {dtype}")
        self.prefix = prefix
        self.dtype = dtype
        self.elem_type = _DTYPES[dtype]
        self.initializers = initializers
        self.nodes: list[onnx.NodeProto] = []
        self._counter = counter if counter is not None else itertools.count()

    def fresh(self, hint: str) -> str:
        return f"{self.prefix}/{hint}_{next(self._counter)}"

    def body(self, hint: str) -> OnnxGraph:
        """A subgraph builder that shares this one's initializers and names."""
        return OnnxGraph(self.fresh(hint), self.dtype, self.initializers, self._counter)

    def op(self, op_type: str, inputs: list[str], outputs: int = 1, **attrs) -> list[str]:
        names = [self.fresh(op_type) for _ in range(outputs)]
        self.nodes.append(
            helper.make_node(op_type, inputs, names, name=self.fresh(op_type + "_node"), **attrs)
        )
        return names

    def op1(self, op_type: str, inputs: list[str], **attrs) -> str:
        return self.op(op_type, inputs, 1, **attrs)[0]

    def const(self, value, name: str | None = None) -> str:
        """An initializer of ``value`` (a tensor, array or number; floats in the graph dtype)."""
        if isinstance(value, Tensor):
            value = value.detach().to(device="cpu", dtype=self.dtype).numpy()
        array = np.asarray(value)
        if array.dtype.kind == "f":
            array = array.astype(_NUMPY_DTYPES[self.dtype])
        name = name or self.fresh("const")
        if name not in self.initializers:
            self.initializers[name] = numpy_helper.from_array(array.copy(order="C"), name)
        return name

    def ints(self, values: list[int]) -> str:
        return self.const(np.array(values, dtype=np.int64))


def _param_const(
    g: OnnxGraph, spec: LayerSpec, role: str, k: int, d: int, fn=None, tag: str = ""
) -> str | None:
    """The parameter ``role`` of layer ``k``, direction ``d`` (through ``fn``) as an initializer;
    ``tag`` names what ``fn`` made of it."""
    t = spec.param(role, k, d)
    if t is None:
        return None
    t = t.detach()
    suffix = "_reverse" if d else ""
    return g.const(t if fn is None else fn(t), name=f"{spec.name}{role}_l{k}{suffix}{tag}")


def reorder_gates(t: Tensor, mode: str, H: int) -> Tensor:
    return torch.cat([t[j * H : (j + 1) * H] for j in _ONNX_GATE_ORDER[mode]])


def onnx_peephole(t: Tensor, H: int) -> Tensor:
    """rnnkit's peephole ``(i, f, o)`` in the order of ONNX's ``P``, ``(i, o, f)``."""
    return torch.cat([t[:H], t[2 * H :], t[H : 2 * H]])


def node_op(mode: str) -> str:
    """The ONNX op of a layer of ``mode``."""
    return {"LSTM": "LSTM", "GRU": "GRU"}.get(mode, "RNN")


def node_attributes(spec: LayerSpec, D: int) -> dict:
    """The attributes of the ONNX LSTM/GRU/RNN node of one layer of ``spec``, ``D``
    directions."""
    v = spec.variant
    acts = [ONNX_ACTIVATIONS[a] for a in spec.activations] * D
    attrs: dict = dict(
        hidden_size=spec.hidden_size,
        direction="bidirectional" if D == 2 else "forward",
        activations=[name for name, _ in acts],
    )
    # ONNX consumes activation_alpha/beta in order, by the activations that take them
    alpha = [a["alpha"] for _, a in acts if "alpha" in a]
    beta = [a["beta"] for _, a in acts if "beta" in a]
    if alpha:
        attrs["activation_alpha"] = alpha
    if beta:
        attrs["activation_beta"] = beta
    if v.gate_clip is not None:
        attrs["clip"] = float(v.gate_clip)
    if spec.mode == "GRU":
        attrs["linear_before_reset"] = 1
    if v.coupled_input_forget:
        attrs["input_forget"] = 1
    return attrs


def _slice(g: OnnxGraph, x: str, start: int, end: int, axis: int) -> str:
    return g.op1("Slice", [x, g.ints([start]), g.ints([end]), g.ints([axis])])


def _node_layer(g: OnnxGraph, spec: LayerSpec, k: int, x: str, h0, c0, lengths):
    """Layer ``k`` as one ONNX LSTM/GRU/RNN node: ``[L, N, D*H]`` output and ``[D, N, H]``
    final states."""
    mode, H, D = spec.mode, spec.hidden_size, spec.num_directions

    def stacked(role: str, fn) -> str | None:
        """``fn(d)`` for each direction, stacked: ONNX's ``[D, ...]`` weights."""
        if spec.param("bias_ih" if role == "bias" else role, k, 0) is None:
            return None
        parts = [fn(d) for d in range(D)]
        suffix = "_bidirectional" if D == 2 else ""
        return g.const(torch.stack(parts), name=f"{spec.name}{role}_l{k}{suffix}_onnx")

    def gates(role: str, d: int) -> Tensor:
        return reorder_gates(spec.param(role, k, d).detach(), mode, H)

    w = stacked("weight_ih", lambda d: gates("weight_ih", d))  # [D, G*H, H_in]
    r = stacked("weight_hh", lambda d: gates("weight_hh", d))  # [D, G*H, H]
    # [D, 2*G*H]: the input biases, then the recurrent ones
    b = stacked("bias", lambda d: torch.cat([gates("bias_ih", d), gates("bias_hh", d)]))

    p = stacked("peephole", lambda d: onnx_peephole(spec.param("peephole", k, d).detach(), H))
    h0_k = None if h0 is None else _slice(g, h0, k * D, (k + 1) * D, 0)
    inputs = [x, w, r, b or "", lengths or "", h0_k or ""]
    if mode == "LSTM":
        c0_k = None if c0 is None else _slice(g, c0, k * D, (k + 1) * D, 0)
        inputs += [c0_k or "", p or ""]
    while inputs[-1] == "":
        inputs.pop()
    outs = g.op(node_op(mode), inputs, 3 if mode == "LSTM" else 2, **node_attributes(spec, D))
    # Y [L, D, N, H] -> [L, N, D*H]
    y = g.op1("Transpose", [outs[0]], perm=[0, 2, 1, 3])
    y = g.op1("Reshape", [y, g.ints([0, 0, -1])])
    return y, outs[1], outs[2] if mode == "LSTM" else None


def _activation(g: OnnxGraph, name: str, x: str) -> str:
    op, attrs = ONNX_ACTIVATIONS[name]
    return g.op1(op, [x], **attrs)


def _clip(g: OnnxGraph, x: str, v: float | None) -> str:
    return x if v is None else g.op1("Clip", [x, g.const(-v), g.const(v)])


def _layer_norm(g: OnnxGraph, x: str, weight: str, bias: str | None) -> str:
    inputs = [x, weight] + ([bias] if bias else [])
    # stash_type: the mean and deviation in the layer's dtype (ONNX's default is float32)
    return g.op1("LayerNormalization", inputs, axis=-1, epsilon=LN_EPS, stash_type=g.elem_type)


def _zoneout(g: OnnxGraph, new: str, old: str, p: float) -> str:
    # eval zoneout: torch.lerp(new, old, p) = new + p * (old - new)
    if p == 0:
        return new
    return g.op1("Add", [new, g.op1("Mul", [g.const(p), g.op1("Sub", [old, new])])])


def _step(g: OnnxGraph, spec: LayerSpec, w: dict, gx: str, h: str, c: str | None):
    """The ops of one step (``rnnkit.cells.make_step``); returns the new ``h`` and ``c``."""
    v, H = spec.variant, spec.hidden_size
    acts = spec.activations
    clip = v.gate_clip
    zh, zc = v.zoneout
    r = g.op1("MatMul", [h, w["weight_hh"]])
    if "layer_norm_hh" in w:
        r = _layer_norm(g, r, w["layer_norm_hh"], None)
    if "bias_hh" in w:
        r = g.op1("Add", [r, w["bias_hh"]])
    if spec.mode == "LSTM":
        gi, gf, gg, go = g.op("Split", [g.op1("Add", [gx, r]), g.ints([H] * 4)], 4, axis=1)
        if "peephole" in w:
            pi, pf, po = w["peephole"]
            gi = g.op1("Add", [gi, g.op1("Mul", [pi, c])])
            gf = g.op1("Add", [gf, g.op1("Mul", [pf, c])])
        i = _activation(g, acts[0], _clip(g, gi, clip))
        if v.coupled_input_forget:
            f = g.op1("Sub", [g.const(1.0), i])
        else:
            f = _activation(g, acts[0], _clip(g, gf, clip))
        gg = _activation(g, acts[1], _clip(g, gg, clip))
        c_new = g.op1("Add", [g.op1("Mul", [f, c]), g.op1("Mul", [i, gg])])
        c_new = _clip(g, c_new, v.cell_clip)
        if "peephole" in w:
            go = g.op1("Add", [go, g.op1("Mul", [po, c_new])])
        o = _activation(g, acts[0], _clip(g, go, clip))
        c_out = c_new
        if "layer_norm_c_weight" in w:
            c_out = _layer_norm(g, c_new, w["layer_norm_c_weight"], w["layer_norm_c_bias"])
        h_new = g.op1("Mul", [o, _activation(g, acts[2], c_out)])
        if "weight_hr" in w:
            h_new = _clip(g, g.op1("MatMul", [h_new, w["weight_hr"]]), v.proj_clip)
        return _zoneout(g, h_new, h, zh), _zoneout(g, c_new, c, zc)
    if spec.mode == "GRU":
        x_r, x_z, x_n = g.op("Split", [gx, g.ints([H] * 3)], 3, axis=1)
        h_r, h_z, h_n = g.op("Split", [r, g.ints([H] * 3)], 3, axis=1)
        r_t = _activation(g, acts[0], _clip(g, g.op1("Add", [x_r, h_r]), clip))
        z_t = _activation(g, acts[0], _clip(g, g.op1("Add", [x_z, h_z]), clip))
        n_pre = g.op1("Add", [x_n, g.op1("Mul", [r_t, h_n])])
        n_t = _activation(g, acts[1], _clip(g, n_pre, clip))
        # (h - n) * z + n
        h_new = g.op1("Add", [g.op1("Mul", [g.op1("Sub", [h, n_t]), z_t]), n_t])
        return _zoneout(g, h_new, h, zh), None
    h_new = _activation(g, acts[0], _clip(g, g.op1("Add", [gx, r]), clip))
    return _zoneout(g, h_new, h, zh), None


def _scan_direction(
    g: OnnxGraph, spec: LayerSpec, k: int, d: int, x: str, h0, c0, mask, restart=None
):
    """Layer ``k``, direction ``d`` as a Scan: ``[L, N, H_out]`` output, ``[N, H_out]`` and
    ``[N, H]`` final states. ``restart``: the direction's ``(zero, initial)`` bool masks
    ``[L, N, 1]`` (``initial`` None where no row restarts from ``h0``), or None."""
    H = spec.hidden_size
    is_lstm = spec.mode == "LSTM"

    def transposed(t: Tensor) -> Tensor:
        return t.t()

    w: dict = {}
    for role in ("weight_hh", "weight_hr"):
        name = _param_const(g, spec, role, k, d, transposed, "_T")
        if name is not None:
            w[role] = name
    for role in ("bias_hh", "layer_norm_hh", "layer_norm_c_weight", "layer_norm_c_bias"):
        name = _param_const(g, spec, role, k, d)
        if name is not None:
            w[role] = name
    if spec.param("peephole", k, d) is not None:
        w["peephole"] = [
            _param_const(g, spec, "peephole", k, d, lambda t, j=j: t[j * H : (j + 1) * H], tag)
            for j, tag in enumerate(("_i", "_f", "_o"))
        ]
    # the input projection of every step at once: [L, N, G*H]
    gx = g.op1("MatMul", [x, _param_const(g, spec, "weight_ih", k, d, transposed, "_T")])
    ln_ih = _param_const(g, spec, "layer_norm_ih", k, d)
    if ln_ih is not None:
        gx = _layer_norm(g, gx, ln_ih, None)
    b_ih = _param_const(g, spec, "bias_ih", k, d)
    if b_ih is not None:
        gx = g.op1("Add", [gx, b_ih])

    body = g.body(f"scan_l{k}_d{d}")
    h_in, gx_t = body.fresh("h"), body.fresh("gates_x")
    c_in = body.fresh("c") if is_lstm else None
    m_t = body.fresh("mask") if mask is not None else None
    restarts = [] if restart is None else [r for r in restart if r is not None]
    r_t = [body.fresh(tag) for tag in ("zero", "initial")[: len(restarts)]]
    h_prev, c_prev = h_in, c_in
    if r_t:
        # the rows that restart here read zeros, or their initial state (an outer value)
        h_prev = body.op1("Where", [r_t[0], body.const(0.0), h_prev])
        c_prev = body.op1("Where", [r_t[0], body.const(0.0), c_prev]) if is_lstm else None
        if len(r_t) > 1:
            h_prev = body.op1("Where", [r_t[1], h0, h_prev])
            c_prev = body.op1("Where", [r_t[1], c0, c_prev]) if is_lstm else None
    h_new, c_new = _step(body, spec, w, gx_t, h_prev, c_prev)
    y_t = h_new
    if m_t is not None:
        # a step past the sequence's end keeps the state and outputs zeros
        h_new = body.op1("Where", [m_t, h_new, h_prev])
        y_t = body.op1("Where", [m_t, y_t, body.const(0.0)])
        if is_lstm:
            c_new = body.op1("Where", [m_t, c_new, c_prev])
    # a graph's outputs are distinct values: y_t may be h_new, which may be an input
    h_out = body.op1("Identity", [h_new])
    y_out = body.op1("Identity", [y_t])
    outs = [h_out] + ([body.op1("Identity", [c_new])] if is_lstm else []) + [y_out]

    def info(name: str, elem_type=None) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, elem_type or g.elem_type, None)

    states = [h_in] + ([c_in] if is_lstm else [])
    scans = [gx_t] + ([m_t] if m_t is not None else []) + r_t
    body_inputs = [info(n) for n in states + [gx_t]]
    body_inputs += [info(n, TensorProto.BOOL) for n in scans[1:]]
    graph = helper.make_graph(body.nodes, body.prefix, body_inputs, [info(n) for n in outs])
    scan_inputs = [gx] + ([mask] if mask is not None else []) + restarts
    results = g.op(
        "Scan",
        [h0] + ([c0] if is_lstm else []) + scan_inputs,
        len(outs),
        body=graph,
        num_scan_inputs=len(scans),
        scan_input_directions=[d] * len(scans),
        scan_output_directions=[d],
    )
    if is_lstm:
        return results[2], results[0], results[1]
    return results[1], results[0], None


def _zeros_state(g: OnnxGraph, x: str, size: int) -> str:
    """Zeros ``[N, size]``, ``N`` read from ``x`` ``[L, N, H_in]``."""
    n = g.op1("Slice", [g.op1("Shape", [x]), g.ints([1]), g.ints([2])])
    shape = g.op1("Concat", [n, g.ints([size])], axis=0)
    value = helper.make_tensor("value", g.elem_type, [1], [0.0])
    return g.op1("ConstantOfShape", [shape], value=value)


def _state(g: OnnxGraph, states: str, j: int) -> str:
    """Entry ``j`` ``[N, H]`` of ``states`` ``[D*num_layers, N, H]``."""
    return g.op1("Gather", [states, g.const(np.array(j, dtype=np.int64))], axis=0)


def _step_mask(g: OnnxGraph, x: str, lengths: str) -> str:
    """``[L, N, 1]`` booleans: step ``t`` of sequence ``n`` is inside its length."""
    L = g.op1("Gather", [g.op1("Shape", [x]), g.const(np.array(0, dtype=np.int64))], axis=0)
    t = g.op1("Range", [g.const(np.array(0, dtype=np.int64)), L, g.const(np.array(1))])
    lengths = g.op1("Cast", [lengths], to=TensorProto.INT64)
    inside = g.op1(
        "Less", [g.op1("Unsqueeze", [t, g.ints([1])]), g.op1("Unsqueeze", [lengths, g.ints([0])])]
    )
    return g.op1("Unsqueeze", [inside, g.ints([2])])


def _restart_masks(g: OnnxGraph, x: str, lengths, reset: str, D: int) -> list[tuple]:
    """Per direction of ``D``, the ``(zero, initial)`` bool masks ``[L, N, 1]`` of
    :func:`rnnkit.resets.restarts` for the time-major ``reset`` ``[L, N]``: forward, a step
    that starts a piece starts from zeros; in reverse, each piece starts at its last step, from
    zeros unless it is the first piece, which starts from ``h0`` (``initial``; a sequence
    without resets just starts at its end). Steps past ``lengths`` carry."""
    i64 = TensorProto.INT64

    def scalar(v):
        return g.const(np.array(v, dtype=np.int64))

    shape = g.op1("Shape", [x])
    L = g.op1("Gather", [shape, scalar(0)], axis=0)
    t = g.op1("Unsqueeze", [g.op1("Range", [scalar(0), L, scalar(1)]), g.ints([1])])  # [L, 1]
    if lengths is None:
        end = g.op1("Sub", [L, scalar(1)])
    else:
        end = g.op1("Sub", [g.op1("Cast", [lengths], to=i64), scalar(1)])
    end = g.op1("Unsqueeze", [end, g.ints([0])])  # [1, N] or [1]
    running = g.op1("LessOrEqual", [t, end])
    forward_zero = g.op1("And", [reset, running])

    def steps(m):
        return g.op1("Unsqueeze", [m, g.ints([2])])

    if D == 1:
        return [(steps(forward_zero), None)]
    # any reset at or before each step: the piece there is not the first
    later = g.op1("Greater", [g.op1("CumSum", [g.op1("Cast", [reset], to=i64), scalar(0)]),
                              scalar(0)])  # fmt: skip
    # a reset at the next step: this one ends a piece, where its reverse run starts
    ahead = g.op1("Slice", [reset, g.ints([1]), g.ints([np.iinfo(np.int64).max]), g.ints([0])])
    zeros_row = g.op1("ConstantOfShape", [g.op1("Concat", [g.ints([1]), g.op1(
        "Slice", [shape, g.ints([1]), g.ints([2])])], axis=0)],
        value=helper.make_tensor("value", TensorProto.BOOL, [1], [False]))  # fmt: skip
    next_reset = g.op1("Concat", [ahead, zeros_row], axis=0)
    before = g.op1("And", [next_reset, g.op1("Less", [t, end])])
    at_end = g.op1("And", [g.op1("Equal", [t, end]), later])
    reverse_zero = g.op1("Or", [g.op1("And", [before, later]), at_end])
    reverse_initial = g.op1("And", [before, g.op1("Not", [later])])
    return [(steps(forward_zero), None), (steps(reverse_zero), steps(reverse_initial))]


def build_layer(g: OnnxGraph, spec: LayerSpec, x: str, h0, c0, lengths, reset=None):
    """The nodes of a whole layer into ``g``; returns the names of ``output``, ``h_n``, ``c_n``.

    ``x`` is ``[L, N, H_in]``; ``h0`` ``[D*num_layers, N, H_out]`` and ``c0`` (LSTM)
    ``[D*num_layers, N, H]`` or ``None`` for zeros; ``lengths`` int32 ``[N]`` or ``None``;
    ``reset`` bool ``[L, N]`` (time-major) or ``None``. ``c_n`` is ``None`` but for LSTM.
    """
    D, is_lstm = spec.num_directions, spec.mode == "LSTM"
    # onnxruntime's LSTM/GRU/RNN kernels take float32 only: float64 layers run as a Scan, and
    # so do resets, which ONNX's nodes do not have
    node = uses_onnx_node(spec) and g.dtype == torch.float32 and reset is None
    mask = None if node or lengths is None else _step_mask(g, x, lengths)
    restarts = None if reset is None else _restart_masks(g, x, lengths, reset, D)
    hs, cs = [], []
    for k in range(spec.num_layers):
        if node:
            x, h_k, c_k = _node_layer(g, spec, k, x, h0, c0, lengths)
            hs.append(h_k)
            cs.append(c_k)
            continue
        ys = []
        for d in range(D):
            j = k * D + d
            h0_j = _state(g, h0, j) if h0 else _zeros_state(g, x, spec.H_out)
            c0_j = None
            if is_lstm:
                c0_j = _state(g, c0, j) if c0 else _zeros_state(g, x, spec.hidden_size)
            restart = None if restarts is None else restarts[d]
            y, h_n, c_n = _scan_direction(g, spec, k, d, x, h0_j, c0_j, mask, restart)
            ys.append(y)
            hs.append(g.op1("Unsqueeze", [h_n, g.ints([0])]))
            if is_lstm:
                cs.append(g.op1("Unsqueeze", [c_n, g.ints([0])]))
        x = ys[0] if D == 1 else g.op1("Concat", ys, axis=-1)
    h_n = hs[0] if len(hs) == 1 else g.op1("Concat", hs, axis=0)
    c_n = None
    if is_lstm:
        c_n = cs[0] if len(cs) == 1 else g.op1("Concat", cs, axis=0)
    return x, h_n, c_n

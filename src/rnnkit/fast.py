r"""The fast path of small calls: a layer's inference call straight to the fused CPU op, and a
cell's step straight to the reference's step.

A batch-1 step or a short chunk costs little arithmetic (``LSTM(64, 128)``: 0.1 M
multiply-adds a step), so what the general path does around it — validation, parameter
gathering, engine dispatch, the driver's per-layer records — is most of such a call. Here a
module keeps a :class:`Plan` of what its last fast call established (its weights, which are
checked, the op, the per-layer weight lists) and later calls with nothing that needs more go
to the op with a few checks of their own.

A call takes the fast path when all of these hold, and the general path (whose results are
the same bits: the same op on the same arguments) otherwise:

- no gradient is recorded (``torch.no_grad()`` or ``torch.inference_mode()``), no torch.func
  transform, torch.compile, torch.jit trace, ONNX export or :func:`rnnkit.portable` is on, and
  autocast is off on CPU;
- the layer is a plain one (no variant but ``forget_bias``) on ``engine="auto"`` or
  ``"fused"``, whose compiled kernels load, and no inter-layer dropout applies;
- the input is a dense CPU tensor (no subclass) of float32 or float64 (or bfloat16, where its
  products run in bfloat16: ``build.bf16_kernel()``), of the weights' dtype and the module's
  ``input_size``, batched or unbatched, with at least one step; no ``lengths=``
  or ``reset=``; ``hx`` absent or of the exact shapes and dtype the module takes.

Cells (``LSTMCell``, ``GRUCell``, ``RNNCell``: one step, which ``engine="auto"`` gives to
the reference engine) take a fast path of their own, :func:`cell_call`: the reference's prepare
and step functions called directly, gradients allowed, the general path's ops in its order.

A plan is the module's own (never shared, and kept beside it: pickling and copies never
carry one) and holds its weight tensors by identity: assigning
a parameter (``m.weight_hh_l0 = ...``) makes the next call build a new one, and in-place
changes (``optimizer.step()``, ``load_state_dict``) reach the op, whose cache of packed
weights keys on each tensor's version (``csrc/weight_cache.h``).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch._C import _functorch
from torch.onnx._internal.exporter import _flags as _onnx_flags
from torch.onnx._internal.torchscript_exporter._globals import GLOBALS as _ts_globals

from rnnkit import traced
from rnnkit.cells import STEPS, CellParams, make_prepare
from rnnkit.modes import MODES
from rnnkit.validation import check_layer_parameters

__all__ = ["CellPlan", "Plan", "call", "cell_call"]

# tests turn it off to compare the two paths
enabled = True

_DTYPES = (torch.float32, torch.float64)

# module -> ((engine, variant), Plan or None): beside the module, not in it, so that pickling,
# deepcopy and state_dict never see a plan (a copy builds its own)
_plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Plan:
    """What a module's fast call needs, established once: ``weights`` are its
    ``_flat_weights`` as they were checked (by identity), ``layers`` their slice per layer."""

    weights: tuple[Tensor, ...]
    layers: tuple[list[Tensor], ...]
    op: object
    code: int
    lstm: bool
    # uniform input's batch sizes, as the op takes them
    uniform: list[int]
    D: int
    H: int
    H_out: int


def _eligible(module: nn.Module) -> bool:
    if module.engine not in ("auto", "fused") or not module.variant.is_plain:
        return False
    from rnnkit.engines.cpu import build

    return build.build_error() is None


def _plan(module: nn.Module) -> Plan | None:
    """The module's plan, built (and checked as the general path checks) when its weights,
    engine or variant changed; None when the module cannot take the fast path."""
    key = (module.engine, module.variant)
    kept = _plans.get(module)
    flat = module._flat_weights
    if kept is not None and kept[0] == key:
        plan = kept[1]
        if plan is None:
            return None
        if len(flat) == len(plan.weights) and all(
            a is b for a, b in zip(flat, plan.weights, strict=True)
        ):
            return plan
    if not _eligible(module):
        _plans[module] = (key, None)
        return None
    try:
        check_layer_parameters(module, flat)
    except (RuntimeError, ValueError, TypeError):
        # the general path raises torch's error
        return None
    from rnnkit.engines.cpu.build import kernels
    from rnnkit.engines.cpu.ops import UNIFORM

    D = 2 if module.bidirectional else 1
    per = len(flat) // module.num_layers
    plan = Plan(
        weights=tuple(flat),
        layers=tuple(list(flat[k * per : (k + 1) * per]) for k in range(module.num_layers)),
        # the overload's C++ callable: the Python frame of OpOverload.__call__ is a tenth of a
        # small call
        op=kernels().layer_forward.default._op,
        code=MODES[module.mode].code,
        lstm=module.mode == "LSTM",
        uniform=list(UNIFORM),
        D=D,
        H=module.hidden_size,
        H_out=module.proj_size or module.hidden_size,
    )
    _plans[module] = (key, plan)
    return plan


def _bf16_products() -> bool:
    from rnnkit.engines.cpu import build

    return build.bf16_kernel() != "float32"


def _off() -> bool:
    """Whether anything around the call asks for the general path (the flags read directly:
    ``torch.onnx.is_in_onnx_export()`` alone costs a microsecond of imports)."""
    return (
        torch.is_grad_enabled()
        or traced.is_portable()
        or torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or _onnx_flags._is_onnx_exporting
        or _ts_globals.in_onnx_export
        or torch.is_autocast_enabled("cpu")
        # a torch.func transform
        or _functorch.peek_interpreter_stack() is not None
    )


def _state(t, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
    return (
        type(t) is Tensor
        and t.dtype == dtype
        and t.device.type == "cpu"
        and t.layout == torch.strided
        and t.shape == shape
    )


def call(module: nn.Module, input, hx):
    """``module(input, hx)`` on the fast path, or None where the general path must run it."""
    if not enabled or type(input) is not Tensor or _off():
        return None
    if module.training and module.dropout != 0 and module.num_layers > 1:
        return None
    plan = _plan(module)
    if plan is None:
        return None
    # read each call: .to() and .double() change a parameter in place, its identity kept
    w = plan.weights[0]
    dtype = w.dtype
    # bfloat16: where its products run in bfloat16 (the op takes its weights as they are)
    bf16 = dtype == torch.bfloat16 and _bf16_products()
    if input.dtype != dtype or not (dtype in _DTYPES or bf16) or input.device.type != "cpu":
        return None
    if w.device.type != "cpu":
        return None
    if input.layout != torch.strided or input.size(-1) != module.input_size:
        return None
    batched = input.dim() == 3
    if not batched and input.dim() != 2:
        return None
    batch_first = module.batch_first and batched
    x = input.transpose(0, 1) if batch_first else input
    if not batched:
        x = x.unsqueeze(1)
    L, N = x.size(0), x.size(1)
    if L == 0 or N == 0:
        return None
    lstm = plan.lstm
    layers = module.num_layers * plan.D
    if hx is None:
        h0 = x.new_zeros(layers, N, plan.H_out)
        c0 = x.new_zeros(layers, N, plan.H) if lstm else None
    else:
        h_shape = (layers, N, plan.H_out) if batched else (layers, plan.H_out)
        if lstm:
            if type(hx) is not tuple or len(hx) != 2:
                return None
            h0, c0 = hx
            c_shape = (layers, N, plan.H) if batched else (layers, plan.H)
            if not (_state(h0, h_shape, dtype) and _state(c0, c_shape, dtype)):
                return None
        else:
            h0, c0 = hx, None
            if not _state(h0, h_shape, dtype):
                return None
        if not batched:
            h0 = h0.unsqueeze(1)
            c0 = None if c0 is None else c0.unsqueeze(1)
    rows = x.reshape(L * N, x.size(2)).contiguous()
    if bf16:
        # as the general path widens each layer's input and states (engines/cpu/__init__.py);
        # a layer's float32 output goes on to the next one unrounded, which its products round
        # to bfloat16 (nearest even) as the general path's rounding of it would: the same bits
        rows, h0 = rows.float(), h0.float()
        c0 = None if c0 is None else c0.float()
    h_n, c_n = [], []
    D = plan.D
    for k, weights in enumerate(plan.layers):
        h_k = h0[k * D : (k + 1) * D].contiguous()
        c_k = None if c0 is None else c0[k * D : (k + 1) * D].contiguous()
        rows, h, c = plan.op(
            plan.code, rows, h_k, c_k, weights, plan.uniform, module.bias, False, None
        )
        h_n.append(h)
        c_n.append(c)
    output = rows.view(L, N, rows.size(1))
    h = h_n[0] if len(h_n) == 1 else torch.cat(h_n)
    c = None if not lstm else (c_n[0] if len(c_n) == 1 else torch.cat(c_n))
    if bf16:
        output, h = output.to(dtype), h.to(dtype)
        c = None if c is None else c.to(dtype)
    if batch_first:
        output = output.transpose(0, 1)
    if not batched:
        output = output.squeeze(1)
        h = h.squeeze(1)
        c = None if c is None else c.squeeze(1)
    return (output, (h, c)) if lstm else (output, h)


# Cells. A cell's call is one step of torch ops on the reference engine (engine="auto" gives
# cells to it: a fused loop gains nothing on one step), so the fast path of a cell calls the
# reference's own prepare and step functions, the general path's ops in its order: gradients
# need no other path, and the bits and the autograd graph are the general path's.

_CELL_MODES = {"LSTMCell": "LSTM", "GRUCell": "GRU"}
_RNN_CELL_MODES = {"tanh": "RNN_TANH", "relu": "RNN_RELU"}


@dataclass(frozen=True)
class CellPlan:
    """A cell's checked weights (by identity) and the functions of its step."""

    weights: tuple[Tensor | None, ...]
    params: CellParams
    prepare: object
    step: object
    lstm: bool


def _cell_plan(cell: nn.Module) -> CellPlan | None:
    name = type(cell).__name__
    mode = (
        _RNN_CELL_MODES.get(getattr(cell, "nonlinearity", None))
        if name == "RNNCell"
        else _CELL_MODES.get(name)
    )
    key = (cell.engine, cell.variant, mode)
    weights = (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    kept = _plans.get(cell)
    if kept is not None and kept[0] == key:
        plan = kept[1]
        if plan is None or all(a is b for a, b in zip(weights, plan.weights, strict=True)):
            return plan
    if mode is None or cell.engine not in ("auto", "reference") or not cell.variant.is_plain:
        _plans[cell] = (key, None)
        return None
    w_ih = weights[0]
    G = MODES[mode].gates
    H, H_in = cell.hidden_size, cell.input_size
    shapes = ((G * H, H_in), (G * H, H), (G * H,), (G * H,))
    # anything unusual (a missing or misshapen weight, another dtype, device or layout) goes
    # to the general path, which raises torch's error for it
    if type(w_ih) not in (nn.Parameter, Tensor) or w_ih.dtype not in _DTYPES:
        return None
    for k, (w, shape) in enumerate(zip(weights, shapes, strict=True)):
        if w is None and k >= 2 and not cell.bias:
            continue
        if type(w) not in (nn.Parameter, Tensor):
            return None
        if w.shape != shape or w.dtype != w_ih.dtype or w.device.type != "cpu":
            return None
        if w.layout != torch.strided:
            return None
    if not cell.bias and (weights[2] is not None or weights[3] is not None):
        return None
    plan = CellPlan(
        weights=weights,
        params=CellParams(*weights),
        prepare=make_prepare(mode, cell.variant, False),
        step=STEPS[mode],
        lstm=mode == "LSTM",
    )
    _plans[cell] = (key, plan)
    return plan


def _cell_off() -> bool:
    """As :func:`_off`, gradients allowed."""
    return (
        traced.is_portable()
        or torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or _onnx_flags._is_onnx_exporting
        or _ts_globals.in_onnx_export
        or torch.is_autocast_enabled("cpu")
        or _functorch.peek_interpreter_stack() is not None
    )


def cell_call(cell: nn.Module, input, hx):
    """``cell(input, hx)`` on the fast path, or None where the general path must run it."""
    if not enabled or type(input) is not Tensor or _cell_off():
        return None
    plan = _cell_plan(cell)
    if plan is None:
        return None
    w = plan.weights[0]
    dtype = w.dtype
    if input.dtype != dtype or input.device.type != "cpu" or input.layout != torch.strided:
        return None
    if w.device.type != "cpu":
        return None
    batched = input.dim() == 2
    if (not batched and input.dim() != 1) or input.size(-1) != cell.input_size:
        return None
    x = input if batched else input.unsqueeze(0)
    N = x.size(0)
    if N == 0:
        return None
    shape = (N, cell.hidden_size) if batched else (cell.hidden_size,)
    if hx is None:
        h = x.new_zeros(N, cell.hidden_size)
        state = (h, h) if plan.lstm else h
    elif plan.lstm:
        if type(hx) is not tuple or len(hx) != 2:
            return None
        if not (_state(hx[0], shape, dtype) and _state(hx[1], shape, dtype)):
            return None
        state = hx if batched else (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
    else:
        if not _state(hx, shape, dtype):
            return None
        state = hx if batched else hx.unsqueeze(0)
    gates_x, p = plan.prepare(x, plan.params, N)
    out = plan.step(gates_x, state, p)
    if not batched:
        out = tuple(t.squeeze(0) for t in out) if plan.lstm else out.squeeze(0)
    return out

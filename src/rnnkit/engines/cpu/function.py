"""The fused CPU engine's autograd layer and driver.

:class:`FusedLayer` runs one layer (one or both directions) through the compiled time loops
and gives autograd a hand-written backward (``csrc/lstm.cpp`` & co. derive it): the forward
keeps the gate activations and the few states that backward needs, and no autograd graph.
:func:`run_rnn` stacks the layers with torch's inter-layer dropout between them. A double
backward (``create_graph=True``) recomputes the layer with the reference engine's torch ops
and differentiates that graph, so gradients of gradients work on this engine too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._C import _functorch

from rnnkit.cells import CellParams
from rnnkit.engines.base import RNNCall, RNNResult, time_major, transforms
from rnnkit.engines.cpu.build import kernels
from rnnkit.engines.reference import run_packed_layer
from rnnkit.functional import gather_params
from rnnkit.variants import PLAIN

# mode -> the integer the kernels take
MODES = {"LSTM": 0, "GRU": 1, "RNN_TANH": 2, "RNN_RELU": 3}
_LSTM = MODES["LSTM"]

_NAMES = {v: k for k, v in MODES.items()}


def torch_weights(p: CellParams) -> list[Tensor]:
    """The weights of one layer and direction in ``_flat_weights`` order, absent ones left out."""
    return [t for t in (p.w_ih, p.w_hh, p.b_ih, p.b_hh, p.w_hr) if t is not None]


def _reference_graph(mode, batch_sizes, has_bias, x, h0, c0, weights):
    """The layer again on the reference engine's ops, as an autograd graph: what a double
    backward differentiates, since the compiled backward has no graph of its own."""
    D = h0.size(0)
    params = gather_params(_NAMES[mode], weights, has_bias, 1, D, PLAIN)
    states = [(h0[d], c0[d]) if mode == _LSTM else h0[d] for d in range(D)]
    out, finals = run_packed_layer(_NAMES[mode], x, batch_sizes, states, params)
    if mode == _LSTM:
        return out, torch.stack([f[0] for f in finals]), torch.stack([f[1] for f in finals])
    return out, torch.stack(finals)


class FusedLayer(torch.autograd.Function):
    """One layer over all its steps: ``x`` ``[R, H_in]`` rows in time-major (or packed) order.

    ``h0`` is ``[D, N, H_out]``, ``c0`` ``[D, N, H]`` for LSTM (else None), ``weights`` the
    layer's slice of ``_flat_weights``. Returns ``out`` ``[R, D*H_out]``, ``h_n``, ``c_n``
    (LSTM; else an empty placeholder) and the buffers that backward needs, which take no
    gradient. ``mode``, ``batch_sizes`` and ``has_bias`` are plain Python values kept on
    ``ctx``. A ``forward`` without ``ctx`` (``setup_context`` keeps what backward needs) and
    the ops' batching rules (``func.py``) let torch.func transform it: under ``vmap``, forward
    and backward run through those rules.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(mode, batch_sizes, has_bias, x, h0, c0, *weights):
        return tuple(
            kernels().layer_forward(mode, x, h0, c0, list(weights), batch_sizes, has_bias, True)
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        mode, batch_sizes, has_bias, x, h0, c0, *weights = inputs
        out, h_n, c_n, *saved = output
        ctx.mode, ctx.batch_sizes, ctx.has_bias = mode, batch_sizes, has_bias
        ctx.n_weights = len(weights)
        ctx.save_for_backward(x, h0, c0, out, *weights, *saved)
        ctx.mark_non_differentiable(*saved, *([c_n] if mode != _LSTM else []))
        # gradients of the saved buffers are never used: no zeros for them
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_out, grad_hn, grad_cn, *_):
        x, h0, c0, out, *rest = ctx.saved_tensors
        weights, saved = rest[: ctx.n_weights], rest[ctx.n_weights :]
        grad_out = grad_or_zeros(grad_out, out)
        grad_hn = grad_or_zeros(grad_hn, h0)
        grad_cn = grad_or_zeros(grad_cn, c0) if ctx.mode == _LSTM else None
        grads = (grad_out, grad_hn) if grad_cn is None else (grad_out, grad_hn, grad_cn)
        need = ctx.needs_input_grad
        if backward_needs_graph([x, h0, c0, *weights, *grads]):
            # create_graph=True: the gradient must itself be differentiable, which the compiled
            # loops are not; recompute the layer as a graph of torch ops and differentiate that.
            return (None, None, None, *_double_backward(ctx, x, h0, c0, weights, grads))
        reuse_saved = _saved_die_here()
        dx, dh0, dc0, *dweights = kernels().layer_backward(
            ctx.mode, grad_out, grad_hn, grad_cn, x, h0, c0, list(weights), out, list(saved),
            ctx.batch_sizes, ctx.has_bias, need[3], reuse_saved,
        )  # fmt: skip
        dweights = [g if n else None for g, n in zip(dweights, need[6:], strict=True)]
        return (
            None, None, None,
            dx if need[3] else None,
            dh0 if need[4] else None,
            dc0 if ctx.mode == _LSTM and need[5] else None,
            *dweights,
        )  # fmt: skip


def grad_or_zeros(grad: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if grad is None else grad


def backward_needs_graph(tensors: list[Tensor | None]) -> bool:
    """Whether a backward must build a graph: under ``create_graph=True`` of torch.autograd,
    not for torch.func's own gradients. Raises where it would need one inside a ``vmap``.

    ``grad``, ``vjp`` and ``jacrev`` differentiate with ``create_graph=True`` whatever is
    asked; the engine refuses the nested transforms that would differentiate this backward
    (``rnn_unsupported``). Their backward runs inside the ``grad`` transform, or, for a
    ``vjp`` function called after its transform returned, on tensors of that ended transform.
    """
    if not torch.is_grad_enabled() or "grad" in transforms():
        return False
    levels = {_functorch.maybe_get_level(t) for t in tensors if t is not None}
    if -2 in levels:
        return False
    if any(level > 0 for level in levels):
        # the recomputed graph would hold vmap's batched tensors, which autograd cannot take
        raise RuntimeError(
            "rnnkit: a double backward (create_graph=True) through a torch.func.vmap call is "
            "not supported on the fused engine; run the model with engine='reference'"
        )
    return True


def tracked_outside(tensors: list[Tensor | None]) -> bool:
    """Whether torch.autograd outside every torch.func transform records the ops on one of
    ``tensors``: the tensor under the transforms' wrappers requires grad, and the outermost
    ``grad`` transform was entered with grad mode on."""
    stack = _functorch.get_interpreter_stack() or []
    grads = [i for i in stack if str(i.key()).endswith("Grad")]
    if grads and not _functorch.CGradInterpreterPtr(grads[0]).prevGradMode():
        return False
    for t in tensors:
        if t is None:
            continue
        while _functorch.is_functorch_wrapped_tensor(t):
            t = _functorch.get_unwrapped(t)
        if t.requires_grad:
            return True
    return False


def _saved_die_here() -> bool:
    """True when the saved buffers die with this backward call (no ``retain_graph``), as
    torch's own compiled autograd assumes (``saved_tensors_use_once``): the kernels may then
    write the gate gradients over them. Under torch.compile, and on a torch without this
    private query, it says False and the kernels allocate."""
    if torch.compiler.is_compiling():
        return False
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return keep_graph is not None and not keep_graph()


def _double_backward(ctx, x, h0, c0, weights, grads):
    """Gradients as a graph (``create_graph=True``): the same layer recomputed with the
    reference engine's torch ops on the saved inputs, and differentiated by autograd."""
    inputs = [x, h0, c0, *weights]
    wanted = [
        i for i, (t, n) in enumerate(zip(inputs, ctx.needs_input_grad[3:], strict=True))
        if n and t is not None
    ]  # fmt: skip
    outputs = _reference_graph(ctx.mode, ctx.batch_sizes, ctx.has_bias, x, h0, c0, weights)
    got = torch.autograd.grad(
        outputs, [inputs[i] for i in wanted], grads, create_graph=True, allow_unused=True
    )
    result = [None] * len(inputs)
    for i, g in zip(wanted, got, strict=True):
        result[i] = g
    return result


def fused_layer(
    mode: int,
    x: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    weights: list[Tensor],
    batch_sizes: list[int],
    has_bias: bool,
) -> tuple[Tensor, ...]:
    """Launch one layer: through :class:`FusedLayer` when a gradient is wanted, else straight
    to the kernels, which then keep nothing for backward."""
    x, h0 = x.contiguous(), h0.contiguous()
    c0 = c0.contiguous() if c0 is not None else None
    tensors = [x, h0, *weights] if c0 is None else [x, h0, c0, *weights]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        out, h_n, c_n, *_ = FusedLayer.apply(mode, batch_sizes, has_bias, x, h0, c0, *weights)
    else:
        out, h_n, c_n = kernels().layer_forward(
            mode, x, h0, c0, weights, batch_sizes, has_bias, False
        )
    return (out, h_n, c_n) if mode == _LSTM else (out, h_n)


def run_rnn(call: RNNCall) -> RNNResult:
    """Run a stacked, possibly bidirectional, possibly packed RNN; see :class:`RNNCall`.

    Same structure as the reference driver, a layer at a time: inter-layer dropout is
    ``F.dropout`` on the same tensor in the same order, so its masks match under one seed.
    """
    mode = MODES[call.mode]
    D = 2 if call.bidirectional else 1
    x, batch_sizes = time_major(call)
    if call.batch_sizes is None:
        L, N = x.shape[:2]
        x = x.reshape(L * N, x.size(2))
    if call.mode == "LSTM":
        h0_all, c0_all = call.hx
    else:
        h0_all, c0_all = call.hx, None
    weights = [t for p in call.params for t in torch_weights(p)]
    per_layer = len(weights) // call.num_layers
    has_bias = call.params[0].b_ih is not None

    h_n, c_n = [], []
    for layer in range(call.num_layers):
        states = slice(layer * D, (layer + 1) * D)
        c0 = c0_all[states] if c0_all is not None else None
        w = weights[layer * per_layer : (layer + 1) * per_layer]
        x, *final = fused_layer(mode, x, h0_all[states], c0, w, batch_sizes, has_bias)
        h_n.append(final[0])
        c_n.extend(final[1:])
        if call.dropout != 0 and call.train and layer < call.num_layers - 1:
            x = F.dropout(x, call.dropout, training=True)

    if call.batch_sizes is None:
        x = x.view(L, N, x.size(1))
        if call.batch_first:
            x = x.transpose(0, 1)
    h_n = torch.cat(h_n, 0) if len(h_n) > 1 else h_n[0]
    if call.mode == "LSTM":
        return x, h_n, torch.cat(c_n, 0) if len(c_n) > 1 else c_n[0]
    return x, h_n

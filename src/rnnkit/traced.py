r"""rnnkit layers as plain torch ops, for graph exporters that cannot take rnnkit's compiled ops.

While torch's dynamo-based ONNX exporter traces a model (``torch.onnx.export(...,
dynamo=True)``), or inside :func:`portable` (``torch.export`` for ExecuTorch, or an
AOTInductor package that needs no rnnkit where it runs), each rnnkit layer's call
(:func:`layer`) runs as torch ops, whatever the engine: the user passes nothing (no
translation table) and the sequence length and batch stay symbolic.

- Under the ONNX exporter, where ONNX's ``LSTM``/``GRU``/``RNN`` op computes the layer
  exactly (torch's layers in float32, ``bias=False``, the variants ONNX defines: peepholes,
  ``gate_clip``, ``coupled_input_forget``, named activations; see
  :func:`rnnkit.onnx_layers.uses_onnx_node`), each layer is one such node
  (``torch.onnx.ops.symbolic_multi_out``), both directions in one, ``lengths=`` as its
  ``sequence_lens``. Its weights are the parameters reordered to ONNX's gate order by torch
  ops on the initializers (the exporter's optimizer folds them).
- Everything else (every layer inside :func:`portable`; under the ONNX exporter
  ``proj_size``, layer norm, zoneout's eval mix, ``cell_clip``, float64, ``reset=``) runs each
  layer and direction as torch's ``scan`` over the reference engine's own step
  (:func:`rnnkit.cells.make_step`): core ATen ops in a ``scan``, which the ONNX exporter writes
  as an ONNX ``Scan`` and ExecuTorch runs as a loop. A step past a sequence's length keeps
  the state and outputs zeros (so the reverse direction starts at each sequence's end, as the
  packed path does); a reset step selects zeros or the initial state
  (:func:`rnnkit.resets.restarts`).

The layer is exported in eval mode semantics: a layer in training mode that draws random
numbers (dropout between layers, zoneout, recurrent or weight dropout) raises, as an exported
graph cannot express the draws. A ``PackedSequence`` raises too (its batch sizes are data): pass
the padded input with ``lengths=``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch._higher_order_ops.scan import scan
from torch.nn.utils.rnn import PackedSequence

from rnnkit.cells import make_prepare, make_step
from rnnkit.functional import gather_params
from rnnkit.resets import INITIAL, ZERO, check_reset, restarts

__all__ = ["is_portable", "layer", "portable"]

# a plain global, not a ContextVar: torch.compile traces a read of it (and guards on it), where
# it stops at ContextVar.get
_portable_depth = 0


@contextlib.contextmanager
def portable() -> Iterator[None]:
    """Within it, every rnnkit layer (``LSTM``, ``GRU``, ``RNN``) runs as core ATen ops in
    torch's ``scan`` over the reference engine's step, whatever its engine: what
    ``torch.export.export`` records then holds no rnnkit op, so the program runs where rnnkit's
    compiled ops are not loaded (ExecuTorch's runtime; an AOTInductor package on a machine
    without rnnkit), with the sequence length and batch symbolic.

    Layers in training mode that draw random numbers raise, as does a ``PackedSequence``
    (pass the padded input with ``lengths=``); ``reset=`` and ``lengths=`` are kept. Eager
    calls inside it are correct but slow (one ``scan`` step at a time).

    Examples::

        >>> model = rnnkit.LSTM(8, 16, 2).eval()
        >>> x = torch.randn(13, 2, 8)
        >>> with rnnkit.portable():
        ...     ep = torch.export.export(
        ...         model, (x,), dynamic_shapes={"input": {0: torch.export.Dim("L", max=4096)}}
        ...     )
        >>> "rnnkit" in ep.graph_module.code
        False
    """
    global _portable_depth
    _portable_depth += 1
    try:
        yield
    finally:
        _portable_depth -= 1


def is_portable() -> bool:
    """Whether calls run inside :func:`portable` (a process-wide setting, as export is)."""
    return _portable_depth > 0


def _is_random(module: nn.Module) -> bool:
    v = module.variant
    inter_layer = module.dropout > 0 and module.num_layers > 1
    return inter_layer or v.zoneout != (0.0, 0.0) or v.recurrent_dropout or v.weight_dropout


def layer(module: nn.Module, input, hx, reset, lengths, check_hx, onnx_nodes: bool):
    """``module(input, hx, reset, lengths)`` (an rnnkit ``LSTM``, ``GRU`` or ``RNN``) as
    torch ops an exporter traces, ONNX nodes where ``onnx_nodes`` and the node computes the
    layer, else a ``scan`` per direction; returns what ``forward`` returns.
    ``check_hx(name, hx, is_lstm, batched)`` is the module's check of ``hx``, which returns
    the states batched."""
    name = type(module).__name__
    if isinstance(input, PackedSequence):
        raise NotImplementedError(
            f"{name}: an exported graph takes padded input: a PackedSequence's batch sizes are data, "
            "which the exported graph would keep as the example's; pass the padded input with "
            "lengths="
        )
    if module.training and _is_random(module):
        raise NotImplementedError(
            f"{name} draws random numbers in training mode (dropout, zoneout, recurrent or "
            "weight dropout), which an exported graph cannot express; export the model in eval mode"
        )
    if not isinstance(input, Tensor) or input.dim() not in (2, 3):
        raise ValueError(f"{name}: Expected input to be 2D or 3D")
    if input.dtype not in (torch.float32, torch.float64):
        raise NotImplementedError(
            f"{name}: export supports float32 and float64 layers, got {input.dtype}"
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
    if onnx_nodes:
        # an ONNX graph is for inference: no gradient flows through it, and the exporter's
        # passes fail on some scans whose autograd forward saves symbolic sizes
        params = [type(p)(*(None if t is None else t.detach() for t in p)) for p in params]
    N = x.size(1)
    H, H_out = module.hidden_size, module.proj_size or module.hidden_size
    if hx is None:
        h0 = x.new_zeros(module.num_layers * D, N, H_out)
        c0 = x.new_zeros(module.num_layers * D, N, H) if is_lstm else None
    else:
        hx = check_hx(name, hx, is_lstm, batched)
        h0, c0 = hx if is_lstm else (hx, None)
    spec = None
    if onnx_nodes:
        # rnnkit.onnx_layers imports onnx, which the ONNX exporter has loaded already
        from rnnkit.onnx_layers import layer_spec, uses_onnx_node

        spec = layer_spec(module)
    node = spec is not None and uses_onnx_node(spec) and x.dtype == torch.float32 and reset is None
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
    from rnnkit.onnx_layers import node_attributes, node_op, onnx_peephole, reorder_gates

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
        # copies, not views into hx: a view's storage offset (a multiple of the batch) is one
        # more symbol, which torch.export then unifies with the batch and specializes it
        h_init = h0[d].clone()
        c_init = c0[d].clone() if is_lstm else None

        # what a restarting row reads: hx itself, apart from the carry's copy (scan may not
        # see its carry aliased among its other inputs, and ExecuTorch's XNNPACK delegate
        # refuses a copy of a copy as a pass-through)
        h_first = h0[d] if reset is not None else None
        c_first = c0[d] if reset is not None and is_lstm else None

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

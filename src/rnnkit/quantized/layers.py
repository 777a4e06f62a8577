"""The dynamically quantized layers and cells: int8 weights, float32 activations and states.

Built from a float layer by :func:`rnnkit.quantize_dynamic`, never from sizes: they hold no
parameters, only buffers. They take the float layer's call as it is (``lengths=``, a
``PackedSequence``, ``batch_first``, unbatched input, ``step()``, a state carried from call to
call) and run every direction of every layer in one compiled op per direction
(``rnnkit_int8::direction_forward``, ``engines/cpu/csrc/quantized.cpp``); the driver, the
packing and the validation are the float layers'. Inference only.

``state_dict`` holds, per weight, torch's name with the int8 matrix ``[J, K]`` and
``<name>_scale`` (float32 ``[J]``, per output channel), and the float32 biases under theirs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from rnnkit import cell_modules, modules, traced
from rnnkit import validation as V
from rnnkit.cells import CellParams
from rnnkit.engines.base import RNNCall, transforms
from rnnkit.engines.cpu import build
from rnnkit.engines.cpu.ops import UNIFORM, op_batch_sizes
from rnnkit.engines.driver import LayerCall, run_stack
from rnnkit.modes import MODES
from rnnkit.quantized.weights import QWeight
from rnnkit.variants import Variant

__all__ = ["GRU", "GRUCell", "LSTM", "LSTMCell", "RNN", "RNNCell", "kernel"]


def kernel() -> str:
    """The int8 product kernel this CPU runs: ``"vnni"`` (AVX-512 VNNI) or ``"portable"``
    (any x86-64 CPU; ``RNNKIT_INT8_KERNEL=portable`` forces it)."""
    import ctypes

    path = build.prepare().path
    fn = ctypes.CDLL(str(path)).rnnkit_int8_kernel
    fn.restype = ctypes.c_char_p
    return fn().decode()


class _Int8Weights(nn.Module):
    """int8 weights as buffers: panels and row sums (not saved: rebuilt from the int8 matrix)
    and scales, under the float module's parameter names."""

    _qnames: tuple[str, ...] = ()
    _order: tuple[str, ...] = ()

    def _take(self, float_module: nn.Module, names: list[str]) -> None:
        qnames = []
        for name in names:
            w = getattr(float_module, name, None)
            if w is None:
                self.register_buffer(name, None)
            elif name.startswith("weight"):
                self._set_q(name, QWeight.quantize(w))
                qnames.append(name)
            else:
                self.register_buffer(name, w.detach().to("cpu", torch.float32).clone())
        self._qnames = tuple(qnames)
        self._order = tuple(names)

    def _set_q(self, name: str, w: QWeight) -> None:
        self.register_buffer(f"{name}_packed", w.panels, persistent=False)
        self.register_buffer(f"{name}_sum", w.sum, persistent=False)
        self.register_buffer(f"{name}_scale", w.scale, persistent=False)
        self.__dict__.setdefault("_qshapes", {})[name] = (w.J, w.K)

    def qweight(self, name: str) -> QWeight:
        """The int8 weight ``name`` (torch's parameter name)."""
        J, K = self._qshapes[name]
        return QWeight(
            getattr(self, f"{name}_packed"), getattr(self, f"{name}_scale"),
            getattr(self, f"{name}_sum"), J, K,
        )  # fmt: skip

    def weight_nbytes(self) -> int:
        """Bytes of the weights as held (int8 panels, scales, row sums, float32 biases)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        own = {}
        super()._save_to_state_dict(own, prefix, keep_vars)
        # in the float module's order: weight_ih_l0, its scale, weight_hh_l0, ..., bias_ih_l0
        for name in self._order:
            if name in self._qnames:
                w = self.qweight(name)
                destination[prefix + name] = w.int8()
                destination[prefix + name + "_scale"] = w.scale
            elif prefix + name in own:
                destination[prefix + name] = own.pop(prefix + name)
        destination.update(own)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
        error_msgs,
    ):  # fmt: skip
        mine = set()
        for name in self._qnames:
            key, skey = prefix + name, prefix + name + "_scale"
            mine.update((key, skey))
            if key not in state_dict or skey not in state_dict:
                missing_keys.extend(k for k in (key, skey) if k not in state_dict)
                continue
            q, scale = state_dict[key], state_dict[skey]
            J, K = self._qshapes[name]
            if q.dtype != torch.int8 or tuple(q.shape) != (J, K) or tuple(scale.shape) != (J,):
                error_msgs.append(
                    f"size mismatch for {key}: copying an int8 weight of {q.dtype} "
                    f"{list(q.shape)} (scale {list(scale.shape)}) from checkpoint, the shape in "
                    f"current model is int8 [{J}, {K}] (scale [{J}])"
                )
                continue
            self._set_q(name, QWeight.of_int8(q, scale.to(torch.float32)))
        rest = {k: v for k, v in state_dict.items() if k not in mine}
        super()._load_from_state_dict(
            rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _get_name(self) -> str:
        return "Quantized" + type(self).__name__

    def _check_inference(self, name: str, *tensors) -> None:
        if not torch.is_grad_enabled():
            return
        for t in tensors:
            t = t.data if isinstance(t, PackedSequence) else t
            if isinstance(t, (tuple, list)):
                self._check_inference(name, *t)
            elif isinstance(t, Tensor) and t.requires_grad:
                raise RuntimeError(
                    f"{name}: the int8 layers are inference only and pass no gradient, but an "
                    "input or state requires grad; train the float model (quantize it after), "
                    "or run under torch.no_grad()/torch.inference_mode()"
                )


def _check_eager(name: str) -> None:
    if (
        torch.jit.is_tracing()
        or torch.onnx.is_in_onnx_export()
        or torch.compiler.is_compiling()
        or traced.is_portable()
        or transforms()
    ):
        raise NotImplementedError(
            f"{name}: the int8 layers run eagerly only; torch.jit.trace, torch.compile, "
            "torch.func transforms, rnnkit.portable() and ONNX export take the float model"
        )


def _float_input(name: str, data: Tensor) -> None:
    if data.dtype != torch.float32:
        raise ValueError(
            f"{name}: the int8 layer takes float32 input (its activations and states are "
            f"float32), got {data.dtype}"
        )
    if data.device.type != "cpu":
        raise RuntimeError(f"{name}: the int8 layers run on the CPU; got input on {data.device}")


_OP = None


def _op():
    global _OP
    if _OP is None:
        build.kernels()
        _OP = torch.ops.rnnkit_int8.direction_forward
    return _OP


def _direction(mode: str, x: Tensor, h0: Tensor, c0: Tensor | None, p: CellParams, batch_sizes,
               reverse: bool):  # fmt: skip
    wr = p.w_hr
    return _op()(
        MODES[mode].code, x, h0, c0,
        p.w_ih.panels, p.w_ih.scale, p.w_ih.sum, p.w_hh.panels, p.w_hh.scale, p.w_hh.sum,
        p.b_ih, p.b_hh,
        None if wr is None else wr.panels, None if wr is None else wr.scale,
        None if wr is None else wr.sum, batch_sizes, reverse,
    )  # fmt: skip


def _layer(lc: LayerCall):
    x = lc.rows().contiguous()
    batch_sizes = op_batch_sizes(lc.batch_sizes)
    outs, hs, cs = [], [], []
    for d, p in enumerate(lc.params):
        c0 = None if lc.c0 is None else lc.c0[d].contiguous()
        out, h, c = _direction(lc.mode, x, lc.h0[d].contiguous(), c0, p, batch_sizes, d == 1)
        outs.append(out)
        hs.append(h)
        cs.append(c)
    out = torch.cat(outs, 1) if len(outs) > 1 else outs[0]
    return lc.shaped(out), torch.stack(hs), None if lc.c0 is None else torch.stack(cs)


class _QuantizedLayer(_Int8Weights, modules.RNNBase):
    """A dynamically quantized LSTM, GRU or RNN, made from a float one."""

    def __init__(self, float_module: nn.Module) -> None:
        nn.Module.__init__(self)
        for key in ("mode", "input_size", "hidden_size", "num_layers", "bias", "batch_first",
                    "bidirectional"):  # fmt: skip
            setattr(self, key, getattr(float_module, key))
        self.dropout = float(float_module.dropout)
        self.proj_size = getattr(float_module, "proj_size", 0)
        if hasattr(float_module, "nonlinearity"):
            self.nonlinearity = float_module.nonlinearity
        self.engine = "auto"
        self.variant = Variant()
        self._all_weights = [list(names) for names in float_module._all_weights]
        self._flat_weights_names = [n for names in self._all_weights for n in names]
        self._variant_names = []
        self._take(float_module, self._flat_weights_names)
        self.train(float_module.training)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dtype=torch.qint8"

    def _forward(self, input, hx, reset, lengths):
        name = modules._NAMES[self.mode]
        if reset is not None:
            raise NotImplementedError(f"{name}: the int8 layers do not take reset=")
        _check_eager(name)
        self._check_inference(name, input, hx)
        if self.training and self.dropout > 0 and self.num_layers > 1:
            raise RuntimeError(
                f"{name}: the int8 layers are inference only: in training mode this layer "
                f"would apply dropout={self.dropout} between layers; call .eval()"
            )
        if lengths is None:
            out = self._direct(input, hx)
            if out is not None:
                return out
        return self._eager_forward(input, hx, lengths)

    def _direct(self, input, hx):
        """The call without the driver, for what a deployed layer mostly gets: a float32
        ``[L, N, H_in]`` tensor (``[N, L, H_in]`` batch first) and a state of the exact
        shapes, or none. Anything else returns None and takes the general path, which
        validates it."""
        if type(input) is not Tensor or input.dim() != 3 or input.dtype != torch.float32:
            return None
        if input.device.type != "cpu" or input.layout != torch.strided:
            return None
        L, N = (input.size(1), input.size(0)) if self.batch_first else input.shape[:2]
        if L == 0 or N == 0 or input.size(2) != self.input_size:
            return None
        lstm, D = self.mode == "LSTM", 2 if self.bidirectional else 1
        H, H_out = self.hidden_size, self.proj_size or self.hidden_size
        LD = self.num_layers * D
        if hx is None:
            h0 = input.new_zeros(LD, N, H_out)
            c0 = input.new_zeros(LD, N, H) if lstm else None
        else:
            h0, c0 = hx if lstm and type(hx) is tuple and len(hx) == 2 else (hx, None)
            for t, shape in ((h0, (LD, N, H_out)), (c0, (LD, N, H) if lstm else None)):
                if shape is None:
                    continue
                if type(t) is not Tensor or t.shape != shape or t.dtype != torch.float32:
                    return None
                if t.device.type != "cpu" or t.layout != torch.strided:
                    return None
            if lstm != (c0 is not None):
                return None
        x = (input.transpose(0, 1) if self.batch_first else input).reshape(L * N, -1)
        x = x.contiguous()
        code, buffers, batch = MODES[self.mode].code, self._buffers, list(UNIFORM)
        hs, cs, outs = [], [], []
        for k, names in enumerate(self._all_weights):
            if k % D == 0 and k:
                x = torch.cat(outs, 1) if D > 1 else outs[0]
                outs = []
            w = [[buffers[f"{n}_{part}"] for part in ("packed", "scale", "sum")]
                 if n in self._qshapes else [buffers[n]] for n in names]  # fmt: skip
            bias = (w[2][0], w[3][0]) if self.bias else (None, None)
            w_hr = w[-1] if self.proj_size else (None, None, None)
            out, h, c = _op()(
                code, x, h0[k].contiguous(), None if c0 is None else c0[k].contiguous(),
                *w[0], *w[1], *bias, *w_hr, batch, k % D == 1,
            )  # fmt: skip
            outs.append(out)
            hs.append(h)
            cs.append(c)
        out = (torch.cat(outs, 1) if D > 1 else outs[0]).view(L, N, -1)
        if self.batch_first:
            out = out.transpose(0, 1)
        h_n = torch.stack(hs)
        return (out, (h_n, torch.stack(cs))) if lstm else (out, h_n)

    def _call(self, input, hx, reset):
        """Validation as the float layer's (torch.nn's messages), then the int8 ops."""
        name = modules._NAMES[self.mode]
        lstm = self.mode == "LSTM"
        packed = isinstance(input, PackedSequence)
        batch_sizes = sorted_indices = unsorted_indices = None
        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
        else:
            data = input
        _float_input(name, data)
        D = 2 if self.bidirectional else 1
        _, states = V.check_layer_input(
            self.mode, data, batch_sizes, sorted_indices, unsorted_indices, hx, self.batch_first,
            self.num_layers * D, self.input_size, self.hidden_size,
            self.proj_size or self.hidden_size,
        )  # fmt: skip
        if hx is not None:
            for label, state in zip(("hx[0]", "hx[1]") if lstm else ("hx",), states, strict=True):
                V.expect_dtype(label, state, data.dtype, "input")
                if state.device != data.device:
                    raise RuntimeError(f"{name}: {label} is on {state.device}, the input on cpu")
        if not packed and data.size(1 if self.batch_first else 0) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        if sorted_indices is not None and hx is not None:
            states = [s.index_select(1, sorted_indices) for s in states]
        params = []
        for names in self._all_weights:
            get = {n.rsplit("_l", 1)[0]: n for n in names}
            params.append(
                CellParams(
                    w_ih=self.qweight(get["weight_ih"]), w_hh=self.qweight(get["weight_hh"]),
                    b_ih=getattr(self, get["bias_ih"]) if self.bias else None,
                    b_hh=getattr(self, get["bias_hh"]) if self.bias else None,
                    w_hr=self.qweight(get["weight_hr"]) if self.proj_size else None,
                )
            )  # fmt: skip
        call = RNNCall(
            mode=self.mode, input=data, batch_sizes=batch_sizes,
            hx=tuple(states) if lstm else states[0], params=tuple(params),
            num_layers=self.num_layers, dropout=0.0, train=False,
            bidirectional=self.bidirectional, batch_first=self.batch_first,
        )  # fmt: skip
        output, *hidden = run_stack(call, _layer)
        if packed:
            output = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
            if unsorted_indices is not None:
                hidden = [h.index_select(1, unsorted_indices) for h in hidden]
        return (output, *hidden)


class LSTM(_QuantizedLayer, modules.LSTM):
    """:class:`rnnkit.LSTM` with int8 weights (see :func:`rnnkit.quantize_dynamic`)."""


class GRU(_QuantizedLayer, modules.GRU):
    """:class:`rnnkit.GRU` with int8 weights (see :func:`rnnkit.quantize_dynamic`)."""


class RNN(_QuantizedLayer, modules.RNN):
    """:class:`rnnkit.RNN` with int8 weights (see :func:`rnnkit.quantize_dynamic`)."""


class _QuantizedCell(_Int8Weights, cell_modules.RNNCellBase):
    """A dynamically quantized cell, made from a float one."""

    _mode = ""

    def __init__(self, float_module: nn.Module) -> None:
        nn.Module.__init__(self)
        self.input_size = float_module.input_size
        self.hidden_size = float_module.hidden_size
        self.bias = float_module.bias
        if hasattr(float_module, "nonlinearity"):
            self.nonlinearity = float_module.nonlinearity
        self.engine = "auto"
        self.variant = Variant()
        self._variant_names = []
        self._take(float_module, ["weight_ih", "weight_hh", "bias_ih", "bias_hh"])
        self.train(float_module.training)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dtype=torch.qint8"

    def _fast(self, input, hx):
        return None

    def _call(self, fn, input: Tensor, hx, name: str):
        _check_eager(name)
        self._check_inference(name, input, hx)
        _float_input(name, input)
        lstm = isinstance(hx, tuple)
        if input.size(1) != self.input_size:
            raise RuntimeError(
                f"input has inconsistent input_size: got {input.size(1)} expected {self.input_size}"
            )
        for k, h in enumerate(hx if lstm else (hx,)):
            label = f"hidden{k}"
            if h.size(0) != input.size(0):
                raise RuntimeError(
                    f"Input batch size {input.size(0)} doesn't match {label} batch size {h.size(0)}"
                )
            if h.size(1) != self.hidden_size:
                raise RuntimeError(
                    f"{label} has inconsistent hidden_size: got {h.size(1)}, expected "
                    f"{self.hidden_size}"
                )
            V.expect_dtype(f"hx[{k}]" if lstm else "hx", h, input.dtype, "input")
        mode = self._mode or {"tanh": "RNN_TANH", "relu": "RNN_RELU"}[self.nonlinearity]
        params = CellParams(
            self.qweight("weight_ih"), self.qweight("weight_hh"), self.bias_ih, self.bias_hh
        )
        h0, c0 = (hx[0], hx[1]) if lstm else (hx, None)
        _, h, c = _direction(
            mode, input.contiguous(), h0.contiguous(),
            None if c0 is None else c0.contiguous(), params, op_batch_sizes(()), False,
        )  # fmt: skip
        return (h, c) if lstm else h


class LSTMCell(_QuantizedCell, cell_modules.LSTMCell):
    """:class:`rnnkit.LSTMCell` with int8 weights (see :func:`rnnkit.quantize_dynamic`)."""

    _mode = "LSTM"


class GRUCell(_QuantizedCell, cell_modules.GRUCell):
    """:class:`rnnkit.GRUCell` with int8 weights (see :func:`rnnkit.quantize_dynamic`)."""

    _mode = "GRU"


class RNNCell(_QuantizedCell, cell_modules.RNNCell):
    """:class:`rnnkit.RNNCell` with int8 weights (see :func:`rnnkit.quantize_dynamic`)."""

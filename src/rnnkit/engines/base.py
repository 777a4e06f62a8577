"""The engine interface: what every engine receives, returns and declares it supports.

An engine runs one layer of a stacked call (``layer``: every direction of it; the driver in
``engines/driver.py`` owns the stack, the states, inter-layer dropout, the order of the random
draws and ``batch_first``) and one step of a cell (``cell``). What it runs is declared as data:
a tuple of :class:`Support` regions, each a set of modes, devices, dtypes, call options and
variant fields. The dispatcher (``rnnkit.functional.select_engine``) refuses every call that no
region of an engine covers, with the reason, so an option or variant field that an engine does
not name is never handed to it. What data cannot say (whether a compiler built the kernels, an
interpreter is on) is the engine's ``rnn_unsupported``/``cell_unsupported``, which return
``None`` when the engine can run a call and otherwise a short reason. ``engine=<name>`` raises
that reason; ``engine="auto"`` moves on to the next engine. Calls arrive validated (shapes,
dtypes, devices) by ``rnnkit.functional``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch._C import _functorch

from rnnkit.cells import CellParams, State
from rnnkit.modes import MODES
from rnnkit.variants import PLAIN, Variant

# (output, h_n) for GRU/RNN, (output, h_n, c_n) for LSTM
RNNResult = tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]


# A constant to torch.compile, which cannot trace the stack: read when tracing, never a guard.
@torch.compiler.assume_constant_result
def transforms() -> tuple[str, ...]:
    """The torch.func transforms around this call, outermost first (``"vmap"``, ``"grad"``,
    ``"jvp"``, ``"functionalize"``); empty outside any. ``grad``, ``vjp`` and ``jacrev`` are
    ``"grad"``; ``jacfwd`` is ``"vmap"`` over ``"jvp"``."""
    stack = _functorch.get_interpreter_stack() or []
    return tuple(str(level.key()).rpartition(".")[2].lower() for level in stack)


def forward_ad(tensors: list[Tensor]) -> bool:
    """Whether forward-mode AD runs through this call: under ``torch.func.jvp``/``jacfwd``,
    or with a dual tensor of ``torch.autograd.forward_ad`` among ``tensors``."""
    if "jvp" in transforms():
        return True
    # no tensor has a tangent outside torch.autograd.forward_ad.dual_level()
    if getattr(fwAD, "_current_level", 0) < 0:
        return False
    return any(fwAD.unpack_dual(t).tangent is not None for t in tensors)


@dataclass(frozen=True)
class RNNCall:
    """A whole multi-layer RNN call, in the terms of ``torch._VF.lstm`` and friends.

    ``input`` is ``[L, N, H_in]`` (``[N, L, H_in]`` if ``batch_first``), or the packed data
    ``[sum(batch_sizes), H_in]`` when ``batch_sizes`` (int64, CPU, non-increasing) is given.
    ``hx`` is ``h_0`` ``[D*num_layers, N, H_out]``, or ``(h_0, c_0)`` for LSTM with ``c_0``
    ``[D*num_layers, N, H]``. ``params`` holds one :class:`CellParams` per layer and
    direction, layer-major. The output has the input's layout.
    """

    mode: str  # "LSTM", "GRU", "RNN_TANH", "RNN_RELU"
    input: Tensor
    batch_sizes: Tensor | None
    hx: Tensor | tuple[Tensor, Tensor]
    params: tuple[CellParams, ...]
    num_layers: int
    dropout: float
    train: bool
    bidirectional: bool
    batch_first: bool
    variant: Variant = PLAIN
    # restarts inside the sequences (rnnkit.resets): bool, time-major [L, N], or the packed
    # rows [R] of it with packed input; None without
    reset: Tensor | None = None

    @property
    def proj_size(self) -> int:
        w_hr = self.params[0].w_hr
        return 0 if w_hr is None else w_hr.size(0)


def time_major(call: RNNCall) -> tuple[Tensor, list[int]]:
    """``call.input`` time-major (``[L, N, H_in]``; packed rows as given) and the batch size
    of every step of packed input; none for uniform input, whose steps all have the full
    batch (``driver.step_batches``): a list of L sizes would be a constant of one sequence
    length in a trace or an exported graph."""
    x = call.input
    if call.batch_sizes is not None:
        return x, call.batch_sizes.tolist()
    if call.batch_first:
        x = x.transpose(0, 1)
    return x, []


@dataclass(frozen=True)
class CellCall:
    """One step of a cell: ``input`` ``[N, H_in]``, ``hx`` ``[N, H]`` or ``(h, c)``."""

    mode: str
    input: Tensor
    hx: State
    params: CellParams
    variant: Variant = PLAIN
    train: bool = False


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


def call_tensors(call: RNNCall | CellCall) -> list[Tensor]:
    """Every tensor of a call: input, states, then each layer-direction's parameters."""
    hx = list(call.hx) if isinstance(call.hx, tuple) else [call.hx]
    params = call.params if isinstance(call, RNNCall) else (call.params,)
    return [call.input, *hx, *(t for p in params for t in p if t is not None)]


# The call options an engine may declare, each with what it means. A call uses an option when
# its predicate holds; an engine that does not declare an option is never handed a call that
# uses it.
OPTIONS: dict[str, str] = {
    "layers": "num_layers > 1",
    "bidirectional": "bidirectional=True",
    "proj_size": "proj_size > 0",
    "packed": "packed input (PackedSequence or batch_sizes)",
    "dropout": "inter-layer dropout in training",
    "no_bias": "bias=False",
    "batch_first": "batch_first=True",
    "reset": "reset= (restarts inside a sequence)",
    "mixed_dtypes": "input, states and weights of more than one dtype",
    "autocast": "autocast",
    "forward_ad": "forward-mode AD (torch.func.jvp, jacfwd, forward_ad)",
    "vmap": "torch.func.vmap",
    "grad": "torch.func gradients (grad, vjp, jacrev)",
    "grad_of_grad": "torch.func gradients of gradients (grad of grad, jacrev of jacrev)",
    "grad_tracked_outside": (
        "torch.func gradients (grad, vjp, jacrev) of tensors that torch.autograd also tracks "
        "(pass detached tensors or call the transform under torch.no_grad())"
    ),
    "functionalize": "torch.func.functionalize",
    "jit_trace": (
        "torch.jit.trace (a time loop in Python is unrolled into the trace at the example's "
        "sequence length; trace a layer that runs on engine='fused', or export with "
        "torch.export or rnnkit.onnx.export)"
    ),
}


def call_options(call: RNNCall | CellCall) -> frozenset[str]:
    """The names of :data:`OPTIONS` that ``call`` uses."""
    tensors = call_tensors(call)
    stack = transforms()
    used = set()
    if isinstance(call, RNNCall):
        used.update(
            name
            for name, on in (
                ("layers", call.num_layers > 1),
                ("bidirectional", call.bidirectional),
                ("proj_size", call.proj_size > 0),
                ("packed", call.batch_sizes is not None),
                ("dropout", call.dropout != 0 and call.train and call.num_layers > 1),
                ("no_bias", call.params[0].b_ih is None),
                ("batch_first", call.batch_first),
                ("reset", call.reset is not None),
                ("jit_trace", torch.jit.is_tracing()),
            )
            if on
        )
    elif call.params.b_ih is None:
        used.add("no_bias")
    if any(t.dtype != call.input.dtype for t in tensors):
        used.add("mixed_dtypes")
    if torch.is_autocast_enabled(call.input.device.type):
        used.add("autocast")
    if forward_ad(tensors):
        used.add("forward_ad")
    for name in ("vmap", "functionalize"):
        if name in stack:
            used.add(name)
    if "grad" in stack:
        used.add("grad")
        if stack.count("grad") > 1:
            used.add("grad_of_grad")
        if tracked_outside(tensors):
            used.add("grad_tracked_outside")
    return frozenset(used)


def variant_fields(variant: Variant) -> frozenset[str]:
    """The fields of ``variant`` that differ from their defaults: what the call asks of the
    step math beyond torch's (a field added to :class:`Variant` tomorrow counts too)."""
    return _memoized(_variant_fields, variant)


def _memoized(cached: Callable, *args):
    """``cached(*args)`` of an ``lru_cache`` function, or its uncached function where an
    argument does not hash (a variant field of an unhashable value)."""
    try:
        return cached(*args)
    except TypeError:
        return cached.__wrapped__(*args)


# A Variant is frozen, so its fields are worked out once per distinct variant (a small call
# spent 7% of its time in dataclasses.fields here).
@functools.lru_cache(maxsize=256)
def _variant_fields(variant: Variant) -> frozenset[str]:
    return frozenset(f.name for f in fields(variant) if getattr(variant, f.name) != f.default)


ALL_MODES = frozenset(MODES)


@dataclass(frozen=True)
class Support:
    """One region of calls that an engine runs: a call is in it when its mode, device type and
    dtype are in these sets (``None``: any), and every option it uses and every variant field
    it sets is named here."""

    modes: frozenset[str]
    devices: frozenset[str] | None
    dtypes: frozenset[torch.dtype] | None
    options: frozenset[str]
    variant_fields: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        unknown = set(self.options) - set(OPTIONS)
        if unknown:
            raise ValueError(f"unknown call options {sorted(unknown)}; known: {list(OPTIONS)}")

    def misses(self, call: RNNCall | CellCall, options: frozenset[str] | None = None) -> list[str]:
        """What of ``call`` lies outside this region, in words (empty: it lies inside).
        ``options``: :func:`call_options` of the call, where the caller has them."""
        options = call_options(call) if options is None else options
        return self.misses_of(
            call.mode, call.input.device.type, call.input.dtype, options, call.variant
        )

    def misses_of(
        self,
        mode: str,
        device: str,
        dtype: torch.dtype,
        options: frozenset[str],
        variant: Variant,
    ) -> list[str]:
        """:meth:`misses` of a call of this mode, device type, dtype, options and variant."""
        missing = []
        if mode not in self.modes:
            missing.append(f"mode {mode}")
        if self.devices is not None and device not in self.devices:
            missing.append(f"{device} tensors")
        if self.dtypes is not None and dtype not in self.dtypes:
            missing.append(str(dtype))
        missing += [OPTIONS[o] for o in sorted(options - self.options)]
        fields_ = sorted(variant_fields(variant) - self.variant_fields)
        missing += [f"variant {name}={getattr(variant, name)!r}" for name in fields_]
        return missing


def refusal(support: tuple[Support, ...], call: RNNCall | CellCall) -> str | None:
    """None when a region of ``support`` covers ``call``; else what the nearest regions (those
    that miss least) lack."""
    if not support:
        kind = "cells" if isinstance(call, CellCall) else "layers"
        return f"{kind} not supported"
    # what Support.misses reads of the call: the answer is worked out once per distinct key
    key = (support, call.mode, call.input.device.type, call.input.dtype, call_options(call))
    return _memoized(_refusal, key, call.variant)


@functools.lru_cache(maxsize=1024)
def _refusal(key: tuple, variant: Variant) -> str | None:
    support, mode, device, dtype, options = key
    misses = [s.misses_of(mode, device, dtype, options, variant) for s in support]
    if any(not m for m in misses):
        return None
    fewest = min(len(m) for m in misses)
    # each way the nearest regions fall short, once
    nearest = dict.fromkeys(
        "; ".join(f"{m} not supported" for m in miss) for miss in misses if len(miss) == fewest
    )
    return ", or ".join(nearest)


def _runs(call) -> str | None:
    return None


def _sound() -> str | None:
    return None


# One layer of a call: see ``engines/driver.py``'s ``LayerCall``.
LayerFn = Callable[..., "tuple[Tensor, Tensor, Tensor | None]"]


@dataclass(frozen=True)
class Engine:
    name: str
    # one layer (all its directions) of an RNNCall, under the driver
    layer: LayerFn
    run_cell: Callable[[CellCall], State]
    # the calls it runs, as data (see Support)
    rnn_support: tuple[Support, ...]
    cell_support: tuple[Support, ...] = ()
    # what data cannot say: None when the environment lets the engine run the call, else why
    rnn_unsupported: Callable[[RNNCall], str | None] = _runs
    cell_unsupported: Callable[[CellCall], str | None] = _runs
    # None, or what is broken in the installation (kernels that failed to build): then
    # engine="auto" moves on with one warning that names it, and a request by name raises it
    fault: Callable[[], str | None] = _sound

    def refused(self, call: RNNCall | CellCall) -> str | None:
        """None when this engine declares ``call``, else what it does not declare."""
        support = self.cell_support if isinstance(call, CellCall) else self.rnn_support
        return refusal(support, call)

    def unsupported(self, call: RNNCall | CellCall) -> str | None:
        """None when this engine can run ``call``, else why not: first what it does not
        declare, then its fault, then what its environment check says."""
        reason = self.refused(call) or self.fault()
        if reason is not None:
            return reason
        if isinstance(call, CellCall):
            return self.cell_unsupported(call)
        return self.rnn_unsupported(call)

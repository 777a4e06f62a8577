"""Launchers of the pointwise kernels: tile sizes, grid and the compute dtype of one step.

Each function launches one kernel of ``kernels.py`` (``variant_kernels.py``) over the ``b``
active rows of a step. The caller owns every buffer (``recurrence.py`` and ``variant.py``
allocate them once per direction); a launcher only picks the tiling. Row strides are passed for
the tensors that may be column slices of a wider matrix (a direction's half of a bidirectional
output); every other tensor is contiguous.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

from rnnkit.engines.triton import kernels, variant_kernels

# A program covers a [BLOCK_N, BLOCK_H] tile of (row, unit) with at most TILE elements (per gate
# block). Compiled, these are starting points for tuning on a GPU. Interpreted, every program
# costs the same per op whatever its size, so one program takes the whole step.
_MAX_BLOCK_H = 1 << 16 if kernels.INTERPRETED else 128
_TILE = 1 << 16 if kernels.INTERPRETED else 1024


def on_device(t: Tensor):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of state and pointwise math for a layer of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def acc_tl(t: Tensor):
    """:func:`acc_dtype` of ``t``'s dtype as a Triton type, for a kernel's ``ACC``."""
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def _grid(b: int, H: int, whole_rows: bool = False) -> tuple[tuple[int, int], dict]:
    block_h = triton.next_power_of_2(H)
    if not whole_rows:
        block_h = min(block_h, _MAX_BLOCK_H)
    block_n = min(triton.next_power_of_2(b), max(1, _TILE // block_h))
    grid = (triton.cdiv(b, block_n), triton.cdiv(H, block_h))
    # FMA contraction, Triton's default so far, stated: its default is set to change
    return grid, dict(BLOCK_N=block_n, BLOCK_H=block_h, enable_fp_fusion=True)


def lstm_forward(gates, c, cs, h, out, b: int, H: int) -> None:
    """``gates`` [b, 4H] pre-activations (activations on exit when ``cs`` is given), ``c``
    [N, H] state, ``cs`` [b, H] saved c_t or None, ``h`` [b, *] and ``out`` [b, *] or None:
    where h_t (r_t with a projection) goes."""
    grid, blocks = _grid(b, H)
    kernels.lstm_forward_kernel[grid](
        gates, c, cs, h, out, b, H, h.stride(0), 0 if out is None else out.stride(0),
        ACC=acc_tl(c), SAVE=cs is not None, OUT=out is not None, **blocks,
    )  # fmt: skip


def restart_forward(codes, a, a0, b_state, b0, b: int) -> None:
    """Before a step: the rows ``j < b`` of the states ``a`` (and ``b_state``, or None) whose
    restart code ``codes`` [b] says so start over, from zeros or from their rows of ``a0``
    (``b0``)."""
    two = b_state is not None
    W_b = b_state.size(1) if two else 0
    grid, blocks = _grid(b, max(a.size(1), W_b))
    kernels.restart_forward_kernel[grid](
        codes, a, a0, b_state, b0, b, max(a.size(1), W_b), a.size(1), W_b, a.stride(0),
        a0.stride(0), b_state.stride(0) if two else 0, b0.stride(0) if two else 0, TWO=two,
        **blocks,
    )  # fmt: skip


def restart_backward(codes, da, da0, db, db0, b: int) -> None:
    """After a step back: the gradients ``da`` (and ``db``, or None) [N, *] of the state that
    entered the step stop at the rows ``j < b`` that restarted there; those that restarted
    from the initial state add theirs to ``da0`` (``db0``). All contiguous."""
    two = db is not None
    W_b = db.size(1) if two else 0
    grid, blocks = _grid(b, max(da.size(1), W_b))
    kernels.restart_backward_kernel[grid](
        codes, da, da0, db, db0, b, max(da.size(1), W_b), da.size(1), W_b, TWO=two, **blocks
    )


def lstm_backward(act, cs, cprev, c0, dh, go, dc, dG, codes, b: int, b_prev: int, H: int) -> None:
    """One step back: ``dh`` [b, *] is dh_t from the later steps when ``go`` (the output
    rows' gradient) is given, else dr_t of a projection; ``dc`` [N, H] is updated in place;
    ``codes`` [b] the step's restart codes or None."""
    grid, blocks = _grid(b, H)
    kernels.lstm_backward_kernel[grid](
        act, cs, cprev, c0, dh, go, dc, dG, codes, b, b_prev, H, dh.stride(0),
        0 if go is None else go.stride(0), ACC=acc_tl(dc), ADD_GO=go is not None,
        RESET=codes is not None, **blocks,
    )  # fmt: skip


def gru_forward(x, hw, h, hio, out, ws, b: int, H: int) -> None:
    """``h`` [N, H] state in the compute dtype; ``hio`` its copy in the layer's dtype (the next
    GEMM's operand) or None when they are one tensor; ``ws`` [b, 4H] saved or None."""
    grid, blocks = _grid(b, H)
    kernels.gru_forward_kernel[grid](
        x, hw, h, hio, out, ws, b, H, out.stride(0),
        ACC=acc_tl(h), IO_STATE=hio is not None, SAVE=ws is not None, **blocks,
    )  # fmt: skip


def gru_backward(ws, hprev, h0, dh, go, dG, codes, b: int, b_prev: int, H: int) -> None:
    grid, blocks = _grid(b, H)
    kernels.gru_backward_kernel[grid](
        ws, hprev, h0, dh, go, dG, codes, b, b_prev, H, hprev.stride(0), go.stride(0),
        ACC=acc_tl(dh), RESET=codes is not None, **blocks,
    )  # fmt: skip


def rnn_forward(a, h, out, b: int, H: int, relu: bool) -> None:
    grid, blocks = _grid(b, H)
    kernels.rnn_forward_kernel[grid](
        a, h, out, b, H, out.stride(0), ACC=acc_tl(h), RELU=relu, **blocks
    )


def rnn_backward(hs, dh, go, dG, b: int, H: int, relu: bool) -> None:
    grid, blocks = _grid(b, H)
    kernels.rnn_backward_kernel[grid](
        hs, dh, go, dG, b, H, hs.stride(0), go.stride(0), ACC=acc_tl(dh), RELU=relu, **blocks
    )


def _variant_flags(v, train: bool) -> dict:
    """The constexpr switches of a variant, and its zoneout modes: 0 off, 1 masks, 2 rate."""
    zh, zc = v.zoneout
    return dict(
        PEEP=v.peephole,
        CIFG=v.coupled_input_forget,
        GCLIP=v.gate_clip is not None,
        CCLIP=v.cell_clip is not None,
        LN_C=v.layer_norm,
        ZH=0 if zh == 0 else 1 if train else 2,
        ZC=0 if zc == 0 else 1 if train else 2,
    )


def variant_scalars(v, like: Tensor) -> Tensor:
    """The variant's float arguments in the compute dtype (a Python float would reach a kernel
    as float32): zoneout rates (h, c), gate and cell clips, LayerNorm's eps."""
    from rnnkit.cells import LN_EPS

    clips = [0.0 if c is None else c for c in (v.gate_clip, v.cell_clip)]
    return torch.tensor([*v.zoneout, *clips, LN_EPS], dtype=acc_dtype(like.dtype)).to(like.device)


def lstm_variant_forward(v, train, gx, rr, c, h, out, y, p, kh, kc, saved, scalars, b, H):
    """One step of an LSTM variant ``v`` (``train``: zoneout by masks, else by its rates).
    ``p`` holds the layer's parameters, ``saved`` the rows ``(z, ct, cz, stats)`` to keep,
    each None when not kept, ``scalars`` is :func:`variant_scalars`."""
    grid, blocks = _grid(b, H, whole_rows=v.layer_norm)
    z, ct, cz, stats = saved
    variant_kernels.lstm_variant_forward_kernel[grid](
        gx, rr, c, h, out, y, p.peephole, p.ln_c_weight, p.ln_c_bias, kh, kc, z, ct, cz, stats,
        scalars, b, H, 0 if out is None else out.stride(0), ACC=acc_tl(c), SAVE=z is not None,
        PROJ=y is not None, **_variant_flags(v, train), **blocks,
    )  # fmt: skip


def lstm_variant_backward(
    v, train, saved, cprev, c0, dy, dh, go, kh, dc, kc, p, dz, dco, scalars, codes, b, b_prev, H
) -> None:
    """One step back: ``saved`` the step's rows ``(z, ct, stats)``; ``dy`` given with a
    projection, else ``dh`` [N, H] and ``go`` (the output rows' gradient) make it; ``codes``
    [b] the step's restart codes or None."""
    grid, blocks = _grid(b, H, whole_rows=v.layer_norm)
    z, ct, stats = saved
    variant_kernels.lstm_variant_backward_kernel[grid](
        z, ct, cprev, c0, stats, dy, dh, go, kh, dc, kc, p.peephole, p.ln_c_weight,
        p.ln_c_bias, dz, dco, scalars, codes, b, b_prev, H, 0 if go is None else go.stride(0),
        ACC=acc_tl(dc), PROJ=dy is not None, RESET=codes is not None,
        **_variant_flags(v, train), **blocks,
    )  # fmt: skip

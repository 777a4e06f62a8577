"""int8 weights of the quantized layers: per output channel, symmetric, in the kernel's panels.

A weight ``W`` ``[J, K]`` becomes ``W ~ scale[j] * q[j, k]``, ``q`` int8 in ``[-127, 127]``
and ``scale[j] = max_k |W[j, k]| / 127`` (1 for a row of zeros), rounded to nearest, ties to
even. The compiled kernel (``engines/cpu/csrc/quantized.cpp``) reads ``q`` as panels
``[ceil(J/16), ceil(K/4), 16, 4]`` (16 outputs by 4 consecutive inputs, zero-padded), with
the row sums ``sum_k q[j, k]`` that take the activations' zero point out of the product.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DEPTH", "PANEL", "QWeight"]

PANEL, DEPTH = 16, 4


@dataclass(frozen=True)
class QWeight:
    """One int8 weight: ``panels`` (int8, flat), ``scale`` (float32 ``[J]``), ``sum`` (int32
    ``[J]``) and its float shape ``[J, K]``."""

    panels: Tensor
    scale: Tensor
    sum: Tensor
    J: int
    K: int

    @staticmethod
    def quantize(w: Tensor) -> QWeight:
        """The int8 weight of a float ``w`` ``[J, K]`` (any float dtype; rounded in float64 from
        ``w``'s values, so the result does not depend on it)."""
        if w.dim() != 2 or not w.is_floating_point():
            raise ValueError(
                f"quantize: expected a 2-D float weight, got {w.dtype} {list(w.shape)}"
            )
        if not torch.isfinite(w).all():
            raise ValueError("quantize: the weight holds inf or NaN")
        w64 = w.detach().to("cpu", torch.float64)
        amax = w64.abs().amax(dim=1)
        scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax)).to(torch.float32)
        q = torch.round(w64 / scale.double().unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
        return QWeight.of_int8(q, scale)

    @staticmethod
    def of_int8(q: Tensor, scale: Tensor) -> QWeight:
        """Panels of an int8 ``q`` ``[J, K]`` with its float32 ``scale`` ``[J]``."""
        if q.dtype != torch.int8 or q.dim() != 2:
            raise ValueError(f"expected a 2-D int8 weight, got {q.dtype} {list(q.shape)}")
        J, K = q.shape
        if scale.dtype != torch.float32 or tuple(scale.shape) != (J,):
            raise ValueError(
                f"expected a float32 scale of shape [{J}], got {scale.dtype} {list(scale.shape)}"
            )
        Jb, Kq = -(-J // PANEL), -(-K // DEPTH)
        padded = F.pad(q.to("cpu"), (0, Kq * DEPTH - K, 0, Jb * PANEL - J))
        panels = padded.view(Jb, PANEL, Kq, DEPTH).permute(0, 2, 1, 3).contiguous().view(-1)
        sums = q.to(torch.int32).sum(dim=1, dtype=torch.int32)
        return QWeight(panels, scale.to("cpu").contiguous(), sums.contiguous(), J, K)

    def int8(self) -> Tensor:
        """``q`` ``[J, K]``, unpacked from the panels."""
        Jb, Kq = -(-self.J // PANEL), -(-self.K // DEPTH)
        q = self.panels.view(Jb, Kq, PANEL, DEPTH).permute(0, 2, 1, 3).reshape(Jb * PANEL, -1)
        return q[: self.J, : self.K].contiguous()

    def dequantize(self) -> Tensor:
        """``scale[j] * q[j, k]`` in float32 ``[J, K]``."""
        return self.int8().to(torch.float32) * self.scale.unsqueeze(1)

    def size(self, dim: int) -> int:
        return (self.J, self.K)[dim]

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.J, self.K))

    @property
    def nbytes(self) -> int:
        """Bytes held: panels, scales and sums."""
        return sum(t.numel() * t.element_size() for t in (self.panels, self.scale, self.sum))

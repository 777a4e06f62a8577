"""The table of recurrent modes: one row per mode, read by every module, engine and kernel.

A mode is torch's name for a recurrence (``"LSTM"``, ``"GRU"``, ``"RNN_TANH"``,
``"RNN_RELU"``, as ``torch.nn.RNNBase.mode``). Its row says how many gate blocks its weights
stack (``G``: ``weight_ih`` is ``[G*H, H_in]``), how many state tensors it carries (LSTM's
``(h, c)``) and the integer the compiled CPU kernels and the Triton kernels take for it. The
C++ build receives the codes as macros from this table (``engines/cpu/build.py``), and the
Triton kernels compare against them as constants, so no other file spells them.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MODES", "Mode", "mode"]


@dataclass(frozen=True)
class Mode:
    name: str
    # G: gate blocks in weight_ih/weight_hh and the biases ([G*H, *])
    gates: int
    # 2 for LSTM's (h, c), else 1
    states: int
    # the kernels' integer for this mode
    code: int

    @property
    def is_lstm(self) -> bool:
        return self.states == 2


MODES: dict[str, Mode] = {
    m.name: m
    for m in (
        Mode("LSTM", gates=4, states=2, code=0),
        Mode("GRU", gates=3, states=1, code=1),
        Mode("RNN_TANH", gates=1, states=1, code=2),
        Mode("RNN_RELU", gates=1, states=1, code=3),
    )
}


def mode(name: str) -> Mode:
    """The row of mode ``name``; a ``ValueError`` naming the modes for any other."""
    try:
        return MODES[name]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown mode '{name}'; expected one of {', '.join(MODES)}") from None

"""Fixtures of the whole suite."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def triton_interpreter():
    """Triton's interpreter for the requesting test, where torch sees no GPU.

    ``TRITON_INTERPRET=1`` is set while the test runs, and the kernels are imported under it
    the first time (Triton reads it when it decorates a kernel), so that the engine takes CPU
    tensors there and nowhere else in the run. With a GPU, nothing changes: the kernels
    compile.
    """
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        from rnnkit.engines.triton import interpreted

        if not interpreted():
            pytest.skip("the Triton kernels were compiled before TRITON_INTERPRET=1 was set")
        yield

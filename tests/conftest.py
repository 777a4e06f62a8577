"""Fixtures of the whole suite."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest
import torch

# inductor's on-disk caches of this run alone: measured here, a kernel cached by a run under
# another ATEN_CPU_CAPABILITY (the suite's AVX2 check) came back in a later run and gave wrong
# results (torch.compile of an LSTM with resets off by 0.8), so no run reads another's
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _INDUCTOR_CACHE = tempfile.mkdtemp(prefix="rnnkit-tests-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _INDUCTOR_CACHE
    atexit.register(shutil.rmtree, _INDUCTOR_CACHE, ignore_errors=True)


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

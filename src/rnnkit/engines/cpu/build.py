"""Just-in-time build of the fused CPU engine's C++ kernels, once per machine and torch version.

:func:`kernels` compiles ``csrc/*.cpp`` with ``torch.utils.cpp_extension.load`` on first use
(seconds; later processes reuse the cached library) and returns the ``torch.ops.rnnkit_cpu``
namespace. The build lands in torch's extension cache, or under ``RNNKIT_BUILD_DIR`` when that
is set. A failure is remembered for the process and raised again, with the compiler's reason,
by every later call: it is never retried mid-run.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import torch

from rnnkit.engines.cpu import fake, func
from rnnkit.modes import MODES

__all__ = ["BuildError", "build_error", "kernels"]

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = ["layer.cpp", "lstm.cpp", "gru.cpp", "rnn.cpp", "lstm_variant.cpp"]

# Vector width of the activations: what torch itself dispatches to on this CPU, so the build
# never uses instructions the machine lacks (``ATEN_CPU_CAPABILITY`` lowers it for both).
_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}


class BuildError(RuntimeError):
    """The fused CPU kernels could not be compiled or loaded; the message says why."""


_ops = None
_error: str | None = None
_lock = threading.Lock()


def _flags() -> tuple[str, list[str]]:
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in _CAPABILITY_FLAGS:
        return "default", []
    flags = [*_CAPABILITY_FLAGS[capability], f"-DCPU_CAPABILITY={capability}"]
    return capability.lower(), [*flags, f"-DCPU_CAPABILITY_{capability}"]


def _mode_macros() -> list[str]:
    """The table of modes for the C++ sources: each mode's kernel code and gate blocks."""
    return [
        flag
        for m in MODES.values()
        for flag in (f"-DRNNKIT_MODE_{m.name}={m.code}", f"-DRNNKIT_GATES_{m.name}={m.gates}")
    ]


def _ninja_on_path() -> None:
    # cpp_extension runs `ninja` from PATH; the ninja wheel puts it beside this interpreter,
    # which is not on PATH when the virtual environment was not activated.
    from torch.utils.cpp_extension import is_ninja_available

    if is_ninja_available():
        return
    candidates = [Path(sys.executable).parent]
    try:
        import ninja

        candidates.insert(0, Path(ninja.BIN_DIR))
    except (ImportError, AttributeError):
        pass
    for directory in candidates:
        if (directory / "ninja").exists():
            os.environ["PATH"] = f"{directory}{os.pathsep}{os.environ.get('PATH', '')}"
            return


def _build():
    from torch.utils.cpp_extension import load

    suffix, flags = _flags()
    build_dir = os.environ.get("RNNKIT_BUILD_DIR")
    if build_dir:
        build_dir = os.path.join(build_dir, f"rnnkit_cpu_{suffix}")
        os.makedirs(build_dir, exist_ok=True)
    _ninja_on_path()
    load(
        name=f"rnnkit_cpu_{suffix}",
        sources=[str(_CSRC / s) for s in _SOURCES],
        extra_cflags=["-O3", "-Wno-unused-function", *flags, *_mode_macros()],
        build_directory=build_dir,
        is_python_module=False,
        verbose=False,
    )
    ops = torch.ops.rnnkit_cpu
    if not ops.blas_available():
        raise BuildError("this torch build exports no BLAS sgemm_/dgemm_ to call")
    fake.register("rnnkit_cpu")
    func.register("rnnkit_cpu")
    return ops


def kernels():
    """The compiled ops (``torch.ops.rnnkit_cpu``), built on first use.

    Raises :class:`BuildError` with the compiler's or loader's reason when they cannot be had.
    """
    global _ops, _error
    if _ops is not None:
        return _ops
    # one build and one load per process, however many threads make their first call at once
    with _lock:
        if _ops is None and _error is None:
            try:
                _ops = _build()
            except Exception as e:  # the compiler's or loader's reason, kept for every caller
                _error = f"{type(e).__name__}: {e}".strip()
    if _ops is not None:
        return _ops
    raise BuildError(f"the fused CPU engine's kernels are unavailable ({_error})")


# A constant to torch.compile: traced once (building the kernels if needed), never a guard.
@torch.compiler.assume_constant_result
def build_error() -> str | None:
    """None when the kernels load (building them if needed), else why they cannot."""
    try:
        kernels()
    except BuildError as e:
        return str(e)
    return None

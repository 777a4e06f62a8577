"""The C++ compiler's part of the fused CPU engine's build: flags, commands, and failures
told in one line.

The kernels compile against torch's headers and link against its libraries as
``torch.utils.cpp_extension`` would, without it and without ninja: one compiler process per
source, in parallel, then one link. The flags are data (:class:`Recipe`), so that the cache
key (``build.py``) covers every one of them.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch

from rnnkit.modes import MODES

__all__ = ["CompileError", "Recipe", "compile_library", "recipe"]

CSRC = Path(__file__).parent / "csrc"
SOURCES = ("layer.cpp", "lstm.cpp", "gru.cpp", "rnn.cpp", "lstm_variant.cpp", "quantized.cpp")

# Vector width of the activations: what torch itself dispatches to on this CPU, so the build
# never uses instructions the machine lacks (``ATEN_CPU_CAPABILITY`` lowers it for both).
_CAPABILITY_FLAGS = {
    "AVX512": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma"),
    "AVX2": ("-mavx2", "-mfma"),
}


class CompileError(RuntimeError):
    """The compiler or linker failed, or is missing; the message is one line."""


@dataclass(frozen=True)
class Recipe:
    """How the library is made: the compiler, its flags, the sources and headers."""

    cxx: str
    capability: str
    cflags: tuple[str, ...]
    ldflags: tuple[str, ...]
    sources: tuple[Path, ...]
    headers: tuple[Path, ...]


def _mode_macros() -> list[str]:
    """The table of modes for the C++ sources: each mode's kernel code and gate blocks."""
    return [
        flag
        for m in MODES.values()
        for flag in (f"-DRNNKIT_MODE_{m.name}={m.code}", f"-DRNNKIT_GATES_{m.name}={m.gates}")
    ]


def recipe() -> Recipe:
    """This machine's recipe: ``CXX`` (default ``c++``), torch's CPU capability, its headers,
    libraries and C++ ABI."""
    capability = torch.backends.cpu.get_cpu_capability()
    isa = list(_CAPABILITY_FLAGS.get(capability, ()))
    if isa:
        isa += [f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}"]
    root = Path(torch.__file__).parent
    include = root / "include"
    # -fopenmp: ATen's at::parallel_for is inline and runs its body on OpenMP threads only
    # where _OPENMP is defined (else serially); the library then shares the OpenMP runtime that
    # libtorch_cpu loaded (its libgomp.so.1)
    cflags = [
        "-fPIC", "-std=c++20", "-O3", "-fopenmp", "-Wno-unused-function",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        "-isystem", str(include), "-isystem", str(include / "torch" / "csrc" / "api" / "include"),
        *isa, *_mode_macros(),
    ]  # fmt: skip
    ldflags = ["-shared", "-fopenmp", f"-L{root / 'lib'}", "-lc10", "-ltorch_cpu", "-ltorch"]
    return Recipe(
        cxx=os.environ.get("CXX") or "c++",
        capability=capability.lower() if isa else "default",
        cflags=tuple(cflags),
        ldflags=tuple(ldflags),
        sources=tuple(CSRC / s for s in SOURCES),
        headers=tuple(sorted(CSRC.glob("*.h"))),
    )


def _first_error(output: str) -> str:
    """The line of a compiler's output that says what went wrong first."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    # the driver's "collect2: error: ld returned 1" sums up the linker's own lines above it
    lines = [line for line in lines if not line.startswith("collect2:")] or lines
    patterns = (r"\berror\b", r"\bfatal\b", r"undefined reference", r"cannot find", r"\bld\b.*:")
    for pattern in patterns:
        for line in lines:
            if re.search(pattern, line, re.IGNORECASE):
                return line
    return lines[-1] if lines else "no output"


def _run_all(commands: list[tuple[str, list[str]]], jobs: int, out: TextIO) -> None:
    """Run ``(name, argv)`` commands, ``jobs`` at a time, their output to ``out``; the first
    failure raises :class:`CompileError` after the others are stopped."""
    pending = list(commands)
    running: list[tuple[str, subprocess.Popen]] = []
    try:
        while pending or running:
            while pending and len(running) < jobs:
                name, argv = pending.pop(0)
                out.write(f"$ {shlex.join(argv)}\n")
                proc = subprocess.Popen(
                    argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
                )
                running.append((name, proc))
            # it stays in `running` while waited on, so that an interrupt stops it too
            name, proc = running[0]
            text = proc.communicate()[0]
            running.pop(0)
            out.write(text)
            if proc.returncode != 0:
                raise CompileError(f"{name}: {_first_error(text)}")
    finally:
        # interrupted (Ctrl-C) or failed: no compiler outlives the build
        for _, proc in running:
            proc.kill()
            proc.wait()


def compile_library(r: Recipe, work: Path, target: Path, log: Path) -> None:
    """Compile ``r``'s sources in ``work`` and link them into ``target``; the compiler's
    output goes to ``log``. Raises :class:`CompileError` with the first error's line."""
    cxx = shutil.which(r.cxx)
    if cxx is None:
        raise CompileError(
            f"no C++ compiler: {r.cxx!r} is not on PATH (install g++ or clang++, or set CXX)"
        )
    objects = [work / f"{s.stem}.o" for s in r.sources]
    compiles = [
        (s.name, [cxx, *r.cflags, "-c", str(s), "-o", str(o)])
        for s, o in zip(r.sources, objects, strict=True)
    ]
    # torch's own default for its extension builds: MAX_JOBS, else every core
    jobs = max(int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1), 1)
    link = [cxx, *map(str, objects), *r.ldflags, "-o", str(target)]
    with open(log, "w") as out:
        _run_all(compiles, jobs, out)
        _run_all([("link", link)], 1, out)

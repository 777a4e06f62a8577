"""The fused CPU engine's compiled library: built once per environment, verified, loaded.

:func:`kernels` loads the library on first use, building it first when no finished build is
cached (15-60 s on two cores; ``python -m rnnkit build`` does it ahead of time, and
``make venv`` runs that). It says so on stderr when it starts and when it is done.

Where: ``RNNKIT_BUILD_DIR`` if set, else ``$TORCH_EXTENSIONS_DIR/rnnkit``, else
``$XDG_CACHE_HOME/rnnkit`` (``~/.cache/rnnkit``); inside it one folder per key,
``cpu-<isa>-<key>``. The key hashes everything the binary depends on: torch's version and
commit, Python's implementation and version, the machine, the compiler and every flag
(``compiler.py``), and every source and header. So environments that differ never evict each
other, and a change to any of them builds anew. A folder holds:

- ``rnnkit_cpu.so``: the library, written under a temporary name and renamed into place;
- ``manifest.json``: the key's inputs and the library's size and SHA-256, written last; the
  library is opened only when it matches them (a truncated or foreign file is rebuilt, never
  mapped), and a folder without it holds no finished build;
- ``lock``: held with ``flock`` while a process builds. The kernel drops it when its owner
  dies (``SIGTERM``, ``SIGKILL``), so no build leaves a lock behind; the file names the owner,
  and a waiting process gives up after ``RNNKIT_BUILD_WAIT`` seconds (default 900);
- ``build.log``: the compiler's output of the last build.

A finished build in a read-only cache is opened directly, without the lock. A failed build is
remembered for the process and raised again, in one line that names its cause first, by every
later call; an interrupted one (Ctrl-C) is not, and the next call builds again.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import json
import os
import platform
import shutil
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rnnkit.engines.cpu import compiler, ops

__all__ = [
    "BuildError", "Cached", "Loaded", "build_error", "cache_root", "cached", "describe",
    "kernels", "prepare", "summary",
]  # fmt: skip

LIBRARY, MANIFEST, LOCK, LOG = "rnnkit_cpu.so", "manifest.json", "lock", "build.log"
_DEFAULT_WAIT_S = 900.0


class BuildError(RuntimeError):
    """The fused CPU kernels could not be built or loaded; the message says why."""


@dataclass(frozen=True)
class Cached:
    """Where this environment's build lives, and what its key covers."""

    directory: Path
    inputs: dict

    @property
    def library(self) -> Path:
        return self.directory / LIBRARY


@dataclass(frozen=True)
class Loaded:
    """The library in this process: where from, and the seconds it took to build (0.0 when a
    cached build was loaded) and to load."""

    path: Path
    build_s: float
    load_s: float


_loaded: Loaded | None = None
_error: str | None = None
_lock = threading.Lock()


def cache_root() -> Path:
    """The folder that holds rnnkit's builds (see the module's docstring)."""
    if os.environ.get("RNNKIT_BUILD_DIR"):
        return Path(os.environ["RNNKIT_BUILD_DIR"]).expanduser()
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]).expanduser() / "rnnkit"
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "rnnkit"


def _digest(paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def cached() -> Cached:
    """This environment's build folder and the inputs of its key."""
    r = compiler.recipe()
    inputs = {
        "torch": torch.__version__,
        "torch_commit": torch.version.git_version,
        "python": f"{sys.implementation.name}-{platform.python_version()}{sys.abiflags}",
        "machine": platform.machine(),
        "cxx": r.cxx,
        "cflags": list(r.cflags),
        "ldflags": list(r.ldflags),
        "sources": _digest([*r.sources, *r.headers]),
    }
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    return Cached(cache_root() / f"cpu-{r.capability}-{key}", inputs)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _finished(c: Cached) -> bool:
    """True when ``c`` holds a finished build whose library matches its manifest."""
    try:
        manifest = json.loads((c.directory / MANIFEST).read_text())
        library = c.library
        return (
            manifest.get("inputs") == c.inputs
            and library.stat().st_size == manifest.get("size")
            and _sha256(library) == manifest.get("sha256")
        )
    except (OSError, ValueError, AttributeError):
        return False


class _FileLock:
    """``flock`` on ``path`` with a bounded wait; the file names the owner while held."""

    def __init__(self, path: Path, wait_s: float) -> None:
        self.path, self.wait_s = path, wait_s
        self.fd: int | None = None

    def __enter__(self) -> _FileLock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise BuildError(_unwritable(self.path.parent, e)) from None
        try:
            self._wait(fd)
        except BaseException:  # given up, or interrupted while waiting
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self.fd = fd
        return self

    def _wait(self, fd: int) -> None:
        start, told = time.monotonic(), False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            waited = time.monotonic() - start
            owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            if waited > self.wait_s:
                raise BuildError(
                    f"gave up after {waited:.0f} s waiting for {owner} to finish building in "
                    f"{self.path.parent} (RNNKIT_BUILD_WAIT sets the wait)"
                )
            if not told:
                _say(f"waiting for {owner} to finish building the fused CPU engine")
                told = True
            time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        os.ftruncate(self.fd, 0)
        os.close(self.fd)  # drops the flock


def _unwritable(directory: Path, e: OSError) -> str:
    return (
        f"no finished build in {directory}, and cannot build there ({e.strerror}); set "
        "RNNKIT_BUILD_DIR to a writable folder, or run `python -m rnnkit build` where it is "
        "writable"
    )


def _say(message: str) -> None:
    print(f"rnnkit: {message}", file=sys.stderr, flush=True)


def _build(c: Cached, force: bool = False) -> float:
    """Build ``c`` (under its lock, unless another process finished it meanwhile, or anew with
    ``force``); returns the seconds spent building."""
    try:
        c.directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BuildError(_unwritable(c.directory, e)) from None
    wait_s = float(os.environ.get("RNNKIT_BUILD_WAIT") or _DEFAULT_WAIT_S)
    with _FileLock(c.directory / LOCK, wait_s):
        if _finished(c) and not force:
            return 0.0
        _say(
            f"building the fused CPU engine's kernels, once for this torch, Python and CPU "
            f"(15-60 s) in {c.directory}"
        )
        start = time.perf_counter()
        # a failed or killed build may have left these: under the lock nobody uses them
        for stale in [c.library, c.directory / MANIFEST, *c.directory.glob("tmp-*")]:
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)
        work = Path(tempfile.mkdtemp(prefix="tmp-", dir=c.directory))
        try:
            target = work / LIBRARY
            log = c.directory / LOG
            log.unlink(missing_ok=True)
            try:
                compiler.compile_library(compiler.recipe(), work, target, log)
            except compiler.CompileError as e:
                where = f" (the compiler's output: {log})" if log.exists() else ""
                raise BuildError(f"{e}{where}") from None
            manifest = {"inputs": c.inputs, "size": target.stat().st_size}
            manifest["sha256"] = _sha256(target)
            os.replace(target, c.library)
            (work / MANIFEST).write_text(json.dumps(manifest, indent=1))
            os.replace(work / MANIFEST, c.directory / MANIFEST)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        seconds = time.perf_counter() - start
        _say(f"built the fused CPU engine in {seconds:.0f} s; later runs load it from there")
        return seconds


def _open(c: Cached) -> None:
    """Load the verified library of ``c`` into this process."""
    try:
        torch.ops.load_library(str(c.library))
    except OSError as e:
        raise BuildError(f"cannot load {c.library}: {e}") from None
    if not ctypes.CDLL(str(c.library)).rnnkit_blas_available():
        raise BuildError("this torch build exports no BLAS sgemm_/dgemm_ to call")


def prepare(force: bool = False) -> Loaded:
    """Load the library into this process, building it first when needed (or anew with
    ``force``, before any load); returns where it came from and how long that took. Raises
    :class:`BuildError` with the reason."""
    global _loaded, _error
    if _loaded is not None:
        return _loaded
    # one build and one load per process, however many threads make their first call at once
    with _lock:
        if _loaded is None and _error is None:
            try:
                c = cached()
                build_s = 0.0 if _finished(c) and not force else _build(c, force)
                start = time.perf_counter()
                if not _finished(c):
                    raise BuildError(f"the build in {c.directory} does not match its manifest")
                _open(c)
                _loaded = Loaded(c.library, build_s, time.perf_counter() - start)
            except BuildError as e:
                _error = str(e)
            except Exception as e:  # a fault of ours or the system's: kept, in one line
                _error = f"{type(e).__name__}: {e}".strip()
    if _loaded is not None:
        return _loaded
    raise BuildError(f"the fused CPU engine is unavailable: {_error}")


def kernels():
    """The compiled ops (``torch.ops.rnnkit_cpu``), built on first use.

    Raises :class:`BuildError` with the compiler's or loader's reason when they cannot be had.
    """
    if _loaded is None:
        prepare()
    return getattr(torch.ops, ops.NAMESPACE)


# A constant to torch.compile: traced once (building the kernels if needed), never a guard.
@torch.compiler.assume_constant_result
def build_error() -> str | None:
    """None when the kernels load (building them if needed), else why they cannot."""
    try:
        prepare()
    except BuildError as e:
        return str(e)
    return None


def summary() -> dict:
    """The library of this process as plain data (for reports): its path, the seconds spent
    building it (0 when it was cached) and loading it, and which GEMM runs its products on
    this CPU (``gemm``: ``own``, ``mkl``, or own for the small step products and MKL for the
    rest); or the reason it is missing."""
    try:
        loaded = prepare()
    except BuildError as e:
        return {"error": str(e)}
    kernels = ctypes.CDLL(str(loaded.path)).rnnkit_gemm_kernels
    kernels.restype = ctypes.c_char_p
    return {
        "library": str(loaded.path),
        "build_s": loaded.build_s,
        "load_s": loaded.load_s,
        "gemm": kernels().decode(),
        "bfloat16": bf16_kernel(),
    }


_has_bf16: bool | None = None


def bf16_kernel() -> str:
    """How a bfloat16 layer's products run: ``"native"`` (AVX-512-BF16's bfloat16 dot
    products with float32 sums, where the CPU has them), ``"portable"`` (the same arithmetic in
    plain C++: ``RNNKIT_BF16_KERNEL=portable``, for tests) or ``"float32"`` (the layer widened
    to float32: the default on other CPUs, or ``RNNKIT_BF16_KERNEL=float32``). Read per call."""
    global _has_bf16
    choice = os.environ.get("RNNKIT_BF16_KERNEL")
    if choice in ("portable", "float32"):
        return choice
    if _has_bf16 is None:
        _has_bf16 = bool(ctypes.CDLL(str(prepare().path)).rnnkit_cpu_has_bf16())
    return "native" if _has_bf16 else "float32"


def _standin(name: str):
    """The kernel of op ``name`` until the library is loaded: it loads it (building it first
    when needed) and runs the op again, which the library's CPU kernel then takes, ahead of
    this one, for good."""

    def run(*args):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        tensors += [t for a in args if isinstance(a, list | tuple) for t in a]
        off_cpu = {str(t.device) for t in tensors if isinstance(t, torch.Tensor)} - {"cpu"}
        if off_cpu:
            # the library has no kernel there: the op would come back to this one
            raise RuntimeError(
                f"{ops.NAMESPACE}::{name} runs on CPU tensors only, got tensors on "
                f"{', '.join(sorted(off_cpu))}"
            )
        return getattr(kernels(), name)(*args)

    run.__name__ = name
    return run


# A key that a backend's kernel (the library's, under CPU) takes precedence over.
_STANDIN = torch.library.Library(ops.NAMESPACE, "IMPL", "CompositeExplicitAutograd")
for _name in ops.NAMES:
    _STANDIN.impl(_name, _standin(_name))


def describe() -> dict:
    """The build folder, whether a finished build is there, and its key's inputs, as data."""
    c = cached()
    return {"directory": str(c.directory), "finished": _finished(c), "inputs": c.inputs}

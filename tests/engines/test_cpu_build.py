"""The fused CPU engine's build as a user meets it: first use, its cache, and its faults.

Each fault runs in fresh Python processes with a private build folder (``RNNKIT_BUILD_DIR``)
and a timeout, as a user's programs would: a build killed by ``SIGTERM``, interrupted by
Ctrl-C and called again in the same process, a damaged cached library, a cache that must not
be written, a build held by another process, a missing or failing compiler. A folder with a
finished build is a copy of this process's own (the same key), so that only the test of a
first build compiles.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import rnnkit
from rnnkit.engines.cpu import build

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="flock and fork semantics")

SRC = Path(rnnkit.__file__).resolve().parents[1]
_TIMEOUT_S = 30


def _python(
    code: str, folder: Path, timeout: float = _TIMEOUT_S, **env
) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter whose builds go to ``folder``."""
    environ = {**os.environ, "RNNKIT_BUILD_DIR": str(folder), "PYTHONPATH": str(SRC), **env}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=environ,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def finished() -> Path:
    """This environment's finished build (built or loaded by this process)."""
    if build.build_error() is not None:
        pytest.skip(build.build_error())
    return build.cached().directory


@pytest.fixture
def private(tmp_path, finished) -> Path:
    """A private build folder holding a copy of the finished build, as a key-named folder."""
    shutil.copytree(finished, tmp_path / finished.name, ignore=shutil.ignore_patterns("tmp-*"))
    (tmp_path / finished.name / build.LOCK).unlink(missing_ok=True)
    return tmp_path


FORWARD = """
import torch, rnnkit
torch.manual_seed(0)
m = rnnkit.LSTM(4, 6, 2, engine="fused")
x = torch.randn(5, 3, 4)
ref = rnnkit.LSTM(4, 6, 2, engine="reference")
ref.load_state_dict(m.state_dict())
torch.testing.assert_close(m(x)[0], ref(x)[0])
print("forward ok")
"""


def test_a_cached_build_loads_without_building_or_locking(private, finished):
    """A finished build is opened directly: no message, no compiler, no lock file created, so
    that a read-only cache (a container's root filesystem) serves as well."""
    folder = private / finished.name
    folder.chmod(0o555)
    try:
        run = _python(FORWARD, private, PATH=str(private / "no-compiler-here"))
    finally:
        folder.chmod(0o755)
    assert run.returncode == 0, run.stderr
    assert "forward ok" in run.stdout and "building" not in run.stderr
    assert not (folder / build.LOCK).exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_cached_library_is_never_opened(private, finished, damage):
    """A truncated library (an interrupted copy, a full disk) would be mapped past its end and
    kill the process with SIGBUS: it fails its manifest's size and hash, so it is rebuilt —
    here with no compiler, so auto falls back with one line that says why."""
    library = private / finished.name / build.LIBRARY
    data = library.read_bytes()
    library.write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(len(data)))
    code = """
    import warnings, torch, rnnkit
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rnnkit.LSTM(4, 6)(torch.randn(5, 3, 4))
    print("\\n".join(str(w.message) for w in caught))
    """
    run = _python(code, private, PATH=str(private / "no-compiler-here"))
    assert run.returncode == 0, run.stderr
    (warning,) = [line for line in run.stdout.splitlines() if "engine='auto'" in line]
    assert warning.startswith("rnnkit: the fused CPU engine is unavailable: no C++ compiler")
    assert len(warning) < 300
    # the damaged file is gone, not left for the next process to map
    assert not library.exists()


def test_a_missing_compiler_fails_in_one_line_and_fused_raises_it(tmp_path):
    code = """
    import warnings, torch, rnnkit
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            rnnkit.LSTM(4, 6, engine="fused")(torch.randn(5, 3, 4))
        except RuntimeError as e:
            print("raised:", e)
    print("warnings:", len(caught))
    """
    run = _python(code, tmp_path, CXX="/nonexistent/c++")
    assert run.returncode == 0, run.stderr
    assert (
        "raised: no rnnkit engine can run this call (fused: the fused CPU engine is " in run.stdout
    )
    assert "no C++ compiler: '/nonexistent/c++' is not on PATH" in run.stdout
    assert "warnings: 0" in run.stdout


def test_a_compile_error_names_its_first_error_line_and_the_log(tmp_path):
    compiler = tmp_path / "failing-c++"
    compiler.write_text(
        "#!/bin/sh\necho 'In file included from x.h:1,'\necho 'lstm.cpp:3:1: error: no such type'\n"
        "echo '1 error generated.'\nexit 1\n"
    )
    compiler.chmod(0o755)
    code = """
    from rnnkit.engines.cpu import build
    try:
        build.kernels()
    except build.BuildError as e:
        print(e)
    """
    run = _python(code, tmp_path / "cache", CXX=str(compiler))
    assert run.returncode == 0, run.stderr
    message = run.stdout.strip()
    assert ": lstm.cpp:3:1: error: no such type (the compiler's output: " in message
    assert message.endswith("build.log)") and len(message) < 400


def _hold_lock(folder: Path, seconds: float) -> subprocess.Popen:
    """A process that holds ``folder``'s build lock for ``seconds``, as a building one would;
    returns once it holds it."""
    code = f"""
    import sys, time
    from pathlib import Path
    from rnnkit.engines.cpu import build
    with build._FileLock(Path({str(folder)!r}) / build.LOCK, 60):
        print("held", flush=True)
        time.sleep({seconds})
    """
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, "PYTHONPATH": str(SRC)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_held_build_lock_is_waited_for_with_a_bound(tmp_path, finished):
    """Another process building: a new one says whom it waits for and gives up after
    RNNKIT_BUILD_WAIT seconds with that in its reason; one that waits longer finds the
    builder's finished build under the lock and loads it, building nothing."""
    folder = tmp_path / finished.name
    folder.mkdir()
    holder = _hold_lock(folder, 60)
    code = """
    from rnnkit.engines.cpu import build
    try:
        build.kernels()
        print("loaded")
    except build.BuildError as e:
        print(e)
    """
    env = {**os.environ, "RNNKIT_BUILD_DIR": str(tmp_path), "PYTHONPATH": str(SRC)}
    try:
        run = _python(code, tmp_path, RNNKIT_BUILD_WAIT="0.5")
        assert f"waiting for pid {holder.pid} on " in run.stderr
        assert f"s waiting for pid {holder.pid} on " in run.stdout
        assert run.stdout.startswith("the fused CPU engine is unavailable: gave up after ")
        waiter = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code)],
            env={**env, "RNNKIT_BUILD_WAIT": "30"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert "waiting for pid" in waiter.stderr.readline()
        # the builder finishes: its library, then its manifest, then it lets go
        shutil.copy(finished / build.LIBRARY, folder / build.LIBRARY)
        shutil.copy(finished / build.MANIFEST, folder / build.MANIFEST)
        holder.kill()
        out, err = waiter.communicate(timeout=_TIMEOUT_S)
        assert out.strip() == "loaded", out + err
        assert "building" not in err
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_lock_holder_leaves_no_lock_behind(tmp_path):
    """SIGTERM (timeout, docker, schedulers) or SIGKILL in the middle of a build: the kernel
    drops the flock with the process, and the next one takes it at once."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        holder = _hold_lock(tmp_path, 60)
        holder.send_signal(sig)
        holder.wait()
        assert (tmp_path / build.LOCK).exists()
        start = time.monotonic()
        with build._FileLock(tmp_path / build.LOCK, 5):
            assert time.monotonic() - start < 2


def test_the_cache_key_covers_what_the_library_depends_on(monkeypatch, tmp_path):
    """torch, Python, the compiler and every flag and source are in the key; the folder
    follows RNNKIT_BUILD_DIR, then TORCH_EXTENSIONS_DIR, then XDG_CACHE_HOME."""
    inputs = build.cached().inputs
    assert inputs["torch"] == torch.__version__ and inputs["torch_commit"]
    assert inputs["python"].startswith(f"{sys.implementation.name}-")
    assert any(str(Path(torch.__file__).parent) in f for f in inputs["cflags"])
    base = build.cached().directory.name
    monkeypatch.setenv("CXX", "clang++")
    assert build.cached().directory.name != base
    monkeypatch.delenv("CXX")
    monkeypatch.setattr(rnnkit.engines.cpu.compiler, "_mode_macros", lambda: ["-DX=1"])
    assert build.cached().directory.name != base
    monkeypatch.undo()
    # what is on PATH (an activated venv's ninja, say) is not an input
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert build.cached().directory.name == base
    monkeypatch.delenv("RNNKIT_BUILD_DIR", raising=False)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    assert build.cache_root() == tmp_path / "ext" / "rnnkit"
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert build.cache_root() == tmp_path / "xdg" / "rnnkit"
    monkeypatch.setenv("RNNKIT_BUILD_DIR", str(tmp_path / "mine"))
    assert build.cache_root() == tmp_path / "mine"


def test_the_op_schemas_exist_at_import_without_a_build(tmp_path):
    """A graph that holds the ops resolves them after `import rnnkit` alone; nothing builds
    until a kernel runs."""
    code = """
    import torch, rnnkit
    from rnnkit.engines.cpu import build, ops
    for name in ops.NAMES:
        print(getattr(torch.ops.rnnkit_cpu, name).default._schema)
    print("loaded:", build._loaded is not None, build._error)
    """
    run = _python(code, tmp_path, CXX="/nonexistent/c++")
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("rnnkit_cpu::") == 4 and "loaded: False None" in run.stdout
    assert not list(tmp_path.iterdir())


_COMPILER = """#!/bin/sh
# a compiler that, in its first call of a build, stops the build its mode says how
# (RNNKIT_TEST_STOP=term: waits to be killed; int: Ctrl-C to the building process), and
# otherwise is the real one
# (mkdir: one compiler of those that start at once wins, so a single signal is sent)
if [ -n "$RNNKIT_TEST_MARK" ] && mkdir "$RNNKIT_TEST_MARK" 2>/dev/null; then
  [ "$RNNKIT_TEST_STOP" = int ] && kill -INT $PPID
  exec sleep 120
fi
exec c++ "$@"
"""

EXPORT = """
import pickle, signal, sys, torch, rnnkit
# Ctrl-C raises here as in a terminal's Python, even where this test runs as a background job
# (whose children inherit SIGINT ignored, and Python then installs no handler)
signal.signal(signal.SIGINT, signal.default_int_handler)
torch.manual_seed(0)
m = rnnkit.LSTM(4, 6, 2, engine="fused").eval()
x = torch.randn(5, 3, 4)
try:
    torch.export.export(m, (x,))
except KeyboardInterrupt:
    print("interrupted", flush=True)
# the same call again in this process (a notebook): the build starts over and finishes
ep = torch.export.export(m, (x,))
code = ep.graph_module.code
assert "rnnkit_cpu.layer_forward" in code and "blas" not in code, code
torch.export.save(ep, sys.argv[1] + "/lstm.pt2")
with torch.no_grad():
    torch.save((x, m(x)[0]), sys.argv[1] + "/expected.pt")
print("exported")
"""


@pytest.mark.slow
def test_a_first_build_survives_sigterm_and_ctrl_c_then_serves_a_fresh_process(tmp_path):
    """The first build, as users stopped it: killed by SIGTERM mid-compile (no stale lock),
    then interrupted by Ctrl-C in a process that calls again (it builds, during a
    torch.export trace that records no build step), then a fresh process loads an exported
    program with nothing but `import rnnkit` and runs it without building."""
    compiler = tmp_path / "c++"
    compiler.write_text(_COMPILER)
    compiler.chmod(0o755)
    cache = tmp_path / "cache"
    env = {
        "RNNKIT_BUILD_DIR": str(cache),
        "PYTHONPATH": str(SRC),
        "CXX": str(compiler),
        "RNNKIT_TEST_STOP": "term",
        "RNNKIT_TEST_MARK": str(tmp_path / "term-mark"),
    }
    # 1. SIGTERM while the compilers run; its whole session goes (the compiler too)
    victim = subprocess.Popen(
        [sys.executable, "-c", FORWARD],
        env={**os.environ, **env},
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + _TIMEOUT_S
    while not (tmp_path / "term-mark").exists():
        assert time.monotonic() < deadline and victim.poll() is None, victim.stderr.read()
        time.sleep(0.05)
    os.killpg(victim.pid, signal.SIGTERM)
    victim.wait()
    assert "building the fused CPU engine" in victim.stderr.read()
    # 2. Ctrl-C during the build, then the same call again in that process
    env.update(RNNKIT_TEST_STOP="int", RNNKIT_TEST_MARK=str(tmp_path / "int-mark"))
    run = subprocess.run(
        [sys.executable, "-c", EXPORT, str(tmp_path)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    logs = "".join(f"\n{log}:\n{log.read_text()}" for log in cache.glob(f"*/{build.LOG}"))
    assert run.returncode == 0, run.stdout + run.stderr + logs
    assert run.stdout.split() == ["interrupted", "exported"]
    assert "built the fused CPU engine in" in run.stderr
    (folder,) = cache.iterdir()
    manifest = json.loads((folder / build.MANIFEST).read_text())
    assert manifest["size"] == (folder / build.LIBRARY).stat().st_size
    assert not list(folder.glob("tmp-*"))
    # 3. a fresh process: the exported program resolves the ops after `import rnnkit`
    load = f"""
    import torch, rnnkit
    ep = torch.export.load({str(tmp_path / "lstm.pt2")!r})
    x, expected = torch.load({str(tmp_path / "expected.pt")!r})
    torch.testing.assert_close(ep.module()(x)[0], expected)
    print("loaded ok")
    """
    run = _python(load, cache, CXX=str(compiler), RNNKIT_TEST_STOP="term")
    assert run.returncode == 0, run.stderr
    assert "loaded ok" in run.stdout and "building" not in run.stderr

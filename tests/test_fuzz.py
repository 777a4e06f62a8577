"""Property-based: malformed inputs to every entry point raise a clean error on every engine.

``malformed.py`` draws the cases (every category of every module family, see its docstring)
and checks each; here it runs in a subprocess per engine, so that a crash of a compiled engine
(a segfault gives a negative return code) or a hang (the timeout) fails the test instead of
killing pytest. The counts it reports are printed (``pytest -s`` shows them).
The Triton engine runs in Triton's interpreter on CPU tensors, as its other tests do where there
is no GPU. ``RNNKIT_FUZZ_EXAMPLES`` sets the cases per engine (default: 10 per category, 390 in
all).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import malformed

HERE = Path(__file__).parent
EXAMPLES = int(os.environ.get("RNNKIT_FUZZ_EXAMPLES", 10 * malformed.N_GROUPS))


@pytest.mark.parametrize("engine", ["reference", "fused", "triton", "auto"])
def test_malformed_inputs_raise_clean_errors(engine):
    # the subprocess imports what this process imports
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    if engine == "triton":
        pytest.importorskip("triton")
        if not torch.cuda.is_available():
            env["TRITON_INTERPRET"] = "1"
    command = [sys.executable, str(HERE / "malformed.py"), "--engine", engine]
    proc = subprocess.run(
        [*command, "--examples", str(EXAMPLES)],
        capture_output=True,
        text=True,
        timeout=max(300, EXAMPLES),
        env=env,
    )
    if proc.returncode < 0:
        pytest.fail(f"the fuzz process crashed with signal {-proc.returncode}:\n{proc.stderr}")
    assert proc.returncode == 0, f"a malformed input got through:\n{proc.stderr[-6000:]}"
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\n{engine}: {counts['cases']} malformed cases, 0 crashes, 0 outputs: {counts}")
    assert counts["engine"] == engine
    assert counts["cases"] >= min(EXAMPLES, malformed.N_GROUPS)
    assert sorted(counts["by_category"]) == malformed.CATEGORIES
    assert sorted(counts["by_module"]) == sorted(
        [*malformed.LAYERS, *malformed.CELLS, "functional"]
    )


def test_raised_by_checks_tells_checks_from_kernels():
    """The fuzz's criterion can fail: an error from a torch op is not from rnnkit's checks."""
    import rnnkit

    with pytest.raises(RuntimeError) as from_torch:
        torch.randn(2, 3) @ torch.randn(4, 5)
    assert not malformed.raised_by_checks(from_torch.value)
    with pytest.raises(RuntimeError) as from_rnnkit:
        rnnkit.GRU(3, 4)(torch.randn(2, 1, 5))
    assert malformed.raised_by_checks(from_rnnkit.value)

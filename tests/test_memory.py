"""Memory: a long sequence under ``no_grad`` holds its output and no more; training calls leak
nothing.

Both read the resident set size from ``/proc`` (Linux only): torch's CPU allocator has no
statistics of its own, and the profiler's memory events cost more than the run itself at
L = 100,000. The long-sequence run is a subprocess, alone in its memory, that resets its peak
(``/proc/self/clear_refs``) before the call and reads it after.
"""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

import rnnkit

MiB = 2**20
LINUX = sys.platform.startswith("linux") and os.path.exists("/proc/self/statm")
pytestmark = pytest.mark.skipif(not LINUX, reason="reads memory from /proc (Linux only)")

# One no_grad call of an LSTM on [L, 1, H_in]: peak growth of the resident set over the call.
PEAK = r"""
import json, re, sys, time
import torch, rnnkit

engine, L, H_in, H = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(1)

def kib(field):
    return int(re.search(field + r":\s+(\d+)", open("/proc/self/status").read()).group(1))

module = rnnkit.LSTM(H_in, H, engine=engine)
x = torch.randn(L, 1, H_in)
with torch.no_grad():
    module(x[:64])  # loads the kernels, warms the allocator
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) starts again from the current size
    before = kib("VmRSS")
    start = time.perf_counter()
    out, _ = module(x)
    seconds = time.perf_counter() - start
    peak = kib("VmHWM")
print(json.dumps({"peak": (peak - before) * 1024, "output": out.numel() * out.element_size(),
                  "seconds": seconds}))
"""


def _peak(engine: str, L: int, H_in: int, H: int) -> dict:
    # the subprocess imports what this process imports
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.run(
        [sys.executable, "-c", PEAK, engine, str(L), str(H_in), str(H)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    if proc.returncode != 0 and "clear_refs" in proc.stderr:
        pytest.skip("this kernel does not let a process reset its peak memory")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# The reference engine runs L = 100,000 in about 10 s on one core; both engines get the full
# length. Measured (H_in 16, H 64, float32): output 24.4 MiB, input projection 97.7 MiB, peak
# growth 122.1 MiB on the reference engine and 125.9 MiB on the fused one; the reference
# engine's list of per-step outputs, before it wrote into its output, made it 248 MiB.
@pytest.mark.parametrize("engine", ["reference", "fused"])
def test_long_sequence_no_grad_memory_is_output_plus_a_constant(engine):
    L, H_in, H = 100_000, 16, 64
    run = _peak(engine, L, H_in, H)
    # the one-GEMM input projection [L, N, 4*H] that ATen's layer computes before its loop
    projection = L * 4 * H * 4
    extra = run["peak"] - run["output"] - projection
    print(
        f"\n{engine}: L={L}: peak {run['peak'] / MiB:.1f} MiB = output "
        f"{run['output'] / MiB:.1f} + input projection {projection / MiB:.1f} + "
        f"{extra / MiB:.1f} MiB, in {run['seconds']:.1f} s"
    )
    assert run["output"] == L * H * 4
    # a list of L per-step outputs alone (tensor objects and their storage) is ~50 MiB here
    assert extra < 16 * MiB, f"{extra / MiB:.1f} MiB above output and input projection"


def test_bidirectional_no_grad_frees_each_direction_input_projection():
    """The reference engine, as ATen: a direction's input projection is freed before the next
    direction's is computed, so a bidirectional layer holds one at a time (the driver keeps
    no prepared input past its direction's run)."""
    from rnnkit.bench.runner import _peak_mb

    L, N, H_in, H = 200, 8, 16, 64
    module = rnnkit.LSTM(H_in, H, bidirectional=True, engine="reference").eval()
    x = torch.randn(L, N, H_in)
    with torch.no_grad():
        peak = _peak_mb(lambda: module(x), torch.device("cpu")) * MiB
    output, projection = L * N * 2 * H * 4, L * N * 4 * H * 4
    # both projections alive at once would be output + 2 projections
    assert peak < output + 1.5 * projection, f"{peak / MiB:.2f} MiB"


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture
def one_thread():
    # the calls are tiny: on a busy machine intra-op threads only wait for each other
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(
    "engine,variant",
    [("reference", {}), ("fused", {}), ("fused", dict(layer_norm=True, zoneout=0.1))],
    ids=["reference", "fused", "fused-variant"],
)
def test_training_calls_do_not_leak(engine, variant):
    """Thousands of forward/backward/optimizer steps: the resident set stays flat."""
    torch.manual_seed(0)
    module = rnnkit.LSTM(8, 32, engine=engine, **variant).train()
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-3)
    x = torch.randn(5, 16, 8)

    def steps(n: int) -> None:
        for _ in range(n):
            optimizer.zero_grad()
            out, (h, c) = module(x)
            (out.square().mean() + h.sum() + c.sum()).backward()
            optimizer.step()

    steps(100)
    before = _rss()
    start = time.perf_counter()
    calls = 3000
    steps(calls)
    grown = _rss() - before
    print(
        f"\n{engine}{variant or ''}: {calls} training calls in {time.perf_counter() - start:.1f}"
        f" s, resident set {before / MiB:.1f} MiB, grew {grown / MiB:+.2f} MiB"
    )
    # one call's output alone is 10 KiB, its graph several times that: a leak of either per
    # call would pass 10 MiB
    assert grown < 4 * MiB, f"grew {grown / MiB:.1f} MiB over {calls} calls"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_long_sequence_no_grad_memory_is_output_plus_a_constant():
    """The Triton engine at L = 100,000 (on a GPU: the interpreter takes ~12 ms a step)."""
    pytest.importorskip("triton")
    L, H_in, H = 100_000, 16, 64
    module = rnnkit.LSTM(H_in, H, engine="triton").cuda()
    x = torch.randn(L, 1, H_in, device="cuda")
    with torch.no_grad():
        module(x[:64])
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out, _ = module(x)
        peak = torch.cuda.max_memory_allocated() - before
    projection = L * 4 * H * 4
    extra = peak - out.numel() * out.element_size() - projection
    print(f"\ntriton: L={L}: peak {peak / MiB:.1f} MiB, {extra / MiB:.1f} MiB above output + proj")
    assert extra < 16 * MiB, f"{extra / MiB:.1f} MiB above output and input projection"

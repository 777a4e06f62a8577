"""What the Triton engine alone does, against the reference engine where it computes.

The suites of every fast engine (``test_engines.py``, ``test_engine_variants.py``) hold it to
the reference on the covering grids; here are its persistent and per-step kernels, tiles
smaller than a step, bit-identical repeats, NaN and infinities, autocast, what it leaves to
other engines, GPU sizes, and one test that compiles every kernel for two GPU architectures,
which needs no GPU. Without CUDA the kernels run in Triton's interpreter on CPU tensors
(``conftest.py``'s ``triton_interpreter``).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

import rnnkit
from engines import (
    TRITON,
    VariantCase,
    assert_matches_reference,
    check_case,
    check_variant_case,
    layer,
    on_device,
    pair,
    randn64,
    run,
    with_reference,
)
from grid import ModuleCase, module_params
from parity import assert_bitwise, engines_picked
from test_reliability import NAN_CASES, _poisoned, assert_same_nonfinite

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("triton_interpreter")

CUDA = torch.cuda.is_available()
DEVICE = TRITON.device


PERSISTENT_CASES = [
    ModuleCase("LSTM", size=(6, 3, 5, 7), num_layers=2, bidirectional=True, h0=True),
    ModuleCase("LSTM", size=(4, 70, 3, 20), dtype=torch.float64, batch_first=True),
    ModuleCase("LSTM", size=(5, 1, 3, 6), packed="unsorted", bidirectional=True),  # one length
    ModuleCase("RNN_TANH", size=(6, 3, 5, 7), bidirectional=True, h0=True, dropout=0.3),
    ModuleCase("RNN_RELU", size=(6, 3, 5, 7), num_layers=2, dtype=torch.float64),
    ModuleCase("GRU", size=(6, 3, 5, 7), num_layers=2, bidirectional=True, h0=True),
    ModuleCase("GRU", size=(4, 70, 3, 20), dtype=torch.float64, bias=False),
]


def _spy_persistent(monkeypatch) -> list[str]:
    from rnnkit.engines.triton import persistent

    ran = []
    for name in ("forward", "backward"):
        real = getattr(persistent, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            ran.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(persistent, name, spy)
    return ran


@pytest.mark.parametrize("kernels", ["persistent", "per-step"])
@pytest.mark.parametrize("case", module_params(PERSISTENT_CASES))
def test_persistent_and_per_step_kernels(case, kernels, monkeypatch):
    """Layers without projection on equal lengths run the whole loop in one launch (two
    batch tiles at N = 70), unless ``RNNKIT_TRITON_PERSISTENT=0``; both match the reference."""
    monkeypatch.setenv("RNNKIT_TRITON_PERSISTENT", "1" if kernels == "persistent" else "0")
    ran = _spy_persistent(monkeypatch)
    check_case(TRITON, case)
    if kernels == "persistent":
        assert "forward" in ran and "backward" in ran
    else:
        assert not ran


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
@pytest.mark.parametrize("forward_kernels", ["persistent", "per-step"])
def test_either_backward_after_either_forward(forward_kernels, mode, monkeypatch):
    """The persistent and per-step loops save the same buffers."""
    module, reference = with_reference(
        layer(TRITON, mode, input_size=3, hidden_size=5, bidirectional=True)
    )
    x = randn64(TRITON, 4, 2, 3)
    env = {"persistent": "1", "per-step": "0"}
    runs = []
    for m in (reference, module):
        monkeypatch.setenv("RNNKIT_TRITON_PERSISTENT", env[forward_kernels])
        out, state = m(x)
        monkeypatch.setenv("RNNKIT_TRITON_PERSISTENT", "0" if env[forward_kernels] == "1" else "1")
        loss = out.sin().sum() + sum(t.sum() for t in (state if mode == "LSTM" else [state]))
        grads = torch.autograd.grad(loss, [x, *m.parameters()])
        names = ["grad_input", *(f"grad_{name}" for name, _ in m.named_parameters())]
        runs.append(dict(zip(names, grads, strict=True)))
    expected, actual = runs
    assert_matches_reference(actual, expected, engine="triton")


def test_persistent_launches_fit_the_gpu(monkeypatch):
    """Every program of a launch must be resident: larger grids go to the per-step kernels."""
    from rnnkit.engines.triton import persistent

    monkeypatch.setattr(persistent, "_multiprocessors", lambda device: 2)
    x = torch.empty(0)
    assert persistent.takes("LSTM", x, 64, 64, False, True)
    assert not persistent.takes("LSTM", x, 200, 64, False, True)
    assert not persistent.takes("LSTM", x, 4, persistent.MAX_H + 1, False, True)
    assert not persistent.takes("LSTM", x, 4, 8, True, True)
    assert persistent.takes("GRU", x, 4, 8, False, True)
    assert not persistent.takes("LSTM", x, 4, 8, False, False)


@pytest.mark.parametrize(
    "case",
    module_params(
        [
            ModuleCase(mode, size=(4, 5, 3, 9), packed="unsorted", bidirectional=True, h0=True)
            for mode in ("LSTM", "GRU", "RNN_TANH")
        ]
        + [ModuleCase("LSTM", size=(4, 5, 3, 9), proj=True, h0=True)]
    ),
)
def test_tiles_smaller_than_a_step(case, monkeypatch):
    """Several programs per step, with partial tiles in both rows and units."""
    from rnnkit.engines.triton import launch

    monkeypatch.setattr(launch, "_MAX_BLOCK_H", 4)
    monkeypatch.setattr(launch, "_TILE", 8)
    check_case(TRITON, case)


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, id=c.id)
        for c in (
            VariantCase(ModuleCase("LSTM", size=(4, 5, 3, 9), bidirectional=True), "all", True),
            VariantCase(ModuleCase("LSTM", size=(4, 5, 3, 9), proj=True), "peephole", False),
        )
    ],
)
def test_variant_tiles_smaller_than_a_step(case, monkeypatch):
    """Several programs per step (whole rows each where layer_norm normalizes c)."""
    from rnnkit.engines.triton import launch

    monkeypatch.setattr(launch, "_MAX_BLOCK_H", 4)
    monkeypatch.setattr(launch, "_TILE", 8)
    check_variant_case(TRITON, case)


@pytest.mark.parametrize(
    "case",
    [
        ModuleCase("LSTM", num_layers=2, bidirectional=True, proj=True, h0=True, dropout=0.3),
        ModuleCase("GRU", packed="unsorted", h0=True, size=(5, 3, 4, 6)),
    ],
    ids=lambda c: c.id,
)
def test_repeated_calls_are_bit_identical(case):
    """No atomic adds of values and a fixed reduction order in every kernel: outputs, final
    states and every gradient repeat bit for bit from the same seed (dropout included)."""
    module, _ = pair(TRITON, case)
    module.train(case.dropout > 0)
    inp = on_device(TRITON, case.inputs())
    runs = [run(case, module, inp, seed=5)[0] for _ in range(2)]
    assert_bitwise(*runs)


@pytest.mark.parametrize(
    "case,where,index,value",
    [
        pytest.param(case, where, index, value, id=f"{case.id}-{i}")
        for case, where, index, value, i in NAN_CASES
        if i in ("x-nan", "x-neginf", "h0-inf", "c0-nan")
    ],
)
def test_nan_and_inf_propagate_as_on_reference(case, where, index, value):
    """No silent cleaning: NaN and infinities land where the reference puts them, on the
    persistent kernels and (with a projection) the per-step ones."""
    module, reference = pair(TRITON, case)
    inp = _poisoned(case, where, index, value)
    expected = run(case, reference, on_device(TRITON, inp))[0]
    actual = run(case, module, on_device(TRITON, inp))[0]
    truth = run(case, copy.deepcopy(reference).double(), on_device(TRITON, inp, torch.float64))[0]
    assert_same_nonfinite(*({k: v.cpu() for k, v in r.items()} for r in (expected, actual, truth)))


def _f32(*shape):
    return torch.randn(*shape, device=DEVICE, requires_grad=True)


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_autocast_runs_what_torch_casts_whole(mode):
    """Under autocast the engine takes the layers torch.nn casts whole (CPU: oneDNN's LSTM;
    CUDA: cuDNN's, every layer), in the cast dtype with autocast off inside: the reference's
    dtypes and values within the cast dtype's tolerance, gradients reaching float32 leaves.
    Other calls it leaves to the reference engine."""
    if not CUDA and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("no bfloat16 oneDNN on this CPU")
    if not CUDA and mode != "LSTM":
        with pytest.raises(RuntimeError, match="triton: under autocast runs only"):
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                layer(TRITON, mode, input_size=3, hidden_size=4, dtype=torch.float32)(_f32(5, 2, 3))
        return
    module, reference = with_reference(
        layer(TRITON, mode, input_size=3, hidden_size=4, num_layers=2, dtype=torch.float32)
    )
    x = _f32(5, 2, 3)
    runs = []
    for m in (reference, module):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            out, state = m(x)
        state = list(state) if isinstance(state, tuple) else [state]
        grads = torch.autograd.grad(out.float().square().sum(), [x, *m.parameters()])
        names = ["output", "h_n", "c_n"][: 1 + len(state)]
        names += ["grad_input", *(f"grad_{name}" for name, _ in m.named_parameters())]
        runs.append(dict(zip(names, [out, *state, *grads], strict=True)))
    expected, actual = runs
    assert_matches_reference(actual, expected, engine="triton", dtype=torch.bfloat16)


def test_torch_func_transforms_go_to_the_reference():
    """Named, the engine refuses torch.func transforms clearly instead of failing inside them."""
    module = layer(TRITON, "GRU", input_size=3, hidden_size=4)
    x = randn64(TRITON, 2, 5, 1, 3)
    with pytest.raises(RuntimeError, match="triton: torch.func.vmap not supported"):
        torch.func.vmap(module)(x)
    with pytest.raises(RuntimeError, match=r"triton: torch.func gradients \(grad, vjp"):
        torch.func.grad(lambda x: module(x)[0].sum())(x[0])


def test_auto_never_picks_triton(monkeypatch):
    """Not before GPU measurements say where it is faster; on CPU, never."""
    picked = engines_picked(monkeypatch)
    for dtype in (torch.float32, torch.bfloat16):
        rnnkit.GRU(4, 5, dtype=dtype).to(DEVICE)(torch.randn(3, 2, 4, dtype=dtype, device=DEVICE))
    assert "triton" not in picked


@pytest.mark.skipif(CUDA, reason="the CPU rules")
def test_cpu_tensors_need_the_interpreter(monkeypatch):
    x = torch.randn(3, 2, 4)
    module = rnnkit.LSTM(4, 5, engine="triton")
    module(x)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="triton: needs CUDA tensors .*TRITON_INTERPRET=1"):
        module(x)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    "case",
    module_params(
        [
            ModuleCase("LSTM", size=(50, 64, 40, 300), proj=True, packed="unsorted", h0=True),
            ModuleCase("GRU", size=(50, 64, 40, 300), bidirectional=True, num_layers=2),
            ModuleCase("RNN_TANH", size=(50, 64, 40, 300), dtype=torch.float64),
        ]
    ),
)
def test_gpu_sizes(case):
    """Sizes whose steps span many programs of the compiled kernels."""
    check_case(TRITON, case)


COMPILE = """
import inspect
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from rnnkit.engines.triton import kernels, persistent, variant_kernels
from rnnkit.modes import MODES

assert not kernels.INTERPRETED
modules = (kernels, variant_kernels, persistent)
fns = [getattr(m, n) for m in modules for n in dir(m) if n.endswith("_kernel")]
for fn in fns:
    params = list(inspect.signature(fn.fn).parameters)
    for io, flag in (("bf16", True), ("fp64", False)):
        signature, constexprs = {}, {}
        for p in params:
            if p.startswith("p_"):
                signature[p] = {"p_sync": "*i32", "p_codes": "*i8"}.get(p, "*" + io)
            elif p.isupper() or p.startswith("BLOCK"):
                signature[p] = "constexpr"
                constexprs[p] = {"ACC": tl.float64 if io == "fp64" else tl.float32,
                                 "BLOCK_N": 16, "BLOCK_H": 64, "BLOCK_K": 64,
                                 "MODE": MODES["LSTM" if flag else "RNN_RELU"].code,
                                 "G": MODES["LSTM" if flag else "RNN_RELU"].gates,
                                 "TILES_H": 2 if flag else 1,
                                 "ZH": 1 if flag else 2, "ZC": 2 if flag else 1}.get(p, flag)
            else:
                signature[p] = "i32"
        for arch in (80, 90):
            src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
            target = GPUTarget("cuda", arch, 32)
            triton.compile(src, target=target, options={"enable_fp_fusion": True})
print(len(fns))
"""


def test_kernels_compile_for_gpus(tmp_path):
    """Every kernel, in half precision with its options on and in float64 with them off,
    compiles to sm_80 and sm_90 machine code (Triton's bundled compiler; no GPU needed). The
    interpreter runs the kernels' Python, which catches no compile-only error."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    run = subprocess.run(
        [sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert int(run.stdout.split()[-1]) == 12

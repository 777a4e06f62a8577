"""``torch.autocast``: rnnkit's layers and cells give ``torch.nn``'s dtypes, and its values.

On ATen's loops (oneDNN off) rnnkit runs torch's ops one for one, so every output, state and
gradient has torch's dtype, and the reference engine torch's bits. With oneDNN on, torch's LSTM
(no projection, padded input) runs oneDNN's kernel, which casts everything to bfloat16; rnnkit
casts alike (``rnnkit.amp``) and stays within bfloat16's tolerance. That comparison runs in a
child process with ``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16``: on CPUs that list AMX without
enabling it, oneDNN's bfloat16 kernels die on an illegal instruction otherwise (see the README's
known issues), and the variable only works before oneDNN's first use in a process.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from grid import CellCase, ModuleCase
from parity import (
    ENGINES,
    assert_bitwise,
    assert_close,
    assert_parity,
    assert_same_structure,
    default_path,
    grads,
)
from rnnkit.testing import aten_path

BF16 = torch.bfloat16

LAYERS = {
    "LSTM": ModuleCase("LSTM", size=(7, 3, 5, 8), num_layers=2, bidirectional=True),
    "LSTM-proj": ModuleCase("LSTM", size=(7, 3, 5, 8), proj=True),
    "LSTM-packed": ModuleCase("LSTM", size=(7, 3, 5, 8), packed="unsorted"),
    "LSTM-bf-unbatched": ModuleCase("LSTM", size=(7, 3, 5, 8), batch_first=True, batched=False),
    "LSTM-empty-batch": ModuleCase("LSTM", size=(7, 0, 5, 8)),
    "GRU": ModuleCase("GRU", size=(7, 3, 5, 8), num_layers=2, batch_first=True),
    "RNN-tanh": ModuleCase("RNN_TANH", size=(7, 3, 5, 8), bidirectional=True),
    "RNN-relu": ModuleCase("RNN_RELU", size=(7, 3, 5, 8), num_layers=2),
}
CELLS = {
    "LSTMCell": CellCase("LSTM"),
    "GRUCell": CellCase("GRU"),
    "RNNCell-tanh": CellCase("RNN_TANH"),
    "RNNCell-relu": CellCase("RNN_RELU"),
}
# (input dtype, initial states): float32 or bfloat16 input, states zeros or given in float32
INPUTS = {"x32": (torch.float32, False), "x32-h32": (torch.float32, True), "x16": (BF16, False)}
INPUTS["x16-h32"] = (BF16, True)


def _inputs(case, which: str, seed: int = 0):
    dtype, states = INPUTS[which]
    inp = dataclasses.replace(case, **{"h0" if isinstance(case, ModuleCase) else "hx": states})
    inp = inp.inputs(seed)
    return dataclasses.replace(inp, x=inp.x.detach().to(dtype).requires_grad_())


def autocast_run(case, module, inp, device: str = "cpu", dtype=BF16) -> tuple[dict, dict]:
    """Forward under autocast to ``dtype``, backward after it; tensors by name, and the
    structure with every tensor's dtype."""
    with torch.autocast(device, dtype=dtype):
        if isinstance(case, ModuleCase):
            tensors, structure = case.forward(module, inp)
        else:
            hx = None
            if inp.states:
                hx = tuple(inp.states.values()) if case.mode == "LSTM" else inp.states["h0"]
            out = module(inp.x, hx)
            tensors = dict(zip(("h", "c"), out, strict=True)) if case.mode == "LSTM" else {"h": out}
            structure = {}
    leaves = {"input": inp.x, **inp.states, **dict(module.named_parameters())}
    result = {**tensors, **grads(tensors, leaves)}
    structure.update({f"dtype_{k}": None if v is None else v.dtype for k, v in result.items()})
    return result, structure


def _all_cases():
    return {**LAYERS, **CELLS}


def _modules(case, engine: str):
    with torch.random.fork_rng(devices=[]):
        return case.modules(engine)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("which", INPUTS)
@pytest.mark.parametrize("name", _all_cases())
def test_matches_torch_on_aten_loops(name, which, engine):
    """oneDNN off: torch's dtypes everywhere, and the reference engine torch's bits."""
    case = _all_cases()[name]
    ref, ours = _modules(case, engine)
    inp = _inputs(case, which)
    with aten_path():
        expected, expected_structure = autocast_run(case, ref, inp)
        actual, structure = autocast_run(case, ours, inp)
    assert_same_structure(expected_structure, structure)
    assert_parity(expected, actual, engine, BF16)


def test_auto_runs_autocast_on_the_reference():
    """The fused engine refuses autocast; "auto" then runs the reference engine."""
    case = LAYERS["LSTM"]
    inp = _inputs(case, "x32-h32")
    results = []
    for engine in ("reference", "auto"):
        _, ours = _modules(case, engine)
        with aten_path():
            results.append(autocast_run(case, ours, inp))
    (expected, _), (actual, _) = results
    assert_bitwise(expected, actual, BF16)
    _, fused = _modules(case, "fused")
    with aten_path(), torch.autocast("cpu", dtype=BF16):
        with pytest.raises(RuntimeError, match="fused: autocast not supported"):
            fused(inp.x)


def _default_path_results(path: str) -> None:
    """In a fresh process: torch's default path (oneDNN on) and rnnkit's, every case and input
    under autocast, saved to ``path``."""
    results = {}
    for name, case in _all_cases().items():
        for which in INPUTS:
            for engine in ENGINES:
                ref, ours = _modules(case, engine)
                inp = _inputs(case, which)
                with default_path():
                    results[name, which, engine] = _torch_and_ours(case, ref, ours, inp)
    torch.save(results, path)


# oneDNN's message when this CPU has no bfloat16 kernel for torch's LSTM (an AVX2-only CPU)
_NO_PRIMITIVE = "could not create a primitive descriptor"


def _torch_and_ours(case, ref, ours, inp) -> tuple | str:
    """Both runs, or torch's own error where torch.nn cannot run the case on this CPU."""
    try:
        expected = autocast_run(case, ref, inp)
    except RuntimeError as error:
        if _NO_PRIMITIVE not in str(error):
            raise
        return f"torch.nn's default path fails on this CPU: {str(error).splitlines()[0]}"
    return expected, autocast_run(case, ours, inp)


@pytest.fixture(scope="module")
def default_path_results(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("amp") / "results.pt")
    env = {
        **os.environ,
        "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16",
        "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
    }
    code = f"import test_amp; test_amp._default_path_results({path!r})"
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(path)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("which", INPUTS)
@pytest.mark.parametrize("name", _all_cases())
def test_matches_torch_default_path(name, which, engine, default_path_results):
    """oneDNN on: torch's dtypes everywhere (all bfloat16 where torch's LSTM takes oneDNN),
    values and gradients within bfloat16's tolerance."""
    result = default_path_results[name, which, engine]
    if isinstance(result, str):
        pytest.skip(result)
    (expected, expected_structure), (actual, structure) = result
    assert_same_structure(expected_structure, structure)
    assert_close(expected, actual, BF16)


def _to(inp, device: str):
    return dataclasses.replace(
        inp,
        x=inp.x.detach().to(device).requires_grad_(),
        states={k: v.detach().to(device).requires_grad_() for k, v in inp.states.items()},
    )


def _cuda_engines():
    engines = ["reference", "auto"]
    try:
        import triton  # noqa: F401

        engines.append("triton")
    except ImportError:
        pass
    return engines


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("autocast_dtype", [torch.float16, BF16], ids=["f16", "bf16"])
@pytest.mark.parametrize("engine", _cuda_engines())
@pytest.mark.parametrize("name", _all_cases())
def test_cuda_matches_torch(name, engine, autocast_dtype):
    """On CUDA torch's layers run cuDNN, whose autocast wrapper casts everything to float16
    (whatever autocast's dtype), and its cells autocast to autocast's dtype: rnnkit gives the
    same dtypes, and values within the cast dtype's tolerance of torch's."""
    case = _all_cases()[name]
    if engine == "triton" and isinstance(case, CellCase):
        pytest.skip("the Triton engine runs no cells")
    ref, ours = _modules(case, engine)
    inp = _to(_inputs(case, "x32-h32"), "cuda")
    expected, expected_structure = autocast_run(case, ref.cuda(), inp, "cuda", autocast_dtype)
    actual, structure = autocast_run(case, ours.cuda(), inp, "cuda", autocast_dtype)
    assert_same_structure(expected_structure, structure)
    cast = torch.float16 if isinstance(case, ModuleCase) else autocast_dtype
    assert_close(expected, actual, cast)

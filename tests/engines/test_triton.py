"""The Triton engine against the reference engine: outputs, final states, every gradient.

On a machine with CUDA the kernels are compiled and every test runs on the GPU. Without one,
the tests run the kernels in Triton's interpreter on CPU tensors (``conftest.py``'s
``triton_interpreter``), and one test compiles every kernel for two GPU architectures, which
needs no GPU either.

Same covering grid as the other engines (``grid.MODULE_CASES``), plus tiles smaller than a
step, saturated gates, dropout, half precision, gradcheck, double backward and the dispatch.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import rnnkit
from grid import CaseInputs, ModuleCase, module_params
from parity import assert_bitwise, assert_same_structure
from rnnkit.testing import compare, engine_tolerance, kind_of, tolerance
from test_reliability import NAN_CASES, _poisoned, assert_same_nonfinite

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("triton_interpreter")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def _on_device(inp: CaseInputs) -> CaseInputs:
    def leaf(t):
        return t.detach().to(DEVICE).requires_grad_()

    return CaseInputs(leaf(inp.x), {k: leaf(v) for k, v in inp.states.items()}, inp.lengths)


def _run(case: ModuleCase, module, inp: CaseInputs, seed: int):
    """Forward, then the gradients of a fixed random-weighted sum of the outputs."""
    torch.manual_seed(seed)
    tensors, structure = case.forward(module, inp)
    leaves = {"input": inp.x, **inp.states, **dict(module.named_parameters())}
    gen = torch.Generator().manual_seed(1)
    outs = list(tensors.values())
    weights = [torch.randn(o.shape, generator=gen).to(o) for o in outs]
    got = torch.autograd.grad(outs, list(leaves.values()), weights, allow_unused=True)
    grads = {f"grad_{name}": g for name, g in zip(leaves, got, strict=True)}
    return {**tensors, **grads}, structure


def _pair(case: ModuleCase, *, scale: float = 1.0):
    """The case's rnnkit module on the Triton engine, and a reference-engine copy."""
    _, module = case.modules("triton")
    module = module.to(DEVICE)
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(scale)
    reference = copy.deepcopy(module)
    reference.engine = "reference"
    return module, reference


def assert_matches_reference(case: ModuleCase, *, seed: int = 0, scale: float = 1.0) -> None:
    """Triton and reference on the same weights (times ``scale``) and inputs agree within
    :data:`rnnkit.testing.ENGINE_TOLERANCES`; with ``case.dropout`` both train from one seed."""
    module, reference = _pair(case, scale=scale)
    inp = _on_device(case.inputs(seed))
    runs = []
    for m in (reference, module):
        m.train(case.dropout > 0)
        runs.append(_run(case, m, inp, seed))
    (expected, expected_structure), (actual, structure) = runs
    assert_same_structure(expected_structure, structure)
    failures = []
    for name, e in expected.items():
        result = compare(actual[name], e, what=name, tol=engine_tolerance(e, name))
        if not result.ok:
            failures.append(str(result))
    assert not failures, "triton differs from reference:\n  " + "\n  ".join(failures)


@pytest.mark.parametrize("case", module_params())
def test_matches_reference(case):
    assert_matches_reference(case)


# Batches of a packed sequence shrinking by more than one row at a time, a long sequence
# with N=1, an LSTM whose projection is a single unit.
EXTRA_CASES = [
    ModuleCase("LSTM", size=(4, 6, 9, 12), proj=True, packed="unsorted", h0=True),
    ModuleCase("GRU", size=(5, 9, 8, 7), packed="sorted", bidirectional=True, num_layers=2),
    ModuleCase("RNN_RELU", size=(5, 9, 8, 7), packed="unsorted", h0=True),
    ModuleCase("LSTM", size=(40, 1, 3, 5), bidirectional=True, dtype=torch.float64),
    ModuleCase("LSTM", size=(5, 3, 4, 2), proj=True, bidirectional=True, h0=True),
]


@pytest.mark.parametrize("case", module_params(EXTRA_CASES))
def test_matches_reference_packed_and_long(case):
    assert_matches_reference(case)


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
    assert_matches_reference(case)
    if kernels == "persistent":
        assert "forward" in ran and "backward" in ran
    else:
        assert not ran


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
@pytest.mark.parametrize("forward_kernels", ["persistent", "per-step"])
def test_either_backward_after_either_forward(forward_kernels, mode, monkeypatch):
    """The persistent and per-step loops save the same buffers."""
    module = _layer(mode, input_size=3, hidden_size=5, bidirectional=True)
    reference = copy.deepcopy(module)
    reference.engine = "reference"
    x = _f64(4, 2, 3)
    env = {"persistent": "1", "per-step": "0"}
    runs = []
    for m in (reference, module):
        monkeypatch.setenv("RNNKIT_TRITON_PERSISTENT", env[forward_kernels])
        out, state = m(x)
        monkeypatch.setenv("RNNKIT_TRITON_PERSISTENT", "0" if env[forward_kernels] == "1" else "1")
        loss = out.sin().sum() + sum(t.sum() for t in (state if mode == "LSTM" else [state]))
        runs.append(torch.autograd.grad(loss, [x, *m.parameters()]))
    for e, a in zip(*runs, strict=True):
        assert compare(a, e, tol=engine_tolerance(e, "grad")).ok


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
    assert_matches_reference(case)


@pytest.mark.parametrize(
    "case",
    module_params(
        [
            ModuleCase(mode, size=(6, 3, 4, 5), dtype=dtype, h0=True)
            for mode in ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")
            for dtype in (torch.float32, torch.float64)
        ]
    ),
)
def test_saturated_gates(case):
    """Pre-activations around +-1e3: no overflow inside sigmoid and tanh, no NaN."""
    assert_matches_reference(case, scale=300.0)


@pytest.mark.parametrize(
    "case",
    module_params(
        [
            ModuleCase(mode, num_layers=3, bidirectional=bidir, packed=packed, dropout=0.4)
            for mode in ("LSTM", "GRU", "RNN_TANH")
            for bidir, packed in ((False, "none"), (True, "unsorted"))
        ]
        + [ModuleCase("LSTM", num_layers=2, proj=True, h0=True, dropout=0.5, batch_first=True)]
    ),
)
def test_dropout_masks_match_reference(case):
    """Inter-layer dropout draws the reference's (and so torch's) masks under one seed."""
    assert_matches_reference(case)


def _cast(inp: CaseInputs, dtype: torch.dtype) -> CaseInputs:
    states = {k: v.to(dtype) for k, v in inp.states.items()}
    return CaseInputs(inp.x.to(dtype), states, inp.lengths)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize(
    "case",
    module_params(
        [
            ModuleCase("LSTM", size=(7, 3, 5, 6), proj=True, h0=True),
            ModuleCase("LSTM", size=(7, 3, 5, 6), num_layers=2),
            ModuleCase("GRU", size=(7, 3, 5, 6), bidirectional=True, packed="unsorted", h0=True),
            ModuleCase("RNN_TANH", size=(7, 3, 5, 6), h0=True),
        ]
    ),
)
def test_half_precision(case, dtype):
    """float16/bfloat16 with float32 state and pointwise math: within the tolerance table of
    ``dtype`` of the float32 reference on the same (rounded) values, and at least about as
    close to it as the reference engine run in ``dtype`` itself. Triton's interpreter casts
    float32 to bfloat16 by truncation (compiled kernels round to nearest even), a bias that
    adds up over the rows of a weight gradient: there only the tolerance table applies."""
    module, _ = _pair(case)
    module = module.to(dtype)
    truth_module = copy.deepcopy(module).float()
    truth_module.engine = "reference"
    half_reference = copy.deepcopy(module)
    half_reference.engine = "reference"
    inp = case.inputs()
    half = _on_device(_cast(inp, dtype))
    single = _on_device(_cast(half, torch.float32))
    # oneDNN's bfloat16 GEMMs can die on CPUs that list AMX without enabling it (README)
    with torch.backends.mkldnn.flags(enabled=False):
        truth, _ = _run(case, truth_module, single, 0)
        actual, _ = _run(case, module, half, 0)
        own, _ = _run(case, half_reference, half, 0)
    strict = CUDA or dtype != torch.bfloat16
    failures = []
    for name, e in truth.items():
        a = actual[name]
        assert a.dtype == dtype, name
        result = compare(a.float(), e, what=name, tol=tolerance(dtype, kind_of(name)))
        error = (a.float() - e).abs().max().item()
        reference_error = (own[name].float() - e).abs().max().item()
        if not result.ok or (strict and error > 2 * reference_error + 1e-3):
            failures.append(f"{result}; reference in {dtype}: max_abs={reference_error:.3e}")
    assert not failures, "\n  ".join(failures)


def _layer(mode: str, **kw) -> torch.nn.Module:
    cls = {"RNN_TANH": "RNN", "RNN_RELU": "RNN"}.get(mode, mode)
    if mode.startswith("RNN_"):
        kw["nonlinearity"] = mode[4:].lower()
    module = getattr(rnnkit, cls)(engine="triton", **{"dtype": torch.float64, **kw})
    return module.to(DEVICE)


def _f64(*shape):
    return torch.randn(*shape, dtype=torch.float64, device=DEVICE, requires_grad=True)


def _f32(*shape):
    return torch.randn(*shape, device=DEVICE, requires_grad=True)


@pytest.mark.parametrize(
    "mode, kw, packed",
    [
        pytest.param(
            "LSTM", dict(bidirectional=True, proj_size=2), True, id="LSTM-bidir-proj2-packed"
        ),
        pytest.param("GRU", dict(bidirectional=True), True, id="GRU-bidir-packed"),
        pytest.param("GRU", dict(bias=False, batch_first=True), False, id="GRU-nobias-bf"),
        pytest.param("RNN_RELU", dict(), True, id="RNNrelu-packed"),
    ],
)
def test_gradcheck(mode, kw, packed):
    """The hand-written backward against finite differences, in float64 on tiny layers.
    Interpreted, in gradcheck's fast mode (one random direction per input) and without its
    undefined-gradient pass, which autograd answers with zeros before the kernels see it."""
    torch.manual_seed(0)
    module = _layer(mode, input_size=3, hidden_size=4, **kw)
    L, N = 4, 3
    bf = kw.get("batch_first", False)
    D, H_out = (2 if kw.get("bidirectional") else 1), kw.get("proj_size") or 4
    lead = (D * kw.get("num_layers", 1), N)
    x = _f64(*((N, L, 3) if bf else (L, N, 3)))
    h0, c0 = _f64(*lead, H_out), _f64(*lead, 4)
    names = [name for name, _ in module.named_parameters()]
    lengths = torch.tensor([4, 2, 3])

    def fn(x, h0, c0, *weights):
        inp = pack_padded_sequence(x, lengths, bf, enforce_sorted=False) if packed else x
        hx = (h0, c0) if mode == "LSTM" else h0
        out, hidden = torch.func.functional_call(
            module, dict(zip(names, weights, strict=True)), (inp, hx)
        )
        out = out.data if packed else out
        return (out, *(hidden if mode == "LSTM" else (hidden,)))

    inputs = (x, h0, c0, *module.parameters())
    assert torch.autograd.gradcheck(
        fn, inputs, eps=1e-6, atol=1e-7, fast_mode=not CUDA, check_undefined_grad=CUDA
    )


def test_double_backward():
    """create_graph=True recomputes through torch ops: gradgradcheck holds on this engine."""
    module = _layer("LSTM", input_size=3, hidden_size=4, proj_size=2, bidirectional=True)
    names = [name for name, _ in module.named_parameters()]
    x = _f64(3, 2, 3)

    def fn(x, *weights):
        out, _ = torch.func.functional_call(module, dict(zip(names, weights, strict=True)), (x,))
        return out

    params = [p.detach().clone().requires_grad_() for p in module.parameters()]
    assert torch.autograd.gradgradcheck(fn, (x, *params), fast_mode=True)


def test_backward_twice_with_retain_graph():
    """The saved buffers survive a first backward: a second gives the same gradients."""
    module = _layer("LSTM", input_size=3, hidden_size=4, bidirectional=True)
    x = _f64(5, 2, 3)
    out, _ = module(x)
    (first,) = torch.autograd.grad(out.sum(), x, retain_graph=True)
    (second,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(first, second)


def test_inference_matches_training_forward():
    """no_grad runs the loops without saving; same values as the graph-building forward."""
    module = _layer("LSTM", input_size=3, hidden_size=5, proj_size=2, bidirectional=True)
    x = _f64(4, 3, 3)
    with torch.no_grad():
        inference = module(x.detach())
    training = module(x)
    assert torch.equal(inference[0], training[0])
    assert all(torch.equal(a, b) for a, b in zip(inference[1], training[1], strict=True))


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
    module, _ = _pair(case)
    module.train(case.dropout > 0)
    inp = _on_device(case.inputs())
    runs = [_run(case, module, inp, seed=5)[0] for _ in range(2)]
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
    module, reference = _pair(case)
    inp = _poisoned(case, where, index, value)
    expected = _run(case, reference, _on_device(inp), 0)[0]
    actual = _run(case, module, _on_device(inp), 0)[0]
    assert_same_nonfinite(
        {k: v.cpu() for k, v in expected.items()}, {k: v.cpu() for k, v in actual.items()}
    )


def test_non_contiguous_states_and_empty_batch():
    module = _layer("LSTM", input_size=3, hidden_size=4, num_layers=2)
    h0 = torch.randn(2, 4, 2, dtype=torch.float64, device=DEVICE).transpose(1, 2)
    c0 = torch.randn(2, 2, 4, dtype=torch.float64, device=DEVICE)
    x = _f64(5, 2, 3)
    out, (h_n, c_n) = module(x, (h0, c0))
    reference = copy.deepcopy(module)
    reference.engine = "reference"
    expected, (e_h, e_c) = reference(x, (h0, c0))
    for a, e in ((out, expected), (h_n, e_h), (c_n, e_c)):
        assert compare(a, e, tol=engine_tolerance(e)).ok
    out, (h_n, _) = module(_f64(5, 0, 3))
    assert out.shape == (5, 0, 4) and h_n.shape == (2, 0, 4)


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
                _layer(mode, input_size=3, hidden_size=4, dtype=torch.float32)(_f32(5, 2, 3))
        return
    module = _layer(mode, input_size=3, hidden_size=4, num_layers=2, dtype=torch.float32)
    reference = copy.deepcopy(module)
    reference.engine = "reference"
    x = _f32(5, 2, 3)
    runs = []
    for m in (reference, module):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            out, state = m(x)
        state = list(state) if isinstance(state, tuple) else [state]
        grads = torch.autograd.grad(out.float().square().sum(), [x, *m.parameters()])
        runs.append([out, *state, *grads])
    for e, a in zip(*runs, strict=True):
        assert a.dtype == e.dtype
        assert compare(a.float(), e.float(), tol=tolerance(torch.bfloat16, "grad")).ok


def test_what_it_leaves_to_other_engines():
    """Named, the engine raises why; it never falls back."""
    x = torch.randn(3, 2, 4, device=DEVICE)
    with pytest.raises(RuntimeError, match="triton: cells not supported"):
        rnnkit.GRUCell(4, 5, engine="triton").to(DEVICE)(x[0])
    with pytest.raises(RuntimeError, match="triton: variant layer_norm=True not supported"):
        rnnkit.GRU(4, 5, layer_norm=True, engine="triton").to(DEVICE)(x)


def test_torch_func_transforms_go_to_the_reference():
    """Named, the engine refuses torch.func transforms clearly instead of failing inside them."""
    module = _layer("GRU", input_size=3, hidden_size=4)
    x = _f64(2, 5, 1, 3)
    with pytest.raises(RuntimeError, match="triton: torch.func.vmap not supported"):
        torch.func.vmap(module)(x)
    with pytest.raises(RuntimeError, match=r"triton: torch.func gradients \(grad, vjp"):
        torch.func.grad(lambda x: module(x)[0].sum())(x[0])


def test_auto_never_picks_triton(monkeypatch):
    """Not before GPU measurements say where it is faster; on CPU, never."""
    from rnnkit import functional

    picked = []
    select = functional.select_engine

    def spy(engine, call):
        picked.append(select(engine, call).name)
        return select(engine, call)

    monkeypatch.setattr(functional, "select_engine", spy)
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
    assert_matches_reference(case)


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
                signature[p] = "*i32" if p == "p_sync" else "*" + io
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
    assert int(run.stdout.split()[-1]) == 10

"""torch.func over rnnkit's modules: ``vmap`` over inputs, states and stacked parameters
(model ensembles), ``grad``, ``vjp``, ``jacrev``, ``jacfwd`` and their compositions.

torch.nn's recurrent layers fail under vmap (no batching rule for ``aten::lstm``). Here every
transformed call is checked against the same module looped over the vmapped dim, or against
torch.autograd: within the engine tolerance in float64, and in float32 about as close to a
float64 run as the loop is. The fused engine folds a vmap over inputs into its batch (one
kernel call), loops over stacked weights, and refuses forward-mode AD and gradients of
gradients, which ``engine="auto"`` gives to the reference.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import (
    functional_call,
    grad,
    hessian,
    jacfwd,
    jacrev,
    stack_module_state,
    vjp,
    vmap,
)
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import rnnkit
from parity import assert_engine_close, engines_picked, randomize_variant_parameters, truth_of

# torch's forward-mode decompositions still go through torch.jit.script
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")

L, N, H_IN, H, B = 4, 2, 3, 5, 3
F32, F64 = torch.float32, torch.float64

LAYERS = [
    pytest.param("LSTM", {}, id="LSTM"),
    pytest.param("GRU", dict(bidirectional=True, num_layers=2, batch_first=True), id="GRU-bidir"),
    pytest.param("RNN", dict(nonlinearity="relu"), id="RNNrelu"),
    pytest.param("LSTM", dict(proj_size=2, bidirectional=True, num_layers=2), id="LSTM-proj"),
    # zoneout in eval: its expectation, no random numbers
    pytest.param("LSTM", dict(layer_norm=True, peephole=True, zoneout=0.2), id="LSTM-variants"),
    pytest.param("GRU", dict(layer_norm=True), id="GRU-layer_norm"),
]
MODULES = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"]
ENGINES = ("reference", "fused", "auto")


def _module(cls: str, engine: str, dtype=F64, seed: int = 0, **kw) -> torch.nn.Module:
    if engine == "fused" and cls.endswith("Cell"):
        pytest.skip("cells run on the reference engine")
    torch.manual_seed(seed)
    module = getattr(rnnkit, cls)(H_IN, H, engine=engine, **kw).to(dtype)
    if engine == "fused" and cls != "LSTM" and not module.variant.is_plain:
        pytest.skip("GRU and RNN variants run on the reference engine")
    return randomize_variant_parameters(module).eval()


def _input(module, *lead: int, dtype=F64) -> torch.Tensor:
    if isinstance(module, rnnkit.RNNBase):
        shape = (N, L) if module.batch_first else (L, N)
    else:
        shape = (N,)
    return torch.randn(*lead, *shape, H_IN, dtype=dtype)


def _state(module, *lead: int, dtype=F64):
    """A random initial state for ``module``, with leading dims ``lead``."""
    if isinstance(module, rnnkit.RNNBase):
        D = (2 if module.bidirectional else 1) * module.num_layers
        h = torch.randn(*lead, D, N, module.proj_size or H, dtype=dtype)
        c = torch.randn(*lead, D, N, H, dtype=dtype)
    else:
        h = torch.randn(*lead, N, H, dtype=dtype)
        c = torch.randn(*lead, N, H, dtype=dtype)
    return (h, c) if module.__class__.__name__.startswith("LSTM") else h


def _index(state, i: int):
    return tuple(t[i] for t in state) if isinstance(state, tuple) else state[i]


def _flat(result) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    return [t for part in result for t in _flat(part)]


def _stack(results: list) -> list[torch.Tensor]:
    return [torch.stack(ts) for ts in zip(*map(_flat, results), strict=True)]


def _assert_close(actual, expected, what: str = "output", truth=None) -> None:
    """In float64 within the engine tolerance; below it against ``truth``, the float64 run of
    ``expected``'s computation (``rnnkit.testing.compare``)."""

    def named(tensors):
        return {f"{what}[{i}]": t for i, t in enumerate(_flat(tensors))}

    truth = None if truth is None else named(truth)
    assert_engine_close(named(expected), named(actual), truth, "transformed call differs")


def _loss(out) -> torch.Tensor:
    return sum(t.square().sum() for t in _flat(out))


# vmap over inputs and states


@pytest.mark.parametrize("dtype, hx", [
    pytest.param(F64, None, id="f64"),
    pytest.param(F64, "vmapped", id="f64-hx-vmapped"),
    pytest.param(F64, "shared", id="f64-hx-shared"),
    pytest.param(F32, None, id="f32"),
])  # fmt: skip
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("cls, kw", LAYERS)
def test_vmap_over_inputs_equals_loop(cls, kw, engine, dtype, hx):
    module = _module(cls, engine, dtype, **kw)
    x = _input(module, B, dtype=dtype)

    def loop(module, x, h0):
        if hx is None:
            return _stack([module(xi) for xi in x])
        if hx == "vmapped":
            return _stack([module(x[i], _index(h0, i)) for i in range(B)])
        return _stack([module(xi, h0) for xi in x])

    if hx is None:
        h0 = None
        actual = vmap(module)(x)
    elif hx == "vmapped":
        h0 = _state(module, B, dtype=dtype)
        actual = vmap(module)(x, h0)
    else:
        h0 = _state(module, dtype=dtype)
        actual = vmap(module, in_dims=(0, None))(x, h0)
    _assert_close(actual, loop(module, x, h0), truth=truth_of(loop, module, x, h0))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("cls, kw", LAYERS[:4])
def test_vmap_inference_and_unbatched_input(cls, kw, engine):
    module = _module(cls, engine, **kw)
    x = torch.randn(B, L, H_IN, dtype=F64)  # [L, H_in] per sample: unbatched
    with torch.no_grad():
        actual = vmap(module)(x)
    _assert_close(actual, _stack([module(xi) for xi in x]))


@pytest.mark.parametrize("hx", [None, "vmapped", "shared", "unbatched-input"])
@pytest.mark.parametrize("engine", ("reference", "auto"))
@pytest.mark.parametrize("cls", ["LSTMCell", "GRUCell", "RNNCell"])
def test_vmap_cells_equals_loop(cls, engine, hx):
    module = _module(cls, engine)
    x = _input(module, B)
    if hx == "unbatched-input":
        x = x[:, 0]
        actual, expected = vmap(module)(x), _stack([module(xi) for xi in x])
    elif hx is None:
        actual, expected = vmap(module)(x), _stack([module(xi) for xi in x])
    elif hx == "vmapped":
        h = _state(module, B)
        actual = vmap(module)(x, h)
        expected = _stack([module(x[i], _index(h, i)) for i in range(B)])
    else:
        h = _state(module)
        actual = vmap(module, in_dims=(0, None))(x, h)
        expected = _stack([module(xi, h) for xi in x])
    _assert_close(actual, expected)


def _kernel_calls(fn) -> int:
    with torch.profiler.profile() as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "rnnkit_cpu::layer_forward")


@pytest.mark.parametrize("grad_mode", [False, True])
def test_vmap_over_inputs_runs_the_fused_kernel_once(grad_mode):
    """Shared weights: the vmapped dim joins the batch, one kernel call per layer (the profiler
    counts the batched call and the one it makes); stacked weights: one per model."""
    module = _module("LSTM", "fused", F32, num_layers=2)
    x = _input(module, B, dtype=F32)
    module(x[0])  # kernels built before counting
    with torch.set_grad_enabled(grad_mode):
        assert _kernel_calls(lambda: vmap(module)(x)) == 2 * 2
        params = {k: torch.stack([v] * B) for k, v in module.named_parameters()}
        ensemble = vmap(lambda p, x: functional_call(module, p, (x,)), in_dims=(0, None))
        assert _kernel_calls(lambda: ensemble(params, x[0])) == 2 * (1 + B)


# model ensembles: stacked parameters


@pytest.mark.parametrize("x_dim", [0, None], ids=["x-per-model", "x-shared"])
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("cls", MODULES)
def test_ensemble_equals_each_model(cls, engine, x_dim):
    models = [_module(cls, engine, seed=i) for i in range(B)]
    params, buffers = stack_module_state(models)
    x = _input(models[0], *([B] if x_dim == 0 else []))

    def call(p, b, x):
        return functional_call(models[0], (p, b), (x,))

    actual = vmap(call, in_dims=(0, 0, x_dim))(params, buffers, x)
    expected = _stack([m(x[i] if x_dim == 0 else x) for i, m in enumerate(models)])
    _assert_close(actual, expected)
    # and their gradients, each model's own
    # stack_module_state's parameters require grad: detached, the fused engine runs grad
    params = {k: v.detach() for k, v in params.items()}
    grads = vmap(grad(lambda p, b, x: _loss(call(p, b, x))), in_dims=(0, 0, x_dim))(
        params, buffers, x
    )
    for name, g in grads.items():
        expected = [
            torch.autograd.grad(_loss(m(x[i] if x_dim == 0 else x)), dict(m.named_parameters())[name])[0]
            for i, m in enumerate(models)
        ]  # fmt: skip
        _assert_close(g, torch.stack(expected), f"grad_{name}")


# grad, vjp, jacrev, per-sample gradients


def _params(module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in module.named_parameters()}


def _autograd(module, x):
    """The gradients of ``_loss`` by torch.autograd: the parameters', then the input's."""
    x = x.detach().requires_grad_()
    params = list(module.parameters())
    return torch.autograd.grad(_loss(module(x)), [*params, x])


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("cls", MODULES)
def test_grad_over_parameters_and_input(cls, engine):
    module = _module(cls, engine)
    x = _input(module)
    expected = _autograd(module, x)
    g_params, g_x = grad(lambda p, x: _loss(functional_call(module, p, (x,))), argnums=(0, 1))(
        _params(module), x
    )
    _assert_close([*g_params.values(), g_x], list(expected), "grad")
    with torch.no_grad():  # the module's parameters need no graph outside the transform
        (g_x,) = vjp(lambda x: _loss(module(x)), x)[1](torch.tensor(1.0, dtype=F64))
    _assert_close(g_x, expected[-1], "grad_x")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("cls", MODULES)
def test_jacrev_equals_autograd_jacobian(cls, engine):
    module = _module(cls, engine)
    x = _input(module)

    def out(x):
        return _flat(module(x))[0]

    expected = torch.autograd.functional.jacobian(out, x)
    with torch.no_grad():  # the module's parameters need no graph outside the transform
        _assert_close(jacrev(out)(x), expected, "grad_jacobian")
        # vmap of jacrev: one Jacobian per sample
        xs = _input(module, 2)
        expected = _stack([jacrev(out)(xi) for xi in xs])
        _assert_close(vmap(jacrev(out))(xs), expected, "grad_jacobian")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("cls", MODULES)
def test_per_sample_gradients_equal_loop(cls, engine):
    """The classic use: ``vmap(grad(loss))`` over the samples of a batch."""
    module = _module(cls, engine)
    xs = _input(module, B)
    params = _params(module)

    def loss(p, x):
        return _loss(functional_call(module, p, (x,)))

    actual = vmap(grad(loss), in_dims=(None, 0))(params, xs)
    for i, x in enumerate(xs):
        expected = _autograd(module, x)[:-1]
        _assert_close([g[i] for g in actual.values()], list(expected), "grad")


def test_auto_runs_the_fused_engine_under_reverse_mode_transforms(monkeypatch):
    module = _module("LSTM", "auto")
    x = _input(module, B)
    params = _params(module)
    picked = engines_picked(monkeypatch)
    vmap(module)(x)
    with torch.no_grad():
        grad(lambda x: _loss(module(x)))(x[0])
        jacrev(lambda x: module(x)[0])(x[0])
    vmap(grad(lambda p, x: _loss(functional_call(module, p, (x,)))), in_dims=(None, 0))(params, x)
    assert set(picked) == {"fused"}
    # parameters that torch.autograd tracks outside the transform: the reference engine
    picked.clear()
    jacrev(lambda x: module(x)[0])(x[0])
    assert set(picked) == {"reference"}


# forward mode and gradients of gradients: the reference engine's


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("cls", MODULES)
def test_jacfwd(cls, engine):
    module = _module(cls, engine)
    x = _input(module)

    def out(x):
        return _flat(module(x))[0]

    if engine == "fused":
        with pytest.raises(RuntimeError, match="fused: forward-mode AD"):
            jacfwd(out)(x)
        return
    _assert_close(jacfwd(out)(x), torch.autograd.functional.jacobian(out, x), "grad_jacobian")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("cls", ["LSTM", "GRU", "LSTMCell"])
def test_forward_ad_dual_tensors(cls, engine):
    """torch.autograd.forward_ad, the forward mode outside torch.func, chooses alike."""
    module = _module(cls, engine)
    x, tangent = _input(module), _input(module)

    def out(x):
        return _flat(module(x))[0]

    with fwAD.dual_level():
        if engine == "fused":
            with pytest.raises(RuntimeError, match="fused: forward-mode AD"):
                out(fwAD.make_dual(x, tangent))
            return
        actual = fwAD.unpack_dual(out(fwAD.make_dual(x, tangent))).tangent
    jacobian = torch.autograd.functional.jacobian(out, x)
    expected = (jacobian * tangent).sum(tuple(range(-x.dim(), 0)))
    _assert_close(actual, expected, "grad_tangent")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("cls", ["LSTM", "GRUCell"])
def test_gradients_of_gradients(cls, engine, monkeypatch):
    module = _module(cls, engine)
    x = _input(module)

    def loss(x):
        return _loss(module(x))

    if engine == "fused":
        with pytest.raises(RuntimeError, match="fused: torch.func gradients of gradients"):
            grad(lambda x: grad(loss)(x).sum())(x)
        return
    xr = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(loss(xr), xr, create_graph=True)
    (expected,) = torch.autograd.grad(g.sum(), xr)
    picked = engines_picked(monkeypatch)
    _assert_close(grad(lambda x: grad(loss)(x).sum())(x), expected, "grad_grad")
    _assert_close(hessian(loss)(x).sum(tuple(range(x.dim()))), expected, "grad_grad")
    assert set(picked) == {"reference"}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("cls, kw", [LAYERS[0], LAYERS[3], LAYERS[4]])
def test_torch_func_gradient_differentiated_again(cls, kw, engine, monkeypatch):
    """grad() and jacrev() of tensors that torch.autograd tracks outside the transform: their
    results are differentiable again, equal to torch.autograd's double backward. The fused
    backward has no derivative: "auto" runs the reference engine, "fused" refuses."""
    module = _module(cls, engine, **kw)
    x = _input(module)
    params = dict(module.named_parameters())

    def loss(p):
        return _loss(functional_call(module, p, (x,)))

    first = torch.autograd.grad(loss(params), list(params.values()), create_graph=True)
    expected = torch.autograd.grad(sum(v.square().sum() for v in first), list(params.values()))
    if engine == "fused":
        with pytest.raises(RuntimeError, match="fused: torch.func gradients .* of tensors"):
            grad(loss)(params)
        return
    picked = engines_picked(monkeypatch)
    g = grad(loss)(params)
    assert set(picked) == {"reference"}
    actual = torch.autograd.grad(sum(v.square().sum() for v in g.values()), list(params.values()))
    _assert_close(actual, expected, "grad_grad")
    # the same through jacrev, against the reference engine's module
    reference = copy.deepcopy(module)
    reference.engine = "reference"
    runs = []
    for m in (module, reference):
        jacobian = jacrev(lambda x, m=m: _flat(m(x))[0].sin().sum(0))(x)
        runs.append(torch.autograd.grad(jacobian.square().sum(), list(m.parameters())))
    _assert_close(runs[0], runs[1], "grad_grad")


def test_double_backward_through_vmap():
    """torch.autograd's create_graph=True over a vmapped call: the reference engine's graph
    differentiates twice; the fused engine, whose double backward recomputes the layer outside
    any transform, raises instead of giving zeros."""
    for engine in ("reference", "fused"):
        module = _module("GRU", engine)
        x = _input(module, B).requires_grad_()
        out = vmap(module)(x)
        if engine == "fused":
            with pytest.raises(RuntimeError, match="double backward .* through a torch.func.vmap"):
                torch.autograd.grad(_loss(out), module.weight_hh_l0, create_graph=True)
            continue
        (g,) = torch.autograd.grad(_loss(out), module.weight_hh_l0, create_graph=True)
        (actual,) = torch.autograd.grad(g.sum(), x)
        loss = _loss([module(xi) for xi in x])
        (g,) = torch.autograd.grad(loss, module.weight_hh_l0, create_graph=True)
        _assert_close(actual, torch.autograd.grad(g.sum(), x)[0], "grad_grad")


# randomness: dropout and the random variants in training


RANDOM = [
    pytest.param("LSTM", dict(num_layers=2, dropout=0.5), id="dropout"),
    pytest.param("LSTM", dict(zoneout=0.3), id="LSTM-zoneout"),
    pytest.param("LSTM", dict(recurrent_dropout=0.3), id="LSTM-recurrent_dropout"),
    pytest.param("LSTM", dict(weight_dropout=0.3), id="LSTM-weight_dropout"),
    pytest.param("GRU", dict(zoneout=0.3), id="GRU-zoneout"),
    pytest.param("LSTMCell", dict(zoneout=0.3), id="LSTMCell-zoneout"),
]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("cls, kw", RANDOM)
def test_randomness_follows_vmap(cls, kw, engine):
    """torch.func's ``randomness=``: "error" (the default) raises torch's error, "same" draws
    one mask for all samples, "different" one per sample."""
    module = _module(cls, engine, **kw).train()
    x = _input(module).expand(B, *_input(module).shape)  # the same input for every sample
    with pytest.raises(RuntimeError, match="randomness error mode"):
        vmap(module)(x)
    # one mask: the samples equal to rounding (a batched product may round them apart)
    same = _flat(vmap(module, randomness="same")(x))[0]
    _assert_close(list(same[1:]), [same[0]] * (B - 1))
    different = _flat(vmap(module, randomness="different")(x))[0]
    assert all((different[0] - d).abs().max() > 1e-3 for d in different[1:])


# packed sequences and lengths


@pytest.mark.parametrize("engine", ENGINES)
def test_packed_data_and_lengths_under_vmap(engine):
    module = _module("LSTM", engine, bidirectional=True, batch_first=True)
    lengths = torch.tensor([4, 2])
    x = torch.randn(B, N, L, H_IN, dtype=F64)
    actual = vmap(lambda x: module(x, lengths=lengths))(x)
    _assert_close(actual, _stack([module(xi, lengths=lengths) for xi in x]))
    # a PackedSequence built inside the vmapped function, over its data
    packed = [pack_padded_sequence(xi, lengths, batch_first=True) for xi in x]
    data = torch.stack([p.data for p in packed])
    bs = packed[0].batch_sizes
    actual = vmap(lambda d: module(PackedSequence(d, bs))[0].data)(data)
    _assert_close(actual, torch.stack([module(p)[0].data for p in packed]))


def test_what_cannot_be_vmapped_raises_clearly():
    module = _module("LSTM", "auto", batch_first=True)
    x = torch.randn(B, N, L, H_IN, dtype=F64)
    with pytest.raises(ValueError, match="lengths cannot be vmapped over"):
        vmap(lambda x, n: module(x, lengths=n))(x, torch.tensor([[4, 2]] * B))
    weights = list(module.parameters())
    rows = torch.randn(B, L * N, H_IN, dtype=F64)
    with pytest.raises(RuntimeError, match="batch_sizes cannot be vmapped over"):
        vmap(lambda r, bs: rnnkit.functional.lstm(r, weights, batch_sizes=bs))(
            rows, torch.full((B, L), N)
        )


# the README's example


def test_readme_example_runs():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## torch.func", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    exec(compile(code, "README.md", "exec"), {})

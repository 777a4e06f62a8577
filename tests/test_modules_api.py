"""LSTM, GRU and RNN as torch.nn modules: construction, parameters, init and module behaviour.

Everything is checked against torch.nn doing the same thing, never against written-down values;
numbers bit for bit on the reference engine and within tolerance on the default engine
(``parity.ENGINES``).
"""

import contextlib
import copy
import inspect
import io
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

import rnnkit
from grid import ModuleCase
from parity import ENGINES, assert_parity, same_outcome, truth_of
from rnnkit.testing import aten_path

NAMES = ("LSTM", "GRU", "RNN")

# (class name, args, kwargs): every constructor option, positionally and by keyword
CONFIGS = [
    ("LSTM", (5, 7), {}),
    ("LSTM", (5, 7, 2, False, True, 0.25, True, 3), {}),
    ("LSTM", (4, 6), dict(num_layers=3, proj_size=2, bidirectional=True, dropout=0.5)),
    ("GRU", (5, 7, 3, True, True, 0.5, True), {}),
    ("GRU", (3, 1), dict(bias=False)),
    ("RNN", (5, 7, 2, "relu", False, True, 0.0, True), {}),
    ("RNN", (5, 7), dict(nonlinearity="relu", batch_first=True, dropout=1)),
    ("RNN", (5, 7, 2, "tanh"), {}),
]
CONFIG_IDS = [f"{name}-{i}" for i, (name, _, _) in enumerate(CONFIGS)]


def build(lib, name, args, kwargs, seed=0):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return getattr(lib, name)(*args, **kwargs)


@pytest.fixture(params=CONFIGS, ids=CONFIG_IDS)
def pair(request):
    name, args, kwargs = request.param
    return build(nn, name, args, kwargs), build(rnnkit, name, args, kwargs)


def test_signature_matches_torch():
    for name in NAMES:
        ours = inspect.signature(getattr(rnnkit, name).__init__).parameters
        assert ours == inspect.signature(getattr(nn, name).__init__).parameters, name


def test_attributes_match_torch(pair):
    ref, ours = pair
    for attr in (
        "mode input_size hidden_size num_layers bias batch_first dropout bidirectional "
        "proj_size training"
    ).split():
        assert getattr(ours, attr) == getattr(ref, attr), attr
        assert type(getattr(ours, attr)) is type(getattr(ref, attr)), attr
    assert getattr(ours, "nonlinearity", None) == getattr(ref, "nonlinearity", None)


def test_repr_matches_torch(pair):
    ref, ours = pair
    assert repr(ours) == repr(ref)


def test_init_matches_torch_under_the_same_seed(pair):
    """Same parameters, names, order, shapes, values; the same random numbers drawn."""
    ref, ours = pair
    expected = dict(ref.named_parameters())
    actual = dict(ours.named_parameters())
    assert list(actual) == list(expected)
    for name, p in expected.items():
        assert type(actual[name]) is nn.Parameter and actual[name].requires_grad, name
        assert torch.equal(actual[name], p), name
    # the generator ends in the same state: no extra or missing draws
    name, args, kwargs = CONFIGS[0]
    build(nn, name, args, kwargs, seed=3)
    after_ref = torch.rand(4)
    build(rnnkit, name, args, kwargs, seed=3)
    assert torch.equal(torch.rand(4), after_ref)


def test_flat_weights_and_all_weights_match_torch(pair):
    ref, ours = pair
    assert ours._flat_weights_names == ref._flat_weights_names
    assert ours._all_weights == ref._all_weights
    params = dict(ours.named_parameters())
    assert [id(w) for w in ours._flat_weights] == [id(params[n]) for n in ref._flat_weights_names]
    assert [[id(w) for w in ws] for ws in ours.all_weights] == [
        [id(params[n]) for n in names] for names in ref._all_weights
    ]
    assert [[w.shape for w in ws] for ws in ours.all_weights] == [
        [w.shape for w in ws] for ws in ref.all_weights
    ]


@pytest.mark.parametrize("name", NAMES)
def test_not_an_instance_of_torch_classes(name):
    """rnnkit's layers are not torch.nn.RNNBase subclasses (README: isinstance and torch's
    type checks): dynamo refuses torch's recurrent classes, quantization maps exact types."""
    m = build(rnnkit, name, (4, 6), {})
    assert isinstance(m, rnnkit.RNNBase) and isinstance(m, nn.Module)
    assert not isinstance(m, nn.RNNBase)
    assert not isinstance(m, getattr(nn, name))


def test_quantize_dynamic_needs_revert():
    """quantize_dynamic swaps torch.nn's exact types: it leaves an rnnkit layer float, and
    quantizes it once rnnkit.revert has made it torch's again."""
    model = nn.Sequential(build(rnnkit, "LSTM", (4, 6), {}), build(rnnkit, "GRU", (6, 5), {}))
    kept = torch.ao.quantization.quantize_dynamic(model, dtype=torch.qint8)
    assert [type(m) for m in kept] == [rnnkit.LSTM, rnnkit.GRU]
    assert kept[0].weight_hh_l0.dtype == torch.float32
    quantized = torch.ao.quantization.quantize_dynamic(rnnkit.revert(model), dtype=torch.qint8)
    dynamic = torch.ao.nn.quantized.dynamic
    assert [type(m) for m in quantized] == [dynamic.LSTM, dynamic.GRU]


def test_flatten_parameters_is_a_no_op(pair):
    _, ours = pair
    before = [(n, p.data_ptr(), p.clone()) for n, p in ours.named_parameters()]
    assert ours.flatten_parameters() is None
    after = list(ours.named_parameters())
    for (name, ptr, value), (name2, p) in zip(before, after, strict=True):
        assert name == name2 and p.data_ptr() == ptr and torch.equal(p, value)


def test_state_dict_loads_both_ways(pair):
    ref, ours = pair
    assert list(ours.state_dict()) == list(ref.state_dict())
    fresh_ref = type(ref)(*_args_of(ref))
    fresh_ours = type(ours)(*_args_of(ref))
    fresh_ours.load_state_dict(ref.state_dict(), strict=True)
    fresh_ref.load_state_dict(ours.state_dict(), strict=True)
    for a, b, c in zip(
        ref.parameters(), fresh_ours.parameters(), fresh_ref.parameters(), strict=True
    ):
        assert torch.equal(a, b) and torch.equal(a, c)


def _args_of(m):
    """Positional constructor arguments that rebuild ``m``'s architecture (no dropout)."""
    if isinstance(m, (nn.RNN, rnnkit.RNN)):
        nonlinearity = (m.nonlinearity,)
    else:
        nonlinearity = ()
    args = (m.input_size, m.hidden_size, m.num_layers, *nonlinearity, m.bias, m.batch_first, 0.0)
    if isinstance(m, (nn.LSTM, rnnkit.LSTM)):
        return (*args, m.bidirectional, m.proj_size)
    return (*args, m.bidirectional)


def test_dtype_and_device_arguments():
    for name in NAMES:
        m = getattr(rnnkit, name)(3, 4, 2, dtype=torch.float64, device=torch.device("cpu"))
        assert {p.dtype for p in m.parameters()} == {torch.float64}
        meta = getattr(rnnkit, name)(3, 4, device="meta")
        assert {p.device.type for p in meta.parameters()} == {"meta"}


def test_engine_is_keyword_only():
    for name in NAMES:
        cls = getattr(rnnkit, name)
        assert cls(3, 4, engine="reference").engine == "reference"
        assert cls(3, 4).engine == "auto"
        with pytest.raises(ValueError):
            cls(3, 4, engine="no-such-engine")
    # all ten positional slots of torch.nn.LSTM are taken; an eleventh is an error
    with pytest.raises(TypeError):
        rnnkit.LSTM(3, 4, 1, True, False, 0.0, False, 0, None, None, "reference")


CONSTRUCTOR_ERRORS = [
    ("LSTM", (10, 0, 1), {}),
    ("GRU", (10, 10, 0), {}),
    ("RNN", (10, 10, -2), {}),
    ("LSTM", (3, 5), dict(bias=0)),
    ("GRU", (3, 5), dict(bias="True")),
    ("RNN", (3, 5), dict(batch_first=1)),
    ("LSTM", (3, 5), dict(batch_first="False")),
    ("LSTM", (3.0, 5), {}),
    ("GRU", ("10", 5), {}),
    ("RNN", (0, 5), {}),
    ("LSTM", (-1, 5), {}),
    ("LSTM", (3, 5.0), {}),
    ("GRU", (3, -3), {}),
    ("LSTM", (3, 5), dict(dropout=-0.1)),
    ("GRU", (3, 5), dict(dropout=1.5)),
    ("RNN", (3, 5), dict(dropout=True)),
    ("LSTM", (3, 5), dict(dropout="0.5")),
    ("LSTM", (3, 5), dict(proj_size=-1)),
    ("LSTM", (3, 5), dict(proj_size=5)),
    ("LSTM", (3, 5), dict(proj_size=7)),
    ("GRU", (3, 5), dict(proj_size=2)),
    ("RNN", (3, 5), dict(proj_size=0)),
    ("RNN", (3, 5), dict(nonlinearity="sigmoid")),
    ("RNN", (3, 5, 1, "gelu"), {}),
    ("GRU", (3, 5), dict(num_layers=2.0)),
    ("LSTM", (3, 5), dict(unknown_option=1)),
    ("LSTM", (True, 5), {}),
]


@pytest.mark.parametrize(
    "name,args,kwargs",
    CONSTRUCTOR_ERRORS,
    ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(CONSTRUCTOR_ERRORS)],
)
def test_constructor_validation_matches_torch(name, args, kwargs):
    """The same exception type and message as torch.nn (or success where torch succeeds)."""
    same_outcome(
        lambda: getattr(nn, name)(*args, **kwargs), lambda: getattr(rnnkit, name)(*args, **kwargs)
    )


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("num_layers,dropout", [(1, 0.3), (1, 1), (2, 0.3), (1, 0.0)])
def test_dropout_warning_matches_torch(name, num_layers, dropout):
    caught = []
    for lib in (nn, rnnkit):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            getattr(lib, name)(3, 4, num_layers, dropout=dropout)
        caught.append([(w.category, str(w.message)) for w in record])
    assert caught[1] == caught[0]
    assert len(caught[0]) == (num_layers == 1 and dropout > 0)


def _run_both(ref, ours, **case_kwargs):
    """Both modules (of the same architecture) on one ModuleCase's inputs and gradients, and
    the float64 truth of torch's run."""
    case = ModuleCase(
        ref.mode,
        size=(5, 3, ref.input_size, ref.hidden_size),
        num_layers=ref.num_layers,
        bidirectional=ref.bidirectional,
        batch_first=ref.batch_first,
        dtype=ref.weight_ih_l0.dtype,
        **case_kwargs,
    )
    inp = case.inputs()
    with aten_path():
        expected, _ = case.run(ref, inp)
    actual, _ = case.run(ours, inp)
    return expected, actual, case.truth(ref, inp)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", NAMES)
def test_to_and_dtype_conversions(name, dtype, engine):
    ref = build(nn, name, (4, 6, 2), {})
    ours = build(rnnkit, name, (4, 6, 2), dict(engine=engine))
    ref.double().to(dtype)
    ours.double().to(dtype)
    assert {p.dtype for p in ours.parameters()} == {dtype}
    assert {w.dtype for w in ours._flat_weights} == {dtype}
    expected, actual, truth = _run_both(ref, ours, h0=True)
    assert_parity(expected, actual, engine, truth=truth)


def test_half_conversion():
    for name in NAMES:
        ours = build(rnnkit, name, (4, 6), {}).half()
        assert {w.dtype for w in ours._flat_weights} == {torch.float16}
        ours.float()
        assert {w.dtype for w in ours._flat_weights} == {torch.float32}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", NAMES)
def test_deepcopy(name, engine):
    ref = build(nn, name, (4, 6, 2), {})
    ours = build(rnnkit, name, (4, 6, 2), dict(engine=engine))
    clone = copy.deepcopy(ours)
    assert type(clone) is type(ours) and repr(clone) == repr(ours)
    assert clone.engine == engine
    for (n, p), (n2, q) in zip(ours.named_parameters(), clone.named_parameters(), strict=True):
        assert n == n2 and torch.equal(p, q) and p.data_ptr() != q.data_ptr()
    with torch.no_grad():
        next(clone.parameters()).add_(1.0)
    assert not torch.equal(next(clone.parameters()), next(ours.parameters()))
    expected, actual, truth = _run_both(ref, copy.deepcopy(ours), h0=True)
    assert_parity(expected, actual, engine, truth=truth)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", NAMES)
def test_pickle_and_torch_save_round_trip(name, engine):
    ref = build(nn, name, (4, 6, 2), {})
    ours = build(rnnkit, name, (4, 6, 2), dict(engine=engine))
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    for restored in (pickle.loads(pickle.dumps(ours)), torch.load(buffer, weights_only=False)):
        assert type(restored) is type(ours) and repr(restored) == repr(ours)
        assert restored._flat_weights_names == ours._flat_weights_names
        assert restored.engine == engine
        expected, actual, truth = _run_both(ref, restored, h0=True)
        assert_parity(expected, actual, engine, truth=truth)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_RELU"])
def test_functional_call_with_replaced_parameters(mode, engine):
    case = ModuleCase(mode, num_layers=2, bidirectional=True, proj=mode == "LSTM", h0=True)
    ref, ours = case.modules(engine)
    gen = torch.Generator().manual_seed(5)
    # at the unit scale the ReLU layers grow to thousands, and their entries that cancel to
    # near zero keep the rounding of those: measured against float64, both sides round alike
    params = {
        n: torch.randn(p.shape, generator=gen).requires_grad_() for n, p in ref.named_parameters()
    }
    inp = case.inputs()

    def run(module, params, inp):
        return case.run(_FunctionalCall(module, params), inp)[0]

    results = []
    for module, context in ((ref, aten_path), (ours, contextlib.nullcontext)):
        with context():
            results.append(run(module, params, inp))
    assert_parity(*results, engine, truth=truth_of(run, ref, params, inp))
    # the module's own parameters are untouched and unused
    for p in ours.parameters():
        assert p.grad is None


class _FunctionalCall(nn.Module):
    """``module`` called through torch.func.functional_call with ``params``, as a module."""

    def __init__(self, module, params):
        super().__init__()
        self.inner = module
        self.params = params

    def forward(self, *args):
        return functional_call(self.inner, self.params, args)

    def named_parameters(self, *args, **kwargs):
        # the gradients of interest are those of the replacement tensors
        return iter(self.params.items())


@pytest.mark.parametrize("name", NAMES)
def test_forward_hooks_see_what_torch_hooks_see(name):
    seen = {}
    for lib in (nn, rnnkit):
        module = build(lib, name, (4, 6), {})
        calls = seen[lib] = []
        module.register_forward_pre_hook(lambda m, args, c=calls: c.append(("pre", len(args))))
        module.register_forward_hook(
            lambda m, args, out, c=calls: c.append(("post", type(out), type(out[1]), len(out)))
        )
        # a hook's return value replaces the output
        module.register_forward_hook(lambda m, args, out: (out[0] * 0, out[1]))
        out = module(torch.randn(3, 2, 4))
        assert not out[0].any()
    assert seen[rnnkit] == seen[nn]


@pytest.mark.parametrize("name", NAMES)
def test_train_eval(name):
    ours = build(rnnkit, name, (4, 6, 2), dict(dropout=0.5))
    assert ours.training
    assert ours.eval() is ours and not ours.training
    assert ours.train() is ours and ours.training


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH"])
def test_assigned_parameter_is_used(mode, engine):
    """Assigning a new Parameter (as torch.nn allows) changes the next forward as in torch."""
    case = ModuleCase(mode, num_layers=2, h0=True)
    ref, ours = case.modules(engine)
    new = torch.randn_like(ref.weight_hh_l1)
    ref.weight_hh_l1 = nn.Parameter(new.clone())
    ours.weight_hh_l1 = nn.Parameter(new.clone())
    with torch.no_grad():
        ref.bias_ih_l0.mul_(3)
        ours.bias_ih_l0.mul_(3)
    inp = case.inputs()
    with aten_path():
        expected, _ = case.run(ref, inp)
    assert_parity(expected, case.run(ours, inp)[0], engine, truth=case.truth(ref, inp))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_parametrized_weight(mode, engine):
    """A parametrization (weight norm here) on a recurrent weight works as in torch.nn."""
    case = ModuleCase(mode, num_layers=2, h0=True)
    ref, ours = case.modules(engine)
    for m in (ref, ours):
        nn.utils.parametrizations.weight_norm(m, "weight_hh_l0")
    ours.load_state_dict(ref.state_dict())
    inp = case.inputs()
    # before any forward: a module that has computed a parametrized weight cannot be copied
    truth = case.truth(ref, inp)
    with aten_path():
        expected, _ = case.run(ref, inp)
    assert_parity(expected, case.run(ours, inp)[0], engine, truth=truth)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_RELU"])
def test_sgd_steps_match_torch(mode, engine):
    """A few optimizer steps leave both modules with the same parameters (bit for bit on the
    reference engine)."""
    case = ModuleCase(mode, num_layers=2, bidirectional=True, h0=True, dtype=torch.float64)
    ref, ours = case.modules(engine)
    for module, context in ((ref, aten_path), (ours, contextlib.nullcontext)):
        opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
        for step in range(3):
            inp = case.inputs(seed=step)
            with context():
                out, _ = case.forward(module, inp)
                loss = sum(t.square().sum() for t in out.values())
                opt.zero_grad()
                loss.backward()
            opt.step()
    assert_parity(dict(ref.named_parameters()), dict(ours.named_parameters()), engine)

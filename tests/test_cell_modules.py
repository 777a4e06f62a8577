"""LSTMCell, GRUCell and RNNCell against torch.nn: numbers, module behaviour and errors.

The cell grid runs here on the default engine (``engine="auto"``) within tolerance of torch,
and in ``tests/engines/test_reference.py`` bit for bit on the reference engine; the other
numeric checks run on both (``parity.ENGINES``).
"""

import contextlib
import copy
import inspect
import pickle
import warnings

import pytest
import torch
from torch import nn

import rnnkit
from grid import CellCase, cell_params, check_cell_case
from parity import ENGINES, assert_parity, same_outcome
from rnnkit.testing import aten_path

CELLS = ("LSTMCell", "GRUCell", "RNNCell")


@pytest.mark.parametrize("case", cell_params())
def test_matches_torch(case):
    check_cell_case(case)


@pytest.mark.parametrize("engine", ENGINES)
def test_steps_through_time_match_torch(engine):
    """A cell fed its own state for many steps: the gradients go through time."""
    for mode in ("LSTM", "GRU", "RNN_RELU"):
        case = CellCase(mode, size=(3, 4, 6), dtype=torch.float64)
        ref, ours = case.modules(engine)
        xs = torch.randn(20, 3, 4, dtype=torch.float64, requires_grad=True)
        results = []
        for module, context in ((ref, aten_path), (ours, contextlib.nullcontext)):
            with context():
                hx = None
                outs = []
                for x in xs:
                    hx = module(x, hx)
                    outs.append(hx[0] if mode == "LSTM" else hx)
                output = torch.stack(outs)
                grads = torch.autograd.grad(output.sin().sum(), [xs, *module.parameters()])
            names = ["grad_input", *(f"grad_{n}" for n, _ in module.named_parameters())]
            results.append({"output": output.detach(), **dict(zip(names, grads, strict=True))})
        assert_parity(*results, engine)


@pytest.mark.parametrize("name", CELLS)
def test_signature_matches_torch(name):
    """torch's parameters (names, kinds, defaults, order); anything more is keyword-only."""

    def shape(p):
        return p.name, p.kind, p.default

    ours = inspect.signature(getattr(rnnkit, name).__init__).parameters.values()
    theirs = inspect.signature(getattr(nn, name).__init__).parameters.values()
    assert [shape(p) for p in ours][: len(theirs)] == [shape(p) for p in theirs]
    extra = list(ours)[len(theirs) :]
    assert {p.kind for p in extra} <= {
        inspect.Parameter.KEYWORD_ONLY,
        inspect.Parameter.VAR_KEYWORD,
    }
    engine = inspect.signature(getattr(rnnkit, name).__init__).parameters["engine"]
    assert engine.kind is inspect.Parameter.KEYWORD_ONLY and engine.default == "auto"


CONFIGS = [
    ("LSTMCell", (5, 7), {}),
    ("LSTMCell", (5, 7, False), {}),
    ("GRUCell", (3, 1), {}),
    ("GRUCell", (4, 6), dict(bias=False)),
    ("RNNCell", (5, 7, True, "relu"), {}),
    ("RNNCell", (5, 7), dict(nonlinearity="tanh", bias=False)),
]


def build(lib, name, args, kwargs, seed=0):
    torch.manual_seed(seed)
    return getattr(lib, name)(*args, **kwargs)


@pytest.fixture(params=CONFIGS, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(CONFIGS)])
def pair(request):
    name, args, kwargs = request.param
    return build(nn, name, args, kwargs), build(rnnkit, name, args, kwargs)


def test_init_attributes_repr_and_state_dict(pair):
    ref, ours = pair
    assert repr(ours) == repr(ref)
    for attr in ("input_size", "hidden_size", "bias", "training"):
        assert getattr(ours, attr) == getattr(ref, attr)
    assert getattr(ours, "nonlinearity", None) == getattr(ref, "nonlinearity", None)
    assert list(ours.state_dict()) == list(ref.state_dict())
    expected = dict(ref.named_parameters())
    actual = dict(ours.named_parameters())
    assert list(actual) == list(expected)
    for name, p in expected.items():
        assert torch.equal(actual[name], p) and type(actual[name]) is nn.Parameter, name
    # bias=False registers the biases as None, as torch does
    assert (ours.bias_ih is None) == (ref.bias_ih is None)
    ref.load_state_dict(ours.state_dict(), strict=True)
    ours.load_state_dict(ref.state_dict(), strict=True)


@pytest.mark.parametrize("name", CELLS)
def test_draws_the_same_random_numbers(name):
    build(nn, name, (4, 6), {}, seed=1)
    after_ref = torch.rand(3)
    build(rnnkit, name, (4, 6), {}, seed=1)
    assert torch.equal(torch.rand(3), after_ref)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", CELLS)
def test_module_behaviour(name, engine):
    """dtype/device arguments, .double(), deepcopy, pickle and engine selection."""
    ours = build(rnnkit, name, (4, 6), dict(dtype=torch.float64))
    assert {p.dtype for p in ours.parameters()} == {torch.float64}
    assert {
        p.device.type for p in build(rnnkit, name, (4, 6), dict(device="meta")).parameters()
    } == {"meta"}
    ref = build(nn, name, (4, 6), {}).double()
    ours = build(rnnkit, name, (4, 6), dict(engine=engine)).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    with aten_path():
        expected = ref(x)
    for clone in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        assert type(clone) is type(ours) and repr(clone) == repr(ours)
        assert clone.engine == engine
        assert_parity(_named(expected), _named(clone(x)), engine)
    assert build(rnnkit, name, (4, 6), dict(engine="reference")).engine == "reference"
    with pytest.raises(ValueError):
        build(rnnkit, name, (4, 6), dict(engine="no-such-engine"))


def _named(out):
    return {"h": out[0], "c": out[1]} if isinstance(out, tuple) else {"h": out}


CONSTRUCTOR_CASES = [
    ("RNNCell", (3, 5), dict(nonlinearity="gelu")),
    ("LSTMCell", (3, -5), {}),
    ("GRUCell", (3, 0), {}),
    ("LSTMCell", (3, 5), dict(bias=0)),
    ("GRUCell", (3, 5), dict(unknown_option=1)),
]


@pytest.mark.parametrize(
    "name,args,kwargs",
    CONSTRUCTOR_CASES,
    ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(CONSTRUCTOR_CASES)],
)
def test_constructor_matches_torch(name, args, kwargs):
    """torch's cells validate little: they fail (or not) where torch does, the same way."""
    same_outcome(
        lambda: getattr(nn, name)(*args, **kwargs), lambda: getattr(rnnkit, name)(*args, **kwargs)
    )


def hx(name, *shape, dtype=torch.float32):
    h = torch.randn(shape, dtype=dtype)
    return (h, torch.randn(shape, dtype=dtype)) if name == "LSTMCell" else h


# (id, constructor kwargs, input, hx, message must match); cells are 5 -> 7
ERRORS = [
    ("input-3d", {}, lambda n: torch.randn(2, 3, 5), lambda n: None, True),
    ("input-0d", {}, lambda n: torch.randn(()), lambda n: None, True),
    ("hx-3d", {}, lambda n: torch.randn(3, 5), lambda n: hx(n, 1, 3, 7), True),
    ("input-size", {}, lambda n: torch.randn(3, 6), lambda n: hx(n, 3, 7), True),
    ("input-size-unbatched", {}, lambda n: torch.randn(6), lambda n: None, True),
    ("hidden-size", {}, lambda n: torch.randn(3, 5), lambda n: hx(n, 3, 8), True),
    ("batch", {}, lambda n: torch.randn(3, 5), lambda n: hx(n, 4, 7), True),
    ("input-float64", {}, lambda n: torch.randn(3, 5, dtype=torch.float64), lambda n: None, True),
    (
        "hx-float64",
        {},
        lambda n: torch.randn(3, 5),
        lambda n: hx(n, 3, 7, dtype=torch.float64),
        True,
    ),
    # torch unsqueezes the 2-D state of an unbatched input and reports a confusing size
    ("unbatched-input-2d-hx", {}, lambda n: torch.randn(5), lambda n: hx(n, 3, 7), False),
    ("batched-input-1d-hx", {}, lambda n: torch.randn(3, 5), lambda n: hx(n, 7), False),
]


def _error_params():
    for id_, kwargs, make_input, make_hx, message in ERRORS:
        for name in CELLS:
            yield pytest.param(name, kwargs, make_input, make_hx, message, id=f"{name}-{id_}")
    yield pytest.param(
        "RNNCell",
        dict(nonlinearity="gelu"),
        lambda n: torch.randn(3, 5),
        lambda n: None,
        True,
        id="RNNCell-unknown-nonlinearity",
    )
    yield pytest.param(
        "LSTMCell",
        {},
        lambda n: torch.randn(3, 5),
        lambda n: (torch.randn(3, 7), torch.randn(3, 6)),
        True,
        id="LSTMCell-c-hidden-size",
    )
    yield pytest.param(
        "LSTMCell",
        {},
        lambda n: torch.randn(3, 5),
        lambda n: (torch.randn(3, 7), torch.randn(2, 7)),
        True,
        id="LSTMCell-c-batch",
    )


@pytest.mark.parametrize("name,kwargs,make_input,make_hx,message", list(_error_params()))
def test_forward_error_matches_torch(name, kwargs, make_input, make_hx, message):
    torch.manual_seed(0)
    ref = getattr(nn, name)(5, 7, **kwargs)
    ours = getattr(rnnkit, name)(5, 7, **kwargs)
    ours.load_state_dict(ref.state_dict())
    x, state = make_input(name), make_hx(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        error = same_outcome(lambda: ref(x, state), lambda: ours(x, state), message=message)
    assert error is not None, "the case is meant to be an error in torch.nn"


@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell", "RNNCell"])
def test_plain_cells_never_read_training(name):
    """As torch's cells: a module whose ``training`` attribute is gone still runs (code that
    builds modules without ``nn.Module.__init__``'s attributes, or deletes them, relies on
    it). A cell whose variant draws masks in training does read it."""
    x = torch.randn(2, 3)
    ours, theirs = getattr(rnnkit, name)(3, 4), getattr(nn, name)(3, 4)
    ours.load_state_dict(theirs.state_dict())
    del ours.training, theirs.training
    expected, actual = theirs(x), ours(x)
    for e, a in zip(
        *(t if isinstance(t, tuple) else (t,) for t in (expected, actual)), strict=True
    ):
        assert torch.equal(e, a)
    zoned = getattr(rnnkit, name)(3, 4, zoneout=0.1)
    del zoned.training
    with pytest.raises(AttributeError, match="training"):
        zoned(x)

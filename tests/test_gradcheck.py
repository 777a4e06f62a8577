"""torch.autograd.gradcheck and gradgradcheck of the six modules in float64, on tiny sizes.

The parameters are inputs too (through torch.func.functional_call), so every gradient and
every second derivative is checked against finite differences. First derivatives on the
reference and the default engine; second derivatives on the reference, which autograd
differentiates twice. The default engine may pick one whose backward is not differentiable:
it must then say so, and name the reference.
"""

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence

import rnnkit
from parity import ENGINES

# (id, class name, constructor kwargs, input shape, state shapes, packed lengths)
CASES = [
    (
        "LSTM-bidir-proj-l2",
        "LSTM",
        dict(num_layers=2, bidirectional=True, proj_size=2),
        (3, 2, 2),
        [(4, 2, 2), (4, 2, 3)],
        None,
    ),
    (
        "LSTM-packed-bidir",
        "LSTM",
        dict(bidirectional=True),
        (3, 3, 2),
        [(2, 3, 3), (2, 3, 3)],
        [1, 3, 2],
    ),
    ("LSTM-unbatched-nobias", "LSTM", dict(bias=False, batch_first=True), (3, 2), [], None),
    ("GRU-bidir-l2", "GRU", dict(num_layers=2, bidirectional=True), (3, 2, 2), [(4, 2, 3)], None),
    ("GRU-packed", "GRU", dict(num_layers=2), (3, 3, 2), [(2, 3, 3)], [3, 1, 2]),
    ("RNN-tanh-packed-bidir", "RNN", dict(bidirectional=True), (3, 2, 2), [(2, 2, 3)], [2, 3]),
    ("RNN-relu-l2", "RNN", dict(num_layers=2, nonlinearity="relu"), (3, 2, 2), [(2, 2, 3)], None),
    ("LSTMCell", "LSTMCell", {}, (2, 2), [(2, 3), (2, 3)], None),
    ("GRUCell-nobias", "GRUCell", dict(bias=False), (2, 2), [(2, 3)], None),
    ("RNNCell-tanh", "RNNCell", {}, (2, 2), [(2, 3)], None),
    ("RNNCell-relu-unbatched", "RNNCell", dict(nonlinearity="relu"), (2,), [(3,)], None),
]


def _function(name, kwargs, n_states, lengths, engine):
    torch.manual_seed(0)
    module = getattr(rnnkit, name)(2, 3, dtype=torch.float64, engine=engine, **kwargs)
    names = [n for n, _ in module.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in module.parameters()]

    def f(x, *rest):
        states, weights = rest[:n_states], rest[n_states:]
        if lengths is not None:
            x = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
        hx = None
        if states:
            hx = tuple(states) if len(states) == 2 else states[0]
        out = functional_call(module, dict(zip(names, weights, strict=True)), (x, hx))
        if lengths is not None:
            out = (out[0].data, out[1])
        return tuple(torch.utils._pytree.tree_leaves(out))

    return f, params


def _args(name, kwargs, shape, state_shapes, lengths, engine):
    """The function of the inputs and parameters, and the arguments to check it at."""
    f, params = _function(name, kwargs, len(state_shapes), lengths, engine)
    gen = torch.Generator().manual_seed(1)
    inputs = [
        torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_()
        for s in (shape, *state_shapes)
    ]
    if kwargs.get("nonlinearity") == "relu":
        # keep pre-activations away from ReLU's kink, where finite differences are wrong
        inputs = [(t.detach().abs() + 0.5).requires_grad_() for t in inputs]
        params = [(p.detach().abs() * 0.5 + 0.05).requires_grad_() for p in params]
    return f, (*inputs, *params)


PARAMS = [pytest.param(*c[1:], id=c[0]) for c in CASES]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name,kwargs,shape,state_shapes,lengths", PARAMS)
def test_gradcheck(name, kwargs, shape, state_shapes, lengths, engine):
    f, args = _args(name, kwargs, shape, state_shapes, lengths, engine)
    assert gradcheck(f, args)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name,kwargs,shape,state_shapes,lengths", PARAMS)
def test_gradgradcheck(name, kwargs, shape, state_shapes, lengths, engine):
    f, args = _args(name, kwargs, shape, state_shapes, lengths, engine)
    assert gradgradcheck(f, args, fast_mode=True)


def test_readme_double_backward_example_runs():
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Double backward", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    exec(compile(code, "README.md", "exec"), {})

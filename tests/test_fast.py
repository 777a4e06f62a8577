"""The fast path of small inference calls (``rnnkit.fast``): the general path's bits on every
call it takes, the general path (and its errors) on every call it must not take, and a plan
that follows the module's weights."""

from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch
from torch import nn

import rnnkit
from rnnkit import fast
from rnnkit.engines.cpu import build

pytestmark = pytest.mark.skipif(
    build.build_error() is not None, reason="the fused CPU engine's kernels do not build here"
)

P = pytest.param

LAYERS = [
    P("LSTM", {}, id="LSTM"),
    P("LSTM", dict(num_layers=2, proj_size=3), id="LSTM-proj-2layers"),
    P("LSTM", dict(bidirectional=True, batch_first=True), id="LSTM-bidir-batch_first"),
    P("GRU", dict(num_layers=2, bias=False), id="GRU-nobias-2layers"),
    P("GRU", dict(bidirectional=True), id="GRU-bidir"),
    P("RNN", {}, id="RNN-tanh"),
    P("RNN", dict(nonlinearity="relu", num_layers=3, dropout=0.5), id="RNN-relu-3layers-dropout"),
]  # fmt: skip

CALLS = [
    P(1, 1, False, id="L1-N1"),
    P(7, 3, True, id="L7-N3-hx"),
    P(32, 1, True, id="L32-N1-hx"),
    P(5, None, False, id="L5-unbatched"),
    P(5, None, True, id="L5-unbatched-hx"),
]


def _inputs(m, L: int, N: int | None, with_hx: bool, dtype):
    D = 2 if m.bidirectional else 1
    H_out = m.proj_size or m.hidden_size
    batch = () if N is None else (N,)
    x = torch.randn(*((L,) if N is None else (N, L) if m.batch_first else (L, N)), 4, dtype=dtype)
    if not with_hx:
        return x, None
    h = torch.randn(D * m.num_layers, *batch, H_out, dtype=dtype)
    if isinstance(m, rnnkit.LSTM):
        return x, (h, torch.randn(D * m.num_layers, *batch, m.hidden_size, dtype=dtype))
    return x, h


def _flat(out) -> list[torch.Tensor]:
    y, hx = out
    return [y, *(hx if isinstance(hx, tuple) else (hx,))]


def _general(m, x, hx):
    fast.enabled = False
    try:
        return m(x, hx)
    finally:
        fast.enabled = True


@pytest.fixture
def counted(monkeypatch):
    """How many calls took the fast path."""
    taken = []
    call = fast.call

    def counting(module, input, hx):
        out = call(module, input, hx)
        if fast.enabled:  # not the general path's runs of _general
            taken.append(out is not None)
        return out

    monkeypatch.setattr(fast, "call", counting)
    return taken


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"]
)
@pytest.mark.parametrize("L, N, with_hx", CALLS)
@pytest.mark.parametrize("cls, kw", LAYERS)
def test_fast_calls_give_the_general_paths_bits(
    cls, kw, L, N, with_hx, dtype, counted, monkeypatch
):
    """bfloat16 too, where its products run in bfloat16 (the portable kernel on a CPU
    without AVX-512-BF16)."""
    if dtype == torch.bfloat16 and build.bf16_kernel() == "float32":
        monkeypatch.setenv("RNNKIT_BF16_KERNEL", "portable")
    torch.manual_seed(0)
    m = getattr(rnnkit, cls)(4, 6, dtype=dtype, **kw).eval()
    x, hx = _inputs(m, L, N, with_hx, dtype)
    with torch.no_grad():
        want = _flat(_general(m, x, hx))
        for _ in range(2):  # the plan's first call, then a kept plan
            got = _flat(m(x, hx))
            assert len(got) == len(want)
            for a, b in zip(got, want, strict=True):
                assert a.shape == b.shape and torch.equal(a, b)
    assert counted == [True, True]


def _lstm():
    torch.manual_seed(0)
    return rnnkit.LSTM(4, 6, num_layers=2).eval()


@pytest.mark.parametrize(
    "case",
    [
        P(lambda m, x: (m, x, torch.enable_grad()), id="grad-enabled"),
        P(lambda m, x: (m, x.to(torch.bfloat16), torch.no_grad()), id="bfloat16-float32"),
        P(lambda m, x: (m.train().requires_grad_(False), x, torch.no_grad()), id="train"),
        P(lambda m, x: (rnnkit.LSTM(4, 6, engine="reference").eval(), x, torch.no_grad()),
          id="reference-engine"),
        P(lambda m, x: (rnnkit.LSTM(4, 6, layer_norm=True).eval(), x, torch.no_grad()),
          id="variant"),
        P(lambda m, x: (m, x, torch.autocast("cpu", dtype=torch.bfloat16)), id="autocast"),
        P(lambda m, x: (m, x, rnnkit.portable()), id="portable"),
    ],
)  # fmt: skip
def test_calls_that_need_the_general_path_take_it(case, counted, monkeypatch):
    m = rnnkit.LSTM(4, 6, num_layers=2, dropout=0.5).eval()
    m, x, context = case(m, torch.randn(5, 2, 4))
    if x.dtype == torch.bfloat16:
        # bfloat16 widened to float32, as on a CPU without AVX-512-BF16
        monkeypatch.setenv("RNNKIT_BF16_KERNEL", "float32")
        m = m.to(torch.bfloat16)
    with context:
        m(x)
    assert counted == [False]


def test_calls_with_lengths_or_reset_or_packed_input_take_the_general_path(counted):
    m = _lstm()
    x = torch.randn(5, 2, 4)
    with torch.no_grad():
        m(x, lengths=torch.tensor([5, 3]))
        m(x, reset=torch.zeros(5, 2, dtype=torch.bool))
        m(nn.utils.rnn.pack_padded_sequence(x, torch.tensor([5, 3])))
    # fast.call is not reached for lengths= and reset=; a PackedSequence is refused by it
    assert counted == [False]


@pytest.mark.parametrize(
    "bad, error, match",
    [
        P(lambda m: (torch.randn(5, 2, 3), None), RuntimeError,
          "input.size\\(-1\\) must be equal to input_size. Expected 4, got 3", id="features"),
        P(lambda m: (torch.randn(5, 2, 4), (torch.zeros(2, 3, 6), torch.zeros(2, 3, 6))),
          RuntimeError, "Expected hidden\\[0\\] size \\(2, 2, 6\\), got \\[2, 3, 6\\]",
          id="hx-batch"),
        P(lambda m: (torch.randn(5, 2, 4), torch.zeros(2, 2, 6)), RuntimeError,
          "LSTM expects hx to be a tuple", id="hx-not-tuple"),
        P(lambda m: (torch.randn(5, 2, 4, dtype=torch.float64), None), ValueError,
          "RNN input dtype \\(torch.float64\\) does not match weight dtype", id="dtype"),
        P(lambda m: (torch.randn(0, 2, 4), None), RuntimeError,
          "Expected sequence length to be larger than 0 in RNN", id="empty"),
        P(lambda m: (torch.randn(5, 2, 2, 4), None), ValueError,
          "LSTM: Expected input to be 2D or 3D, got 4D instead", id="rank"),
    ],
)  # fmt: skip
def test_bad_calls_raise_the_general_paths_errors(bad, error, match):
    m = _lstm()
    x, hx = bad(m)
    with torch.no_grad(), pytest.raises(error, match=match):
        m(x, hx)
    with pytest.raises(error, match=match):
        _general(m, x, hx)


def _changes():
    def in_place(m):
        with torch.no_grad():
            m.weight_hh_l1.mul_(0.5)

    def optimizer_step(m):
        m.train()
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        m(torch.randn(5, 2, 4))[0].sum().backward()
        opt.step()
        m.eval()

    def load_state_dict(m):
        m.load_state_dict({k: torch.randn_like(v) for k, v in m.state_dict().items()})

    def assign(m):
        m.weight_ih_l0 = nn.Parameter(torch.randn_like(m.weight_ih_l0))

    def to_float64(m):
        m.double()

    return [
        P(in_place, id="in-place"),
        P(optimizer_step, id="optimizer-step"),
        P(load_state_dict, id="load_state_dict"),
        P(assign, id="assigned-parameter"),
        P(to_float64, id="double"),
    ]


@pytest.mark.parametrize("change", _changes())
def test_a_changed_weight_is_seen(change):
    m = _lstm()
    x = torch.randn(5, 2, 4)
    with torch.no_grad():
        before = m(x)[0]
    change(m)
    x = x.to(m.weight_hh_l0.dtype)
    with torch.no_grad():
        after = m(x)[0]
        want = _general(m, x, None)[0]
    assert not torch.equal(after.to(before.dtype), before)
    assert torch.equal(after, want)


@pytest.mark.parametrize("cls", ["LSTM", "GRUCell"])
def test_weights_moved_to_another_device_take_the_general_path(cls):
    """``.to()`` changes the parameters in place (same objects): the plan must see it."""
    m = getattr(rnnkit, cls)(4, 6).eval()
    x = torch.randn(5, 2, 4) if cls == "LSTM" else torch.randn(2, 4)
    with torch.no_grad():
        m(x)
        m.to("meta")
        with pytest.raises(Exception) as general:
            _general(m, x, None)
        with pytest.raises(type(general.value)) as got:
            m(x)
    assert str(got.value) == str(general.value)


def test_a_wrongly_shaped_assigned_parameter_raises_torchs_error():
    m = _lstm()
    with torch.no_grad():
        m(torch.randn(5, 2, 4))
    m.weight_hh_l0 = nn.Parameter(torch.randn(24, 5))
    with torch.no_grad(), pytest.raises(RuntimeError, match="weight_hh_l0"):
        m(torch.randn(5, 2, 4))


def test_copies_and_pickles_carry_no_plan_and_run_on_their_own(counted):
    m = _lstm()
    x = torch.randn(5, 2, 4)
    with torch.no_grad():
        want = m(x)[0]
        twin = copy.deepcopy(m)
        loaded = pickle.loads(pickle.dumps(m))
        with torch.no_grad():
            twin.weight_hh_l0.mul_(0.5)
        assert torch.equal(loaded(x)[0], want)
        assert not torch.equal(twin(x)[0], want)
        assert torch.equal(m(x)[0], want)
    assert counted == [True, True, True, True]


def test_threads_each_get_their_modules_bits():
    """Python threads calling one module and their own at once: each call the bits of a
    serial one."""
    torch.manual_seed(0)
    shared = rnnkit.LSTM(4, 16, num_layers=2).eval()
    own = [rnnkit.GRU(4, 16).eval() for _ in range(4)]
    xs = [torch.randn(9, 1 + i, 4) for i in range(4)]
    with torch.no_grad():
        want = [(shared(x)[0], own[i](x)[0]) for i, x in enumerate(xs)]
    failures = []

    def work(i):
        with torch.no_grad():
            for _ in range(50):
                got = (shared(xs[i])[0], own[i](xs[i])[0])
                if not all(torch.equal(a, b) for a, b in zip(got, want[i], strict=True)):
                    failures.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


def test_step_and_streaming_chunks_take_the_fast_path(counted):
    m = _lstm()
    x = torch.randn(64, 1, 4)
    with torch.no_grad():
        want, _ = m(x)
        hx, chunks = None, []
        for chunk in x.split(32):
            out, hx = m(chunk, hx)
            chunks.append(out)
        out_t, _ = m.step(torch.randn(1, 4), hx)
    assert torch.allclose(torch.cat(chunks), want, atol=1e-6)
    assert out_t.shape == (1, 6)
    assert counted == [True] * 4


CELLS = [
    P("LSTMCell", {}, id="LSTMCell"),
    P("GRUCell", dict(bias=False), id="GRUCell-nobias"),
    P("RNNCell", {}, id="RNNCell-tanh"),
    P("RNNCell", dict(nonlinearity="relu"), id="RNNCell-relu"),
]


def _cell_inputs(cell, N: int | None, with_hx: bool, dtype):
    batch = () if N is None else (N,)
    x = torch.randn(*batch, 4, dtype=dtype, requires_grad=True)
    if not with_hx:
        return x, None
    h = torch.randn(*batch, 6, dtype=dtype, requires_grad=True)
    if isinstance(cell, rnnkit.LSTMCell):
        return x, (h, torch.randn(*batch, 6, dtype=dtype, requires_grad=True))
    return x, h


def _cell_run(cell, x, hx, general: bool):
    """The cell's outputs and the gradients of a weighted sum of them."""
    out = _general(cell, x, hx) if general else cell(x, hx)
    outs = list(out) if isinstance(out, tuple) else [out]
    leaves = [x, *(hx if isinstance(hx, tuple) else (hx,) if hx is not None else ()),
              *cell.parameters()]  # fmt: skip
    loss = sum((o * torch.linspace(-1, 1, o.numel()).view_as(o).to(o)).sum() for o in outs)
    return outs, torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("N, with_hx", [P(1, False, id="N1"), P(3, True, id="N3-hx"),
                                        P(None, True, id="unbatched-hx")])  # fmt: skip
@pytest.mark.parametrize("cls, kw", CELLS)
def test_fast_cell_calls_give_the_general_paths_bits_and_gradients(cls, kw, N, with_hx, dtype):
    torch.manual_seed(0)
    cell = getattr(rnnkit, cls)(4, 6, dtype=dtype, **kw)
    x, hx = _cell_inputs(cell, N, with_hx, dtype)
    want, want_grads = _cell_run(cell, x, hx, general=True)
    got, grads = _cell_run(cell, x, hx, general=False)
    for a, b in zip([*got, *grads], [*want, *want_grads], strict=True):
        assert a.shape == b.shape and torch.equal(a, b)
    with torch.no_grad():
        ref = getattr(nn, cls)(4, 6, dtype=dtype, **kw)
        ref.load_state_dict(cell.state_dict())
        torch.testing.assert_close(cell(x, hx), ref(x, hx))


def test_cells_that_need_the_general_path_take_it(monkeypatch):
    taken = []
    cell_call = fast.cell_call

    def counting(cell, input, hx):
        out = cell_call(cell, input, hx)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(fast, "cell_call", counting)
    x = torch.randn(2, 4)
    rnnkit.LSTMCell(4, 6)(x)
    rnnkit.LSTMCell(4, 6, layer_norm=True)(x)
    with pytest.raises(RuntimeError, match="mat1 and mat2 must have the same dtype"):
        rnnkit.GRUCell(4, 6)(x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rnnkit.GRUCell(4, 6)(x)
    with pytest.raises(RuntimeError, match="fused: cells not supported"):
        rnnkit.RNNCell(4, 6, engine="fused")(x)
    assert taken == [True, False, False, False, False]


def test_a_cells_changed_nonlinearity_and_weights_are_seen():
    torch.manual_seed(0)
    cell = rnnkit.RNNCell(4, 6)
    ref = nn.RNNCell(4, 6, nonlinearity="relu")
    x = torch.randn(3, 4)
    with torch.no_grad():
        cell(x)
        cell.nonlinearity = "relu"
        ref.load_state_dict(cell.state_dict())
        assert torch.equal(cell(x), ref(x))
        cell.weight_hh = nn.Parameter(torch.randn(6, 6))
        cell.weight_ih.mul_(2)
        assert torch.equal(cell(x), _general(cell, x, None))
        assert not torch.equal(cell(x), ref(x))


@pytest.mark.parametrize(
    "cls, args, error, match",
    [
        P("LSTMCell", (torch.randn(2, 3),), RuntimeError, "input has inconsistent input_size",
          id="features"),
        P("GRUCell", (torch.randn(2, 4), torch.zeros(3, 6)), RuntimeError,
          "Input batch size 2 doesn't match hidden0 batch size 3", id="hx-batch"),
        P("LSTMCell", (torch.randn(2, 4), torch.zeros(2, 6)), TypeError,
          "hx must be a tuple", id="hx-not-tuple"),
        P("RNNCell", (torch.randn(2, 2, 4),), ValueError, "Expected input to be 1D or 2D",
          id="rank"),
    ],
)  # fmt: skip
def test_bad_cell_calls_raise_the_general_paths_errors(cls, args, error, match):
    cell = getattr(rnnkit, cls)(4, 6)
    with pytest.raises(error, match=match):
        cell(*args)


def test_readme_deploying_example_runs():
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Deploying on CPU", 1)[1].split("\n## ", 1)[0]
    codes = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(codes) == 3  # the fast path's, bfloat16's and int8's
    for code in codes:
        exec(compile(code, "README.md", "exec"), {})

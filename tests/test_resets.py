"""``forward(reset=)`` against its definition: each sequence cut before every reset, the
pieces run as separate sequences (the first from ``hx``, the others from zeros) and put back.

The definition runs the same module on every piece alone (:func:`by_pieces`); the call with
``reset=`` must give the same output, final states and every gradient (input, initial states,
each parameter), on every engine that runs it (:data:`RESET_ENGINES`; the Triton engine on its
persistent kernels and on its per-step ones, in Triton's interpreter without a GPU), with
``lengths=``, layers, directions, projections, ``batch_first``, unbatched input and the
variants; and refuse bad masks clearly.
"""

from __future__ import annotations

import copy
import doctest
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

import rnnkit
import rnnkit.resets
from parity import assert_engine_close, truth_of

_CLASSES = {"LSTM": rnnkit.LSTM, "GRU": rnnkit.GRU, "RNN_TANH": rnnkit.RNN, "RNN_RELU": rnnkit.RNN}


@dataclass(frozen=True)
class ResetCase:
    mode: str = "LSTM"
    L: int = 7
    N: int = 3
    num_layers: int = 1
    bidirectional: bool = False
    proj: bool = False
    batch_first: bool = False
    hx: bool = True
    lengths: bool = False
    unbatched: bool = False
    variant: tuple = ()
    dtype: torch.dtype = torch.float64
    engine: str = "auto"
    device: str = "cpu"

    def module(self) -> torch.nn.Module:
        torch.manual_seed(0)
        kwargs = dict(
            num_layers=self.num_layers,
            bidirectional=self.bidirectional,
            batch_first=self.batch_first,
            engine=self.engine,
            **dict(self.variant),
        )
        if self.mode.startswith("RNN"):
            kwargs["nonlinearity"] = "relu" if self.mode == "RNN_RELU" else "tanh"
        if self.proj:
            kwargs["proj_size"] = 3
        return _CLASSES[self.mode](4, 5, **kwargs).to(self.device, self.dtype).eval()

    def inputs(self, module) -> dict:
        """x, hx, reset (in the module's layout) and lengths, drawn from a fixed seed: a reset
        at step 0 of one sequence, two inside another, none in the last."""
        gen = torch.Generator().manual_seed(1)
        L, N = self.L, 1 if self.unbatched else self.N
        D = 2 if self.bidirectional else 1
        x = torch.randn(L, N, 4, generator=gen, dtype=self.dtype)
        reset = torch.zeros(L, N, dtype=torch.bool)
        reset[0, 0] = reset[3, 0] = True
        if N > 1:
            reset[2, 1] = reset[L - 1, 1] = True
        lengths = [L, L - 2, 2][:N] if self.lengths else None
        hx = None
        if self.hx:
            H_out = 3 if self.proj else 5
            h = torch.randn(self.num_layers * D, N, H_out, generator=gen, dtype=self.dtype)
            c = torch.randn(self.num_layers * D, N, 5, generator=gen, dtype=self.dtype)
            h, c = h.to(self.device), c.to(self.device)
            hx = (h, c) if self.mode == "LSTM" else h
        x, reset = x.to(self.device), reset.to(self.device)
        return {"x": x, "hx": hx, "reset": reset, "lengths": lengths}


def _layout(t: Tensor, case: ResetCase) -> Tensor:
    """A time-major ``[L, N(, F)]`` tensor in the case's layout."""
    if case.unbatched:
        return t[:, 0]
    return t.transpose(0, 1) if case.batch_first else t


def _states(hx):
    return list(hx) if isinstance(hx, tuple) else [hx]


def _named(case, module, x, hx, out, final) -> dict[str, Tensor]:
    """Output, final states and every gradient of a fixed weighted sum of them."""
    gen = torch.Generator().manual_seed(2)
    finals = _states(final)
    loss = (out * torch.randn(out.shape, generator=gen, dtype=out.dtype).to(out.device)).sum()
    for f in finals:
        weights = torch.randn(f.shape, generator=gen, dtype=f.dtype).to(f.device)
        loss = loss + (f * weights).sum()
    leaves = {"x": x, **{f"hx{i}": s for i, s in enumerate(_states(hx)) if s is not None}}
    leaves.update(dict(module.named_parameters()))
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    named = {"output": out.detach(), **{f"state{i}": f.detach() for i, f in enumerate(finals)}}
    for (name, leaf), g in zip(leaves.items(), grads, strict=True):
        named[f"grad_{name}"] = torch.zeros_like(leaf) if g is None else g
    return named


def _leaves(inputs: dict) -> tuple[Tensor, object]:
    x = inputs["x"].clone().requires_grad_()
    hx = inputs["hx"]
    if hx is not None:
        hx = tuple(s.clone().requires_grad_() for s in _states(hx))
        hx = hx if len(hx) == 2 else hx[0]
    return x, hx


def with_reset(case: ResetCase, module, inputs: dict) -> dict[str, Tensor]:
    """The call under test: one forward with ``reset=``."""
    x, hx = _leaves(inputs)
    state = hx
    if case.unbatched and hx is not None:
        state = tuple(s[:, 0] for s in _states(hx)) if case.mode == "LSTM" else hx[:, 0]
    kwargs = {"reset": _layout(inputs["reset"], case)}
    if inputs["lengths"] is not None:
        kwargs["lengths"] = inputs["lengths"]
    out, final = module(_layout(x, case), state, **kwargs)
    if case.unbatched:
        out = out.unsqueeze(1)
        final = tuple(f.unsqueeze(1) for f in _states(final))
    elif case.batch_first:
        out = out.transpose(0, 1)
    final = tuple(_states(final)) if case.mode == "LSTM" else _states(final)[0]
    return _named(case, module, x, hx, out, final)


def by_pieces(case: ResetCase, module, inputs: dict) -> dict[str, Tensor]:
    """The definition: every sequence cut before each reset, each piece run alone (the first
    from its ``hx`` rows, the others from zeros), the outputs put back in place (zeros past a
    sequence's length); the forward direction's final state from the last piece, a reverse
    direction's from the piece at step 0."""
    x, hx = _leaves(inputs)
    reset, lengths = inputs["reset"], inputs["lengths"]
    L, N = x.shape[:2]
    D = 2 if case.bidirectional else 1
    columns, finals = [], []
    for n in range(N):
        end = L if lengths is None else lengths[n]
        cuts = [t for t in range(end) if reset[t, n]]
        bounds = [0, *cuts, end] if not cuts or cuts[0] != 0 else [*cuts, end]
        pieces, first_final, last_final = [], None, None
        for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            if a == b:
                continue
            start = None
            if k == 0 and a == 0 and hx is not None and not reset[0, n]:
                rows = [s[:, n : n + 1] for s in _states(hx)]
                start = tuple(rows) if case.mode == "LSTM" else rows[0]
            piece = x[a:b, n : n + 1]
            y, final = module(piece.transpose(0, 1) if case.batch_first else piece, start)
            pieces.append(y.transpose(0, 1) if case.batch_first else y)
            first_final = final if first_final is None else first_final
            last_final = final
        width = pieces[0].size(-1)
        pad = x.new_zeros(L - end, 1, width)
        columns.append(torch.cat([*pieces, pad]))
        # per layer, direction 0 from the last piece, direction 1 from the first
        parts = []
        for s_first, s_last in zip(_states(first_final), _states(last_final), strict=True):
            rows = [(s_last if i % D == 0 else s_first)[i : i + 1] for i in range(s_last.size(0))]
            parts.append(torch.cat(rows))
        finals.append(parts)
    out = torch.cat(columns, 1)
    final = [torch.cat([f[i] for f in finals], 1) for i in range(len(finals[0]))]
    final = tuple(final) if case.mode == "LSTM" else final[0]
    return _named(case, module, x, hx, out, final)


# the engines that run reset= (every engine; auto picks the fused one on CPU)
RESET_ENGINES = ["reference", "fused", "triton"]
# where each engine runs here: the Triton engine on CUDA, else in Triton's interpreter on CPU
# tensors (the triton_interpreter fixture)
_DEVICES = {"triton": "cuda" if torch.cuda.is_available() else "cpu"}
_FIXTURES = {"triton": "triton_interpreter"}


@pytest.fixture(autouse=True)
def _engine_fixture(request):
    """The fixture that the test's ``engine`` parameter needs (:data:`_FIXTURES`)."""
    callspec = getattr(request.node, "callspec", None)
    engine = callspec.params.get("engine") if callspec is not None else None
    if engine in _FIXTURES:
        request.getfixturevalue(_FIXTURES[engine])


CASES = [
    ResetCase(),
    ResetCase(dtype=torch.float32),
    ResetCase(mode="GRU", hx=False),
    ResetCase(mode="RNN_TANH", batch_first=True),
    ResetCase(mode="RNN_RELU", dtype=torch.float32),
    ResetCase(num_layers=2, bidirectional=True),
    ResetCase(mode="GRU", num_layers=2, bidirectional=True, dtype=torch.float32),
    ResetCase(proj=True, bidirectional=True, batch_first=True),
    ResetCase(lengths=True),
    ResetCase(mode="GRU", lengths=True, bidirectional=True, batch_first=True),
    ResetCase(proj=True, lengths=True, num_layers=2, dtype=torch.float32),
    ResetCase(unbatched=True),
    ResetCase(mode="GRU", unbatched=True, batch_first=True, bidirectional=True),
    ResetCase(variant=(("layer_norm", True), ("peephole", True))),
    ResetCase(variant=(("layer_norm", True),), bidirectional=True, dtype=torch.float32),
    ResetCase(variant=(("zoneout", 0.2),), lengths=True),
    ResetCase(
        variant=(("zoneout", 0.2), ("peephole", True)),
        proj=True,
        bidirectional=True,
        dtype=torch.float32,
    ),
]


def _id(case: ResetCase) -> str:
    default = ResetCase()
    parts = [case.mode]
    for field in (
        "num_layers",
        "bidirectional",
        "proj",
        "batch_first",
        "hx",
        "lengths",
        "unbatched",
    ):
        value = getattr(case, field)
        if value != getattr(default, field):
            parts.append(f"{field}={value}")
    parts += [f"{k}" for k, _ in case.variant]
    parts.append(str(case.dtype).removeprefix("torch."))
    return "-".join(parts)


def _takes_persistent(case: ResetCase) -> bool:
    """Whether the Triton engine's persistent kernels run the case's directions (by
    default): plain layers without projection on equal lengths."""
    return not (case.proj or case.lengths or case.variant)


def _engine_params() -> list:
    """``(case, engine, kernels)`` of every case on every engine of :data:`RESET_ENGINES` and
    "auto"; ``kernels`` the Triton engine's (``RNNKIT_TRITON_PERSISTENT``): the persistent
    ones where they run the case, and the per-step ones on every case."""
    params = []
    for case in CASES:
        for engine in [*RESET_ENGINES, "auto"]:
            kernels = [None]
            if engine == "triton":
                kernels = ["persistent", "per-step"] if _takes_persistent(case) else ["per-step"]
            for k in kernels:
                name = engine if k is None else f"{engine}-{k}"
                params.append(pytest.param(case, engine, k, id=f"{_id(case)}-{name}"))
    return params


@pytest.mark.parametrize(("case", "engine", "kernels"), _engine_params())
def test_reset_equals_running_the_pieces_apart(case, engine, kernels, monkeypatch):
    if kernels is not None:
        monkeypatch.setenv("RNNKIT_TRITON_PERSISTENT", "1" if kernels == "persistent" else "0")
    _check_pieces(ResetCase(**{**case.__dict__, "engine": engine}))


def _check_pieces(case: ResetCase) -> None:
    """The case's call with ``reset=`` on its engine, on the engine's device, against the
    definition run on the reference engine."""
    case = ResetCase(**{**case.__dict__, "device": _DEVICES.get(case.engine, "cpu")})
    module = case.module()
    inputs = case.inputs(module)
    pieces = copy.deepcopy(module)
    pieces.engine = "reference"
    expected = by_pieces(case, pieces, inputs)
    actual = with_reset(case, module, inputs)
    truth = truth_of(lambda m, i: by_pieces(case, m, i), pieces, inputs)
    assert_engine_close(
        expected, actual, truth, title=f"reset= differs from the pieces ({_id(case)})"
    )


@pytest.mark.parametrize("engine", ["triton"])
@pytest.mark.parametrize(
    "case",
    [
        ResetCase(mode="GRU", bidirectional=True, lengths=True),
        ResetCase(proj=True, bidirectional=True, dtype=torch.float32),
        ResetCase(variant=(("layer_norm", True), ("zoneout", 0.2)), bidirectional=True),
    ],
    ids=_id,
)
def test_triton_tiles_smaller_than_a_step(case, engine, monkeypatch):
    """The Triton engine's per-step kernels, the restarts' included, with several programs
    per step and partial tiles in rows and units (whole rows where layer_norm needs them)."""
    from rnnkit.engines.triton import launch

    monkeypatch.setenv("RNNKIT_TRITON_PERSISTENT", "0")
    monkeypatch.setattr(launch, "_MAX_BLOCK_H", 4)
    monkeypatch.setattr(launch, "_TILE", 8)
    _check_pieces(ResetCase(**{**case.__dict__, "engine": engine}))


@pytest.mark.parametrize("engine", [e for e in RESET_ENGINES if e != "reference"])
@pytest.mark.parametrize(
    "case",
    [
        ResetCase(bidirectional=True, lengths=True),
        ResetCase(mode="GRU", bidirectional=True),
        ResetCase(variant=(("peephole", True),), bidirectional=True),
    ],
    ids=_id,
)
def test_double_and_batched_backward_keep_the_resets(case, engine):
    """``create_graph=True`` and ``is_grads_batched=True``, which a fast engine may recompute
    on torch ops, give the reference engine's gradients with resets too."""
    case = ResetCase(**{**case.__dict__, "engine": engine, "device": _DEVICES.get(engine, "cpu")})
    module = case.module()
    inputs = case.inputs(module)
    reference = copy.deepcopy(module)
    reference.engine = "reference"
    runs = []
    for m in (reference, module):
        x, hx = _leaves(inputs)
        kwargs = {"reset": inputs["reset"], "lengths": inputs["lengths"]}
        out, _ = m(x, hx, **kwargs)
        params = list(m.parameters())
        grads = torch.autograd.grad(out.sin().sum(), [x, *params], create_graph=True)
        second = torch.autograd.grad(sum(g.square().sum() for g in grads), [x, *params])
        gen = torch.Generator().manual_seed(3)
        v = torch.randn(2, *out.shape, generator=gen, dtype=out.dtype).to(out.device)
        out, _ = m(x, hx, **kwargs)
        batched = torch.autograd.grad(out, [x, *_states(hx)], v, is_grads_batched=True)
        runs.append([*second, *batched])
    for e, a in zip(*runs, strict=True):
        torch.testing.assert_close(a, e)


def test_step_and_chunks_with_resets_equal_the_whole_call():
    """Streaming: a reset in a chunk, or in ``step``, as in one call over the whole sequence."""
    case = ResetCase(num_layers=2)
    module = case.module()
    inputs = case.inputs(module)
    x, hx, reset = inputs["x"], inputs["hx"], inputs["reset"]
    whole, final = module(x, hx, reset=reset)
    outs, state = [], hx
    for a, b in ((0, 3), (3, 4), (4, 7)):
        out, state = module(x[a:b], state, reset=reset[a:b])
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs), whole)
    steps, state = [], hx
    for t in range(x.size(0)):
        out, state = module.step(x[t], state, reset=reset[t])
        steps.append(out)
    torch.testing.assert_close(torch.stack(steps), whole)
    torch.testing.assert_close(state, final)


@pytest.mark.parametrize("engine", RESET_ENGINES)
def test_an_all_false_reset_changes_nothing(engine):
    device = _DEVICES.get(engine, "cpu")
    module = ResetCase(num_layers=2, bidirectional=True, engine=engine, device=device).module()
    x = torch.randn(6, 3, 4, dtype=torch.float64, device=device)
    plain = module(x)
    with_mask = module(x, reset=torch.zeros(6, 3, dtype=torch.bool, device=device))
    torch.testing.assert_close(with_mask, plain, rtol=0, atol=0)


@pytest.mark.parametrize("engine", ["reference", "fused"])
@pytest.mark.parametrize(
    "case",
    [ResetCase(mode="GRU", dtype=torch.float32), ResetCase(variant=(("layer_norm", True),))],
    ids=_id,
)
def test_resets_under_vmap_and_compile(case, engine):
    module = ResetCase(**{**case.__dict__, "engine": engine}).module()
    x = torch.randn(5, 7, 3, 4, dtype=case.dtype)
    reset = torch.rand(5, 7, 3) < 0.3
    looped = torch.stack([module(x[i], reset=reset[i])[0] for i in range(5)])
    mapped = torch.func.vmap(lambda xi, ri: module(xi, reset=ri)[0])(x, reset)
    torch.testing.assert_close(mapped, looped)
    compiled = torch.compile(lambda xi, ri: module(xi, reset=ri)[0], fullgraph=True)
    torch.testing.assert_close(compiled(x[0], reset[0]), looped[0])

    # and each sample's input gradient under vmap (torch.no_grad: the module's parameters are
    # leaves that torch.autograd tracks, which the fused engine refuses under torch.func.grad)
    def grad_x(xi, ri):
        return torch.func.grad(lambda v: module(v, reset=ri)[0].square().sum())(xi)

    with torch.no_grad():
        looped = torch.stack([grad_x(x[i], reset[i]) for i in range(5)])
        torch.testing.assert_close(torch.func.vmap(grad_x)(x, reset), looped)


@pytest.mark.parametrize(
    ("reset", "error", "match"),
    [
        ([True] * 6, TypeError, "reset must be a bool Tensor, got list"),
        (torch.zeros(6, 2), RuntimeError, "reset must be a bool tensor, got dtype torch.float32"),
        (
            torch.zeros(2, 6, dtype=torch.bool),
            RuntimeError,
            r"reset must have shape \[L, N\] = \[6, 2\] to match the input, got \[2, 6\]",
        ),
        (
            torch.zeros(6, dtype=torch.bool),
            RuntimeError,
            r"reset must have shape \[L, N\] = \[6, 2\]",
        ),
    ],
)
def test_bad_resets_are_refused(reset, error, match):
    with pytest.raises(error, match=match):
        rnnkit.LSTM(4, 5)(torch.randn(6, 2, 4), reset=reset)


def test_bad_resets_of_other_layouts_and_calls_are_refused():
    gru = rnnkit.GRU(4, 5, batch_first=True)
    with pytest.raises(RuntimeError, match=r"GRU: reset must have shape \[N, L\] = \[2, 6\]"):
        gru(torch.randn(2, 6, 4), reset=torch.zeros(6, 2, dtype=torch.bool))
    with pytest.raises(RuntimeError, match=r"reset must have shape \[L\] = \[6\]"):
        gru(torch.randn(6, 4), reset=torch.zeros(6, 1, dtype=torch.bool))
    packed = torch.nn.utils.rnn.pack_sequence([torch.randn(3, 4), torch.randn(2, 4)])
    with pytest.raises(ValueError, match="reset cannot be given with a PackedSequence input"):
        gru(packed, reset=torch.zeros(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="reset cannot be given with a packed input"):
        rnnkit.functional.gru(
            packed, list(gru._flat_weights), reset=torch.zeros(5, dtype=torch.bool)
        )
    with pytest.raises(RuntimeError, match=r"GRU.step: reset must have shape \[N\] = \[2\]"):
        gru.step(torch.randn(2, 4), reset=torch.zeros(1, 2, dtype=torch.bool))
    with pytest.raises(RuntimeError, match=r"reset must have shape \[L, N\] = \[6, 2\]"):
        rnnkit.LSTM(4, 5)(
            torch.randn(6, 2, 4), reset=torch.zeros(6, 3, dtype=torch.bool), lengths=[6, 2]
        )


def test_equals_torchrl_lstm_module_on_its_is_init():
    """torchrl's LSTMModule cuts its rollouts at ``is_init`` in Python; rnnkit's layer with
    ``reset=is_init`` gives its output in one call."""
    tensordict = pytest.importorskip("tensordict")
    torchrl_modules = pytest.importorskip("torchrl.modules")
    torch.manual_seed(0)
    N, T, F, H = 3, 8, 4, 6
    policy = torchrl_modules.LSTMModule(input_size=F, hidden_size=H, in_key="embed", out_key="out")
    x = torch.randn(N, T, F)
    is_init = torch.zeros(N, T, 1, dtype=torch.bool)
    is_init[:, 0] = is_init[0, 3] = is_init[1, 5] = is_init[2, 7] = True
    zeros = torch.zeros(N, T, 1, H)
    td = tensordict.TensorDict(
        {"embed": x, "is_init": is_init, "recurrent_state_h": zeros, "recurrent_state_c": zeros},
        batch_size=[N, T],
    )
    with torchrl_modules.set_recurrent_mode(True):
        expected = policy(td)["out"]
    layer = rnnkit.LSTM(F, H, batch_first=True)
    layer.load_state_dict(policy.lstm.state_dict())
    out, _ = layer(x, reset=is_init[..., 0])
    torch.testing.assert_close(out, expected)


def test_examples_run():
    runner = doctest.DocTestRunner()
    tests = doctest.DocTestFinder().find(rnnkit.resets, globs={"torch": torch, "rnnkit": rnnkit})
    assert sum(len(t.examples) for t in tests) > 0
    for test in tests:
        runner.run(test)
    assert runner.failures == 0

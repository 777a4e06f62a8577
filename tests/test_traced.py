"""``rnnkit.portable()``: layers traced as core ATen ops in torch's ``scan``, so that an exported
program holds no rnnkit op; run by ``torch.export``'s own module, an AOTInductor package and
ExecuTorch's runtime, against eager.

``torch.export`` programs keep the sequence length and the batch symbolic (exported at
``L=10, N=3``, run at :data:`export_cases.SIZES`). ExecuTorch's programs keep the length
symbolic up to a bound and the batch static (its ``scan`` does not resize its carries, and its
lowering of ``chunk`` fixes the batch), as do AOTInductor's packages of them (Inductor fails
on a ``scan`` whose carry has a symbolic batch); so each is exported at one batch and run at
two lengths, some at two batches.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.export import Dim
from torch.nn.utils.rnn import pack_padded_sequence

import rnnkit
from export_cases import (
    SIZES,
    cells_case,
    check,
    flat,
    head_case,
    reset_case,
    tagger_case,
)

P = pytest.param

CASES = [
    P(lambda: head_case(rnnkit.LSTM(4, 8)), id="LSTM"),
    P(lambda: head_case(rnnkit.GRU(4, 8, num_layers=2)), id="GRU-2layers"),
    P(lambda: head_case(rnnkit.RNN(4, 8, nonlinearity="relu", bidirectional=True)),
      id="RNN-relu-bidir"),
    P(lambda: head_case(rnnkit.LSTM(4, 8, peephole=True, bidirectional=True, batch_first=True)),
      id="LSTM-peephole-bidir-batch_first"),
    P(lambda: head_case(rnnkit.LSTM(4, 8, 2, proj_size=3, bidirectional=True)),
      id="LSTM-proj-bidir-2layers"),
    P(lambda: head_case(rnnkit.LSTM(4, 8, layer_norm=True)), id="LSTM-layer_norm"),
    P(lambda: head_case(rnnkit.LSTM(4, 8, bidirectional=True).double()), id="LSTM-bidir-float64"),
    P(lambda: head_case(rnnkit.GRU(4, 8, num_layers=2, zoneout=0.2)), id="GRU-zoneout-2layers"),
    P(lambda: head_case(rnnkit.LSTM(4, 8, 2, proj_size=3, layer_norm=True, peephole=True,
                                    coupled_input_forget=True, zoneout=0.1, gate_clip=3.0,
                                    activations=("hard_sigmoid", "tanh", "softsign"))),
      id="LSTM-every-variant-2layers"),
    P(reset_case, id="LSTM-bidir-reset"),
    P(cells_case, id="cells"),
    P(tagger_case, id="Embedding-LSTM-proj-bidir-2layers-Linear"),
]  # fmt: skip


def _export(model: nn.Module, args: tuple, dims) -> torch.export.ExportedProgram:
    with rnnkit.portable():
        program = torch.export.export(model, args, dynamic_shapes=dims)
    # the program's graph and its scan's subgraphs
    code = "".join(getattr(m, "code", "") for m in program.graph_module.modules())
    assert "rnnkit" not in code, "an rnnkit op is left in the program"
    return program


def _length_only(dims, max_len: int | None = None):
    """``dims`` with the length alone symbolic (at most ``max_len``), the batch static."""
    L = Dim("L", min=1, max=max_len) if max_len else Dim("L")
    return torch.utils._pytree.tree_map(lambda d: L if d.__name__ == "L" else None, dims)


@pytest.mark.parametrize("make", CASES)
def test_torch_export_under_portable_holds_no_rnnkit_op(make):
    torch.manual_seed(0)
    model, inputs, dims = make()
    model.eval()
    program = _export(model, inputs(10, 3), dims)
    for L, N in SIZES:
        args = inputs(L, N)
        with torch.no_grad():
            got = flat(program.module()(*args))
        check(got, model, args, f"the exported program differs from eager at L{L}-N{N}")


@pytest.mark.parametrize(
    "make",
    [
        P(lambda: head_case(rnnkit.LSTM(4, 8, 2, proj_size=3, bidirectional=True)),
          id="LSTM-proj-bidir-2layers-lengths"),
        P(reset_case, id="LSTM-bidir-reset"),
    ],
)  # fmt: skip
def test_aot_inductor_package_of_a_portable_program(make, tmp_path):
    """A package that calls no rnnkit op (``lengths=`` and ``reset=`` included, which the
    fused op's route refuses), its length symbolic: torch 2.13's Inductor fails on a ``scan``
    whose carry has a symbolic batch (``KeyError`` of the batch's symbol), so the batch is
    static."""
    torch.manual_seed(0)
    model, inputs, dims = make()
    model.eval()
    program = _export(model, inputs(10, 3), _length_only(dims))
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "m.pt2"))
    compiled = torch._inductor.aoti_load_package(str(path))
    for L, N in [(13, 3), (5, 3)]:
        args = inputs(L, N)
        with torch.no_grad():
            got = flat(compiled(*args))
        check(got, model, args, f"the AOTInductor package differs from eager at L{L}-N{N}")


def test_eager_calls_under_portable_equal_the_engines_and_the_flag_is_restored():
    torch.manual_seed(0)
    model = rnnkit.LSTM(4, 8, 2, proj_size=3, bidirectional=True).eval()
    x = torch.randn(7, 3, 4)
    with torch.no_grad():
        want = flat(model(x))
        with pytest.raises(ZeroDivisionError), rnnkit.portable():
            assert rnnkit.traced.is_portable()
            got = flat(model(x))
            1 / 0  # noqa: B018
    assert not rnnkit.traced.is_portable()
    check(got, model, (x,), "an eager call under portable() differs from the engine's")
    assert all(torch.equal(a, b) for a, b in zip(flat(model(x)), want, strict=True))


class Packed(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = rnnkit.LSTM(4, 6)

    def forward(self, x, lengths):
        return self.lstm(pack_padded_sequence(x, lengths, enforce_sorted=False))[1][0]


def test_packed_input_and_random_draws_raise():
    with pytest.raises(NotImplementedError, match="pass the padded input with lengths="):
        _export(Packed().eval(), (torch.randn(5, 2, 4), torch.tensor([5, 3])), None)
    model = rnnkit.LSTM(4, 6, zoneout=0.1).train()
    with pytest.raises(NotImplementedError, match="export the model in eval mode"):
        _export(model, (torch.randn(5, 2, 4),), None)


EXECUTORCH_CASES = [
    P(lambda: head_case(rnnkit.LSTM(4, 8)), 2, id="LSTM-N2"),
    P(lambda: head_case(rnnkit.LSTM(4, 8)), 4, id="LSTM-N4"),
    P(lambda: head_case(rnnkit.GRU(4, 8, num_layers=2)), 3, id="GRU-2layers-N3"),
    P(lambda: head_case(rnnkit.LSTM(4, 8, 2, proj_size=3, bidirectional=True)), 2,
      id="LSTM-proj-bidir-2layers-lengths-N2"),
    P(lambda: head_case(rnnkit.LSTM(4, 8, layer_norm=True)), 3, id="LSTM-layer_norm-N3"),
    P(reset_case, 2, id="LSTM-bidir-reset-N2"),
    P(cells_case, 3, id="cells-N3"),
    P(tagger_case, 1, id="Embedding-LSTM-proj-bidir-2layers-Linear-N1"),
    P(tagger_case, 4, id="Embedding-LSTM-proj-bidir-2layers-Linear-N4"),
]  # fmt: skip


@pytest.mark.parametrize("make, N", EXECUTORCH_CASES)
def test_executorch_runs_a_portable_program(make, N):
    pytest.importorskip("executorch")
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    torch.manual_seed(0)
    model, inputs, dims = make()
    model.eval()
    program = _export(model, inputs(10, N), _length_only(dims, 64))
    lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    # the method runs in its program's memory: both are held
    executable = Runtime.get().load_program(lowered.to_executorch().buffer)
    method = executable.load_method("forward")
    for L in (13, 5):
        args = inputs(L, N)
        got = list(method.execute(list(args)))
        check(got, model, args, f"ExecuTorch's run differs from eager at L{L}-N{N}")

"""What rnnkit checks beyond torch.nn, one case per kind of mistake, with the message it gives.

Where torch.nn gives a clear error, ``test_modules_errors.py``, ``test_cell_modules.py`` and
``test_torch_module_db.py`` check that rnnkit gives the same. The cases here are the ones torch
lets through to a kernel, where it crashes (``nn.LSTM`` on a ``PackedSequence`` with a ``c_0``
of the wrong number of layers: a segfault on torch 2.13's CPU build), fails with a message about
the kernel's internals, or returns a result computed from a malformed input. Each must raise
from rnnkit's own checks, before any engine runs; ``test_fuzz.py`` draws many more.
"""

import warnings

import pytest
import torch
from torch.nn import Parameter
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import rnnkit
import rnnkit.functional as RF
from malformed import raised_by_checks
from rnnkit.cli.main import main


def randn(*shape, dtype=torch.float32):
    return torch.randn(shape, dtype=dtype)


def packed(L=4, N=3, H_in=5, lengths=None, enforce_sorted=True):
    lengths = torch.arange(L, L - N, -1) if lengths is None else torch.tensor(lengths)
    return pack_padded_sequence(randn(L, N, H_in), lengths, enforce_sorted=enforce_sorted)


def raw_packed(data, batch_sizes, sorted_indices=None, unsorted_indices=None):
    # past PackedSequence's constructor, as a hand-built or deserialized one may be
    return tuple.__new__(PackedSequence, (data, batch_sizes, sorted_indices, unsorted_indices))


def with_parameter(module, name, value):
    setattr(module, name, value)
    return module


def lstm(engine, **kwargs):
    return rnnkit.LSTM(5, 7, 2, engine=engine, **kwargs)


X = randn(4, 3, 5)
H = randn(2, 3, 7)
HC = (randn(2, 3, 7), randn(2, 3, 7))

# (id, call(engine), exception type, message regex); modules: input_size 5, hidden_size 7, 2 layers
LAYER_CASES = [
    # torch: segfault (packed input skips nn.LSTM's checks, ATen reads past c_0)
    (
        "packed-c0-layers",
        lambda e: lstm(e)(packed(), (randn(2, 3, 7), randn(1, 3, 7))),
        RuntimeError,
        r"Expected hidden\[1\] size \(2, 3, 7\), got \[1, 3, 7\]",
    ),
    # torch: "mat1 and mat2 shapes cannot be multiplied (9x6 and 5x28)"
    (
        "packed-features",
        lambda e: lstm(e)(packed(H_in=6)),
        RuntimeError,
        r"input.size\(-1\) must be equal to input_size. Expected 5, got 6",
    ),
    # torch (one layer): "index 1 is out of bounds for dimension 0 with size 1"
    (
        "lstm-bare-hx",
        lambda e: rnnkit.LSTM(5, 7, engine=e)(X, randn(1, 3, 7)),
        RuntimeError,
        r"LSTM expects hx to be a tuple \(h_0, c_0\), got Tensor",
    ),
    # torch: AttributeError: 'NoneType' object has no attribute 'dim'
    ("lstm-c-none", lambda e: lstm(e)(X, (H, None)), TypeError, r"hx\[1\] must be a Tensor"),
    (
        "gru-hx-list",
        lambda e: rnnkit.GRU(5, 7, engine=e)(X, [H[:1]]),
        TypeError,
        r"GRU: hx must be a Tensor",
    ),
    # torch: "get_mkldnn_dtype: unsupported data type" or a GEMM dtype error
    (
        "c-float64",
        lambda e: lstm(e)(X, (H, H.double())),
        RuntimeError,
        r"hx\[1\] dtype \(torch.float64\) does not match input dtype \(torch.float32\)",
    ),
    (
        "h-int",
        lambda e: rnnkit.GRU(5, 7, 2, engine=e)(X, H.long()),
        RuntimeError,
        r"hx dtype \(torch.int64\)",
    ),
    # torch: "reshape is not implemented for sparse tensors"
    ("input-sparse", lambda e: lstm(e)(X.to_sparse()), RuntimeError, r"layout torch.sparse_coo"),
    (
        "hx-sparse",
        lambda e: rnnkit.GRU(5, 7, 2, engine=e)(X, H.to_sparse()),
        RuntimeError,
        r"hx must be a dense",
    ),
    # torch's message; rnnkit asked autocast about the meta device first, which raised
    (
        "input-meta",
        lambda e: rnnkit.GRU(5, 7, engine=e)(X.to("meta")),
        RuntimeError,
        r"not at the same device, found input tensor at meta and parameter tensor at cpu",
    ),
    # torch: "start (9) + length (1) exceeds dimension size (9)"
    (
        "lengths-past-the-sequence",
        lambda e: lstm(e)(packed(lengths=[6, 3, 2])),
        RuntimeError,
        r"batch_sizes sum to 11 but the packed data has 9 rows",
    ),
    # torch: runs, as if the sequences were shorter
    (
        "batch-sizes-zero",
        lambda e: rnnkit.GRU(5, 7, engine=e)(raw_packed(randn(7, 5), torch.tensor([4, 3, 0]))),
        RuntimeError,
        r"batch_sizes must be positive, got 0 at position 2",
    ),
    (
        "batch-sizes-increasing",
        lambda e: rnnkit.GRU(5, 7, engine=e)(raw_packed(randn(9, 5), torch.tensor([2, 3, 4]))),
        RuntimeError,
        r"batch_sizes must be non-increasing, got 3 at position 1 after 2",
    ),
    # torch: "expected scalar type Long but found Int"
    (
        "batch-sizes-int32",
        lambda e: rnnkit.GRU(5, 7, engine=e)(
            raw_packed(randn(9, 5), torch.tensor([4, 3, 2], dtype=torch.int32))
        ),
        RuntimeError,
        r"batch_sizes must be a 1-D int64 CPU tensor, got a 1-D torch.int32 tensor on cpu",
    ),
    (
        "batch-sizes-list",
        lambda e: rnnkit.GRU(5, 7, engine=e)(raw_packed(randn(9, 5), [4, 3, 2])),
        TypeError,
        r"batch_sizes must be a Tensor, got list",
    ),
    # torch: "INDICES element is out of DATA bounds, id=5 axis_dim=3"
    (
        "sorted-indices-range",
        lambda e: rnnkit.GRU(5, 7, engine=e)(
            raw_packed(
                randn(9, 5),
                torch.tensor([4, 3, 2]),
                torch.tensor([0, 1, 2, 5]),
                torch.tensor([0, 1, 2, 3]),
            ),
            torch.zeros(1, 4, 7),
        ),  # fmt: skip
        RuntimeError,
        r"sorted_indices must be a permutation of range\(4\)",
    ),
    (
        "unsorted-not-inverse",
        lambda e: rnnkit.GRU(5, 7, engine=e)(
            raw_packed(
                randn(9, 5),
                torch.tensor([4, 3, 2]),
                torch.tensor([1, 0, 2, 3]),
                torch.tensor([0, 1, 3, 2]),
            ),
        ),  # fmt: skip
        RuntimeError,
        r"unsorted_indices must be the inverse permutation of sorted_indices",
    ),
    # torch: runs on the first 3 of the 4 state rows, after sorting them
    (
        "unsorted-packed-h-batch",
        lambda e: rnnkit.GRU(5, 7, engine=e)(
            packed(lengths=[2, 4, 3], enforce_sorted=False), randn(1, 4, 7)
        ),
        RuntimeError,
        r"Expected hidden size \(1, 3, 7\), got \[1, 4, 7\]",
    ),
    # torch: the fused engine read past the weight (a heap corruption) or ran on the wrong rows
    (
        "weight-hh-shape",
        lambda e: with_parameter(lstm(e), "weight_hh_l0", Parameter(randn(28, 2)))(X),
        RuntimeError,
        r"LSTM: weight_hh_l0 must have shape \(28, 7\) for the module's sizes, got \(28, 2\)",
    ),
    (
        "bias-none",
        lambda e: with_parameter(lstm(e), "bias_hh_l1", None)(X),
        TypeError,
        r"LSTM: bias_hh_l1 must be a Tensor, got NoneType",
    ),
    (
        "variant-parameter-dtype",
        lambda e: with_parameter(
            lstm(e, peephole=True), "peephole_l1", Parameter(torch.zeros(21, dtype=torch.float64))
        )(X),
        RuntimeError,
        r"peephole_l1 dtype \(torch.float64\) does not match weight_ih_l0's \(torch.float32\)",
    ),
]

W = list(torch.nn.LSTM(5, 7, 2)._flat_weights)
FUNCTIONAL_CASES = [
    (
        "weights-not-a-list",
        lambda e: RF.lstm(X, W[0], num_layers=2, engine=e),
        TypeError,
        r"list of Tensors",
    ),
    (
        "weight-none",
        lambda e: RF.lstm(X, [*W[:5], None, *W[6:]], num_layers=2, engine=e),
        TypeError,
        r"weight_hh_l1 \(weights\[5\]\) must be a Tensor, got NoneType",
    ),
    (
        "weight-shape",
        lambda e: RF.lstm(X, [*W[:6], randn(27), W[7]], num_layers=2, engine=e),
        RuntimeError,
        r"bias_ih_l1 must have shape \(28,\), got \(27,\)",
    ),
    (
        "weight-int",
        lambda e: RF.gru(X, [w.long() for w in torch.nn.GRU(5, 7)._flat_weights], engine=e),
        RuntimeError,
        r"weight_ih_l0 must be a floating-point tensor, got dtype torch.int64",
    ),
    (
        "num-layers-zero",
        lambda e: RF.lstm(X, W, num_layers=0, engine=e),
        ValueError,
        r"greater than zero",
    ),
    (
        "dropout-range",
        lambda e: RF.lstm(X, W, num_layers=2, dropout=1.5, engine=e),
        ValueError,
        r"got 1.5",
    ),
    (
        "lstm-hx-tensor",
        lambda e: RF.lstm(X, W, H, num_layers=2, engine=e),
        TypeError,
        r"got Tensor",
    ),
    (
        "batch-sizes-keyword",
        lambda e: RF.gru(
            randn(9, 5),
            list(torch.nn.GRU(5, 7)._flat_weights),
            batch_sizes=torch.tensor([5, 5]),
            engine=e,
        ),
        RuntimeError,
        r"batch_sizes sum to 10 but the packed data has 9 rows",
    ),  # fmt: skip
    (
        "cell-int-weights",
        lambda e: RF.gru_cell(
            *(torch.ones(*shape, dtype=torch.long) for shape in [(3, 5), (3, 7), (21, 5), (21, 7)]),
            engine=e,
        ),
        RuntimeError,
        r"weight_ih must be a floating-point tensor, got dtype torch.int64",
    ),
    # torch: broadcasts the bias over every gate
    (
        "cell-bias-shape",
        lambda e: RF.gru_cell(
            randn(3, 5), randn(3, 7), randn(21, 5), randn(21, 7), randn(1), None, engine=e
        ),
        RuntimeError,
        r"bias_ih must have shape \(21,\), got \(1,\)",
    ),
]

CELL_CASES = [
    # torch: AttributeError: 'str' object has no attribute 'dim'
    (
        "input-str",
        lambda e: rnnkit.LSTMCell(5, 7, engine=e)("x"),
        TypeError,
        r"LSTMCell: input must be a Tensor",
    ),
    (
        "gru-hx-tuple",
        lambda e: rnnkit.GRUCell(5, 7, engine=e)(randn(3, 5), (randn(3, 7),)),
        TypeError,
        r"GRUCell: hx must be a Tensor, got tuple",
    ),
    # torch: unbatched input takes the rows of a [2, 7] tensor as (h, c)
    (
        "lstm-hx-tensor",
        lambda e: rnnkit.LSTMCell(5, 7, engine=e)(randn(5), randn(2, 7)),
        TypeError,
        r"LSTMCell: hx must be a tuple \(h, c\) of Tensors, got Tensor",
    ),
    # torch: returns a float64 c and h from float32 weights
    (
        "c-float64",
        lambda e: rnnkit.LSTMCell(5, 7, engine=e)(
            randn(3, 5), (randn(3, 7), randn(3, 7, dtype=torch.float64))
        ),
        RuntimeError,
        r"hx\[1\] dtype \(torch.float64\) does not match input dtype \(torch.float32\)",
    ),
    # torch: NotImplementedError from aten::as_strided
    (
        "input-mkldnn",
        lambda e: rnnkit.GRUCell(5, 7, engine=e)(randn(3, 5).to_mkldnn()),
        RuntimeError,
        r"mkldnn",
    ),
    (
        "hx-sparse",
        lambda e: rnnkit.RNNCell(5, 7, engine=e)(randn(3, 5), randn(3, 7).to_sparse()),
        RuntimeError,
        r"dense",
    ),
    (
        "weight-ih-shape",
        lambda e: with_parameter(
            rnnkit.GRUCell(5, 7, engine=e), "weight_ih", Parameter(randn(21, 4))
        )(randn(3, 5)),
        RuntimeError,
        r"GRUCell: weight_ih must have shape \(21, 5\) for the module's sizes, got \(21, 4\)",
    ),
]


def _params(cases):
    return [pytest.param(call, error, match, id=id_) for id_, call, error, match in cases]


@pytest.mark.parametrize("engine", ["reference", "fused", "auto"])
@pytest.mark.parametrize("call,error,match", _params(LAYER_CASES + CELL_CASES + FUNCTIONAL_CASES))
def test_clear_error_from_rnnkits_checks(call, error, match, engine):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error, match=match) as raised:
            call(engine)
    assert raised_by_checks(raised.value), "raised past rnnkit's checks"


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_sparse_input_to_a_cell_runs_as_in_torch():
    """torch.nn's cells multiply a sparse input; so do rnnkit's (zoneout masks stay dense)."""
    torch.manual_seed(0)
    ref = torch.nn.GRUCell(5, 7)
    ours = rnnkit.GRUCell(5, 7, zoneout=0.0)
    ours.load_state_dict(ref.state_dict())
    x = randn(3, 5)
    for layout in (torch.Tensor.to_sparse, torch.Tensor.to_sparse_csr):
        torch.testing.assert_close(ours(layout(x)), ref(layout(x)), rtol=0, atol=0)
    zoneout = rnnkit.LSTMCell(5, 7, zoneout=0.5).train()
    torch.manual_seed(1)
    dense = zoneout(x)
    torch.manual_seed(1)
    sparse = zoneout(x.to_sparse())
    torch.testing.assert_close(sparse, dense)


def test_convert_checks_before_swapping():
    model = torch.nn.Sequential(torch.nn.LSTM(3, 4), torch.nn.GRU(4, 4))
    with pytest.raises(ValueError, match="engine must be one of"):
        rnnkit.convert(model, engine="nonesuch")
    assert [type(m) for m in model] == [torch.nn.LSTM, torch.nn.GRU]
    with pytest.raises(TypeError, match=r"convert\(\) expects a torch.nn.Module, got dict"):
        rnnkit.convert({"lstm": torch.nn.LSTM(3, 4)})
    with pytest.raises(TypeError, match=r"revert\(\) expects a torch.nn.Module"):
        rnnkit.revert([rnnkit.LSTM(3, 4)])
    mixed = torch.nn.Sequential(rnnkit.LSTM(3, 4), rnnkit.GRU(4, 4, layer_norm=True))
    with pytest.raises(ValueError, match="torch.nn has no layer for GRU"):
        rnnkit.revert(mixed)
    assert [type(m) for m in mixed] == [rnnkit.LSTM, rnnkit.GRU]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["demo", "--engine", "nonesuch"], "invalid choice: 'nonesuch'"),
        (["demo", "--lr", "nan"], "must be a positive finite number, got nan"),
        (["demo", "--lr", "0"], "must be a positive finite number, got 0"),
        (["demo", "--seed", str(2**64)], "must be in"),
        (["demo", "--seq-len", "1"], "must be at least 2, got 1"),
        (["bench", "--json", "/nonexistent-dir/bench.json"], "no such directory"),
        (["bench", "--plot", "."], "is a directory"),
    ],
    ids=["engine", "lr-nan", "lr-zero", "seed", "seq-len", "json-dir", "plot-dir"],
)
def test_cli_refuses_bad_arguments_before_running(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_check_refuses_an_unknown_engine(capsys):
    assert main(["check", "--engine", "nonesuch"]) == 2
    assert "unknown engine 'nonesuch'" in capsys.readouterr().err

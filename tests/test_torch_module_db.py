"""torch's own sample and error inputs for the six modules (``common_modules.module_db``).

For every sample, torch's module is built from the sample's constructor arguments, rnnkit's from
the same arguments and torch's state_dict; both run forward on the same inputs, and the outputs
and the gradients of every input and parameter must be bit-identical on the reference engine
(torch on its ATen path), and to rounding on the default engine.
For every error input, rnnkit must raise torch's exception type with a message matching torch's
``error_regex``, as torch's own ``test_modules.py::test_errors`` checks torch.
"""

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence
from torch.testing._internal.common_modules import ModuleErrorEnum, module_db

import rnnkit
from parity import ENGINES, assert_parity, truth_of
from rnnkit.testing import aten_path

INFOS = {
    info.module_cls.__name__: info
    for info in module_db
    if info.module_cls.__name__ in ("LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell")
}
DTYPES = {"f32": torch.float32, "f64": torch.float64}


def _samples(info, dtype, training):
    # the generators draw with the global generator: fix it so that every worker collects the
    # same inputs
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return info.module_inputs_func(
            info, device="cpu", dtype=dtype, requires_grad=True, training=training,
            with_packed_sequence=True,
        )  # fmt: skip


def _sample_params():
    params = []
    for name, info in INFOS.items():
        for dtype_id, dtype in DTYPES.items():
            for training in (True, False):
                samples = _samples(info, dtype, training)
                mode = "train" if training else "eval"
                params += [
                    pytest.param(name, sample, training, id=f"{name}-{dtype_id}-{mode}-{i:02d}")
                    for i, sample in enumerate(samples)
                ]
    return params


def _tensors(value, prefix="out"):
    """Every tensor in a nested output (tuples, PackedSequence), by its position."""
    if isinstance(value, PackedSequence):
        return {
            f"{prefix}.data": value.data,
            f"{prefix}.batch_sizes": value.batch_sizes,
            f"{prefix}.sorted_indices": value.sorted_indices,
            f"{prefix}.unsorted_indices": value.unsorted_indices,
        }
    if isinstance(value, (tuple, list)):
        named = {}
        for i, v in enumerate(value):
            named.update(_tensors(v, f"{prefix}.{i}"))
        return named
    return {prefix: value}


def test_module_db_has_the_six_modules():
    assert sorted(INFOS) == ["GRU", "GRUCell", "LSTM", "LSTMCell", "RNN", "RNNCell"]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name,sample,training", _sample_params())
def test_sample_inputs_match_torch(name, sample, training, engine):
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    torch.manual_seed(0)
    ref = getattr(torch.nn, name)(*args, **kwargs)
    ours = getattr(rnnkit, name)(*args, **kwargs, engine=engine)
    dtype = next(
        v for v in _tensors(sample.forward_input.args).values() if v.is_floating_point()
    ).dtype
    ref.to(dtype).train(training)
    ours.to(dtype).train(training)
    ours.load_state_dict(ref.state_dict(), strict=True)
    fw_args, fw_kwargs = sample.forward_input.args, sample.forward_input.kwargs

    def run(module, fw_args, fw_kwargs):
        leaves = _tensors(fw_args, "in")
        leaves = {k: v for k, v in leaves.items() if v is not None and v.requires_grad}
        torch.manual_seed(1)
        named = _tensors(module(*fw_args, **fw_kwargs))
        floats = [t for t in named.values() if t is not None and t.is_floating_point()]
        wrt = {**leaves, **dict(module.named_parameters())}
        # in the sample's dtype whatever the run's: its float64 truth gets the same weights
        loss = sum(
            (t * torch.linspace(-1, 1, t.numel(), dtype=dtype).to(t.dtype).view_as(t)).sum()
            for t in floats
        )
        grads = torch.autograd.grad(loss, list(wrt.values()), allow_unused=True)
        return {**named, **{f"grad_{k}": g for k, g in zip(wrt, grads, strict=True)}}

    with aten_path():
        expected = run(ref, fw_args, fw_kwargs)
    actual = run(ours, fw_args, fw_kwargs)
    truth = truth_of(run, ref, fw_args, fw_kwargs)
    assert_parity(expected, actual, engine, dtype, truth=truth)


def _error_params():
    params = []
    for name, info in INFOS.items():
        for dtype_id, dtype in DTYPES.items():
            errors = info.module_error_inputs_func(
                info, device="cpu", dtype=dtype, requires_grad=False, training=True
            )
            params += [
                pytest.param(name, error, id=f"{name}-{dtype_id}-{i:02d}")
                for i, error in enumerate(errors)
            ]
    return params


@pytest.mark.parametrize("name,error", _error_params())
def test_error_inputs_match_torch(name, error):
    sample = error.module_error_input
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    cls = getattr(rnnkit, name)
    if error.error_on == ModuleErrorEnum.CONSTRUCTION_ERROR:
        with pytest.raises(error.error_type, match=error.error_regex):
            cls(*args, **kwargs)
    else:
        module = cls(*args, **kwargs)
        fw_args, fw_kwargs = sample.forward_input.args, sample.forward_input.kwargs
        with pytest.raises(error.error_type, match=error.error_regex):
            module(*fw_args, **fw_kwargs)

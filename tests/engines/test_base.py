"""The engine interface: declared support, and the dispatcher refusing what is not declared.

Each engine states as data (``Engine.rnn_support``/``cell_support``) the modes, devices,
dtypes, call options and variant fields it runs. A call outside every region of an engine is
refused with the reason, by name, and ``engine="auto"`` moves on; so an option or variant
field that an engine does not name never reaches its kernels. The strongest case: a variant
field added to :class:`~rnnkit.variants.Variant` tomorrow, which no engine knows.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import rnnkit
from rnnkit import functional as RF
from rnnkit.engines.base import OPTIONS, CellCall, RNNCall, Support, call_options, variant_fields
from rnnkit.engines.reference import VARIANT_FIELDS
from rnnkit.modes import MODES
from rnnkit.variants import PLAIN, Variant

FAST = ("fused", "triton")


def _engine(name: str):
    if name == "triton":
        pytest.importorskip("triton")
    return RF.ENGINES[name]()


@dataclasses.dataclass(frozen=True)
class _Tomorrow(Variant):
    """A Variant with a field no engine implements (say, a new kind of normalization)."""

    new_norm: bool = False


def _call(variant: Variant = PLAIN, mode: str = "LSTM", **kw) -> RNNCall:
    """The call ``rnnkit.functional`` builds for a small layer of ``mode``."""
    module = getattr(rnnkit, "RNN" if mode.startswith("RNN") else mode)(
        3, 4, **({"nonlinearity": mode[4:].lower()} if mode.startswith("RNN") else {}), **kw
    )
    D = 2 if module.bidirectional else 1
    weights = module._flat_weights
    params = RF.gather_params(mode, weights, module.bias, module.num_layers, D, Variant())
    N, H_out = 2, module.proj_size or module.hidden_size
    h0 = torch.zeros(module.num_layers * D, N, H_out)
    c0 = torch.zeros(module.num_layers * D, N, module.hidden_size)
    return RNNCall(
        mode=mode,
        input=torch.randn(5, N, 3),
        batch_sizes=None,
        hx=(h0, c0) if mode == "LSTM" else h0,
        params=params,
        num_layers=module.num_layers,
        dropout=module.dropout,
        train=module.training,
        bidirectional=module.bidirectional,
        batch_first=module.batch_first,
        variant=variant,
    )


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("also", [{}, {"layer_norm": True}], ids=["alone", "with-layer_norm"])
def test_every_fast_engine_refuses_an_undeclared_variant_field(name, also):
    """Accepted, the field would be ignored by the kernels: a silently wrong result."""
    call = _call(_Tomorrow(new_norm=True, **also))
    assert "new_norm" in variant_fields(call.variant)
    reason = _engine(name).unsupported(call)
    assert reason is not None and "variant new_norm=True not supported" in reason


def test_no_engine_runs_an_undeclared_variant_field():
    """The reference declares its fields one by one too: nothing runs the unknown field, and
    ``auto`` says why for every engine."""
    call = _call(_Tomorrow(new_norm=True))
    with pytest.raises(RuntimeError, match="no rnnkit engine can run this call") as info:
        RF.select_engine("auto", call)
    for name in RF.ENGINES:
        assert f"{name}: " in str(info.value)
    assert str(info.value).count("new_norm=True not supported") == len(RF.ENGINES)


def test_the_reference_declares_every_field_of_today():
    assert VARIANT_FIELDS == {f.name for f in dataclasses.fields(Variant)}
    # and so runs every call of today: a plain one, and one with every field set
    reference = RF.ENGINES["reference"]()
    assert reference.unsupported(_call()) is None
    every = Variant(
        layer_norm=True, peephole=True, zoneout=(0.1, 0.1), recurrent_dropout=0.1,
        weight_dropout=0.1, forget_bias=1.0, gate_clip=1.0, cell_clip=1.0, proj_clip=1.0,
        coupled_input_forget=True, activations=("sigmoid", "tanh", "relu"),
    )  # fmt: skip
    assert variant_fields(every) == VARIANT_FIELDS
    assert reference.unsupported(_call(every)) is None


@pytest.mark.parametrize("name", ["reference", *FAST])
def test_declared_support_is_data(name):
    """Regions name only known modes and options; the reference covers everything."""
    engine = _engine(name)
    for region in (*engine.rnn_support, *engine.cell_support):
        assert region.modes <= set(MODES)
        assert region.options <= set(OPTIONS)
    if name != "reference":
        assert engine.cell_support == ()


def test_a_region_refuses_each_option_it_does_not_name():
    """Each option a call uses is checked against the region: leave one out, and the calls
    that use it are refused by its description, the others still run."""
    cases = {
        "layers": dict(num_layers=2),
        "bidirectional": dict(bidirectional=True),
        "proj_size": dict(proj_size=2),
        "no_bias": dict(bias=False),
        "batch_first": dict(batch_first=True),
    }
    everything = frozenset(OPTIONS)
    for option, kw in cases.items():
        call = _call(**kw)
        assert option in call_options(call)
        region = Support(frozenset(MODES), None, None, everything - {option})
        assert region.misses(call) == [OPTIONS[option]]
        assert region.misses(_call()) == []


def test_a_region_refuses_modes_devices_and_dtypes_outside_it():
    region = Support(
        frozenset({"GRU"}), frozenset({"cuda"}), frozenset({torch.float64}), frozenset()
    )
    assert region.misses(_call()) == ["mode LSTM", "cpu tensors", "torch.float32"]


def test_unknown_options_cannot_be_declared():
    with pytest.raises(ValueError, match="unknown call options"):
        Support(frozenset(MODES), None, None, frozenset({"packd"}))


def test_cells_go_where_they_are_declared():
    call = CellCall("GRU", torch.randn(2, 3), torch.zeros(2, 4), _call(mode="GRU").params[0])
    assert RF.select_engine("auto", call).name == "reference"
    with pytest.raises(RuntimeError, match="fused: cells not supported"):
        RF.select_engine("fused", call)

"""rnnkit.quantized.weights: per-channel int8 weights and their panels."""

from __future__ import annotations

import pytest
import torch

from rnnkit.quantized.weights import DEPTH, PANEL, QWeight


@pytest.mark.parametrize(
    "J,K",
    [pytest.param(16, 4, id="one-panel"), pytest.param(212, 37, id="odd"),
     pytest.param(1, 1, id="1x1"), pytest.param(2560, 640, id="H640")],
)  # fmt: skip
def test_quantize_is_per_channel_and_round_trips_the_panels(J, K):
    torch.manual_seed(0)
    w = torch.randn(J, K) * torch.rand(J, 1) * 3
    q = QWeight.quantize(w)
    i8 = q.int8()
    assert i8.dtype == torch.int8 and tuple(i8.shape) == (J, K)
    assert i8.abs().max() <= 127
    # each row uses its whole range, and the rounding error is at most half a step
    assert (i8.abs().amax(dim=1) == 127).all()
    assert ((q.dequantize() - w).abs() <= q.scale.unsqueeze(1) / 2 * (1 + 1e-6)).all()
    assert torch.equal(q.sum, i8.to(torch.int32).sum(dim=1, dtype=torch.int32))
    assert q.panels.numel() == -(-J // PANEL) * PANEL * -(-K // DEPTH) * DEPTH
    again = QWeight.of_int8(i8, q.scale)
    assert torch.equal(again.panels, q.panels) and torch.equal(again.int8(), i8)


def test_a_row_of_zeros_gets_scale_one():
    w = torch.zeros(3, 5)
    w[1] = torch.tensor([0.0, 1, 2, 127, -127]) / 2
    q = QWeight.quantize(w)
    assert q.scale[0] == 1 and q.scale[2] == 1 and (q.int8()[0] == 0).all()
    assert torch.equal(q.dequantize(), w)  # multiples of the row's scale, 1/2


def test_bad_weights_raise():
    with pytest.raises(ValueError, match="inf or NaN"):
        QWeight.quantize(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="2-D float"):
        QWeight.quantize(torch.ones(3, dtype=torch.float32))
    with pytest.raises(ValueError, match="float32 scale"):
        QWeight.of_int8(torch.ones(2, 3, dtype=torch.int8), torch.ones(3))

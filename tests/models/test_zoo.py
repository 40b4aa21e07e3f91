"""MobileNetV3-Small, SqueezeNet 1.1 and ShuffleNetV2 x0.5 (``zoo.py``, torchvision's
layer structure) trace, quantize at 8 bits and run their integer programs in clear:
squeeze-and-excitation products, ``ceil_mode`` max pools, chunks and channel shuffles
included. Their circuits are too large to compile in the test suite; every block they
use is compiled and simulated in ``tests/frontends/test_modern_blocks.py``, and
``benchmarks/modern_cnns.py`` reports their costs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from zoo import build

from fhe_quant.lower import GatherStep, MaxPoolStep, ProductStep
from fhe_quant.torch import compile_torch_model

#: name -> (squeeze-and-excitation products, ceil-mode max pools, gathers after fusion)
STRUCTURE = {
    "mobilenet_v3_small": (9, 0, 0),
    # 13 stride-1 units: two chunk halves each; 16 channel shuffles
    "shufflenet_v2_x0_5": (0, 0, 13 * 2 + 16),
    "squeezenet1_1": (0, 3, 0),
}
#: centred correlation of the integer program's logits with the float model's, with
#: 12-bit tables (random weights: a deep untrained network amplifies every rounding)
MIN_CORRELATION = {"mobilenet_v3_small": 0.95, "shufflenet_v2_x0_5": 0.7, "squeezenet1_1": 0.99}
#: input sizes: 32x32, but SqueezeNet's three ceil-mode pools divide 32x32 maps exactly
#: (15 -> 7 -> 3 -> 1); on 34x34 each one's last window hangs over (16 -> 8 -> 4 -> 2)
SIZES = {"mobilenet_v3_small": 32, "shufflenet_v2_x0_5": 32, "squeezenet1_1": 34}


def _centred_correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef((a - a.mean()).ravel(), (b - b.mean()).ravel())[0, 1])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(STRUCTURE))
def test_zoo_model_runs_as_an_integer_program(name: str, record_property) -> None:
    model, x = build(name, n_data=16, size=SIZES[name])
    with torch.no_grad():
        expected = model(torch.as_tensor(x, dtype=torch.float32)).double().numpy()
    qm = compile_torch_model(model, x, n_bits=8, rounding_bits=12, compile=False)
    steps = qm.program.steps
    counts = (
        sum(isinstance(s, ProductStep) for s in steps),
        sum(isinstance(s, MaxPoolStep) and any(e > b for b, e in s.padding) for s in steps),
        sum(isinstance(s, GatherStep) for s in steps),
    )
    assert counts == STRUCTURE[name]
    got = qm.forward(x)
    assert got.shape == expected.shape == (16, 10)
    assert _centred_correlation(expected, got) > MIN_CORRELATION[name]
    lookups = qm.program.lookups_by_width()
    record_property("lookups_by_width", lookups)
    assert all(width <= 16 for width in lookups)
    # The products cost two lookups per element, at the width of a sum of two codes.
    for step in steps:
        if isinstance(step, ProductStep):
            assert step.lookups_by_width() == {9: 2 * step.squares[0].table.shape[0]}

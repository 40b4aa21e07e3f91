"""Per-layer SQNR in the report: where the quantized program loses the signal."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from fhe_quant.report import layer_sqnr, sqnr_db
from fhe_quant.torch import compile_torch_model


def test_sqnr_db_definition() -> None:
    ref = np.array([3.0, -4.0])
    assert sqnr_db(ref, ref) == math.inf
    assert math.isclose(sqnr_db(ref, ref * 0.9), 20.0)  # error 10% of the signal


def test_sqnr_grows_with_bits_and_shows_the_starved_layer(digits, digits_mlp) -> None:
    x_train, x_test, _, y_test = digits
    # NOTE: without an accumulator budget (the default before issue 14 part 1): "auto"
    # caps the activation codes at its 4-bit tables
    def free(n_bits: int) -> dict:
        model = compile_torch_model(
            digits_mlp, x_train, n_bits=n_bits, accumulator_bits=None, compile=False
        )
        return layer_sqnr(model, x_test)

    low, high = free(3), free(7)
    assert list(low) == ["_0", "_2", "_4"] == list(high)
    for name in low:
        assert high[name] > low[name] + 6.0  # ~6 dB per bit, 4 bits more
    qm = compile_torch_model(digits_mlp, x_train, n_bits=6, accumulator_bits=9, compile=False)
    report = qm.report(x_test, y_test, fhe="disable")
    rows = {row["layer"]: row for row in report.layers}
    assert rows["_0"]["sqnr_db"] < free(6)["_0"] - 3.0  # the 9-bit budget costs signal
    assert "SQNR dB" in str(report) and f"{rows['_0']['sqnr_db']:.1f}" in str(report)
    assert (
        "sqnr_db"
        not in compile_torch_model(digits_mlp, x_train, n_bits=6, compile=False).report().layers[0]
    )  # no data, no SQNR


def test_sqnr_of_a_branching_model() -> None:
    torch.manual_seed(0)

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)) + x)

    x = np.random.default_rng(0).normal(size=(100, 4))
    sqnr = layer_sqnr(compile_torch_model(Residual().eval(), x, n_bits=6, compile=False), x)
    assert len(sqnr) >= 2 and all(v > 10 for v in sqnr.values())

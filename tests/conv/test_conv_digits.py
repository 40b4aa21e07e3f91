"""A small CNN on scikit-learn's digits keeps its accuracy after 6-bit PTQ, simulated."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from fhe_quant.torch import compile_torch_model

#: Test samples scored in simulation (enough to see a 2-point drop, fast to simulate).
N_SIMULATED = 150


def _train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int) -> nn.Module:
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    for _ in range(epochs):
        for batch in torch.randperm(len(xt)).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xt[batch]), yt[batch]).backward()
            optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def digits_cnn() -> tuple[nn.Module, np.ndarray, np.ndarray, np.ndarray]:
    """Conv(1->8, 3x3) -> ReLU -> AvgPool(2) -> Flatten -> Linear(72->10) on 8x8 digits.

    Pixels are scaled to [0, 1] (one range for the whole image): a convolution's input
    scale is one per channel, shared by every pixel, so per-pixel standardization (whose
    rare pixels reach 36 standard deviations) would waste most codes on outliers.
    """
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).reshape(-1, 1, 8, 8)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 3 * 3, 10),
    )
    return _train(model, x_train, y_train, epochs=20), x_train, x_test, y_test


def test_digits_cnn_6_bits_within_2_points_of_float(digits_cnn) -> None:
    model, x_train, x_test, y_test = digits_cnn
    qm = compile_torch_model(model, x_train, n_bits=6)
    x_sim, y_sim = x_test[:N_SIMULATED], y_test[:N_SIMULATED]
    report = qm.report(x_sim, y_sim, fhe="simulate")
    assert report.scores["float"] >= 0.9
    assert report.scores["simulate"] >= report.scores["float"] - 0.02
    assert report.scores["simulate"] == report.scores["quantized"]
    # one table per conv output (8 x 6 x 6) and per pooled value (8 x 3 x 3), none after
    # the last layer; every table input within the table width, the rest dropped exactly
    layers = qm.statistics["layers"]
    assert [layer.get("lookups") for layer in layers] == [288, 72, None]
    assert all(layer["table_input_bits"] <= 7 for layer in layers[:2])
    assert qm.statistics["pbs_count"] == sum(qm.program.lookups_by_width().values())
    # the whole test set in clear, for the record of the drop
    quantized = np.mean(qm.forward(x_test).argmax(axis=1) == y_test)
    floating = np.mean(qm.float_forward(x_test).argmax(axis=1) == y_test)
    assert quantized >= floating - 0.02

"""Digits CNNs with max pooling and with a residual block keep their accuracy after
5- and 6-bit PTQ; simulation agrees with the clear program bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from fhe_quant.lower import AddStep, MaxPoolStep
from fhe_quant.torch import compile_torch_model

#: Test samples run in simulation (the whole test set runs in clear, proven equal).
N_SIMULATED = 8


def _train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int) -> nn.Module:
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # NOTE: two threads on the shared 2-core machines is 10x slower
    try:
        for _ in range(epochs):
            for batch in torch.randperm(len(xt)).split(64):
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(xt[batch]), yt[batch]).backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


class ResidualCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.b(torch.relu(self.a(x))))
        return self.head(torch.flatten(self.pool(x), 1))


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, ...]:
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).reshape(-1, 1, 8, 8)
    return tuple(train_test_split(x, y, test_size=0.25, random_state=0))


@pytest.fixture(scope="module")
def models(digits) -> dict[str, nn.Module]:
    x_train, _, y_train, _ = digits
    torch.manual_seed(0)
    cnn = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )
    torch.manual_seed(0)
    residual = ResidualCNN()
    return {
        "maxpool": _train(cnn, x_train, y_train, 20),
        "residual": _train(residual, x_train, y_train, 20),
    }


@pytest.mark.parametrize("bits", [5, 6])
@pytest.mark.parametrize("name", ["maxpool", "residual"])
def test_digits_branching_cnn_within_1_point_of_float(digits, models, name, bits) -> None:
    x_train, x_test, _, y_test = digits
    # NOTE: compiling at 6 bits (17-bit accumulators after the pool) checks that the max
    # tables keep their width: Concrete refused them at 17 bits without the identity.
    qm = compile_torch_model(models[name], x_train, n_bits=bits)
    floating = np.mean(qm.float_forward(x_test).argmax(axis=1) == y_test)
    quantized = np.mean(qm.forward(x_test).argmax(axis=1) == y_test)
    assert floating >= 0.94
    assert quantized >= floating - 0.01
    # 4 lookups per max pool output (8 x 4 x 4): 3 maxima of bits + 1 bits and one
    # identity of bits bits; one table per ReLU output (8 x 8 x 8); none for the add.
    pools = [s for s in qm.program.steps if isinstance(s, MaxPoolStep)]
    assert [p.lookups(p.in_shape) for p in pools] == [4 * 8 * 4 * 4]
    relus = 3 if name == "residual" else 1
    assert qm.program.lookups_by_width()[bits + 1] == relus * 512 + 3 * 128
    assert qm.program.lookups_by_width()[bits] == 128
    assert sum(isinstance(s, AddStep) for s in qm.program.steps) == (name == "residual")
    if bits == 5:
        q = qm.quantize_input(x_test[:N_SIMULATED])
        clear = qm.fhe_circuit.run(q, "disable")
        np.testing.assert_array_equal(qm.fhe_circuit.run(q, "simulate"), clear)
        assert qm.statistics["pbs_count"] == sum(qm.program.lookups_by_width().values())

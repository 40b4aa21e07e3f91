"""A model whose encrypted part ends with a residual add: the client dequantizes the
add's value (scale, zero, bias of the :class:`AddStep`), through the report and the
deployment artifacts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fhe_quant.deploy import FHEModelClient, FHEModelDev, FHEModelServer
from fhe_quant.lower import AddStep, MaxPoolStep
from fhe_quant.torch import compile_torch_model


class SkipHead(nn.Module):
    """``sigmoid(x + fc2(relu(fc1(x))))``: the add is the last encrypted step (the input
    itself is an operand), the sigmoid runs on the client."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.fc2 = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x + self.fc2(torch.relu(self.fc1(x))))


def _model() -> tuple[nn.Module, np.ndarray]:
    torch.manual_seed(0)
    return SkipHead(), np.random.default_rng(0).normal(size=(30, 3))


def test_output_add_is_dequantized_by_the_client_and_reported() -> None:
    model, x = _model()
    qm = compile_torch_model(model, x, n_bits=8, rounding_bits=16, compile=False)
    assert isinstance(qm.program.output_step, AddStep)
    with torch.no_grad():
        expected = model(torch.as_tensor(x, dtype=torch.float32)).double().numpy()
    np.testing.assert_allclose(qm.forward(x), expected, atol=0.02)
    report = qm.report(x, (expected > 0.5).astype(int).argmax(axis=1), fhe="disable")
    assert "residual add" in report.program
    assert "add" in str(report)


def test_report_lists_tables_and_max_pools_of_a_branching_model() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 2)
    )
    x = np.random.default_rng(0).normal(size=(20, 1, 4, 4))
    qm = compile_torch_model(model, x, n_bits=3, compile=False)
    text = str(qm.report(x, np.zeros(20, dtype=int), fhe="disable"))
    (pool,) = [s for s in qm.program.steps if isinstance(s, MaxPoolStep)]
    (row,) = [line.split() for line in text.splitlines() if line.startswith(pool.name + " ")]
    assert row[-1] == str(4 * 2 * 2 * 2)  # lookups: 3 maxima and 1 identity per output


@pytest.mark.slow
@pytest.mark.execute
def test_deployed_residual_model_round_trips(tmp_path: Path) -> None:
    model, x = _model()
    qm = compile_torch_model(model, x, n_bits=3, p_error=1e-12)
    FHEModelDev(tmp_path, qm).save()
    client = FHEModelClient(tmp_path / "client", key_dir=tmp_path / "keys")
    server = FHEModelServer(tmp_path / "server")
    keys = client.get_serialized_evaluation_keys()
    results = [server.run(c, keys) for c in client.quantize_encrypt_serialize(x[:2])]
    np.testing.assert_array_equal(client.deserialize_decrypt(results), qm.forward_integers(x[:2]))
    np.testing.assert_allclose(client.deserialize_decrypt_dequantize(results), qm.forward(x[:2]))

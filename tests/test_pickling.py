"""Programs are plain data: graphs, quantized graphs, integer programs, uncompiled
modules and QAT modules pickle and deep-copy with no custom code, and the copies compute
the same integers."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from fhe_quant.lower import TableFunction, TableStep
from fhe_quant.torch import QATModule, compile_qat_model, compile_torch_model, prepare_qat


def _round_trips(value):
    return [copy.deepcopy(value), pickle.loads(pickle.dumps(value))]


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(40, 4))


def _residual() -> nn.Module:
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.a(t))
            return self.c(torch.relu(self.b(h) + h))

    torch.manual_seed(0)
    return Residual()


@pytest.mark.parametrize("kind", ["chain", "residual"])
def test_ptq_module_and_its_parts_round_trip(kind: str, x: np.ndarray) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Mish(), nn.Linear(5, 2))
    model = model if kind == "chain" else _residual()
    qm = compile_torch_model(model, x, n_bits=4, compile=False)
    tables = [s for s in qm.program.steps if isinstance(s, TableStep)]
    assert tables and all(isinstance(s.exact, TableFunction) for s in tables)
    expected = qm.forward_integers(x)
    reference = qm.program.run_without_rounding(qm.program.input_quantizer.quantize(x))
    for clone in _round_trips(qm):
        np.testing.assert_array_equal(clone.forward_integers(x), expected)
        np.testing.assert_array_equal(clone.forward(x), qm.forward(x))
        q = clone.program.input_quantizer.quantize(x)
        np.testing.assert_array_equal(clone.program.run_without_rounding(q), reference)
    for part in (qm.graph, qm.quantized, qm.program):
        assert all(type(c) is type(part) for c in _round_trips(part))


def test_qat_module_round_trips_without_custom_code(x: np.ndarray) -> None:
    assert "__getstate__" not in vars(QATModule) and "__deepcopy__" not in vars(QATModule)
    torch.manual_seed(1)
    qat = prepare_qat(nn.Sequential(nn.Linear(4, 6), nn.Softsign(), nn.Linear(6, 2)), n_bits=3)
    qat.initialize(x)
    qat.eval()
    expected = qat(x).detach().numpy()
    for clone in _round_trips(qat):
        np.testing.assert_array_equal(clone.eval()(x).detach().numpy(), expected)
        qm = compile_qat_model(clone, x, compile=False)
        np.testing.assert_array_equal(qm.forward(x), expected)

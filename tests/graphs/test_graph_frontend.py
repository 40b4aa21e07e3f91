"""The torch frontend translates max pooling, residual adds and concatenations into
graph nodes (checked against torch by the tracer itself), and refuses what it cannot
compile, naming the layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fhe_quant.errors import UnsupportedOpError
from fhe_quant.frontends.torch import trace_module
from fhe_quant.torch import compile_torch_model


class Branches(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.how == "add":
            return x + y
        if self.how == "sub":
            return x - y
        if self.how == "torch.add":
            return torch.add(y, x, alpha=-1)
        if self.how == "cat":
            return torch.cat((x, y), dim=-3)
        if self.how == "functional-max":
            return F.max_pool2d(y, 3, stride=2, padding=1)
        return F.adaptive_max_pool2d(y, 2)


@pytest.mark.parametrize(
    ("how", "op", "attrs"),
    [
        ("add", "add", {"coefficients": (1, 1)}),
        ("sub", "add", {"coefficients": (1, -1)}),
        ("torch.add", "add", {"coefficients": (1, -1)}),
        ("cat", "concat", {"axis": 1}),
        ("functional-max", "max_pool", {"kernel": (3, 3), "padding": ((1, 1), (1, 1))}),
        ("adaptive-max", "max_pool", {"kernel": (3, 3), "stride": (3, 3)}),
    ],
)
def test_branches_become_graph_nodes(how: str, op: str, attrs: dict) -> None:
    x = np.random.default_rng(0).normal(size=(4, 2, 6, 6))
    graph = trace_module(Branches(how), x)  # checked against torch's output
    (node,) = [n for n in graph.nodes if n.op == op]
    for key, value in attrs.items():
        got = node.attrs[key]
        assert (tuple(got) if isinstance(got, (tuple, list)) else got) == value


def test_max_pool_1d_and_a_residual_dense_model_compile_and_track_the_float_model() -> None:
    class Dense(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(6, 6)
            self.b = nn.Linear(6, 6)
            self.pool = nn.MaxPool1d(2)
            self.head = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = x + self.b(torch.relu(self.a(x)))  # the input itself is an operand
            return self.head(self.pool(torch.relu(h).unsqueeze(1)).squeeze(1))

    torch.manual_seed(0)
    model = Dense().double()
    x = np.random.default_rng(0).normal(size=(50, 6))
    qm = compile_torch_model(model, x, n_bits=8, rounding_bits=16, compile=False)
    with torch.no_grad():
        expected = model(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(qm.forward(x), expected, atol=0.03 * np.abs(expected).max())


def test_output_of_a_max_pool_is_refused_with_its_place() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2))
    with pytest.raises(UnsupportedOpError, match="ends with a max_pool") as info:
        compile_torch_model(model, np.zeros((4, 1, 6, 6)), n_bits=4, compile=False)
    assert "MaxPool2d" in info.value.where


def test_max_pool_of_the_input_runs_on_the_client() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2 * 3 * 3, 2)).double()
    x = np.random.default_rng(0).normal(size=(30, 2, 6, 6))
    qm = compile_torch_model(model, x, n_bits=8, compile=False)
    assert [n.op for n in qm.quantized.pre] == ["max_pool", "reshape"]
    assert qm.program.lookups_by_width() == {}  # one linear layer, no table
    with torch.no_grad():
        expected = model(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(qm.forward(x), expected, atol=0.02 * np.abs(expected).max())

"""The torch frontend translates every supported layer exactly and refuses the rest."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fhe_quant.errors import TraceError, UnsupportedOpError
from fhe_quant.frontends.torch import trace_module
from fhe_quant.passes import simplify

ACTIVATIONS = [
    nn.ReLU(),
    nn.ReLU6(),
    nn.LeakyReLU(0.2),
    nn.PReLU(8),
    nn.PReLU(),
    nn.Sigmoid(),
    nn.Tanh(),
    nn.GELU(),
    nn.GELU(approximate="tanh"),
    nn.SiLU(),
    nn.Hardtanh(-0.5, 0.7),
    nn.Hardswish(),
    nn.Hardsigmoid(),
    nn.ELU(0.7),
    nn.Softplus(beta=2.0, threshold=5.0),
]


def _x(n: int = 32, d: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)) * 3


def _reference(module: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module.double().eval()(torch.as_tensor(x)).numpy()


@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda m: type(m).__name__)
def test_activation_modules_match_torch(act: nn.Module) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), act, nn.Linear(8, 3))
    x = _x()
    graph = trace_module(model, x)
    np.testing.assert_allclose(graph(x), _reference(model, x), rtol=1e-9, atol=1e-9)


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.fc2 = nn.Linear(6, 2)
        self.register_buffer("shift", torch.linspace(-1, 1, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.leaky_relu(self.fc1(x), 0.1) * 2.0 + self.shift
        h = 1 - torch.tanh(h - 0.5) / 3
        h = torch.sigmoid(torch.nn.functional.gelu(h, approximate="tanh")).relu().neg()
        h = torch.nn.functional.dropout(h, p=0.5, training=self.training)
        return self.fc2(h.view(x.size(0), -1))


def test_functional_forms_match_torch() -> None:
    torch.manual_seed(1)
    model = Functional()
    x = _x()
    graph = trace_module(model, x)
    np.testing.assert_allclose(graph(x), _reference(model, x), rtol=1e-9, atol=1e-9)


def test_batchnorm_and_scalings_fold_into_linear() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Linear(5, 8),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Identity(),
        nn.Linear(8, 4),
        nn.BatchNorm1d(4),
    )
    with torch.no_grad():  # non-trivial running statistics
        for m in model:
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-1, 1)
    x = _x()
    graph = simplify(trace_module(model, x))
    assert [n.op for n in graph.nodes] == ["input", "linear", "relu", "linear"]
    np.testing.assert_allclose(graph(x), _reference(model, x), rtol=1e-9, atol=1e-9)


def test_tracing_does_not_modify_the_module() -> None:
    model = nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3)).train()
    before = [p.detach().clone() for p in model.parameters()]
    trace_module(model, _x())
    assert model.training
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize(
    ("layer", "name"),
    [(nn.LSTM(5, 5), "LSTM"), (nn.Softmax(dim=1), "Softmax"), (nn.LayerNorm(5), "LayerNorm")],
)
def test_unsupported_layers_are_named_with_their_place(layer: nn.Module, name: str) -> None:
    model = nn.Sequential(nn.Linear(5, 5), layer)
    with pytest.raises(UnsupportedOpError, match=rf"{name}.*'1 \({name}\)'"):
        trace_module(model, _x())


def test_conv_is_refused_with_a_hint() -> None:
    # Conv1d/Conv2d are supported (tests/conv); 3-d convolutions are refused with a hint.
    model = nn.Sequential(nn.Conv3d(1, 2, 3), nn.Flatten(), nn.Linear(48, 2))
    with pytest.raises(UnsupportedOpError, match=r"Conv3d.*not supported yet"):
        trace_module(model, np.zeros((4, 1, 4, 4, 8)))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + x


def test_add_of_two_tensors_is_a_residual_add_and_a_quotient_is_refused() -> None:
    graph = trace_module(Residual(), _x())
    assert [n.op for n in graph.nodes] == ["input", "linear", "add"]

    class Product(Residual):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) * x

    assert [n.op for n in trace_module(Product(), _x()).nodes] == ["input", "linear", "mul"]

    class Quotient(Residual):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) / x

    with pytest.raises(UnsupportedOpError, match="div of two encrypted tensors"):
        trace_module(Quotient(), _x())


class Dynamic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


def test_data_dependent_control_flow_is_a_trace_error() -> None:
    with pytest.raises(TraceError, match="Dynamic"):
        trace_module(Dynamic(), _x())


def test_non_module_is_refused() -> None:
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        trace_module(lambda x: x, _x())  # type: ignore[arg-type]

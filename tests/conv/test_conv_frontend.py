"""The torch frontend translates convolutions, pooling and 2-d batch norm exactly, and
refuses the options it cannot compile, naming the layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fhe_quant.errors import UnsupportedOpError
from fhe_quant.frontends.torch import trace_module
from fhe_quant.passes import simplify


def _reference(module: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module.double().eval()(torch.as_tensor(x)).numpy()


def _randomize_batchnorms(model: nn.Module) -> nn.Module:
    with torch.no_grad():  # non-trivial running statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-1, 1)
    return model


CONV2D = [
    nn.Conv2d(2, 4, 3),
    nn.Conv2d(2, 4, 3, padding=1),
    nn.Conv2d(2, 4, (2, 3), padding=(1, 0)),
    nn.Conv2d(2, 4, 3, stride=2, padding=1),
    nn.Conv2d(2, 4, (3, 2), stride=(2, 1)),
    nn.Conv2d(2, 4, 2, padding="same"),  # asymmetric: one more at the end
    nn.Conv2d(2, 4, 3, padding="same", dilation=2),
    nn.Conv2d(2, 4, 4, padding="same", dilation=(1, 2)),
    nn.Conv2d(2, 4, 3, padding="valid"),
    nn.Conv2d(2, 4, 3, dilation=2, padding=2),
    nn.Conv2d(2, 4, 3, groups=2, padding=1),
    nn.Conv2d(2, 2, 3, groups=2, bias=False),  # depthwise
    nn.Conv2d(2, 6, 1, groups=2),
]
CONV1D = [
    nn.Conv1d(2, 3, 3),
    nn.Conv1d(2, 3, 4, padding="same"),
    nn.Conv1d(2, 4, 3, stride=2, padding=2, dilation=2, groups=2),
    nn.Conv1d(2, 2, 5, groups=2, bias=False),
]


@pytest.mark.parametrize("conv", CONV2D, ids=repr)
def test_conv2d_matches_torch(conv: nn.Conv2d) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten())
    x = np.random.default_rng(0).normal(size=(8, 2, 7, 6))
    graph = trace_module(model, x)
    assert [n.op for n in graph.nodes][:2] == ["input", "conv"]
    np.testing.assert_allclose(graph(x), _reference(model, x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("conv", CONV1D, ids=repr)
def test_conv1d_matches_torch(conv: nn.Conv1d) -> None:
    model = nn.Sequential(conv, nn.Tanh())
    x = np.random.default_rng(1).normal(size=(8, 2, 9))
    graph = trace_module(model, x)
    np.testing.assert_allclose(graph(x), _reference(model, x), rtol=1e-9, atol=1e-9)


POOLS = [
    nn.AvgPool2d(2),
    nn.AvgPool2d(3, stride=1),
    nn.AvgPool2d((2, 3), stride=(1, 2), padding=(1, 1)),  # padding counted (the default)
    nn.AvgPool2d(2, count_include_pad=False),  # no padding: same as True
    nn.AdaptiveAvgPool2d(1),
    nn.AdaptiveAvgPool2d((3, 2)),
    nn.AdaptiveAvgPool2d((None, 1)),
]


@pytest.mark.parametrize("pool", POOLS, ids=repr)
def test_avg_pool2d_matches_torch(pool: nn.Module) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 1), pool, nn.Flatten(), nn.Linear(1, 2))
    x = np.random.default_rng(2).normal(size=(6, 1, 6, 4))
    with torch.no_grad():
        features = model[:3](torch.as_tensor(x, dtype=torch.float32)).shape[1]
    model[3] = nn.Linear(features, 2)
    graph = trace_module(model, x)
    ops = [n.op for n in graph.nodes]
    assert ops == ["input", "conv", "avg_pool", "reshape", "linear"]
    pool_node = graph.nodes[2]
    # a depthwise convolution whose weights are all 1/k
    weight = pool_node.params["weight"]
    assert pool_node.attrs["groups"] == 3 and weight.shape[:2] == (3, 1)
    np.testing.assert_array_equal(weight, 1.0 / np.prod(weight.shape[2:]))
    np.testing.assert_allclose(graph(x), _reference(model, x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    "pool", [nn.AvgPool1d(2), nn.AvgPool1d(3, 2, 1), nn.AdaptiveAvgPool1d(2)], ids=repr
)
def test_avg_pool1d_matches_torch(pool: nn.Module) -> None:
    model = nn.Sequential(nn.Conv1d(2, 3, 3), pool, nn.ReLU())
    x = np.random.default_rng(3).normal(size=(6, 2, 10))
    graph = trace_module(model, x)
    np.testing.assert_allclose(graph(x), _reference(model, x), rtol=1e-9, atol=1e-9)


def test_batchnorm2d_folds_into_the_convolution() -> None:
    torch.manual_seed(3)
    model = _randomize_batchnorms(
        nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1, groups=2),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 3, 3, bias=False),
            nn.BatchNorm2d(3),
            nn.AvgPool2d(2),
            nn.BatchNorm2d(3),  # after pooling: stays elementwise (fused into a table)
            nn.Flatten(),
            nn.Linear(3 * 2 * 2, 2),
        )
    )
    x = np.random.default_rng(3).normal(size=(16, 2, 6, 6))
    graph = simplify(trace_module(model, x))
    assert [n.op for n in graph.nodes] == [
        "input",
        "conv",
        "relu",
        "conv",
        "avg_pool",
        "mul_const",
        "add_const",
        "reshape",
        "linear",
    ]
    np.testing.assert_allclose(graph(x), _reference(model, x), rtol=1e-9, atol=1e-9)


def test_batchnorm1d_folds_into_conv1d() -> None:
    torch.manual_seed(4)
    model = _randomize_batchnorms(
        nn.Sequential(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4), nn.ReLU(), nn.Flatten())
    )
    x = np.random.default_rng(4).normal(size=(16, 3, 8))
    graph = simplify(trace_module(model, x))
    assert [n.op for n in graph.nodes] == ["input", "conv", "relu", "reshape"]
    np.testing.assert_allclose(graph(x), _reference(model, x), rtol=1e-9, atol=1e-9)


class FunctionalCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 1, 3, 3))
        self.bias = nn.Parameter(torch.randn(4))
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight, self.bias, padding="same")
        x = F.avg_pool2d(F.relu(x), 2, stride=1)
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(torch.flatten(x, 1))


def test_functional_conv_and_pooling_match_torch() -> None:
    torch.manual_seed(5)
    model = FunctionalCNN()
    x = np.random.default_rng(5).normal(size=(8, 1, 5, 5))
    graph = trace_module(model, x)
    assert [n.op for n in graph.nodes] == [
        "input",
        "conv",
        "relu",
        "avg_pool",
        "avg_pool",
        "reshape",
        "linear",
    ]
    np.testing.assert_allclose(graph(x), _reference(model, x), rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("layer", "shape", "match"),
    [
        (nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), (1, 6, 6), "padding_mode"),
        (nn.Conv1d(1, 2, 3, padding=1, padding_mode="circular"), (1, 6), "padding_mode"),
        (nn.AvgPool2d(3, padding=1, count_include_pad=False), (1, 6, 6), "count_include_pad"),
        (nn.AvgPool2d(2, divisor_override=3), (1, 6, 6), "divisor_override"),
        (nn.AdaptiveAvgPool2d(4), (1, 6, 6), r"output_size=\(4, 4\)"),
        (nn.AdaptiveAvgPool1d(4), (1, 6), r"output_size=\(4,\)"),
        (nn.MaxPool2d(2, dilation=2), (1, 6, 6), "dilation"),
        (nn.MaxPool1d(2, return_indices=True), (1, 6), "return_indices"),
        (nn.AdaptiveMaxPool2d(4), (1, 6, 6), r"output_size=\(4, 4\)"),
        (nn.Conv3d(1, 2, 3), (1, 4, 4, 4), "3-dimensional"),
    ],
    ids=lambda v: repr(v) if isinstance(v, nn.Module) else None,
)
def test_unsupported_options_name_the_layer(layer: nn.Module, shape, match: str) -> None:
    model = nn.Sequential(nn.Identity(), layer)
    name = type(layer).__name__
    with pytest.raises(UnsupportedOpError, match=match) as info:
        trace_module(model, np.zeros((2,) + shape))
    assert info.value.where == f"1 ({name})"
    assert name in str(info.value)


class FunctionalMaxPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, 2, dilation=2)


class ConvProduct(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) / x


class ScaledResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.add(self.conv(x), x, alpha=0.5)


class BatchConcat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), x], dim=0)


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (FunctionalMaxPool(), r"MaxPool2d\(dilation=2\).*max_pool2d"),
        (ConvProduct(), "div of two encrypted tensors"),
        (ScaledResidual(), "alpha=0.5"),
        (BatchConcat(), "cat along the batch axis"),
    ],
    ids=["max_pool2d", "quotient", "scaled-residual", "batch-cat"],
)
def test_unsupported_functions_and_branches(model: nn.Module, match: str) -> None:
    with pytest.raises(UnsupportedOpError, match=match):
        trace_module(model, np.zeros((2, 2, 6, 6)))

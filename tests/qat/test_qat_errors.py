"""Error paths: clear typed errors, and the module stays usable after them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fhe_quant.errors import (
    InputError,
    NotFittedError,
    ParameterError,
    UnsupportedOpError,
)
from fhe_quant.ir import Graph, Node
from fhe_quant.quant.config import QuantConfig
from fhe_quant.quant.qat import QATConfig
from fhe_quant.torch import NotAQATModuleError, QATModule, compile_qat_model, prepare_qat
from fhe_quant.training import fit


def test_unsupported_layer_is_named(make_mlp) -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.Softmax(dim=1))
    with pytest.raises(UnsupportedOpError, match="Softmax"):
        prepare_qat(model)


def test_max_pooling_is_refused_naming_the_layer() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(18, 2))
    with pytest.raises(UnsupportedOpError, match=r"MaxPool2d") as info:
        prepare_qat(model, X_sample=np.zeros((2, 1, 8, 8)))
    assert "MaxPool2d" in info.value.where


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.head = nn.Linear(2 * 4 * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(x + torch.relu(self.conv(x)), 1))


class _Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.head = nn.Linear(4 * 4 * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(torch.cat([x, self.conv(x)], dim=1), 1))


@pytest.mark.parametrize("model", [_Residual(), _Concat()], ids=["residual", "cat"])
def test_branching_models_are_refused_with_a_place(model) -> None:
    # Whether the frontend or QAT refuses it, the error is typed and says where.
    with pytest.raises(UnsupportedOpError, match="residual connection") as info:
        prepare_qat(model, X_sample=np.zeros((2, 2, 4, 4)))
    assert info.value.where


def test_a_branch_in_the_graph_is_refused_by_qat_itself() -> None:
    # Independently of the frontend: a graph whose node reads an earlier one (a skip).
    weight = np.ones((3, 3))
    nodes = (
        Node("x", "input"),
        Node("fc1", "linear", ("x",), {}, {"weight": weight}, "fc1 (Linear)"),
        Node("r", "relu", ("fc1",)),
        Node("fc2", "linear", ("x",), {}, {"weight": weight}, "fc2 (Linear)"),
    )
    graph = Graph(nodes, "x", "fc2", (3,))
    with pytest.raises(UnsupportedOpError, match="chain of layers") as info:
        QATModule(graph, QATConfig(QuantConfig.from_n_bits(3)))
    assert info.value.where == "fc2 (Linear)"


def test_conv_models_need_a_sample_for_their_input_shape() -> None:
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(12, 2))
    with pytest.raises(ParameterError, match="X_sample"):
        prepare_qat(model)


def test_accumulator_budget_below_a_pooling_window_is_refused() -> None:
    # 3-bit codes summed over a 2x2 window reach 28: 5 bits, more than 4.
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(18, 2))
    with pytest.raises(ParameterError, match=r"AvgPool2d.*accumulator reaches 28"):
        prepare_qat(model, n_bits=3, accumulator_bits=4, X_sample=np.zeros((2, 1, 8, 8)))
    prepare_qat(model, n_bits=3, accumulator_bits=5, X_sample=np.zeros((2, 1, 8, 8)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_bits": 0}, "n_bits"),
        ({"n_bits": 9}, "n_bits"),
        ({"n_bits": {"weights": 1}}, "weight_mode='binary'"),
        ({"n_bits": {"activations": 3, "outputs": 1}}, "outputs"),
        ({"n_bits": {"colors": 3}}, "unknown key"),
        ({"activation_scale": "max"}, "activation_scale"),
        ({"weight_mode": "ternary"}, "weight_mode"),
        ({"weight_scale": "l1"}, "weight_scale"),
        ({"accumulator_bits": 1}, "accumulator_bits"),
        ({"accumulator_bits": 8, "weight_mode": "binary"}, "accumulator_bits"),
        ({"rounding_bits": 17}, "rounding_bits"),
        ({"seed": "one"}, "seed"),
    ],
)
def test_bad_parameters_raise_parameter_error(make_mlp, kwargs, message) -> None:
    with pytest.raises(ParameterError, match=message):
        prepare_qat(make_mlp(n_in=4, width=3, n_out=2), **kwargs)


def test_binary_mode_accepts_one_bit_weights(make_mlp) -> None:
    prepare_qat(
        make_mlp(n_in=4, width=3, n_out=2),
        n_bits={"weights": 1, "activations": 3},
        weight_mode="binary",
    )


def test_compile_refuses_a_module_that_was_not_prepared(make_mlp) -> None:
    with pytest.raises(NotAQATModuleError, match="prepare_qat") as info:
        compile_qat_model(make_mlp(n_in=4, width=3, n_out=2), np.zeros((4, 4)))
    assert isinstance(info.value, ParameterError) and isinstance(info.value, TypeError)
    with pytest.raises(NotAQATModuleError):
        compile_qat_model("model.pt", np.zeros((4, 4)))


def test_uninitialised_module_cannot_run_in_eval_or_compile(make_mlp) -> None:
    qat = prepare_qat(make_mlp(n_in=4, width=3, n_out=2))
    with pytest.raises(NotFittedError, match="initialize"):
        compile_qat_model(qat, np.zeros((4, 4)))
    with pytest.raises(NotFittedError):
        qat.eval()(np.zeros((4, 4)))


def test_input_shape_needs_a_linear_layer_or_a_sample() -> None:
    with pytest.raises(ParameterError, match="X_sample"):
        prepare_qat(nn.ReLU())
    with pytest.raises(UnsupportedOpError, match="without a linear layer"):
        prepare_qat(nn.ReLU(), X_sample=np.zeros((2, 3)))
    with pytest.raises(ParameterError, match=r"torch\.nn\.Module"):
        prepare_qat(lambda x: x)


def test_bad_inputs_are_refused_and_the_module_stays_usable(make_mlp) -> None:
    rng = np.random.default_rng(0)
    qat = prepare_qat(make_mlp(n_in=4, width=3, n_out=2))
    x = rng.normal(size=(8, 4))
    qat.initialize(x)
    expected = qat.eval()(x).detach().numpy()
    with pytest.raises(InputError, match="expects"):
        qat(rng.normal(size=(8, 5)))
    bad = x.copy()
    bad[2, 1] = np.nan
    with pytest.raises(InputError, match="NaN"):
        qat(bad)
    with pytest.raises(InputError):
        compile_qat_model(qat, np.zeros((3, 7)), compile=False)
    np.testing.assert_array_equal(qat(torch.as_tensor(x)).detach().numpy(), expected)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"epochs": 0}, ParameterError, "epochs"),
        ({"epochs": 1, "loss": "hinge"}, ParameterError, "loss"),
        ({"epochs": 1, "optimizer": "lbfgs"}, ParameterError, "optimizer"),
        ({"epochs": 1, "lr": 0.0}, ParameterError, "lr"),
        ({"epochs": 1, "schedule": "step"}, ParameterError, "schedule"),
        ({"epochs": 1, "num_threads": 0}, ParameterError, "num_threads"),
    ],
)
def test_fit_parameter_errors(make_mlp, kwargs, error, message) -> None:
    with pytest.raises(error, match=message):
        fit(make_mlp(n_in=4, width=3, n_out=2), np.zeros((4, 4)), np.zeros(4), **kwargs)


def test_fit_data_errors(make_mlp) -> None:
    model = make_mlp(n_in=4, width=3, n_out=2)
    with pytest.raises(InputError, match="match"):
        fit(model, np.zeros((4, 4)), np.zeros(3), epochs=1, verbose=False)
    with pytest.raises(InputError, match="integer class"):
        fit(model, np.zeros((4, 4)), np.full(4, 0.5), epochs=1, verbose=False)
    with pytest.raises(InputError, match="NaN"):
        fit(model, np.full((4, 4), np.nan), np.zeros(4), epochs=1, verbose=False)

"""Convolutional programs run the same in NumPy and in Concrete: bit for bit."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from fhe_quant.lower import NUMPY
from fhe_quant.torch import compile_torch_model

#: Per-lookup error probability for exactness tests: any mismatch is then a real bug.
TINY_P_ERROR = 1e-12


def _worst_cases(qm, n_outputs: int, rng: np.random.Generator) -> np.ndarray:
    """Input codes driving some first-layer outputs (a corner one included) to their
    proven maximum and minimum."""
    step = qm.program.steps[0]
    shape = qm.program.input_shape
    qmax = qm.program.input_quantizer.qmax
    basis = np.eye(int(np.prod(shape)), dtype=np.int64).reshape((-1,) + shape)
    jacobian = (step(basis, NUMPY) - step.offset).reshape(len(basis), -1).T
    rows = np.concatenate([[0], rng.choice(len(jacobian), n_outputs - 1)])
    worst = np.where(jacobian[rows] > 0, qmax, 0)
    best = np.where(jacobian[rows] < 0, qmax, 0)
    return np.concatenate([worst, best]).reshape((-1,) + shape)


def _check_simulate_equals_disable(qm, x: np.ndarray, rng: np.random.Generator) -> None:
    qmax = qm.program.input_quantizer.qmax
    shape = qm.program.input_shape
    q = np.concatenate(
        [
            qm.quantize_input(x),
            np.zeros((1,) + shape, dtype=np.int64),
            np.full((1,) + shape, qmax),
            _worst_cases(qm, 3, rng),
        ]
    )
    clear = qm.fhe_circuit.run(q, "disable")
    np.testing.assert_array_equal(qm.fhe_circuit.run(q, "simulate"), clear)
    np.testing.assert_array_equal(clear, qm.program(q))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    channels=st.sampled_from([(1, 6), (2, 5)]),
    out_per_group=st.integers(1, 2),
    depthwise=st.booleans(),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    dilation=st.integers(1, 2),
    padding=st.sampled_from([0, 1, 2, "same"]),
    pool=st.booleans(),
    bits=st.integers(2, 4),
    seed=st.integers(0, 2**16),
)
def test_conv_simulate_equals_disable_bit_for_bit(
    channels, out_per_group, depthwise, kernel, stride, dilation, padding, pool, bits, seed
) -> None:
    in_channels, size = channels
    groups = in_channels if depthwise else 1
    if padding == "same":
        stride = 1  # torch refuses strided 'same' convolutions
    torch.manual_seed(seed)
    conv = nn.Conv2d(
        in_channels, in_channels * out_per_group, kernel, stride, padding, dilation, groups
    )
    layers: list[nn.Module] = [conv, nn.ReLU()]
    if pool:
        layers.append(nn.AvgPool2d(2, stride=1, padding=1))
    layers += [nn.Flatten(), nn.LazyLinear(3)]
    model = nn.Sequential(*layers)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(30, in_channels, size, size))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Using padding='same'")  # torch's own speed note
        model(torch.as_tensor(x[:1], dtype=torch.float32))  # materialize the lazy layer
    qm = compile_torch_model(model, x, n_bits=bits, p_error=TINY_P_ERROR)
    _check_simulate_equals_disable(qm, rng.normal(size=(3, in_channels, size, size)) * 3, rng)


def test_conv1d_and_dilation_simulate_equals_disable() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv1d(2, 4, 3, padding="same", dilation=2),
        nn.BatchNorm1d(4),
        nn.Tanh(),
        nn.AvgPool1d(2),
        nn.Conv1d(4, 2, 2, stride=2, padding=1, groups=2),
        nn.Flatten(),
    )
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 2, 8))
    qm = compile_torch_model(model, x, n_bits=3, p_error=TINY_P_ERROR)
    _check_simulate_equals_disable(qm, rng.normal(size=(3, 2, 8)), rng)


@pytest.mark.slow
@pytest.mark.execute
def test_small_cnn_execute_equals_disable() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * 2 * 2, 2),
    )
    rng = np.random.default_rng(2)
    x = rng.normal(size=(30, 1, 4, 4))
    qm = compile_torch_model(model, x, n_bits=3, p_error=TINY_P_ERROR)
    x_test = rng.normal(size=(1, 1, 4, 4))
    clear = qm.forward_integers(x_test, fhe="disable")
    np.testing.assert_array_equal(qm.forward_integers(x_test, fhe="simulate"), clear)
    np.testing.assert_array_equal(qm.forward_integers(x_test, fhe="execute"), clear)

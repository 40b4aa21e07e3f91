"""compile_torch_model end to end: exactness across fhe modes, accuracy, error paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from fhe_quant.errors import (
    CompilationError,
    InputError,
    NotCompiledError,
    ParameterError,
    TraceError,
    UnsupportedOpError,
)
from fhe_quant.torch import compile_torch_model

#: Per-lookup error probability for exactness tests: any mismatch is then a real bug.
TINY_P_ERROR = 1e-12

ACTS = [
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.ELU,
    nn.Softplus,
    nn.Hardtanh,
]


def _mlp(widths: list[int], act: type[nn.Module], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def _worst_cases(qm) -> np.ndarray:
    """Float inputs whose codes drive each first-layer accumulator to its proven bounds."""
    weight = qm.program.steps[0].weight
    qmax = qm.program.input_quantizer.qmax
    q = np.concatenate([np.where(weight > 0, qmax, 0), np.where(weight < 0, qmax, 0)])
    return qm.program.input_quantizer.dequantize(q)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    depth=st.integers(1, 3),
    width=st.integers(2, 6),
    bits=st.integers(2, 5),
    act=st.sampled_from(ACTS),
    seed=st.integers(0, 2**16),
)
def test_simulate_equals_disable_bit_for_bit(depth, width, bits, act, seed) -> None:
    widths = [4] + [width] * depth + [3]
    model = _mlp(widths, act, seed)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(40, 4))
    qm = compile_torch_model(model, x, n_bits=bits, p_error=TINY_P_ERROR)
    x_test = np.concatenate(
        [rng.normal(size=(6, 4)), rng.normal(size=(2, 4)) * 100, _worst_cases(qm)]
    )
    clear = qm.forward_integers(x_test, fhe="disable")
    simulated = qm.forward_integers(x_test, fhe="simulate")
    np.testing.assert_array_equal(simulated, clear)


@pytest.mark.slow
@pytest.mark.execute
def test_execute_equals_disable_bit_for_bit() -> None:
    model = _mlp([6, 8, 8, 3], nn.ReLU, seed=7)
    rng = np.random.default_rng(7)
    x = rng.normal(size=(60, 6))
    qm = compile_torch_model(model, x, n_bits=3, p_error=TINY_P_ERROR)
    x_test = rng.normal(size=(3, 6))
    clear = qm.forward_integers(x_test, fhe="disable")
    np.testing.assert_array_equal(qm.forward_integers(x_test, fhe="simulate"), clear)
    np.testing.assert_array_equal(qm.forward_integers(x_test, fhe="execute"), clear)
    np.testing.assert_array_equal(
        qm.forward(x_test, fhe="execute"), qm.forward(x_test, fhe="disable")
    )


def test_accumulator_wider_than_16_bits_compiles_with_narrow_tables() -> None:
    # 8-bit inputs times 8-bit weights over 256 inputs: a 22-bit accumulator, proven.
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(256, 4), nn.ReLU(), nn.Linear(4, 2))
    x = np.random.default_rng(2).normal(size=(64, 256))
    qm = compile_torch_model(  # no budget: the default before accumulator_bits='auto'
        model, x, n_bits=8, rounding_bits=4, p_error=TINY_P_ERROR, accumulator_bits=None
    )
    assert qm.statistics["layers"][0]["accumulator_bits"] > 16
    assert max(qm.program.lookups_by_width()) <= 16
    assert qm.statistics["layers"][0]["table_input_bits"] == 4
    x_test = np.concatenate([x[:3], _worst_cases(qm)])
    np.testing.assert_array_equal(
        qm.forward_integers(x_test, fhe="simulate"), qm.forward_integers(x_test, fhe="disable")
    )


def test_single_linear_layer_needs_no_bootstrap() -> None:
    model = nn.Sequential(nn.Linear(5, 2), nn.Sigmoid())
    x = np.random.default_rng(0).normal(size=(30, 5))
    qm = compile_torch_model(model, x, n_bits=8)
    assert qm.statistics["pbs_count"] == 0
    # the sigmoid after the last layer runs on the client, in float
    out = qm.forward(x, fhe="simulate")
    assert np.all((out > 0) & (out < 1))


def test_one_table_per_hidden_activation_plus_dropped_bits() -> None:
    model = _mlp([5, 7, 4, 2], nn.ReLU, seed=1)
    x = np.random.default_rng(1).normal(size=(50, 5))
    qm = compile_torch_model(model, x, n_bits=3)
    layers = qm.statistics["layers"]
    expected = sum(layer["lookups"] * (1 + layer["truncated_bits"]) for layer in layers[:-1])
    assert qm.statistics["pbs_count"] == expected == sum(qm.program.lookups_by_width().values())
    assert "lookups" not in layers[-1]  # no bootstrap after the last matmul


def test_approximate_rounding_needs_no_extra_bootstrap_and_stays_accurate(
    digits, digits_mlp
) -> None:
    x_train, x_test, _, y_test = digits
    # NOTE: no budget, the default before accumulator_bits='auto'
    exact = compile_torch_model(
        digits_mlp, x_train, n_bits=4, accumulator_bits=None, compile=False
    )
    approx = compile_torch_model(
        digits_mlp, x_train, n_bits=4, rounding="approximate", accumulator_bits=None
    )
    lookups = sum(layer.get("lookups", 0) for layer in approx.statistics["layers"])
    assert approx.statistics["pbs_count"] == lookups == 128
    assert approx.statistics["pbs_per_precision"] == {5: 128}
    assert "approximate)" in approx.program.source()
    report = approx.report(x_test[:120], y_test[:120], fhe="simulate")
    assert report.scores["simulate"] >= report.scores["quantized"] - 0.05
    # the exact program rounds the same bits: same widths, one bootstrap per bit more
    assert [s.index_bits for s in exact.program.steps[1::2]] == [5, 5]
    assert exact.program.lookups_by_width()[1] == sum(
        64 * s.lsbs for s in exact.program.steps[1::2]
    )


def test_bad_rounding_mode(small) -> None:
    model, x = small
    with pytest.raises(ParameterError, match=r"'rounding'.*'nearest'"):
        compile_torch_model(model, x, rounding="nearest", compile=False)


def test_digits_mlp_6_bits_within_2_points_of_float(digits, digits_mlp) -> None:
    x_train, x_test, _, y_test = digits
    qm = compile_torch_model(digits_mlp, x_train, n_bits=6)
    report = qm.report(x_test, y_test, fhe="simulate")
    assert report.scores["simulate"] >= report.scores["float"] - 0.02
    assert (
        report.scores["simulate"] == report.scores["quantized"]
        or abs(report.scores["simulate"] - report.scores["quantized"]) < 0.005
    )
    assert "PBS per sample" in str(report)


# ------------------------------------------------------------------------- error paths


@pytest.fixture(scope="module")
def small() -> tuple[nn.Module, np.ndarray]:
    model = _mlp([4, 5, 2], nn.ReLU, seed=0)
    return model, np.random.default_rng(0).normal(size=(30, 4))


@pytest.mark.parametrize("n_bits", [0, 9, 12, 2.5, "6", True, {"inputs": 4, "bogus": 3}])
def test_bad_n_bits(small, n_bits) -> None:
    model, x = small
    with pytest.raises(ParameterError, match=r"n_bits|bits"):
        compile_torch_model(model, x, n_bits=n_bits, compile=False)


def test_calibration_data_with_nan(small) -> None:
    model, x = small
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(InputError, match=r"NaN or inf.*\(3, 1\)"):
        compile_torch_model(model, bad, compile=False)


def test_calibration_data_with_wrong_shape(small) -> None:
    model, _ = small
    with pytest.raises(TraceError, match=r"shape \(10, 7\).*mat1 and mat2"):
        compile_torch_model(model, np.zeros((10, 7)), compile=False)
    with pytest.raises(InputError, match="batch"):
        compile_torch_model(model, np.zeros(4), compile=False)


def test_inference_input_errors_leave_the_model_usable(small) -> None:
    model, x = small
    qm = compile_torch_model(model, x, n_bits=3, compile=False)
    expected = qm.forward(x[:2])
    with pytest.raises(InputError, match=r"\(5,\).*\(4,\)"):
        qm.forward(np.zeros((2, 5)))
    with pytest.raises(InputError, match="dtype"):
        qm.forward(np.array([["a", "b", "c", "d"]]))
    with pytest.raises(InputError, match="NaN"):
        qm.forward(np.full((1, 4), np.inf))
    with pytest.raises(ParameterError, match=r"'fhe'.*simulated"):
        qm.forward(x[:2], fhe="simulated")
    with pytest.raises(NotCompiledError, match="compile"):
        qm.forward(x[:2], fhe="simulate")
    np.testing.assert_array_equal(qm.forward(x[:2]), expected)
    qm.compile(x)  # and it can still be compiled afterwards
    np.testing.assert_array_equal(qm.forward(x[:2], fhe="simulate"), expected)


def test_unsupported_op_is_reported_before_anything_compiles() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Softmax(dim=1))
    with pytest.raises(UnsupportedOpError, match=r"Softmax.*'1 \(Softmax\)'"):
        compile_torch_model(model, np.zeros((3, 4)))


def test_torch_tensor_inputs_are_accepted(small) -> None:
    model, x = small
    qm = compile_torch_model(model, torch.tensor(x, dtype=torch.float32), n_bits=4, compile=False)
    np.testing.assert_allclose(qm.forward(torch.tensor(x[:3])), qm.forward(x[:3]))


def test_infeasible_circuit_is_a_clear_error_and_the_model_stays_usable() -> None:
    torch.manual_seed(0)
    model = _mlp([64, 64, 64, 10], nn.ReLU, seed=0)
    x = np.random.default_rng(0).normal(size=(64, 64))
    with pytest.raises(
        CompilationError, match=r"no cryptographic parameters.*rounding_bits"
    ) as info:
        compile_torch_model(model, x, n_bits=8, rounding_bits=6, accumulator_bits=None)
    qm = info.value.quantized_module
    assert qm.forward(x[:2]).shape == (2, 10)
    with pytest.raises(NotCompiledError):
        qm.forward(x[:2], fhe="simulate")

"""Tests of fhe_quant.quant.config.QuantConfig."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import fhe_quant.quant as quant
from fhe_quant.quant.calibrate import CALIBRATION_METHODS
from fhe_quant.quant.config import ROLES, QuantConfig


def _bits(config: QuantConfig) -> tuple[int, int, int, int]:
    return (
        config.n_bits_inputs,
        config.n_bits_weights,
        config.n_bits_activations,
        config.n_bits_outputs,
    )


def test_defaults() -> None:
    config = QuantConfig()
    assert _bits(config) == (6, 6, 6, 8)
    assert config.per_channel is True
    assert config.calibration == "minmax"
    assert config.rounding_bits is None
    assert config.rounding_exact is True
    assert ROLES == ("inputs", "weights", "activations", "outputs")
    assert [config.n_bits(role) for role in ROLES] == [6, 6, 6, 8]


def test_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        QuantConfig().per_channel = False  # type: ignore[misc]


def test_public_names() -> None:
    assert set(quant.__all__) == {
        "CALIBRATION_METHODS",
        "ROLES",
        "MSEObserver",
        "MinMaxObserver",
        "MovingAverageAbsMaxObserver",
        "Observer",
        "PercentileObserver",
        "QuantConfig",
        "UniformQuantizer",
        "make_observer",
    }
    assert all(hasattr(quant, name) for name in quant.__all__)


@pytest.mark.parametrize("n_bits", [1, 4, 8, np.int64(5)])
def test_from_n_bits_int_sets_every_role(n_bits: int) -> None:
    config = QuantConfig.from_n_bits(n_bits)
    assert _bits(config) == (int(n_bits),) * 4
    assert type(config.n_bits_outputs) is int


@pytest.mark.parametrize(
    ("n_bits", "expected"),
    [
        ({}, (6, 6, 6, 8)),
        ({"weights": 3}, (6, 3, 6, 8)),
        ({"outputs": 2, "inputs": 7}, (7, 6, 6, 2)),
        ({"activations": 4}, (4, 4, 4, 4)),
        ({"activations": 4, "outputs": 8}, (4, 4, 4, 8)),
        ({"inputs": 1, "weights": 2, "activations": 3, "outputs": 5}, (1, 2, 3, 5)),
    ],
)
def test_from_n_bits_dict(n_bits: dict[str, int], expected: tuple[int, ...]) -> None:
    assert _bits(QuantConfig.from_n_bits(n_bits)) == expected


def test_from_n_bits_passes_other_fields() -> None:
    config = QuantConfig.from_n_bits(
        5, per_channel=False, calibration="mse", rounding_bits=7, rounding_exact=False
    )
    assert (
        config.per_channel,
        config.calibration,
        config.rounding_bits,
        config.rounding_exact,
    ) == (False, "mse", 7, False)


@pytest.mark.parametrize("n_bits", [0, 9, 12, True, 3.0, "6", None, [6]])
def test_from_n_bits_bad_value(n_bits: object) -> None:
    with pytest.raises(ValueError) as info:
        QuantConfig.from_n_bits(n_bits)  # type: ignore[arg-type]
    assert str(info.value) == (
        "The 'n_bits' parameter must be an int in [1, 8] or a dict with keys "
        f"{{'inputs', 'weights', 'activations', 'outputs'}}. Got {n_bits!r} instead."
    )


def test_from_n_bits_unknown_key() -> None:
    with pytest.raises(ValueError) as info:
        QuantConfig.from_n_bits({"weights": 4, "biases": 4})
    message = str(info.value)
    assert "'n_bits'" in message and "'biases'" in message
    assert "'inputs', 'weights', 'activations', 'outputs'" in message


@pytest.mark.parametrize("value", [0, 9, True, 4.0])
def test_from_n_bits_bad_dict_value(value: object) -> None:
    with pytest.raises(ValueError, match="'n_bits' parameter's 'weights' entry") as info:
        QuantConfig.from_n_bits({"weights": value})  # type: ignore[dict-item]
    assert f"Got {value!r} instead." in str(info.value)


@pytest.mark.parametrize("name", ["n_bits_weights", "colour"])
def test_from_n_bits_unknown_keyword(name: str) -> None:
    with pytest.raises(ValueError, match=f"'{name}'"):
        QuantConfig.from_n_bits(6, **{name: 4})


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("value", [0, 9, 12, True, 3.0, None])
def test_bits_field_validation(role: str, value: object) -> None:
    name = f"n_bits_{role}"
    with pytest.raises(ValueError) as info:
        QuantConfig(**{name: value})  # type: ignore[arg-type]
    assert str(info.value) == (
        f"The '{name}' parameter of QuantConfig must be an int in [1, 8]. Got {value!r} instead."
    )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"rounding_bits": 0}, "'rounding_bits'"),
        ({"rounding_bits": 17}, "'rounding_bits'"),
        ({"rounding_bits": True}, "'rounding_bits'"),
        ({"rounding_bits": 8.0}, "'rounding_bits'"),
        ({"calibration": "kl"}, "'calibration'"),
        ({"calibration": None}, "'calibration'"),
        ({"per_channel": 1}, "'per_channel'"),
        ({"rounding_exact": "yes"}, "'rounding_exact'"),
    ],
)
def test_field_validation(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        QuantConfig(**kwargs)  # type: ignore[arg-type]


def test_calibration_error_lists_methods() -> None:
    with pytest.raises(ValueError) as info:
        QuantConfig(calibration="kl")
    assert "'minmax', 'percentile', 'ema', 'mse'" in str(info.value)


@pytest.mark.parametrize("method", CALIBRATION_METHODS)
@pytest.mark.parametrize("rounding_bits", [None, 1, 16])
def test_valid_options(method: str, rounding_bits: int | None) -> None:
    config = QuantConfig(calibration=method, rounding_bits=rounding_bits)
    assert (config.calibration, config.rounding_bits) == (method, rounding_bits)


def test_n_bits_role_validation() -> None:
    with pytest.raises(ValueError, match="'role'"):
        QuantConfig().n_bits("biases")


@pytest.mark.parametrize(
    "config",
    [
        QuantConfig(),
        QuantConfig(
            1, 2, 3, 4, per_channel=False, calibration="ema", rounding_bits=5, rounding_exact=False
        ),
        QuantConfig.from_n_bits(np.int64(7)),
    ],
)
def test_dict_round_trip(config: QuantConfig) -> None:
    data = config.to_dict()
    assert data == {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    assert QuantConfig.from_dict(data) == config
    assert QuantConfig.from_dict(json.loads(json.dumps(data))) == config


def test_from_dict_defaults_and_errors() -> None:
    assert QuantConfig.from_dict({"n_bits_weights": 3}) == QuantConfig(n_bits_weights=3)
    with pytest.raises(ValueError, match="unknown keys \\['n_bits'\\]"):
        QuantConfig.from_dict({"n_bits": 3})
    with pytest.raises(ValueError, match="needs a dict"):
        QuantConfig.from_dict("minmax")  # type: ignore[arg-type]

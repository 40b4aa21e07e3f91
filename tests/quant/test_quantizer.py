"""Tests of fhe_quant.quant.quantizer.UniformQuantizer."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fhe_quant.quant.quantizer import MIN_SCALE, UniformQuantizer

SETTINGS = settings(derandomize=True, database=None, deadline=None, max_examples=300)

BOUND = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, allow_subnormal=False)


@st.composite
def quantizers(draw: st.DrawFn) -> UniformQuantizer:
    """Quantizers built by from_range over every bits/signed/symmetric/narrow option."""
    bits = draw(st.integers(2, 8))
    signed = draw(st.booleans())
    symmetric = draw(st.booleans())
    narrow_range = draw(st.booleans())
    low, high = sorted((draw(BOUND), draw(BOUND)))
    if symmetric and not signed:
        low, high = abs(low), abs(high)
        low, high = min(low, high), max(low, high)
    return UniformQuantizer.from_range(
        low, high, bits, signed=signed, symmetric=symmetric, narrow_range=narrow_range
    )


# ----------------------------------------------------------------------------- format


@pytest.mark.parametrize(
    ("bits", "signed", "narrow_range", "qmin", "qmax"),
    [
        (8, False, False, 0, 255),
        (8, False, True, 0, 254),
        (8, True, False, -128, 127),
        (8, True, True, -127, 127),
        (2, True, False, -2, 1),
        (2, True, True, -1, 1),
        (1, False, False, 0, 1),
        (4, False, False, 0, 15),
    ],
)
def test_integer_range(bits: int, signed: bool, narrow_range: bool, qmin: int, qmax: int) -> None:
    q = UniformQuantizer(bits, (1.0,), (max(qmin, 0),), signed=signed, narrow_range=narrow_range)
    assert (q.qmin, q.qmax) == (qmin, qmax)
    assert not q.per_channel


def test_fields_are_normalised() -> None:
    q = UniformQuantizer(np.int64(4), [np.float32(0.5), 2], np.array([1, 2]), axis=np.int64(0))
    assert q.scale == (0.5, 2.0)
    assert q.zero_point == (1, 2)
    assert type(q.bits) is int and type(q.axis) is int
    assert all(type(v) is float for v in q.scale)
    assert all(type(v) is int for v in q.zero_point)
    assert q.per_channel


def test_is_frozen() -> None:
    q = UniformQuantizer(8, (1.0,), (0,))
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.bits = 4  # type: ignore[misc]


# ----------------------------------------------------------------------------- mapping


def test_quantize_known_values() -> None:
    q = UniformQuantizer(bits=4, scale=(0.5,), zero_point=(3,))
    x = np.array([-10.0, -1.5, -0.25, 0.0, 0.25, 0.75, 1.0, 6.0, 6.3, 100.0])
    codes = q.quantize(x)
    assert codes.dtype == np.int64
    # round half to even: -0.5 -> -0, 0.5 -> 0, 1.5 -> 2
    assert codes.tolist() == [0, 0, 3, 3, 3, 5, 5, 15, 15, 15]
    assert q.dequantize(codes).tolist() == [-1.5, -1.5, 0, 0, 0, 1.0, 1.0, 6.0, 6.0, 6.0]
    assert q.dequantize(codes).dtype == np.float64
    assert q.min_value().tolist() == [-1.5]
    assert q.max_value().tolist() == [6.0]


def test_quantize_rejects_nan() -> None:
    q = UniformQuantizer(8, (1.0,), (0,))
    with pytest.raises(ValueError, match="2 NaN"):
        q.quantize(np.array([1.0, np.nan, np.nan]))


@SETTINGS
@given(quantizers(), st.floats(0.0, 1.0))
def test_round_trip_error_at_most_half_step(q: UniformQuantizer, t: float) -> None:
    low, high = float(q.min_value()[0]), float(q.max_value()[0])
    x = min(max(low + t * (high - low), low), high)
    error = abs(float(q.fake_quantize(np.array(x))) - x)
    scale = q.scale[0]
    assert error <= scale / 2 + 1e-9 * (abs(x) + scale)


@SETTINGS
@given(quantizers(), st.floats(1.0, 1e300), st.booleans())
def test_out_of_range_is_clipped(q: UniformQuantizer, factor: float, above: bool) -> None:
    low, high = float(q.min_value()[0]), float(q.max_value()[0])
    span = high - low
    x = high + factor * span if above else low - factor * span
    codes = q.quantize(np.array([x, np.inf if above else -np.inf]))
    expected = q.qmax if above else q.qmin
    assert codes.tolist() == [expected, expected]


@SETTINGS
@given(quantizers())
def test_zero_is_exact(q: UniformQuantizer) -> None:
    assert float(q.fake_quantize(np.array(0.0))) == 0.0
    assert q.min_value()[0] <= 0.0 <= q.max_value()[0]


@SETTINGS
@given(quantizers())
def test_codes_stay_in_range(q: UniformQuantizer) -> None:
    x = np.linspace(2 * q.min_value()[0] - 1, 2 * q.max_value()[0] + 1, 257)
    codes = q.quantize(x)
    assert codes.min() >= q.qmin and codes.max() <= q.qmax
    assert np.all(np.diff(codes) >= 0)


@SETTINGS
@given(
    st.integers(2, 8),
    st.booleans(),
    st.lists(st.tuples(BOUND, BOUND), min_size=1, max_size=5),
    st.integers(0, 2),
)
def test_per_channel_matches_per_tensor_by_channel(
    bits: int, signed: bool, bounds: list[tuple[float, float]], axis: int
) -> None:
    low = np.array([min(b) for b in bounds])
    high = np.array([max(b) for b in bounds])
    q = UniformQuantizer.from_range(low, high, bits, signed=signed, axis=axis - 3)
    assert len(q.scale) == len(bounds)
    shape = [2, 3, 4]
    shape[axis] = len(bounds)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1.0, 1.0, size=shape) * np.maximum(np.abs(low), np.abs(high)).reshape(
        [len(bounds) if d == axis else 1 for d in range(3)]
    )
    codes = q.quantize(x)
    for channel in range(len(bounds)):
        single = UniformQuantizer.from_range(low[channel], high[channel], bits, signed=signed)
        part = np.take(x, channel, axis=axis)
        assert np.array_equal(np.take(codes, channel, axis=axis), single.quantize(part))
        assert float(np.take(q.fake_quantize(np.zeros(shape)), channel, axis=axis).max()) == 0


def test_per_channel_beats_per_tensor() -> None:
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(8, 16)) * 10 ** np.linspace(-2, 0, 8)[:, None]
    options = {"signed": True, "symmetric": True, "narrow_range": True}
    per_tensor = UniformQuantizer.from_range(weights.min(), weights.max(), 4, **options)
    per_channel = UniformQuantizer.from_range(
        weights.min(axis=1), weights.max(axis=1), 4, axis=0, **options
    )
    error_tensor = np.mean((per_tensor.fake_quantize(weights) - weights) ** 2)
    error_channel = np.mean((per_channel.fake_quantize(weights) - weights) ** 2)
    assert error_channel < error_tensor


def test_broadcast_arrays() -> None:
    q = UniformQuantizer(8, (1.0, 2.0, 4.0), (0, 1, 2), axis=-2)
    assert q.scale_array(3).shape == (1, 3, 1)
    assert q.scale_array(3).dtype == np.float64
    assert q.zero_point_array(2).shape == (3, 1)
    assert q.zero_point_array(2).dtype == np.int64
    assert q.zero_point_array(2).ravel().tolist() == [0, 1, 2]
    tensor = UniformQuantizer(8, (0.5,), (4,))
    assert tensor.scale_array(0).shape == ()
    assert tensor.scale_array(2).shape == (1, 1)


def test_per_channel_shape_errors() -> None:
    q = UniformQuantizer(8, (1.0, 2.0), (0, 0), axis=1)
    with pytest.raises(ValueError, match="2 channels on axis 1"):
        q.quantize(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="'axis'"):
        q.quantize(np.zeros(2))
    with pytest.raises(ValueError, match="scalar"):
        q.dequantize(np.array(3))
    with pytest.raises(ValueError, match="'axis'"):
        q.scale_array(1)


# ----------------------------------------------------------------------------- from_range


def test_from_range_affine_known() -> None:
    q = UniformQuantizer.from_range(-1.0, 3.0, 8)
    assert q.scale == (4.0 / 255,)
    assert q.zero_point == (64,)  # round(0 - (-1) / (4/255)) = round(63.75)


def test_from_range_symmetric_signed_known() -> None:
    q = UniformQuantizer.from_range(-2.0, 1.0, 8, signed=True, symmetric=True)
    assert q.scale == (2.0 / 127,)
    assert q.zero_point == (0,)
    assert q.max_value()[0] == pytest.approx(2.0, rel=1e-15)


def test_from_range_symmetric_unsigned() -> None:
    q = UniformQuantizer.from_range(1.0, 3.0, 2, symmetric=True)
    assert (q.scale, q.zero_point) == ((1.0,), (0,))  # range widened to [0, 3]
    with pytest.raises(ValueError, match="'min_val'"):
        UniformQuantizer.from_range(-1.0, 3.0, 2, symmetric=True)


def test_from_range_widens_to_zero() -> None:
    q = UniformQuantizer.from_range(2.0, 5.0, 4)
    assert q.zero_point == (0,)
    assert q.scale == (5.0 / 15,)
    q = UniformQuantizer.from_range(-5.0, -2.0, 4)
    assert q.zero_point == (15,)
    assert q.max_value()[0] == 0.0


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("signed", [False, True])
def test_from_range_degenerate(symmetric: bool, signed: bool) -> None:
    q = UniformQuantizer.from_range(0.0, 0.0, 4, signed=signed, symmetric=symmetric)
    assert q.scale == (1.0,)
    assert q.fake_quantize(np.array([0.0])).tolist() == [0.0]
    assert q.quantize(np.array([0.0])).tolist() == [q.zero_point[0]]


def test_from_range_tiny_range_has_positive_scale() -> None:
    q = UniformQuantizer.from_range(0.0, 1e-300, 8)
    assert q.scale == (MIN_SCALE,)
    per_channel = UniformQuantizer.from_range(
        np.array([0.0, -1.0]), np.array([0.0, 1.0]), 8, axis=0
    )
    assert per_channel.scale[0] == 1.0
    assert per_channel.scale[1] == 2.0 / 255


def test_from_range_one_bit_unsigned() -> None:
    q = UniformQuantizer.from_range(0.0, 1.0, 1)
    assert (q.qmin, q.qmax, q.scale, q.zero_point) == (0, 1, (1.0,), (0,))
    assert q.quantize(np.array([-1.0, 0.4, 0.6, 3.0])).tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize(
    ("low", "high", "field"),
    [
        (1.0, 0.0, "'min_val'"),
        (np.nan, 1.0, "'min_val'"),
        (0.0, np.inf, "'max_val'"),
        (np.zeros(2), np.zeros(3), "'max_val'"),
        (np.zeros((2, 2)), np.zeros((2, 2)), "'min_val'"),
        (np.zeros(0), np.zeros(0), "'min_val'"),
        (np.zeros(2), np.ones(2), "'axis'"),
        ("a", 1.0, "'min_val'"),
    ],
)
def test_from_range_errors(low: object, high: object, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        UniformQuantizer.from_range(low, high, 8)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"bits": 1, "signed": True}, "'bits'"),
        ({"bits": 0}, "'bits'"),
        ({"bits": 9}, "'bits'"),
        ({"bits": 8, "symmetric": 1}, "'symmetric'"),
        ({"bits": 8, "signed": "yes"}, "'signed'"),
    ],
)
def test_from_range_parameter_errors(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        UniformQuantizer.from_range(0.0, 1.0, **kwargs)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("bits", [0, 9, 12, True, 3.0, "8", None])
def test_bits_validation(bits: object) -> None:
    with pytest.raises(ValueError, match="'bits' parameter of UniformQuantizer") as info:
        UniformQuantizer(bits, (1.0,), (0,))  # type: ignore[arg-type]
    assert f"Got {bits!r} instead." in str(info.value)


def test_bits_error_message_exact() -> None:
    with pytest.raises(ValueError) as info:
        UniformQuantizer(12, (1.0,), (0,))
    assert str(info.value) == (
        "The 'bits' parameter of UniformQuantizer must be an int in [1, 8]. Got 12 instead."
    )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"scale": (0.0,)}, "'scale'"),
        ({"scale": (-1.0,)}, "'scale'"),
        ({"scale": (np.nan,)}, "'scale'"),
        ({"scale": (np.inf,)}, "'scale'"),
        ({"scale": (True,)}, "'scale'"),
        ({"scale": ()}, "'scale'"),
        ({"scale": 1.0}, "'scale'"),
        ({"scale": "1"}, "'scale'"),
        ({"zero_point": (256,)}, "'zero_point'"),
        ({"zero_point": (-1,)}, "'zero_point'"),
        ({"zero_point": (1.0,)}, "'zero_point'"),
        ({"zero_point": (False,)}, "'zero_point'"),
        ({"zero_point": (0, 0)}, "'zero_point'"),
        ({"scale": (1.0, 2.0), "zero_point": (0, 0)}, "'axis'"),
        ({"axis": 1.0}, "'axis'"),
        ({"axis": True}, "'axis'"),
        ({"signed": 1}, "'signed'"),
        ({"narrow_range": None}, "'narrow_range'"),
        ({"bits": 1, "narrow_range": True}, "'narrow_range'"),
        ({"bits": 1, "signed": True}, "'bits'"),
        ({"signed": True, "narrow_range": True, "zero_point": (-128,)}, "'zero_point'"),
    ],
)
def test_field_validation(kwargs: dict[str, object], field: str) -> None:
    arguments: dict[str, object] = {"bits": 8, "scale": (1.0,), "zero_point": (0,)}
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=field):
        UniformQuantizer(**arguments)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- serialisation


@SETTINGS
@given(quantizers(), st.sampled_from([None, 0, -1]))
def test_dict_round_trip(q: UniformQuantizer, axis: int | None) -> None:
    q = dataclasses.replace(q, axis=axis)
    data = q.to_dict()
    assert data == {
        "bits": q.bits,
        "scale": q.scale,
        "zero_point": q.zero_point,
        "signed": q.signed,
        "narrow_range": q.narrow_range,
        "axis": axis,
    }
    assert UniformQuantizer.from_dict(data) == q
    assert UniformQuantizer.from_dict(json.loads(json.dumps(data))) == q


def test_from_dict_errors() -> None:
    data = UniformQuantizer(8, (1.0,), (0,)).to_dict()
    with pytest.raises(ValueError, match="unknown keys \\['colour'\\]"):
        UniformQuantizer.from_dict({**data, "colour": 1})
    del data["scale"]
    with pytest.raises(ValueError, match="'scale'"):
        UniformQuantizer.from_dict(data)
    with pytest.raises(ValueError, match="needs a dict"):
        UniformQuantizer.from_dict([1, 2])  # type: ignore[arg-type]

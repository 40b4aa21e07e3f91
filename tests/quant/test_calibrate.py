"""Tests of fhe_quant.quant.calibrate: the calibration observers."""

from __future__ import annotations

import numpy as np
import pytest

from fhe_quant.quant.calibrate import (
    CALIBRATION_METHODS,
    MinMaxObserver,
    MovingAverageAbsMaxObserver,
    MSEObserver,
    Observer,
    PercentileObserver,
    make_observer,
)
from fhe_quant.quant.quantizer import UniformQuantizer


def _laplace_with_outliers(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    data = rng.laplace(0.0, 1.0, size=20_000)
    data[:10] = rng.choice([-1.0, 1.0], size=10) * rng.uniform(30.0, 40.0, size=10)
    return data


def _mse(quantizer: UniformQuantizer, data: np.ndarray) -> float:
    return float(np.mean((quantizer.fake_quantize(data) - data) ** 2))


# ----------------------------------------------------------------------------- common


@pytest.mark.parametrize("method", CALIBRATION_METHODS)
def test_factory_builds_each_method(method: str) -> None:
    expected = {
        "minmax": MinMaxObserver,
        "percentile": PercentileObserver,
        "ema": MovingAverageAbsMaxObserver,
        "mse": MSEObserver,
    }[method]
    observer = make_observer(method, axis=1)
    assert type(observer) is expected
    assert observer.axis == 1
    assert not observer.observed


def test_factory_passes_options() -> None:
    observer = make_observer("percentile", percentile=90.0)
    assert isinstance(observer, PercentileObserver)
    assert observer.percentile == 90.0


@pytest.mark.parametrize("method", ["MinMax", "", "max", None])
def test_factory_unknown_method(method: object) -> None:
    with pytest.raises(ValueError, match="'method'") as info:
        make_observer(method)  # type: ignore[arg-type]
    assert "'minmax', 'percentile', 'ema', 'mse'" in str(info.value)


@pytest.mark.parametrize("method", CALIBRATION_METHODS)
def test_nothing_observed(method: str) -> None:
    observer = make_observer(method)
    with pytest.raises(ValueError, match="observe"):
        observer.quantizer(8)
    with pytest.raises(ValueError, match="observe"):
        observer.range()


@pytest.mark.parametrize("method", CALIBRATION_METHODS)
def test_non_finite_values_rejected(method: str) -> None:
    observer = make_observer(method)
    with pytest.raises(ValueError, match="got 3 NaN or inf values"):
        observer.observe(np.array([1.0, np.nan, np.inf, -np.inf, 2.0]))
    assert not observer.observed
    with pytest.raises(ValueError, match="empty"):
        observer.observe(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="float array"):
        observer.observe(np.array(["a"]))


@pytest.mark.parametrize("method", CALIBRATION_METHODS)
def test_per_channel_shapes(method: str) -> None:
    rng = np.random.default_rng(1)
    observer = make_observer(method, axis=1)
    observer.observe(rng.normal(size=(10, 3, 4)))
    observer.observe(rng.normal(size=(7, 3, 4)))
    low, high = observer.range()
    assert low.shape == high.shape == (3,)
    assert np.all(low <= high)
    quantizer = observer.quantizer(6, signed=True, symmetric=True)
    assert len(quantizer.scale) == 3 and quantizer.axis == 1
    with pytest.raises(ValueError, match="earlier batches had 3"):
        observer.observe(rng.normal(size=(10, 4, 4)))
    with pytest.raises(ValueError, match="'axis'"):
        observer.observe(np.zeros(3))


@pytest.mark.parametrize("method", CALIBRATION_METHODS)
def test_per_tensor_shapes(method: str) -> None:
    observer = make_observer(method)
    observer.observe(np.linspace(-1.0, 2.0, 50).reshape(5, 10))
    low, high = observer.range()
    assert low.shape == high.shape == ()
    quantizer = observer.quantizer(4)
    assert len(quantizer.scale) == 1 and quantizer.axis is None
    assert quantizer.fake_quantize(np.array(0.0)) == 0.0


@pytest.mark.parametrize("axis", [1.0, True, "0"])
def test_axis_validation(axis: object) -> None:
    with pytest.raises(ValueError, match="'axis' parameter of MinMaxObserver"):
        MinMaxObserver(axis=axis)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- min/max


def test_minmax_running_range() -> None:
    observer = MinMaxObserver()
    observer.observe(np.array([[1.0, 2.0], [3.0, 4.0]]))
    observer.observe(np.array([-0.5, 2.5]))
    low, high = observer.range()
    assert (float(low), float(high)) == (-0.5, 4.0)
    assert observer.n_batches == 2
    assert observer.quantizer(8) == UniformQuantizer.from_range(-0.5, 4.0, 8)


def test_minmax_per_channel_negative_axis() -> None:
    x = np.array([[[1.0, -2.0], [3.0, 0.5]], [[-1.0, 7.0], [2.0, 0.0]]])  # (2, 2, 2)
    observer = MinMaxObserver(axis=-1)
    observer.observe(x)
    low, high = observer.range()
    assert low.tolist() == [-1.0, -2.0]
    assert high.tolist() == [3.0, 7.0]
    quantizer = observer.quantizer(8, signed=True, symmetric=True)
    assert quantizer == UniformQuantizer.from_range(
        np.array([-1.0, -2.0]), np.array([3.0, 7.0]), 8, signed=True, symmetric=True, axis=-1
    )
    assert quantizer.quantize(x).shape == x.shape


# ----------------------------------------------------------------------------- percentile


def test_percentile_known_range() -> None:
    observer = PercentileObserver(percentile=90.0)
    observer.observe(np.arange(0.0, 51.0))
    observer.observe(np.arange(51.0, 101.0))
    low, high = observer.range()
    assert (float(low), float(high)) == (10.0, 90.0)


def test_percentile_100_is_minmax() -> None:
    data = _laplace_with_outliers()
    observer = PercentileObserver(percentile=100)
    observer.observe(data)
    assert [float(v) for v in observer.range()] == [data.min(), data.max()]


def test_percentile_clips_outliers() -> None:
    data = _laplace_with_outliers()
    observer = PercentileObserver(percentile=99.0)
    observer.observe(data)
    low, high = observer.range()
    assert (float(low), float(high)) == tuple(np.percentile(data, [1.0, 99.0]))
    assert high < 10.0 < data.max()


def test_percentile_per_channel() -> None:
    x = np.stack([np.arange(101.0), -np.arange(101.0)], axis=1)  # (101, 2)
    observer = PercentileObserver(percentile=95.0, axis=1)
    observer.observe(x)
    low, high = observer.range()
    assert low.tolist() == [5.0, -95.0]
    assert high.tolist() == [95.0, -5.0]


def test_percentile_sample_cap_is_uniform_and_reproducible() -> None:
    batches = [np.full((2, 500), float(i)) + np.array([[0.0], [100.0]]) for i in range(10)]

    def run() -> np.ndarray:
        observer = PercentileObserver(axis=0, max_samples=1000, seed=3)
        for batch in batches:
            observer.observe(batch)
        return observer.samples

    samples = run()
    assert samples.shape == (2, 1000)
    assert np.array_equal(samples, run())
    # every channel keeps the same positions, and every batch is represented
    assert np.array_equal(samples[1] - samples[0], np.full(1000, 100.0))
    counts = np.bincount(samples[0].astype(int), minlength=10)
    assert counts.sum() == 1000
    assert counts.min() >= 50 and counts.max() <= 150


@pytest.mark.parametrize("percentile", [49.0, 100.5, np.nan, True, "99"])
def test_percentile_validation(percentile: object) -> None:
    with pytest.raises(ValueError, match="'percentile'"):
        PercentileObserver(percentile=percentile)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "value"), [("max_samples", 0), ("max_samples", 1.5), ("seed", -1), ("seed", True)]
)
def test_sampling_validation(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"'{name}'"):
        PercentileObserver(**{name: value})  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- EMA


def test_ema_follows_formula() -> None:
    observer = MovingAverageAbsMaxObserver(momentum=0.9)
    observer.observe(np.array([0.5, -3.0, 1.0]))
    low, high = observer.range()
    assert (float(low), float(high)) == (-3.0, 3.0)
    observer.observe(np.array([2.0, 7.0]))
    expected = 0.9 * 3.0 + (1 - 0.9) * 7.0
    low, high = observer.range()
    assert (float(low), float(high)) == (-expected, expected)


def test_ema_non_negative_data() -> None:
    observer = MovingAverageAbsMaxObserver(momentum=0.5)
    observer.observe(np.array([0.0, 2.0]))
    observer.observe(np.array([1.0, 6.0]))
    assert [float(v) for v in observer.range()] == [0.0, 4.0]
    assert observer.quantizer(4).zero_point == (0,)


def test_ema_per_channel() -> None:
    observer = MovingAverageAbsMaxObserver(momentum=0.75, axis=0)
    observer.observe(np.array([[1.0, 2.0], [-4.0, 0.0]]))
    observer.observe(np.array([[6.0, 0.0], [1.0, 1.0]]))
    low, high = observer.range()
    expected = np.array([0.75 * 2.0 + (1 - 0.75) * 6.0, 0.75 * 4.0 + (1 - 0.75) * 1.0])
    assert high.tolist() == expected.tolist()
    assert low.tolist() == [0.0, -expected[1]]


@pytest.mark.parametrize("momentum", [-0.1, 1.5, np.inf, False])
def test_ema_validation(momentum: object) -> None:
    with pytest.raises(ValueError, match="'momentum'"):
        MovingAverageAbsMaxObserver(momentum=momentum)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- MSE


def test_mse_beats_minmax_on_heavy_tails() -> None:
    data = _laplace_with_outliers()
    minmax, mse = MinMaxObserver(), MSEObserver()
    for observer in (minmax, mse):
        observer.observe(data)
    for options in ({"signed": False}, {"signed": True, "symmetric": True}):
        error_minmax = _mse(minmax.quantizer(4, **options), data)
        error_mse = _mse(mse.quantizer(4, **options), data)
        assert error_mse < 0.5 * error_minmax


def test_mse_range_is_plain_min_max() -> None:
    data = _laplace_with_outliers()
    observer = MSEObserver()
    observer.observe(data)
    assert [float(v) for v in observer.range()] == [data.min(), data.max()]


def test_mse_keeps_full_range_without_outliers() -> None:
    observer = MSEObserver(grid=20)
    data = np.array([0.0, 1.0, 2.0, 3.0])
    observer.observe(data)
    assert observer.quantizer(2) == UniformQuantizer.from_range(0.0, 3.0, 2)


def test_mse_per_channel_is_independent() -> None:
    rng = np.random.default_rng(2)
    x = np.stack([_laplace_with_outliers(1)[:2000], rng.uniform(-1.0, 1.0, 2000)], axis=1)
    per_channel = MSEObserver(axis=1, grid=50)
    per_channel.observe(x)
    quantizer = per_channel.quantizer(4, signed=True, symmetric=True)
    for channel in range(2):
        single = MSEObserver(grid=50)
        single.observe(x[:, channel])
        expected = single.quantizer(4, signed=True, symmetric=True)
        assert quantizer.scale[channel] == expected.scale[0]
        assert quantizer.zero_point[channel] == expected.zero_point[0]


@pytest.mark.parametrize("grid", [0, 2.0, True])
def test_mse_validation(grid: object) -> None:
    with pytest.raises(ValueError, match="'grid'"):
        MSEObserver(grid=grid)  # type: ignore[arg-type]


def test_base_observer_is_minmax() -> None:
    observer = Observer()
    observer.observe(np.array([-2.0, 5.0]))
    assert [float(v) for v in observer.range()] == [-2.0, 5.0]
    assert "n_batches=1" in repr(observer)

"""Calibration observers: collect statistics of float tensors, hand back a quantizer.

An observer sees one or more batches through :meth:`Observer.observe`, then
:meth:`Observer.quantizer` turns the statistics into a
:class:`~fhe_quant.quant.quantizer.UniformQuantizer`. Statistics are per tensor
(``axis=None``) or per channel along ``axis`` (reduced over every other axis).

Examples:
    >>> import numpy as np
    >>> observer = make_observer("minmax")
    >>> observer.observe(np.array([-1.0, 0.5, 3.0]))
    >>> [float(v) for v in observer.range()]
    [-1.0, 3.0]
    >>> observer.quantizer(8).zero_point
    (64,)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np

from fhe_quant.quant.quantizer import UniformQuantizer

__all__ = [
    "CALIBRATION_METHODS",
    "OBSERVERS",
    "MSEObserver",
    "MinMaxObserver",
    "MovingAverageAbsMaxObserver",
    "Observer",
    "PercentileObserver",
    "make_observer",
]

#: Default cap on the samples kept per channel by the sampling observers.
DEFAULT_MAX_SAMPLES = 1_000_000


def _check_real(value: Any, name: str, owner: str, low: float, high: float) -> float:
    if (
        isinstance(value, bool | np.bool_)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(float(value))
        or not low <= float(value) <= high
    ):
        raise ValueError(
            f"The {name!r} parameter of {owner} must be a float in [{low:g}, {high:g}]. "
            f"Got {value!r} instead."
        )
    return float(value)


def _check_positive_int(value: Any, name: str, owner: str) -> int:
    if (
        isinstance(value, bool | np.bool_)
        or not isinstance(value, numbers.Integral)
        or int(value) < 1
    ):
        raise ValueError(
            f"The {name!r} parameter of {owner} must be an int >= 1. Got {value!r} instead."
        )
    return int(value)


class Observer:
    """Base class of the observers: validates batches and tracks the running min/max.

    Subclasses override :meth:`_update` (called with each batch as a ``(channels, n)``
    array) and :meth:`_range` (the ``(low, high)`` per channel, 1-D arrays).

    Args:
        axis: ``None`` for per-tensor statistics, or the channel axis (may be negative)
            for per-channel statistics over all the other axes.

    Raises:
        ValueError: ``axis`` is neither ``None`` nor an int.
    """

    def __init__(self, axis: int | None = None) -> None:
        if axis is not None and (
            isinstance(axis, bool | np.bool_) or not isinstance(axis, numbers.Integral)
        ):
            raise ValueError(
                f"The 'axis' parameter of {type(self).__name__} must be None or an int. "
                f"Got {axis!r} instead."
            )
        self.axis: int | None = None if axis is None else int(axis)
        self._min: np.ndarray | None = None
        self._max: np.ndarray | None = None
        self.n_batches = 0

    @property
    def observed(self) -> bool:
        """Whether at least one batch was observed."""
        return self.n_batches > 0

    def _as_channels(self, x: Any) -> np.ndarray:
        """Validate a batch and lay it out as ``(channels, values)``."""
        name = type(self).__name__
        try:
            array = np.asarray(x, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{name}.observe needs a float array. Got {x!r} instead.") from None
        if array.size == 0:
            raise ValueError(f"{name}.observe got an empty array of shape {array.shape}.")
        n_bad = int((~np.isfinite(array)).sum())
        if n_bad:
            raise ValueError(
                f"{name}.observe got {n_bad} NaN or inf values (of {array.size}); "
                "calibration data must be finite."
            )
        if self.axis is None:
            return array.reshape(1, -1)
        if not -array.ndim <= self.axis < array.ndim:
            raise ValueError(
                f"The 'axis' parameter of {name} is {self.axis}, out of bounds for a batch "
                f"of shape {array.shape}."
            )
        channels = np.moveaxis(array, self.axis, 0)
        channels = channels.reshape(channels.shape[0], -1)
        if self._min is not None and channels.shape[0] != self._min.shape[0]:
            raise ValueError(
                f"{name}.observe got a batch with {channels.shape[0]} channels on axis "
                f"{self.axis}; earlier batches had {self._min.shape[0]}."
            )
        return channels

    def observe(self, x: Any) -> None:
        """Accumulate the statistics of one batch.

        Args:
            x: a non-empty float array; with a channel axis, its channel count must match
                earlier batches.

        Raises:
            ValueError: NaN or inf values (their count is given), an empty batch, or a
                channel mismatch.

        Examples:
            >>> observer = MinMaxObserver(axis=0)
            >>> observer.observe(np.array([[1.0, 2.0], [-3.0, 4.0]]))
            >>> [v.tolist() for v in observer.range()]
            [[1.0, -3.0], [2.0, 4.0]]
        """
        channels = self._as_channels(x)
        low, high = channels.min(axis=1), channels.max(axis=1)
        if self._min is None or self._max is None:
            self._min, self._max = low, high
        else:
            self._min, self._max = np.minimum(self._min, low), np.maximum(self._max, high)
        self._update(channels)
        self.n_batches += 1

    def _update(self, channels: np.ndarray) -> None:
        """Subclass hook: extra statistics of a validated ``(channels, n)`` batch."""

    def _range(self) -> tuple[np.ndarray, np.ndarray]:
        """Subclass hook: ``(low, high)`` per channel (1-D). Default: running min/max."""
        assert self._min is not None and self._max is not None
        return self._min, self._max

    def _require_observed(self, what: str) -> None:
        if not self.observed:
            raise ValueError(
                f"{type(self).__name__}.{what} needs statistics: call observe(x) with "
                "calibration data first."
            )

    def _shaped(self, values: np.ndarray) -> np.ndarray:
        return values.reshape(()) if self.axis is None else values

    def range(self) -> tuple[np.ndarray, np.ndarray]:
        """The ``(low, high)`` range the quantizer is built from.

        Returns:
            Two float64 arrays: 0-d per tensor, 1-D (one value per channel) per channel.

        Raises:
            ValueError: nothing was observed yet.
        """
        self._require_observed("range")
        low, high = self._range()
        return self._shaped(np.array(low, dtype=np.float64)), self._shaped(
            np.array(high, dtype=np.float64)
        )

    def quantizer(
        self,
        bits: int,
        *,
        signed: bool = False,
        symmetric: bool = False,
        narrow_range: bool = False,
    ) -> UniformQuantizer:
        """The quantizer of :meth:`range` (see :meth:`UniformQuantizer.from_range`).

        Args:
            bits: width of the codes.
            signed: signed codes.
            symmetric: zero point fixed at 0.
            narrow_range: drop one extreme code.

        Returns:
            A per-tensor quantizer, or a per-channel one on this observer's axis.

        Raises:
            ValueError: nothing was observed yet, or invalid quantizer parameters.

        Examples:
            >>> observer = MinMaxObserver()
            >>> observer.observe(np.array([0.0, 2.0, 4.0]))
            >>> observer.quantizer(2).scale
            (1.3333333333333333,)
        """
        low, high = self.range()
        return UniformQuantizer.from_range(
            low,
            high,
            bits,
            signed=signed,
            symmetric=symmetric,
            narrow_range=narrow_range,
            axis=self.axis,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(axis={self.axis!r}, n_batches={self.n_batches})"


class MinMaxObserver(Observer):
    """Running minimum and maximum.

    Args:
        axis: ``None`` (per tensor) or the channel axis.

    Examples:
        >>> observer = MinMaxObserver()
        >>> observer.observe(np.array([1.0, 2.0]))
        >>> observer.observe(np.array([-1.0, 0.5]))
        >>> [float(v) for v in observer.range()]
        [-1.0, 2.0]
    """


class _SamplingObserver(Observer):
    """An observer keeping a uniform random sample of at most ``max_samples`` per channel.

    Once full, each batch is merged exactly like reservoir sampling: the number of kept
    values that come from the new batch follows the hypergeometric law, so the sample
    stays uniform over everything observed. The generator is seeded, so calibration is
    reproducible.
    """

    def __init__(
        self, axis: int | None = None, max_samples: int = DEFAULT_MAX_SAMPLES, seed: int = 0
    ) -> None:
        super().__init__(axis)
        name = type(self).__name__
        self.max_samples = _check_positive_int(max_samples, "max_samples", name)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(
                f"The 'seed' parameter of {name} must be an int >= 0. Got {seed!r} instead."
            )
        self._rng = np.random.default_rng(int(seed))
        self._samples: np.ndarray | None = None
        self._n_seen = 0

    @property
    def samples(self) -> np.ndarray:
        """The kept values, ``(channels, n)`` (a copy; empty before any batch)."""
        if self._samples is None:
            return np.empty((0, 0))
        return self._samples.copy()

    def _update(self, channels: np.ndarray) -> None:
        n_new = channels.shape[1]
        kept = self._samples
        if kept is None:
            kept = np.empty((channels.shape[0], 0))
        if kept.shape[1] + n_new <= self.max_samples:
            self._samples = np.concatenate([kept, channels], axis=1)
        else:
            size = self.max_samples
            from_new = int(self._rng.hypergeometric(n_new, self._n_seen, size))
            old = self._rng.choice(kept.shape[1], size - from_new, replace=False)
            new = self._rng.choice(n_new, from_new, replace=False)
            self._samples = np.concatenate([kept[:, old], channels[:, new]], axis=1)
        self._n_seen += n_new


class PercentileObserver(_SamplingObserver):
    """Range between the ``100 - percentile`` and ``percentile`` percentiles.

    Clipping the rare extreme values gives a finer step to the bulk of the distribution.

    Args:
        percentile: upper percentile, in ``[50, 100]`` (100 is the sample's min/max).
        axis: ``None`` (per tensor) or the channel axis.
        max_samples: values kept per channel (uniform random subsample beyond it).
        seed: seed of the subsampling.

    Examples:
        >>> observer = PercentileObserver(percentile=90.0)
        >>> observer.observe(np.arange(11.0))
        >>> [float(v) for v in observer.range()]
        [1.0, 9.0]
    """

    def __init__(
        self,
        percentile: float = 99.99,
        axis: int | None = None,
        max_samples: int = DEFAULT_MAX_SAMPLES,
        seed: int = 0,
    ) -> None:
        super().__init__(axis, max_samples, seed)
        self.percentile = _check_real(percentile, "percentile", type(self).__name__, 50, 100)

    def _range(self) -> tuple[np.ndarray, np.ndarray]:
        assert self._samples is not None
        low, high = np.percentile(self._samples, [100.0 - self.percentile, self.percentile], axis=1)
        return low, high


class MovingAverageAbsMaxObserver(Observer):
    """Exponential moving average of each batch's absolute maximum.

    Per :meth:`observe` call: ``ema = momentum * ema + (1 - momentum) * max(|batch|)``
    (the first batch sets ``ema``). The range is ``[-ema, ema]``, or ``[0, ema]`` when
    every observed value was ``>= 0``.

    Args:
        momentum: weight of the past, in ``[0, 1]``.
        axis: ``None`` (per tensor) or the channel axis.

    Examples:
        >>> observer = MovingAverageAbsMaxObserver(momentum=0.5)
        >>> observer.observe(np.array([1.0, 2.0]))
        >>> observer.observe(np.array([4.0]))
        >>> [float(v) for v in observer.range()]
        [0.0, 3.0]
    """

    def __init__(self, momentum: float = 0.9, axis: int | None = None) -> None:
        super().__init__(axis)
        self.momentum = _check_real(momentum, "momentum", type(self).__name__, 0, 1)
        self._ema: np.ndarray | None = None

    def _update(self, channels: np.ndarray) -> None:
        absmax = np.abs(channels).max(axis=1)
        if self._ema is None:
            self._ema = absmax
        else:
            self._ema = self.momentum * self._ema + (1 - self.momentum) * absmax

    def _range(self) -> tuple[np.ndarray, np.ndarray]:
        assert self._ema is not None and self._min is not None
        return np.where(self._min >= 0, 0.0, -self._ema), self._ema.copy()


class MSEObserver(_SamplingObserver):
    """Clipping range that minimises the mean squared quantization error.

    :meth:`quantizer` tries the ranges ``alpha * [min, max]`` for ``grid`` values of
    ``alpha`` evenly spaced in ``[1 / grid, 1]`` and keeps, for each channel
    independently, the one whose fake-quantized samples are closest (mean squared
    error) to the samples, for the requested ``bits``/``signed``/``symmetric``.
    On ties the widest range wins. :meth:`range` returns the plain min/max.

    Args:
        axis: ``None`` (per tensor) or the channel axis.
        grid: number of candidate clipping ratios.
        max_samples: values kept per channel (uniform random subsample beyond it).
        seed: seed of the subsampling.

    Examples:
        >>> observer = MSEObserver(grid=10)
        >>> observer.observe(np.concatenate([np.linspace(0.0, 1.0, 1000), [3.0]]))
        >>> observer.quantizer(2).scale  # min/max would give 3.0 / 3 = 1.0
        (0.30000000000000004,)
    """

    def __init__(
        self,
        axis: int | None = None,
        grid: int = 100,
        max_samples: int = DEFAULT_MAX_SAMPLES,
        seed: int = 0,
    ) -> None:
        super().__init__(axis, max_samples, seed)
        self.grid = _check_positive_int(grid, "grid", type(self).__name__)

    def _build(
        self, low: np.ndarray, high: np.ndarray, bits: int, options: dict[str, bool]
    ) -> UniformQuantizer:
        """A quantizer for the ``(channels, n)`` sample layout (channel axis 0)."""
        if self.axis is None:
            return UniformQuantizer.from_range(float(low[0]), float(high[0]), bits, **options)
        return UniformQuantizer.from_range(low, high, bits, axis=0, **options)

    def quantizer(
        self,
        bits: int,
        *,
        signed: bool = False,
        symmetric: bool = False,
        narrow_range: bool = False,
    ) -> UniformQuantizer:
        """The quantizer of the clipping range with the least mean squared error.

        Args:
            bits: width of the codes.
            signed: signed codes.
            symmetric: zero point fixed at 0.
            narrow_range: drop one extreme code.

        Returns:
            A per-tensor quantizer, or a per-channel one on this observer's axis.

        Raises:
            ValueError: nothing was observed yet, or invalid quantizer parameters.
        """
        self._require_observed("quantizer")
        assert self._samples is not None and self._min is not None and self._max is not None
        options = {"signed": signed, "symmetric": symmetric, "narrow_range": narrow_range}
        samples = self._samples if self.axis is not None else self._samples[0]
        best_error = np.full(self._min.shape, np.inf)
        best_alpha = np.ones(self._min.shape)
        for alpha in np.linspace(1.0 / self.grid, 1.0, self.grid)[::-1]:
            candidate = self._build(alpha * self._min, alpha * self._max, bits, options)
            error = np.mean((candidate.fake_quantize(samples) - samples) ** 2, axis=-1)
            better = np.reshape(error, best_error.shape) < best_error
            best_error = np.where(better, error, best_error)
            best_alpha = np.where(better, alpha, best_alpha)
        return UniformQuantizer.from_range(
            self._shaped(best_alpha * self._min),
            self._shaped(best_alpha * self._max),
            bits,
            axis=self.axis,
            **options,
        )


#: The observer class of each calibration method name: the one list of observers.
OBSERVERS: Mapping[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "percentile": PercentileObserver,
    "ema": MovingAverageAbsMaxObserver,
    "mse": MSEObserver,
}

#: Names accepted by :func:`make_observer` (and ``QuantConfig.calibration``).
CALIBRATION_METHODS = tuple(OBSERVERS)


def make_observer(method: str, axis: int | None = None, **options: Any) -> Observer:
    """A fresh observer for a calibration method name.

    Args:
        method: one of :data:`CALIBRATION_METHODS`: ``"minmax"``
            (:class:`MinMaxObserver`), ``"percentile"`` (:class:`PercentileObserver`),
            ``"ema"`` (:class:`MovingAverageAbsMaxObserver`) or ``"mse"``
            (:class:`MSEObserver`).
        axis: ``None`` (per tensor) or the channel axis.
        **options: extra constructor arguments of that observer (e.g. ``percentile``).

    Returns:
        The observer, with nothing observed yet.

    Raises:
        ValueError: unknown method name (the valid names are listed).

    Examples:
        >>> type(make_observer("ema", axis=0)).__name__
        'MovingAverageAbsMaxObserver'
    """
    if not isinstance(method, str) or method not in OBSERVERS:
        raise ValueError(
            f"The 'method' parameter of make_observer must be one of "
            f"{', '.join(repr(m) for m in CALIBRATION_METHODS)}. Got {method!r} instead."
        )
    return OBSERVERS[method](axis=axis, **options)

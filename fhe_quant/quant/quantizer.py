"""Uniform (affine) integer quantization of float tensors.

A :class:`UniformQuantizer` maps a real ``x`` to the integer::

    q = clip(round_half_to_even(x / scale) + zero_point, qmin, qmax)

and back with ``x_hat = scale * (q - zero_point)``. ``scale`` and ``zero_point`` are
either one value for the whole tensor (per tensor) or one value per channel along
``axis`` (per channel).

Examples:
    >>> import numpy as np
    >>> q = UniformQuantizer.from_range(-1.0, 1.0, bits=8, signed=True, symmetric=True)
    >>> q.quantize(np.array([-1.0, 0.0, 0.5, 2.0])).tolist()
    [-127, 0, 64, 127]
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

__all__ = ["MAX_BITS", "MIN_SCALE", "ThresholdGrid", "UniformQuantizer"]

#: Widest integer code a :class:`UniformQuantizer` produces.
MAX_BITS = 8

#: Smallest scale :meth:`UniformQuantizer.from_range` returns for a non-empty range: a
#: range narrower than ``MIN_SCALE`` per integer step is quantized with this step instead,
#: so that ``x / scale`` never divides by zero or overflows. A range that is exactly
#: ``[0, 0]`` gets ``scale = 1.0``.
MIN_SCALE = 1e-12

_OWNER = "UniformQuantizer"


def _check_int(value: Any, name: str, low: int, high: int, owner: str = _OWNER) -> int:
    """``value`` as an ``int`` in ``[low, high]`` (bools and floats are rejected)."""
    if (
        isinstance(value, bool | np.bool_)
        or not isinstance(value, numbers.Integral)
        or not low <= int(value) <= high
    ):
        raise ValueError(
            f"The {name!r} parameter of {owner} must be an int in [{low}, {high}]. "
            f"Got {value!r} instead."
        )
    return int(value)


def _check_bool(value: Any, name: str, owner: str = _OWNER) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise ValueError(
            f"The {name!r} parameter of {owner} must be a bool. Got {value!r} instead."
        )
    return bool(value)


def _integer_range(bits: int, signed: bool, narrow_range: bool) -> tuple[int, int]:
    """The ``(qmin, qmax)`` codes of a ``bits``-bit integer."""
    if signed:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        return (qmin + 1 if narrow_range else qmin), qmax
    return 0, (2**bits - 2 if narrow_range else 2**bits - 1)


def _check_format(bits: Any, signed: Any, narrow_range: Any) -> tuple[int, bool, bool]:
    """Validate ``bits``/``signed``/``narrow_range`` together (at least two codes)."""
    bits = _check_int(bits, "bits", 1, MAX_BITS)
    signed = _check_bool(signed, "signed")
    narrow_range = _check_bool(narrow_range, "narrow_range")
    if bits == 1 and signed:
        raise ValueError(
            "The 'bits' parameter of UniformQuantizer must be at least 2 when signed=True: "
            "a 1-bit signed code needs a binary {-1, +1} quantizer, which is not supported. "
            "Got 1 instead (use signed=False for 1-bit codes {0, 1})."
        )
    if bits == 1 and narrow_range:
        raise ValueError(
            "The 'narrow_range' parameter of UniformQuantizer must be False when bits=1: "
            "a narrow 1-bit range holds a single code. Got True instead."
        )
    return bits, signed, narrow_range


def _as_tuple(value: Any, name: str) -> tuple[Any, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence | np.ndarray):
        raise ValueError(
            f"The {name!r} parameter of {_OWNER} must be a non-empty tuple. Got {value!r} instead."
        )
    items = (
        tuple(np.asarray(value).reshape(-1).tolist())
        if isinstance(value, np.ndarray)
        else tuple(value)
    )
    if not items:
        raise ValueError(
            f"The {name!r} parameter of {_OWNER} must be a non-empty tuple. Got () instead."
        )
    return items


def _normalize_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"The 'axis' parameter of {_OWNER} is {axis}, out of bounds for a tensor with "
            f"{ndim} dimensions."
        )
    return axis % ndim


@dataclass(frozen=True)
class UniformQuantizer:
    """Affine integer quantizer, per tensor or per channel.

    Attributes:
        bits: width of the integer codes, 1 to 8.
        scale: real step between consecutive codes; one value per tensor (length 1) or
            one per channel along ``axis``. Finite and positive.
        zero_point: the code of the real value 0, same length as ``scale``, each in
            ``[qmin, qmax]``.
        signed: signed codes (``[-2**(bits-1), 2**(bits-1) - 1]``) or unsigned
            (``[0, 2**bits - 1]``).
        narrow_range: drop one extreme code: the lowest for signed codes (so the range is
            symmetric), the highest for unsigned ones.
        axis: the channel axis of the tensors quantized per channel (may be negative);
            ``None`` quantizes the whole tensor with ``scale[0]``/``zero_point[0]``. More
            than one scale requires an axis.

    Sequences given for ``scale``/``zero_point`` (lists, arrays) are stored as tuples of
    Python ``float``/``int``.

    Examples:
        >>> q = UniformQuantizer(bits=4, scale=(0.5,), zero_point=(3,))
        >>> (q.qmin, q.qmax)
        (0, 15)
        >>> q.quantize(np.array([-1.5, 0.0, 1.2, 100.0])).tolist()
        [0, 3, 5, 15]
        >>> q.dequantize(np.array([0, 3, 5])).tolist()
        [-1.5, 0.0, 1.0]
    """

    bits: int
    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    signed: bool = False
    narrow_range: bool = False
    axis: int | None = None

    def __post_init__(self) -> None:
        bits, signed, narrow_range = _check_format(self.bits, self.signed, self.narrow_range)
        qmin, qmax = _integer_range(bits, signed, narrow_range)

        scale = _as_tuple(self.scale, "scale")
        for value in scale:
            if (
                isinstance(value, bool)
                or not isinstance(value, numbers.Real)
                or not math.isfinite(value)
                or value <= 0
            ):
                raise ValueError(
                    f"The 'scale' parameter of {_OWNER} must hold finite floats > 0. "
                    f"Got {self.scale!r} instead."
                )
        zero_point = _as_tuple(self.zero_point, "zero_point")
        for value in zero_point:
            if (
                isinstance(value, bool)
                or not isinstance(value, numbers.Integral)
                or not qmin <= int(value) <= qmax
            ):
                raise ValueError(
                    f"The 'zero_point' parameter of {_OWNER} must hold ints in "
                    f"[{qmin}, {qmax}] (bits={bits}, signed={signed}, "
                    f"narrow_range={narrow_range}). Got {self.zero_point!r} instead."
                )
        if len(zero_point) != len(scale):
            raise ValueError(
                f"The 'zero_point' parameter of {_OWNER} must have as many entries as "
                f"'scale' ({len(scale)}). Got {len(zero_point)} instead."
            )
        axis = self.axis
        if axis is not None:
            if isinstance(axis, bool | np.bool_) or not isinstance(axis, numbers.Integral):
                raise ValueError(
                    f"The 'axis' parameter of {_OWNER} must be None or an int. "
                    f"Got {axis!r} instead."
                )
            axis = int(axis)
        elif len(scale) > 1:
            raise ValueError(
                f"The 'axis' parameter of {_OWNER} must be an int when quantizing per "
                f"channel ({len(scale)} scales). Got None instead."
            )
        object.__setattr__(self, "bits", bits)
        object.__setattr__(self, "signed", signed)
        object.__setattr__(self, "narrow_range", narrow_range)
        object.__setattr__(self, "scale", tuple(float(v) for v in scale))
        object.__setattr__(self, "zero_point", tuple(int(v) for v in zero_point))
        object.__setattr__(self, "axis", axis)

    # ------------------------------------------------------------------ properties

    @property
    def qmin(self) -> int:
        """Smallest integer code."""
        return _integer_range(self.bits, self.signed, self.narrow_range)[0]

    @property
    def qmax(self) -> int:
        """Largest integer code."""
        return _integer_range(self.bits, self.signed, self.narrow_range)[1]

    @property
    def per_channel(self) -> bool:
        """Whether the quantizer has a channel axis (one scale per channel)."""
        return self.axis is not None

    # ------------------------------------------------------------------ broadcasting

    def _shape(self, ndim: int) -> tuple[int, ...]:
        if self.axis is None:
            return (1,) * ndim
        axis = _normalize_axis(self.axis, ndim)
        return tuple(len(self.scale) if d == axis else 1 for d in range(ndim))

    def scale_array(self, ndim: int) -> np.ndarray:
        """The scale as a float64 array broadcastable to a tensor of ``ndim`` dimensions.

        Args:
            ndim: number of dimensions of the tensor.

        Returns:
            An array of ``ndim`` dimensions, all of size 1 except the channel axis.

        Examples:
            >>> q = UniformQuantizer(bits=8, scale=(1.0, 2.0), zero_point=(0, 0), axis=1)
            >>> q.scale_array(3).shape
            (1, 2, 1)
        """
        return np.asarray(self.scale, dtype=np.float64).reshape(self._shape(ndim))

    def zero_point_array(self, ndim: int) -> np.ndarray:
        """The zero point as an int64 array broadcastable to a tensor of ``ndim`` dimensions.

        Args:
            ndim: number of dimensions of the tensor.

        Returns:
            An array of ``ndim`` dimensions, all of size 1 except the channel axis.

        Examples:
            >>> UniformQuantizer(bits=8, scale=(1.0,), zero_point=(7,)).zero_point_array(2)
            array([[7]])
        """
        return np.asarray(self.zero_point, dtype=np.int64).reshape(self._shape(ndim))

    def _check_channels(self, array: np.ndarray, what: str) -> None:
        if self.axis is None:
            return
        if array.ndim == 0:
            raise ValueError(f"A per-channel {_OWNER} (axis={self.axis}) cannot {what} a scalar.")
        axis = _normalize_axis(self.axis, array.ndim)
        if array.shape[axis] != len(self.scale):
            raise ValueError(
                f"A per-channel {_OWNER} with {len(self.scale)} channels on axis "
                f"{self.axis} cannot {what} a tensor of shape {array.shape} "
                f"({array.shape[axis]} channels)."
            )

    # ------------------------------------------------------------------ mapping

    def quantize(self, x: Any) -> np.ndarray:
        """Float values to integer codes.

        ``clip(round_half_to_even(x / scale) + zero_point, qmin, qmax)``: values outside
        the representable range (including infinities) saturate at ``qmin``/``qmax``.

        Args:
            x: real values; per channel, ``x.shape[axis]`` must equal ``len(scale)``.

        Returns:
            int64 codes of the shape of ``x``.

        Raises:
            ValueError: ``x`` holds NaN, or its channel count does not match.

        Examples:
            >>> q = UniformQuantizer(bits=3, scale=(1.0,), zero_point=(0,), signed=True)
            >>> q.quantize(np.array([-9.0, -0.5, 0.5, 1.5, 2.5, 9.0])).tolist()
            [-4, 0, 0, 2, 2, 3]
        """
        array = np.asarray(x, dtype=np.float64)
        n_nan = int(np.isnan(array).sum())
        if n_nan:
            raise ValueError(f"{_OWNER}.quantize got {n_nan} NaN values; it needs real numbers.")
        self._check_channels(array, "quantize")
        with np.errstate(over="ignore"):
            codes = np.rint(array / self.scale_array(array.ndim))
        codes = codes + self.zero_point_array(array.ndim)
        return np.clip(codes, self.qmin, self.qmax).astype(np.int64)

    def dequantize(self, q: Any) -> np.ndarray:
        """Integer codes to float values: ``scale * (q - zero_point)``.

        Args:
            q: integer codes (not checked against ``[qmin, qmax]``).

        Returns:
            float64 values of the shape of ``q``.

        Examples:
            >>> q = UniformQuantizer(bits=8, scale=(0.25,), zero_point=(128,))
            >>> q.dequantize(np.array([128, 132])).tolist()
            [0.0, 1.0]
        """
        codes = np.asarray(q)
        self._check_channels(codes, "dequantize")
        shifted = codes.astype(np.int64) - self.zero_point_array(codes.ndim)
        return self.scale_array(codes.ndim) * shifted.astype(np.float64)

    def fake_quantize(self, x: Any) -> np.ndarray:
        """Round-trip through the integer grid: ``dequantize(quantize(x))``.

        Examples:
            >>> q = UniformQuantizer(bits=2, scale=(0.5,), zero_point=(0,))
            >>> q.fake_quantize(np.array([0.3, 0.9, 5.0])).tolist()
            [0.5, 1.0, 1.5]
        """
        return self.dequantize(self.quantize(x))

    def min_value(self) -> np.ndarray:
        """Smallest representable real value per channel, ``scale * (qmin - zero_point)``.

        Returns:
            float64 array of shape ``(len(scale),)``.

        Examples:
            >>> UniformQuantizer(bits=4, scale=(0.5,), zero_point=(3,)).min_value().tolist()
            [-1.5]
        """
        zero_point = np.asarray(self.zero_point, dtype=np.float64)
        return np.asarray(self.scale, dtype=np.float64) * (self.qmin - zero_point)

    def max_value(self) -> np.ndarray:
        """Largest representable real value per channel, ``scale * (qmax - zero_point)``.

        Returns:
            float64 array of shape ``(len(scale),)``.

        Examples:
            >>> UniformQuantizer(bits=4, scale=(0.5,), zero_point=(3,)).max_value().tolist()
            [6.0]
        """
        zero_point = np.asarray(self.zero_point, dtype=np.float64)
        return np.asarray(self.scale, dtype=np.float64) * (self.qmax - zero_point)

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of the fields (tuples become lists under ``json``).

        Examples:
            >>> UniformQuantizer(bits=8, scale=(0.5,), zero_point=(0,)).to_dict()["scale"]
            (0.5,)
        """
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UniformQuantizer:
        """Rebuild a quantizer from :meth:`to_dict` output (lists accepted for tuples).

        Raises:
            ValueError: unknown or missing keys, or invalid values.

        Examples:
            >>> q = UniformQuantizer(bits=8, scale=(0.5,), zero_point=(3,))
            >>> UniformQuantizer.from_dict(q.to_dict()) == q
            True
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"{_OWNER}.from_dict needs a dict. Got {data!r} instead.")
        names = [f.name for f in fields(cls)]
        unknown = sorted(str(k) for k in data if k not in names)
        if unknown:
            raise ValueError(
                f"{_OWNER}.from_dict got unknown keys {unknown}; valid keys are {names}."
            )
        missing = [name for name in ("bits", "scale", "zero_point") if name not in data]
        if missing:
            raise ValueError(f"{_OWNER}.from_dict is missing the keys {missing}.")
        return cls(**dict(data))

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_range(
        cls,
        min_val: Any,
        max_val: Any,
        bits: int,
        *,
        signed: bool = False,
        symmetric: bool = False,
        narrow_range: bool = False,
        axis: int | None = None,
    ) -> UniformQuantizer:
        """The quantizer covering ``[min_val, max_val]`` (widened to include 0).

        The range is first widened to contain 0, so that 0 is exactly representable.

        * ``symmetric=True``: ``zero_point = 0`` and ``scale = max(|min|, |max|) / qmax``;
          with ``signed=False`` this needs ``min_val >= 0``.
        * ``symmetric=False`` (affine): ``scale = (max - min) / (qmax - qmin)`` and
          ``zero_point = clip(round(qmin - min / scale), qmin, qmax)``.

        A range of exactly ``[0, 0]`` gets ``scale = 1.0``; any other scale is floored at
        :data:`MIN_SCALE`.

        Args:
            min_val: lower bound, a float or a 1-D array (one per channel).
            max_val: upper bound, same shape as ``min_val``.
            bits: width of the codes, 1 to 8 (2 to 8 when signed).
            signed: signed codes.
            symmetric: zero point fixed at 0.
            narrow_range: drop one extreme code (see :class:`UniformQuantizer`).
            axis: channel axis; required when ``min_val`` holds more than one value.

        Returns:
            The quantizer, with one scale per entry of ``min_val``.

        Raises:
            ValueError: non-finite or inverted bounds, shapes that differ or are not 0-D
                or 1-D, a negative minimum with unsigned symmetric codes, or invalid
                ``bits``/``axis``.

        Examples:
            >>> q = UniformQuantizer.from_range(-1.0, 3.0, bits=2)
            >>> (q.scale, q.zero_point)
            ((1.3333333333333333,), (1,))
            >>> float(q.fake_quantize(np.array(0.0)))
            0.0
        """
        bits, signed, narrow_range = _check_format(bits, signed, narrow_range)
        symmetric = _check_bool(symmetric, "symmetric")
        qmin, qmax = _integer_range(bits, signed, narrow_range)
        try:
            low = np.asarray(min_val, dtype=np.float64)
            high = np.asarray(max_val, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(
                f"The 'min_val' and 'max_val' parameters of {_OWNER}.from_range must be "
                f"floats or 1-D arrays. Got {min_val!r} and {max_val!r} instead."
            ) from None
        if low.shape != high.shape or low.ndim > 1 or low.size == 0:
            raise ValueError(
                f"The 'min_val' and 'max_val' parameters of {_OWNER}.from_range must be "
                f"floats or non-empty 1-D arrays of the same shape. Got shapes {low.shape} "
                f"and {high.shape} instead."
            )
        if not (np.isfinite(low).all() and np.isfinite(high).all()):
            raise ValueError(
                f"The 'min_val' and 'max_val' parameters of {_OWNER}.from_range must be "
                f"finite. Got {min_val!r} and {max_val!r} instead."
            )
        if (low > high).any():
            raise ValueError(
                f"The 'min_val' parameter of {_OWNER}.from_range must be <= 'max_val'. "
                f"Got {min_val!r} and {max_val!r} instead."
            )
        low = np.minimum(low.reshape(-1), 0.0)
        high = np.maximum(high.reshape(-1), 0.0)

        if symmetric:
            if not signed and (low < 0).any():
                raise ValueError(
                    f"The 'min_val' parameter of {_OWNER}.from_range must be >= 0 for an "
                    f"unsigned symmetric quantizer (use signed=True or symmetric=False). "
                    f"Got {min_val!r} instead."
                )
            scale = np.maximum(np.abs(low), high) / qmax
            zero_point = np.zeros_like(scale, dtype=np.int64)
        else:
            scale = (high - low) / (qmax - qmin)
            safe = np.where(scale > 0, scale, 1.0)
            zero_point = np.clip(np.rint(qmin - low / safe), qmin, qmax).astype(np.int64)
        # A [0, 0] range keeps its zero point (0 symmetric, qmin affine): 0 stays exact.
        scale = np.where((high - low) == 0, 1.0, np.maximum(scale, MIN_SCALE))
        return cls(
            bits=bits,
            scale=tuple(float(s) for s in scale),
            zero_point=tuple(int(z) for z in zero_point),
            signed=signed,
            narrow_range=narrow_range,
            axis=axis,
        )


# --------------------------------------------------------------------------- threshold grid

_GRID = "ThresholdGrid"


@dataclass(frozen=True, eq=False)
class ThresholdGrid:
    """A per-feature input encoding built from split thresholds (tree models).

    The code of feature ``f`` is the number of its thresholds strictly below the input,
    ``np.searchsorted(thresholds_f, x_f, side="left")``: monotone, computed in clear by
    the client, so ``x_f <= thresholds_f[j]`` holds exactly when ``code_f <= j``. A tree
    whose every threshold is on the grid then decides on the codes exactly like the
    float model on every input, not just on grid points.

    Attributes:
        bits: width of the codes, 1 to 8; each feature has at most ``2**bits - 1``
            thresholds, so its codes are ``0..len(thresholds_f)``.
        values: ``(T,)`` float64, every feature's thresholds one after the other, strictly
            increasing within a feature, finite.
        counts: ``(F,)`` int64, how many thresholds each feature has (may be 0).
        float32_inputs: compare ``float32(x)`` with the thresholds (scikit-learn, XGBoost)
            instead of the float64 input (LightGBM).

    Examples:
        >>> grid = ThresholdGrid(2, np.array([0.5, 1.5, 2.5, -1.0]), np.array([3, 1]))
        >>> grid.quantize(np.array([[0.5, -2.0], [0.6, 7.0], [9.0, -1.0]])).tolist()
        [[0, 0], [1, 1], [3, 0]]
        >>> ThresholdGrid.from_dict(grid.to_dict()).thresholds(0).tolist()
        [0.5, 1.5, 2.5]
    """

    bits: int
    values: np.ndarray
    counts: np.ndarray
    float32_inputs: bool = True

    def __post_init__(self) -> None:
        bits = _check_int(self.bits, "bits", 1, MAX_BITS, _GRID)
        float32_inputs = _check_bool(self.float32_inputs, "float32_inputs", _GRID)
        values = np.asarray(self.values)
        counts = np.asarray(self.counts)
        if values.ndim != 1 or values.dtype.kind not in "iuf" or not np.isfinite(values).all():
            raise ValueError(f"The 'values' of a {_GRID} must be a 1-D array of finite floats.")
        if counts.ndim != 1 or counts.size == 0 or counts.dtype.kind not in "iu":
            raise ValueError(f"The 'counts' of a {_GRID} must be a non-empty 1-D int array.")
        if counts.min() < 0 or counts.max() > 2**bits - 1 or counts.sum() != values.size:
            raise ValueError(
                f"The 'counts' of a {_GRID} must be in [0, {2**bits - 1}] (bits={bits}) and "
                f"sum to the {values.size} values. Got {counts.tolist()!r:.80}."
            )
        values = values.astype(np.float64)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        steps = np.diff(values)
        inside = np.ones(steps.shape, dtype=bool)
        inside[starts[(starts > 0) & (counts > 0)] - 1] = False  # between two features
        if np.any(steps[inside] <= 0):
            raise ValueError(f"The thresholds of each feature of a {_GRID} must increase.")
        object.__setattr__(self, "bits", bits)
        object.__setattr__(self, "float32_inputs", float32_inputs)
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "counts", counts.astype(np.int64))

    @property
    def qmax(self) -> int:
        """Largest code of the ``bits``-bit codes (a feature's largest is its count)."""
        return 2**self.bits - 1

    @property
    def n_features(self) -> int:
        return int(self.counts.size)

    def thresholds(self, feature: int) -> np.ndarray:
        """The sorted thresholds of ``feature``."""
        start = int(self.counts[:feature].sum())
        return self.values[start : start + int(self.counts[feature])]

    def quantize(self, x: Any) -> np.ndarray:
        """Float inputs ``(..., F)`` to codes: per feature, the thresholds below ``x``.

        Raises:
            ValueError: ``x`` holds NaN or does not have ``F`` features on its last axis.
        """
        array = np.asarray(x, dtype=np.float64)
        if array.ndim == 0 or array.shape[-1] != self.n_features:
            raise ValueError(
                f"A {_GRID} of {self.n_features} features cannot quantize a tensor of shape "
                f"{array.shape}."
            )
        if np.isnan(array).any():
            raise ValueError(f"{_GRID}.quantize got NaN values; it needs real numbers.")
        if self.float32_inputs:
            with np.errstate(over="ignore"):
                array = array.astype(np.float32).astype(np.float64)
        codes = np.empty(array.shape, dtype=np.int64)
        for f in range(self.n_features):
            codes[..., f] = np.searchsorted(self.thresholds(f), array[..., f], side="left")
        return codes

    def to_dict(self) -> dict[str, Any]:
        """The grid as data: its JSON fields (``kind``, ``bits``, ``float32_inputs``) and
        its thresholds as the arrays ``values`` and ``counts`` (:meth:`arrays`, which an
        artifact stores apart, as NumPy data). :meth:`from_dict` inverts it.

        Examples:
            >>> grid = ThresholdGrid(2, np.array([0.5, 1.5]), np.array([2]))
            >>> sorted(grid.to_dict())
            ['bits', 'counts', 'float32_inputs', 'kind', 'values']
            >>> ThresholdGrid.from_dict(grid.to_dict()).thresholds(0).tolist()
            [0.5, 1.5]
        """
        fields = {
            "kind": "threshold_grid",
            "bits": self.bits,
            "float32_inputs": self.float32_inputs,
        }
        return {**fields, **self.arrays()}

    def arrays(self) -> dict[str, np.ndarray]:
        """``values`` and ``counts``, to store beside :meth:`to_dict`'s fields."""
        return {"values": self.values, "counts": self.counts}

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], arrays: Mapping[str, Any] | None = None
    ) -> ThresholdGrid:
        """Rebuild a grid from :meth:`to_dict` (no code is run): its JSON fields and
        arrays together, or the JSON fields alone with the arrays given apart (as
        :meth:`arrays` gives them: an artifact's ``model.json`` and ``model.npz``).

        Raises:
            ValueError: a wrong kind, unknown or missing keys, arrays that are not numeric
                NumPy arrays, or invalid values.
        """
        if not isinstance(data, Mapping) or data.get("kind") != "threshold_grid":
            raise ValueError(f"{_GRID}.from_dict needs a dict of kind 'threshold_grid'.")
        names = ("kind", "bits", "float32_inputs") + (
            ("values", "counts") if arrays is None else ()
        )
        if sorted(str(k) for k in data) != sorted(names):
            raise ValueError(
                f"{_GRID}.from_dict needs exactly the keys {list(names)}; got "
                f"{sorted(str(k) for k in data)!r:.120}."
            )
        source = data if arrays is None else arrays
        for name in ("values", "counts"):
            if not isinstance(source[name], np.ndarray):
                raise ValueError(f"The '{name}' of a {_GRID} must be a NumPy array.")
        return cls(data["bits"], source["values"], source["counts"], data["float32_inputs"])

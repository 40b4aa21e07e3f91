"""Accumulator-aware weight quantization: integer weights whose *proven* accumulator fits a
given width, with each weight's rounding chosen on calibration data.

Why it is cheap to prove. The lowering computes ``acc = apply(q, W) - lo`` with ``lo``
the proven minimum (:func:`fhe_quant.ir.linear_bounds`), so with input codes in
``[0, r]`` the proven range of output ``j`` is ``r * ||W_j||_1`` whatever the signs of
the weights: the shift by ``lo`` gives every row the tight, zero-centred bound that A2Q+
(Colbert et al., 2023) obtains by centring the weights. A row fits ``P`` unsigned bits
exactly when ``||W_j||_1 <= (2**P - 1) // r`` (its *l1 budget*).

How the weights are chosen. For every output channel the input columns are quantized one
by one (GPFQ / OPTQ style, with the accumulator constraint as in AXE, Colbert et al.,
2024): the error made so far on the calibration activations is fed forward into the
next column's rounding, and each integer is clipped to what is left of the row's
budget, so the budget holds by construction. Each row's scale is the best (smallest
output error on the calibration data) of a few multiples of the smallest scale whose
plain rounding fits the budget.

All functions are pure NumPy. ``weight`` arguments are ``(out, in)`` matrices of float
weights already multiplied by their input's scales (``fhe_quant.quant.ptq`` folds them),
and activations are ``(n, in)`` in the same units (``x / s_in``), so that the layer's
output in units of the weight scale is ``x @ (weight / scale).T``.

Examples:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> w, x = rng.normal(size=(4, 16)), rng.uniform(0, 63, size=(200, 16))
    >>> q, scale = quantize_rows(w, x, x, qmax=31, budget=l1_budget(10, 63))
    >>> bool(np.all(proven_range(q, 63) <= 2**10 - 1))
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fhe_quant.errors import RangeError
from fhe_quant.quant.quantizer import MIN_SCALE

__all__ = [
    "AccumulatorBudgetError",
    "SCALE_MULTIPLIERS",
    "MAX_CALIBRATION_ROWS",
    "l1_budget",
    "smallest_accumulator_bits",
    "proven_range",
    "budget_scale",
    "round_and_clip",
    "greedy_quantize",
    "quantize_rows",
    "im2col",
    "output_error",
    "AUTO_MARGIN_DB",
    "AUTO_ENOUGH_DB",
    "layer_error",
    "smallest_within",
]

#: Multiples of the smallest budget-fitting scale tried for every row (the best on the
#: calibration data wins): smaller scales keep more resolution and let the greedy
#: clipping drop the least useful weights; larger ones leave budget to spare.
SCALE_MULTIPLIERS = (0.6, 0.7, 0.8, 0.9, 1.0, 1.15)

#: Calibration rows (samples, or samples x positions of a convolution) used to choose
#: the roundings; more are subsampled deterministically.
MAX_CALIBRATION_ROWS = 4096

#: ``accumulator_bits="auto"``: each layer gets the narrowest accumulator whose
#: calibration SQNR (its output against its error, :func:`layer_error`) is within
#: ``AUTO_MARGIN_DB`` of the best width's, or at least ``AUTO_ENOUGH_DB``
#: (:func:`smallest_within`).
AUTO_MARGIN_DB = 2.0
#: See :data:`AUTO_MARGIN_DB`.
AUTO_ENOUGH_DB = 12.0


class AccumulatorBudgetError(RangeError):
    """``accumulator_bits`` leaves a layer no room for a single non-zero weight.

    Attributes:
        layer: the layer's name.
        accumulator_bits: the width asked for.
        smallest_bits: the smallest width that works (one weight of magnitude 1, or an
            average pooling's fixed accumulator).
    """

    def __init__(
        self, layer: str, accumulator_bits: int, smallest_bits: int, reason: str = ""
    ) -> None:
        self.layer = layer
        self.accumulator_bits = accumulator_bits
        self.smallest_bits = smallest_bits
        reason = reason or "its input codes leave no room for a single non-zero weight"
        super().__init__(
            f"accumulator_bits={accumulator_bits} is too small for layer {layer!r}: "
            f"{reason}. The smallest width that works for this layer is {smallest_bits}; "
            "raise accumulator_bits or lower the activation bits."
        )


def l1_budget(accumulator_bits: int, input_range: int, table_bits: int | None = None) -> int:
    """The largest ``||W_j||_1`` whose proven accumulator fits ``accumulator_bits``
    unsigned bits when every input code lies in an interval of width ``input_range``.

    With ``table_bits`` (the width of the table after the layer), the accumulator also
    keeps room to be rounded half up to that width without a carry into a new bit, which
    would cost one more dropped bit (see ``fhe_quant.lower``): ``acc_max + 2**(lsbs - 1)
    < 2**accumulator_bits`` with ``lsbs = accumulator_bits - table_bits``.

    Examples:
        >>> l1_budget(10, 63)   # 6-bit input codes, 10-bit accumulators
        16
        >>> l1_budget(10, 63, table_bits=6)   # 1023 - 8 = 1015 = 63 * 16 + 7
        16
        >>> l1_budget(12, 63, table_bits=6)   # 4095 - 32 = 4063 = 63 * 64 + 31
        64
        >>> l1_budget(5, 63)
        0
    """
    lsbs = int(accumulator_bits) - int(table_bits) if table_bits is not None else 0
    headroom = 2 ** (lsbs - 1) if lsbs > 0 else 0
    return (2 ** int(accumulator_bits) - 1 - headroom) // max(1, int(input_range))


def smallest_accumulator_bits(input_range: int, table_bits: int | None = None) -> int:
    """The narrowest accumulator with an l1 budget of at least 1 (:func:`l1_budget`, with
    the rounding room before a ``table_bits`` wide table when given).

    Examples:
        >>> smallest_accumulator_bits(63), smallest_accumulator_bits(64)
        (6, 7)
        >>> smallest_accumulator_bits(63, table_bits=5)  # 6 bits leave no room to round
        7
    """
    bits = max(1, int(input_range).bit_length())
    while l1_budget(bits, input_range, table_bits) < 1:
        bits += 1
    return bits


def proven_range(q: np.ndarray, input_range: int) -> np.ndarray:
    """The proven accumulator range ``input_range * ||q_j||_1`` of every output channel
    (axis 0) of integer weights ``q`` of any layout.

    Examples:
        >>> proven_range(np.array([[1, -2], [0, 3]]), 7).tolist()
        [21, 21]
    """
    flat = np.abs(np.asarray(q, dtype=np.int64)).reshape(len(q), -1)
    return int(input_range) * flat.sum(axis=1)


def budget_scale(weight: np.ndarray, qmax: int, budget: Any) -> np.ndarray:
    """Per row, the smallest scale whose real-valued codes ``weight / scale`` fit both
    ``[-qmax, qmax]`` and the l1 budget (``MIN_SCALE`` for an all-zero row).

    Examples:
        >>> budget_scale(np.array([[1.0, -3.0], [0.5, 0.5]]), qmax=7, budget=2).tolist()
        [2.0, 0.5]
    """
    weight = np.asarray(weight, dtype=np.float64)
    budget = np.broadcast_to(np.asarray(budget, dtype=np.float64), (len(weight),))
    by_max = np.abs(weight).max(axis=1) / qmax
    by_l1 = np.abs(weight).sum(axis=1) / np.maximum(budget, 1.0)
    return np.maximum(np.maximum(by_max, by_l1), MIN_SCALE)


def _clip_to_budget(q: np.ndarray, remaining: np.ndarray, qmax: int) -> np.ndarray:
    limit = np.minimum(remaining, qmax)
    return np.clip(q, -limit, limit)


def round_and_clip(weight: np.ndarray, scale: np.ndarray, qmax: int, budget: Any) -> np.ndarray:
    """Round to nearest, then clip each weight (columns in order) to the budget left:
    the baseline that :func:`greedy_quantize` improves on.

    Examples:
        >>> round_and_clip(np.array([[2.6, -2.6, 1.0]]), np.array([1.0]), 7, 5).tolist()
        [[3, -2, 0]]
    """
    weight = np.asarray(weight, dtype=np.float64)
    codes = np.rint(weight / np.asarray(scale, dtype=np.float64)[:, None])
    remaining = np.broadcast_to(np.asarray(budget, dtype=np.int64), (len(weight),)).copy()
    q = np.zeros(weight.shape, dtype=np.int64)
    for i in range(weight.shape[1]):
        q[:, i] = _clip_to_budget(codes[:, i].astype(np.int64), remaining, qmax)
        remaining -= np.abs(q[:, i])
    return q


def greedy_quantize(
    weight: np.ndarray,
    x: np.ndarray,
    x_q: np.ndarray,
    scale: np.ndarray,
    qmax: int,
    budget: Any,
    order: Sequence[int] | None = None,
) -> np.ndarray:
    """Error-correcting sequential quantization of every row under its l1 budget.

    With ``u`` the output error so far (float layer on ``x`` minus quantized layer on
    ``x_q``, in units of each row's scale), column ``i`` gets
    ``q_i = round(<x_q[:, i], u + w_i x[:, i]> / ||x_q[:, i]||^2)``, clipped to
    ``[-qmax, qmax]`` and to the row's remaining budget; then ``u`` takes the new error.
    A column that is 0 on every calibration row is rounded to nearest (within budget).

    Args:
        weight: ``(out, in)`` float weights.
        x: ``(n, in)`` float activations (the target's inputs).
        x_q: ``(n, in)`` the activations the quantized layer sees (e.g. quantized ``x``).
        scale: ``(out,)`` positive scales.
        qmax: largest weight magnitude.
        budget: the l1 budget, one int or one per row.
        order: the order in which columns are quantized (default: decreasing
            ``||x_q[:, i]||``, the most active inputs first).

    Returns:
        ``(out, in)`` int64 weights with ``sum_i |q_ji| <= budget_j`` for every row.

    Examples:
        >>> w = np.array([[0.4, 0.4, 0.4]])
        >>> x = np.eye(3).repeat(10, axis=0) + 1.0
        >>> greedy_quantize(w, x, x, np.array([1.0]), 7, 7).tolist()  # the error carries
        [[0, 1, 0]]
        >>> round_and_clip(w, np.array([1.0]), 7, 7).tolist()  # output 0 instead of ~1.2
        [[0, 0, 0]]
    """
    w = np.asarray(weight, dtype=np.float64) / np.asarray(scale, dtype=np.float64)[:, None]
    x = np.asarray(x, dtype=np.float64)
    x_q = np.asarray(x_q, dtype=np.float64)
    norms = np.einsum("ni,ni->i", x_q, x_q)
    if order is None:
        order = np.argsort(-norms, kind="stable")
    remaining = np.broadcast_to(np.asarray(budget, dtype=np.int64), (len(w),)).copy()
    u = np.zeros((x.shape[0], len(w)))  # running error, one column per output channel
    q = np.zeros(w.shape, dtype=np.int64)
    for i in order:
        if norms[i] > 0:
            target = u + np.outer(x[:, i], w[:, i])
            codes = np.rint(x_q[:, i] @ target / norms[i]).astype(np.int64)
        else:
            target = u
            codes = np.rint(w[:, i]).astype(np.int64)
        q[:, i] = _clip_to_budget(codes, remaining, qmax)
        remaining -= np.abs(q[:, i])
        u = target - np.outer(x_q[:, i], q[:, i])
    return q


def output_error(
    weight: np.ndarray, q: np.ndarray, scale: np.ndarray, x: np.ndarray, x_q: np.ndarray
) -> np.ndarray:
    """Per row, the mean squared error of the quantized layer's output against the float
    one on calibration data (real units).

    Examples:
        >>> output_error(np.array([[1.0]]), np.array([[1]]), np.array([1.0]),
        ...              np.ones((2, 1)), np.ones((2, 1))).tolist()
        [0.0]
    """
    diff = (
        np.asarray(x) @ np.asarray(weight, dtype=np.float64).T
        - np.asarray(x_q) @ (q * np.asarray(scale)[:, None]).T
    )
    return np.mean(diff**2, axis=0)


def quantize_rows(
    weight: np.ndarray,
    x: np.ndarray,
    x_q: np.ndarray,
    qmax: int,
    budget: Any,
    per_channel: bool = True,
    multipliers: Sequence[float] = SCALE_MULTIPLIERS,
) -> tuple[np.ndarray, np.ndarray]:
    """Integer weights and scales of an ``(out, in)`` layer under an l1 budget.

    Tries every multiple in ``multipliers`` of :func:`budget_scale` and keeps, per row
    (or for the whole layer when ``per_channel`` is false), the one whose
    :func:`greedy_quantize` weights give the smallest :func:`output_error`.

    Returns:
        ``(q, scale)``: int64 ``(out, in)`` weights within the budget and ``(out,)``
        scales (all equal when ``per_channel`` is false).

    Examples:
        >>> rng = np.random.default_rng(1)
        >>> w, x = rng.normal(size=(3, 8)), rng.uniform(0, 15, size=(50, 8))
        >>> q, s = quantize_rows(w, x, x, qmax=7, budget=4)
        >>> np.abs(q).sum(axis=1).max() <= 4
        True
    """
    weight = np.asarray(weight, dtype=np.float64)
    base = budget_scale(weight, qmax, budget)
    if not per_channel:
        base = np.full_like(base, base.max())
    best_q = np.zeros(weight.shape, dtype=np.int64)
    best_scale = base.copy()
    best_error = np.full(len(weight), np.inf)
    for multiplier in multipliers:
        scale = base * multiplier
        q = greedy_quantize(weight, x, x_q, scale, qmax, budget)
        error = output_error(weight, q, scale, x, x_q)
        if not per_channel:
            error = np.full_like(error, error.sum())
        better = error < best_error
        best_q[better], best_scale[better] = q[better], scale[better]
        best_error[better] = error[better]
    return best_q, best_scale


def im2col(
    x: np.ndarray,
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[tuple[int, int], ...],
    dilation: tuple[int, ...],
) -> np.ndarray:
    """The patches a convolution reads: ``(n * positions, channels, *kernel)``, padded
    with 0 as the lowering pads codes (a padded tap contributes exactly 0).

    Examples:
        >>> x = np.arange(4.0).reshape(1, 1, 4)
        >>> im2col(x, (2,), (2,), ((0, 0),), (1,)).tolist()
        [[[0.0, 1.0]], [[2.0, 3.0]]]
    """
    x = np.asarray(x, dtype=np.float64)
    spatial = len(kernel)
    x = np.pad(x, ((0, 0), (0, 0)) + tuple(tuple(p) for p in padding))
    extents = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation, strict=True))
    windows = np.lib.stride_tricks.sliding_window_view(
        x, extents, axis=tuple(range(2, 2 + spatial))
    )
    index = (slice(None), slice(None))
    index += tuple(slice(None, None, s) for s in stride)
    index += tuple(slice(None, None, d) for d in dilation)
    windows = windows[index]  # (n, c, *positions, *kernel)
    n, c = windows.shape[:2]
    positions = windows.shape[2 : 2 + spatial]
    moved = np.moveaxis(windows, 1, 1 + spatial)  # (n, *positions, c, *kernel)
    return moved.reshape((n * int(np.prod(positions)), c) + tuple(kernel))


def layer_error(
    weight: np.ndarray,
    q: np.ndarray,
    scale: np.ndarray,
    x: np.ndarray,
    x_q: np.ndarray,
    lsbs: int,
) -> np.ndarray:
    """Per row, :func:`output_error` plus the variance of the table's rounding, which
    drops ``lsbs`` low bits of the accumulator (a uniform error over a cell of
    ``scale * 2**lsbs``, variance ``cell**2 / 12``; 0 for a layer without a table).

    The two terms trade against each other: a narrower accumulator coarsens the weights
    but makes each dropped bit worth less; at a fixed table width the rounding term is
    about the same whatever the budget (the weight scale grows as the cell shrinks).

    Examples:
        >>> one = np.ones((4, 1))
        >>> layer_error(np.array([[1.0]]), np.array([[1]]), np.array([0.5]), one, 2 * one,
        ...             lsbs=1).tolist()
        [0.08333333333333333]
    """
    rounding = (np.asarray(scale, dtype=np.float64) * 2.0**lsbs) ** 2 / 12 if lsbs else 0.0
    return output_error(weight, q, scale, x, x_q) + rounding


def smallest_within(
    sqnr: Mapping[int, float], margin_db: float = AUTO_MARGIN_DB, enough_db: float = AUTO_ENOUGH_DB
) -> int:
    """The smallest width whose signal-to-quantization-noise ratio (dB, width -> SQNR) is
    within ``margin_db`` of the best one's, or at least ``enough_db``.

    Examples:
        >>> smallest_within({8: 1.0, 9: 4.1, 10: 5.5, 11: 5.9}, margin_db=2.0)
        9
        >>> smallest_within({8: 10.0, 9: 13.0, 10: 16.0, 11: 18.0}, enough_db=12.0)
        9
    """
    target = min(max(sqnr.values()) - margin_db, enough_db)
    return min(bits for bits, value in sqnr.items() if value >= target)

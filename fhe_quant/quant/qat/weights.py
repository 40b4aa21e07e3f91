"""Weight quantizers of QAT: symmetric per output channel with the scale of least
squared error (or ``max |w| / qmax``), an optional accumulator budget (A2Q's idea), and
binary weights (BinaryConnect, deterministic or stochastic)."""

from __future__ import annotations

import numpy as np
import torch

from fhe_quant.quant.quantizer import UniformQuantizer

__all__ = ["quantize_weight", "unit_weights"]

#: Number of clipping ratios tried by the least-squares weight scale.
_SCALE_GRID = 41

#: Bisection steps of the accumulator-budget scale (relative precision ~1e-9).
_BUDGET_STEPS = 32

#: Elements computed at once by the scale search (bounds its memory).
_SCALE_CHUNK = 1 << 20


def _budget_fixup(codes: np.ndarray, ratio: np.ndarray, budget: int) -> np.ndarray:
    """Round towards zero the fewest codes that rounding pushed away from zero, per row,
    until ``sum |codes| <= budget``; ``sum |ratio| <= budget`` guarantees it is possible
    (each such code was rounded up by at most 1/2, so at least twice the excess of them
    exist)."""
    excess = np.abs(codes).sum(axis=1) - budget
    if not np.any(excess > 0):
        return codes
    rounded_up = np.abs(codes) - np.abs(ratio)
    order = np.argsort(-rounded_up, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(codes.shape[1])[None, :], axis=1)
    lower = rank < np.maximum(excess, 0)[:, None]
    return codes - np.sign(codes) * lower


def _budget_scale(
    magnitude: np.ndarray, scale: np.ndarray, top: np.ndarray, qmax: int, budget: int
) -> np.ndarray:
    """Per row, ``scale`` when its codes ``clip(rint(|w| / s), 0, qmax)`` already sum to at
    most ``budget``, else (nearly) the smallest larger scale whose codes do: the budget
    goes to the largest weights. The old bound ``sum |w| / budget`` rounds every weight of
    a wide row to 0 when the budget is smaller than the fan-in (64 inputs, budget 9: all
    codes 0, a dead layer); never raising a fitting scale keeps the least-squares scale
    of a row the budget does not bind (raising it to ``max|w| / qmax`` cost a 2-bit MLP 8
    points)."""

    def fits(s: np.ndarray) -> np.ndarray:
        return np.minimum(np.rint(magnitude / s[:, None]), qmax).sum(axis=1) <= budget

    # NOTE: the code sum only falls as the scale grows: bisect (in log scale) between the
    # scale asked for and 2 max|w| (all codes 0, always within budget).
    safe = np.where(scale > 0, scale, 1.0)
    low, high = np.log(safe), np.log(2.0 * np.maximum(np.where(top > 0, top, 1.0), safe))
    for _ in range(_BUDGET_STEPS):
        middle = (low + high) / 2
        within = fits(np.exp(middle))
        high = np.where(within, middle, high)
        low = np.where(within, low, middle)
    return np.where(fits(safe), safe, np.exp(high))


def _least_squares_scale(folded: np.ndarray, top: np.ndarray, qmax: int) -> np.ndarray:
    """Per row, the scale ``r * max|w| / qmax`` (``r`` on a grid in ``[0.2, 1]``) whose
    quantized weights are closest to ``w`` in squared error (ties: the larger ``r``)."""
    top = np.where(top > 0, top, 1.0)
    ratios = np.linspace(1.0, 0.2, _SCALE_GRID)
    errors = np.empty((len(ratios), len(top)))
    chunk = max(1, _SCALE_CHUNK // max(1, folded.size))
    for begin in range(0, len(ratios), chunk):
        scales = top[None, :, None] * (ratios[begin : begin + chunk, None, None] / qmax)
        codes = np.rint(folded[None] / scales)
        np.minimum(codes, qmax, out=codes)
        np.maximum(codes, -qmax, out=codes)
        codes *= scales
        codes -= folded[None]
        errors[begin : begin + chunk] = np.einsum("gij,gij->gi", codes, codes)
    # NOTE: argmin keeps the first minimum: the widest range among equal errors.
    return top * (ratios[np.argmin(errors, axis=0)] / qmax)


def quantize_weight(
    folded: np.ndarray,
    *,
    bits: int,
    binary: bool,
    method: str = "mse",
    stochastic: bool = False,
    l1_budget: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[np.ndarray, UniformQuantizer]:
    """Quantize folded weights ``(out, in)`` per output channel.

    * Uniform: symmetric narrow-range codes ``round(w / scale)``, with ``scale_j`` the
      per-channel scale of least squared error among ``r * max_i |w_ji| / qmax`` for
      ``r`` on a grid in ``[0.2, 1]`` (``method="mse"``; weights beyond the range clip)
      or ``max_i |w_ji| / qmax`` (``method="max"``). With ``l1_budget``, the scale is at
      least ``sum_i |w_ji| / l1_budget`` and the fewest codes rounded away from zero are
      rounded towards it instead, so that ``sum_i |code_ji| <= l1_budget``: multiplied by
      the input codes' width, that bounds the layer's proven accumulator (A2Q's idea,
      with the scale set from the weights at every step instead of learned).
    * Binary: codes ``sign(w)`` (``+1`` for 0) or, with ``stochastic``, ``+1`` with
      probability ``hard_sigmoid(w_ji / max_i |w_ji|)`` drawn from ``generator``;
      ``scale_j = mean_i |w_ji|``. The quantizer is 2-bit signed narrow range (codes
      ``{-1, 0, 1}``, of which only ±1 are used).

    A channel whose weights are all 0 gets the scale 1.

    Args:
        folded: float64 weights with the input step sizes folded in.
        bits: code width of uniform weights (2 to 8).
        binary: binary weights.
        method: scale of uniform weights: ``"mse"`` or ``"max"``.
        stochastic: sample binary codes (training only).
        l1_budget: cap on ``sum |codes|`` per output channel (uniform only).
        generator: torch generator of the stochastic sampling (``None``: torch's global).

    Returns:
        ``(codes, quantizer)``: the int64 codes and the :class:`UniformQuantizer` (scale
        per output channel, axis 0) that the lowering reads.

    Examples:
        >>> w = np.array([[0.3, -0.6, 0.05], [0.0, 0.0, 0.0]])
        >>> codes, q = quantize_weight(w, bits=3, binary=False, method="max")
        >>> codes.tolist(), q.scale
        ([[2, -3, 0], [0, 0, 0]], (0.19999999999999998, 1.0))
        >>> codes, q = quantize_weight(w, bits=3, binary=True)
        >>> codes.tolist(), q.scale[0]
        ([[1, -1, 1], [1, 1, 1]], 0.31666666666666665)
    """
    folded = np.asarray(folded, dtype=np.float64)
    magnitude = np.abs(folded)
    top = magnitude.max(axis=1)
    if binary:
        if stochastic:
            safe = np.where(top > 0, top, 1.0)[:, None]
            probability = np.clip((folded / safe + 1.0) / 2.0, 0.0, 1.0)
            draw = torch.rand(folded.shape, generator=generator, dtype=torch.float64).numpy()
            codes = np.where(draw < probability, 1, -1)
        else:
            codes = np.where(folded >= 0, 1, -1)
        scale = magnitude.mean(axis=1)
        bits = 2
    else:
        qmax = 2 ** (bits - 1) - 1
        scale = _least_squares_scale(folded, top, qmax) if method == "mse" else top / qmax
        if l1_budget is not None:
            scale = _budget_scale(magnitude, scale, top, qmax, l1_budget)
    scale = np.where(scale > 0, scale, 1.0)
    if not binary:
        ratio = folded / scale[:, None]
        codes = np.clip(np.rint(ratio), -qmax, qmax)
        if l1_budget is not None:
            codes = _budget_fixup(codes, ratio, l1_budget)
    quantizer = UniformQuantizer(
        bits=bits,
        scale=tuple(scale.tolist()),
        zero_point=(0,) * len(scale),
        signed=True,
        narrow_range=True,
        axis=0,
    )
    return codes.astype(np.int64), quantizer


def unit_weights(folded: np.ndarray) -> tuple[np.ndarray, UniformQuantizer]:
    """Average pooling's folded weights (one positive constant per output channel):
    codes all 1, the constant as the scale (exact, as post-training quantization)."""
    scale = folded.reshape(len(folded), -1)[:, 0]
    quantizer = UniformQuantizer(
        bits=2,
        scale=tuple(scale.tolist()),
        zero_point=(0,) * len(scale),
        signed=True,
        narrow_range=True,
        axis=0,
    )
    return np.ones(folded.shape, dtype=np.int64), quantizer

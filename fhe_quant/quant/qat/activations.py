"""The activation quantizer of QAT: unsigned affine, one step size per feature, learned
(LSQ) or following moving averages of the ranges seen in training."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fhe_quant.errors import InputError
from fhe_quant.quant.calibrate import MSEObserver
from fhe_quant.quant.qat.config import ACTIVATION_SCALES, check_choice
from fhe_quant.quant.qat.ops import along
from fhe_quant.quant.qat.ste import scale_gradient
from fhe_quant.quant.quantizer import UniformQuantizer

__all__ = ["DEAD_FEATURE_SCALE", "ActivationQuantizer"]

#: Step size of a feature that is exactly 0 on the initialisation data (a constant input
#: pixel, a dead ReLU): its folded weights become 0, so it costs nothing in the proven
#: accumulator ranges, and any value it takes later saturates harmlessly.
DEAD_FEATURE_SCALE = 1e-6

#: Smallest learned step size (LSQ may push one towards 0 or below).
_MIN_STEP = 1e-8


def _zero_points(low: np.ndarray, high: np.ndarray, qmax: int) -> np.ndarray:
    """Affine zero points of the ranges ``[low, high]`` (which contain 0)."""
    width = high - low
    safe = np.where(width > 0, width, 1.0)
    return np.where(width > 0, np.clip(np.rint(-low * qmax / safe), 0, qmax), 0).astype(np.int64)


def _steps_for_range(low: Any, high: Any, zero_point: Any, qmax: int) -> Any:
    """Smallest step sizes whose codes ``0..qmax`` around the fixed zero points cover
    ``[low, high]`` (NumPy or torch); :data:`DEAD_FEATURE_SCALE` for a ``[0, 0]`` range."""
    lib: Any = torch if isinstance(low, Tensor) else np
    z = zero_point.to(low.dtype) if isinstance(low, Tensor) else zero_point.astype(np.float64)
    up = lib.where(z < qmax, high / lib.clip(qmax - z, 1, None), 0.0 * high)
    down = lib.where(z > 0, -low / lib.clip(z, 1, None), 0.0 * low)
    step = lib.maximum(up, down)
    return lib.where(step > 0, step, DEAD_FEATURE_SCALE + 0.0 * step)


class ActivationQuantizer(nn.Module):
    """Unsigned affine quantizer with one step size per feature (on ``axis``).

    The features are the axis that the consuming layer mixes with its weights, as in
    post-training quantization (:mod:`fhe_quant.quant.ptq`): the last axis for a dense
    layer, the channel axis (1) for a convolution or an average pooling, whose step size
    is then shared by every spatial position of a channel (so that it folds into the
    weights).

    The integer zero points are fixed by :meth:`initialize`. With ``method="lsq"`` the
    step sizes are the parameter ``scale``, initialised per feature to the clipping range
    of least squared error on the first data (:class:`~fhe_quant.quant.calibrate.
    MSEObserver`) and then learned. With ``method="ema"`` they are derived from the
    buffers ``running_min``/``running_max`` (updated by :meth:`observe` in training):
    the smallest step whose codes cover the range around the fixed zero point.

    Args:
        n_features: number of features (size of the last axis).
        bits: code width, 1 to 8.
        method: ``"lsq"`` or ``"ema"``.
        momentum: weight of a new batch in the moving averages (``"ema"``).
        axis: the feature axis of the values (``-1``: last; ``1``: channels of
            ``(N, C, ...)`` tensors).

    Examples:
        >>> q = ActivationQuantizer(2, bits=2, method="lsq")
        >>> q.initialize(np.array([[0.0, -1.0], [3.0, 2.0]]))
        >>> q.quantizer().zero_point
        (0, 1)
        >>> q = ActivationQuantizer(2, bits=2, method="ema", axis=1)
        >>> q.initialize(np.stack([np.full((3, 3), 2.0), np.full((3, 3), -1.0)])[None])
        >>> q.quantizer().zero_point, q.quantizer().axis
        ((0, 3), 1)
    """

    def __init__(
        self, n_features: int, bits: int, method: str, momentum: float = 0.1, axis: int = -1
    ) -> None:
        super().__init__()
        self.axis = int(axis)
        self.n_features = int(n_features)
        self.bits = int(bits)
        self.qmax = 2**self.bits - 1
        self.method = check_choice(method, "activation_scale", ACTIVATION_SCALES)
        self.momentum = float(momentum)
        ones = torch.ones(self.n_features, dtype=torch.float64)
        if self.method == "lsq":
            self.scale = nn.Parameter(ones.clone())
        else:
            self.register_buffer("running_min", torch.zeros_like(ones))
            self.register_buffer("running_max", ones.clone())
        self.register_buffer("zero_point", torch.zeros(self.n_features, dtype=torch.int64))
        self.register_buffer("initialized", torch.tensor(False))

    def extra_repr(self) -> str:
        return (
            f"n_features={self.n_features}, bits={self.bits}, method={self.method!r}, "
            f"axis={self.axis}"
        )

    @property
    def is_initialized(self) -> bool:
        return bool(self.initialized)

    def _features(self, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        if not -values.ndim <= self.axis < values.ndim or (
            values.shape[self.axis] != self.n_features
        ):
            raise InputError(
                f"An ActivationQuantizer of {self.n_features} features got values of shape "
                f"{values.shape}; axis {self.axis} must hold the features."
            )
        return np.moveaxis(values, self.axis, -1).reshape(-1, self.n_features)

    @torch.no_grad()
    def initialize(self, values: np.ndarray) -> None:
        """Set the zero points and step sizes from float values ``(..., n_features)``."""
        flat = self._features(values)
        low = np.minimum(flat.min(axis=0), 0.0)
        high = np.maximum(flat.max(axis=0), 0.0)
        dead = (low == 0) & (high == 0)
        if self.method == "lsq":
            observer = MSEObserver(axis=1, grid=50)
            observer.observe(flat)
            mse = observer.quantizer(self.bits, signed=False, symmetric=False)
            zero_point = np.asarray(mse.zero_point, dtype=np.int64)
            step = np.where(dead, DEAD_FEATURE_SCALE, np.asarray(mse.scale))
            self.scale.copy_(torch.from_numpy(step))
        else:
            zero_point = _zero_points(low, high, self.qmax)
            self.running_min.copy_(torch.from_numpy(low))
            self.running_max.copy_(torch.from_numpy(high))
        self.zero_point.copy_(torch.from_numpy(zero_point))
        self.initialized.fill_(True)

    @torch.no_grad()
    def observe(self, values: Tensor) -> None:
        """Move the ``"ema"`` ranges towards a training batch's per-feature min/max."""
        if self.method != "ema":
            return
        flat = values.detach().movedim(self.axis, -1).reshape(-1, self.n_features)
        flat = flat.to(torch.float64)
        low = torch.clamp(flat.amin(dim=0), max=0.0)
        high = torch.clamp(flat.amax(dim=0), min=0.0)
        self.running_min.lerp_(low, self.momentum)
        self.running_max.lerp_(high, self.momentum)

    def step_size(self) -> Tensor:
        """The current positive step sizes ``(n_features,)`` (with gradient for LSQ)."""
        if self.method == "lsq":
            return torch.clamp(self.scale, min=_MIN_STEP)
        return _steps_for_range(
            self.running_min, self.running_max, self.zero_point, self.qmax
        ).clamp_min(_MIN_STEP)

    def gradient_scaled_step(self, values: Tensor) -> Tensor:
        """:meth:`step_size` with LSQ's gradient scale ``1 / sqrt(N * Qp)``, ``N`` the
        values one step size quantizes per sample."""
        step = self.step_size()
        if self.method != "lsq":
            return step
        per_sample = max(1, values[0].numel() // self.n_features) if len(values) else 1
        return scale_gradient(step, 1.0 / math.sqrt(per_sample * self.qmax))

    def quantizer(self) -> UniformQuantizer:
        """The current quantizer (what the integer program uses)."""
        return UniformQuantizer(
            bits=self.bits,
            scale=tuple(self.step_size().detach().tolist()),
            zero_point=tuple(int(z) for z in self.zero_point.tolist()),
            signed=False,
            axis=self.axis,
        )

    def along(self, vector: Tensor, ndim: int) -> Tensor:
        """A per-feature ``vector`` shaped to broadcast against ``ndim``-axis values."""
        return along(vector, self.axis, ndim)

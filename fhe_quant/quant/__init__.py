"""Quantization primitives: uniform quantizers, calibration observers and settings.

Examples:
    >>> import numpy as np
    >>> from fhe_quant.quant import UniformQuantizer
    >>> UniformQuantizer.from_range(0.0, 1.0, bits=4).quantize(np.array([0.5])).tolist()
    [8]
"""

from __future__ import annotations

from fhe_quant.quant.calibrate import (
    CALIBRATION_METHODS,
    MinMaxObserver,
    MovingAverageAbsMaxObserver,
    MSEObserver,
    Observer,
    PercentileObserver,
    make_observer,
)
from fhe_quant.quant.config import ROLES, QuantConfig
from fhe_quant.quant.quantizer import UniformQuantizer

__all__ = [
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
]

"""Weight quantization shared by post-training quantization and the branching lowering.

Weights are symmetric signed codes (narrow range), per output channel (axis 0 of a
``(out, in / groups, *kernel)`` weight) or per tensor, quantized *after* the input's scales
are folded into them (:func:`fold_input_scale`); weights that are one positive constant per
output channel (average pooling) quantize exactly to 1 (:func:`unit_weight_quantizer`).

Examples:
    >>> import numpy as np
    >>> weight_quantizer(np.array([[0.5, -1.0], [2.0, 1.0]]), bits=3, per_channel=True).scale
    (0.3333333333333333, 0.6666666666666666)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fhe_quant.ir import Node, weight_input_channels
from fhe_quant.quant.quantizer import UniformQuantizer

__all__ = ["weight_quantizer", "unit_weight_quantizer", "fold_input_scale"]


def weight_quantizer(weight: np.ndarray, bits: int, per_channel: bool) -> UniformQuantizer:
    """The symmetric, narrow-range quantizer of ``weight`` (``(out, ...)``), one scale per
    output channel or one for the tensor, from the weights' own range."""
    flat = weight.reshape(weight.shape[0], -1)
    if per_channel:
        return UniformQuantizer.from_range(
            flat.min(axis=1),
            flat.max(axis=1),
            bits,
            signed=True,
            symmetric=True,
            narrow_range=True,
            axis=0,
        )
    return UniformQuantizer.from_range(
        float(flat.min()), float(flat.max()), bits, signed=True, symmetric=True, narrow_range=True
    )


def unit_weight_quantizer(weight: np.ndarray, where: str) -> UniformQuantizer:
    """Exact quantizer of weights that are one positive constant per output channel
    (pooling): the codes are all 1 and the scale is the constant.

    Raises:
        ValueError: the weights are not one positive constant per channel (names ``where``).

    Examples:
        >>> unit_weight_quantizer(np.full((2, 1, 2), 0.5), "pool").scale
        (0.5, 0.5)
    """
    flat = weight.reshape(weight.shape[0], -1)
    constant = flat[:, 0]
    if np.any(flat != constant[:, None]) or np.any(constant <= 0):
        raise ValueError(
            f"The weights of {where} must be one positive constant per output channel "
            "(average pooling), to quantize exactly to 1."
        )
    return UniformQuantizer(
        bits=2,
        scale=tuple(constant),
        zero_point=(0,) * len(constant),
        signed=True,
        narrow_range=True,
        axis=0,
    )


def fold_input_scale(node: Node, input_scale: Any) -> np.ndarray:
    """``weight * s_in`` along the weight's input axis (axis 1 of a (out, in, ...) weight;
    with groups, output channel ``o`` reads the input channels of its group); ``s_in`` is
    one scale, or one per input channel.

    Examples:
        >>> node = Node("fc", "linear", ("x",), {}, {"weight": np.ones((1, 2))})
        >>> fold_input_scale(node, [2.0, 3.0]).tolist()
        [[2.0, 3.0]]
    """
    weight = node.params["weight"]
    scale = np.asarray(input_scale, dtype=np.float64)
    if scale.size == 1:
        return weight * scale.item()
    per_column = scale[weight_input_channels(node)]
    return weight * per_column.reshape(per_column.shape + (1,) * (weight.ndim - 2))

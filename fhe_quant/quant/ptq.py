"""Post-training quantization: a float :class:`~fhe_quant.ir.Graph` and calibration data
in, a :class:`QuantizedGraph` out.

The graph (a chain, after :func:`fhe_quant.passes.simplify`) is cut into segments, each a
linear-kind layer (dense, convolution, average pooling) followed by the elementwise and
reshape operations up to the next one::

    [pre: client side] -> linear -> chain -> linear -> chain -> ... -> linear -> [post]

Every tensor that enters a linear layer gets an unsigned affine quantizer calibrated on
the float model's values there (one range per feature by default: per element of the
last axis for a dense layer, per channel (axis 1) for a convolution or pooling, whose
weights are shared along the spatial positions); every linear layer gets symmetric
signed weights (per output channel by default), quantized after folding its input's
scales into them: with ``x_i = s_i (q_i - z_i)``,
``sum_i w_ji x_i = sum_i (w_ji s_i) (q_i - z_i)``, so the integer program only ever
multiplies codes ``q_i`` by integer weights ``round(w_ji s_i / s_j)``. Average pooling's
weights ``1/k`` become exactly 1, with ``s_j = s_i / k`` per channel (a sum of codes;
the division lives in the next table or the client's dequantization). Elementwise
operations before the first linear layer
run on the client before quantization, and those after the last linear layer run on
the client after decryption, so the encrypted program starts and ends with a matmul.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fhe_quant.errors import InputError, UnsupportedOpError
from fhe_quant.ir import OPS, Graph, Node, weight_input_channels
from fhe_quant.quant.calibrate import make_observer
from fhe_quant.quant.config import QuantConfig
from fhe_quant.quant.quantizer import UniformQuantizer

__all__ = [
    "QuantizedLinear",
    "Segment",
    "QuantizedGraph",
    "quantize_graph",
    "check_calibration_data",
]


@dataclass(frozen=True, eq=False)
class QuantizedLinear:
    """A linear layer with integer weights.

    Attributes:
        node: the float node (its bias stays float: it is folded into the next table or
            applied by the client).
        weight_q: the integer weights, same layout as ``node.params["weight"]``; they
            approximate ``weight * input scale`` (the input scales are folded in).
        weight_quantizer: symmetric signed quantizer of the folded weights (per channel
            on axis 0, or per tensor; always per channel and exact for pooling).
        input_quantizer: unsigned quantizer of the tensor entering the layer.
    """

    node: Node
    weight_q: np.ndarray
    weight_quantizer: UniformQuantizer
    input_quantizer: UniformQuantizer


@dataclass(frozen=True, eq=False)
class Segment:
    """A linear layer and the elementwise/reshape chain after it.

    ``output_quantizer`` quantizes the chain's output for the next linear layer; it is
    ``None`` for the last segment, whose chain runs on the client in float.
    """

    linear: QuantizedLinear
    chain: tuple[Node, ...]
    output_quantizer: UniformQuantizer | None


@dataclass(frozen=True, eq=False)
class QuantizedGraph:
    """The quantized model: client pre-processing, segments, client post-processing."""

    graph: Graph
    pre: tuple[Node, ...]
    segments: tuple[Segment, ...]
    config: QuantConfig

    @property
    def input_quantizer(self) -> UniformQuantizer:
        return self.segments[0].linear.input_quantizer

    @property
    def post(self) -> tuple[Node, ...]:
        return self.segments[-1].chain


def check_calibration_data(
    x: np.ndarray, input_shape: tuple[int, ...] | None, what: str = "calibration data"
) -> np.ndarray:
    """Validate a float batch: numeric, finite, shaped ``(N, *input_shape)``."""
    try:
        array = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"The {what} must be numeric; conversion to float failed: {exc}") from None
    if array.ndim < 2 or array.shape[0] == 0:
        raise InputError(
            f"The {what} must be a non-empty batch of shape (n_samples, *input_shape). "
            f"Got shape {array.shape}."
        )
    if input_shape is not None and tuple(array.shape[1:]) != tuple(input_shape):
        raise InputError(
            f"The {what} has samples of shape {array.shape[1:]}, but the model expects "
            f"{tuple(input_shape)}."
        )
    bad = ~np.isfinite(array)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise InputError(
            f"The {what} holds {int(bad.sum())} NaN or inf values (first at index {first}); "
            "impute or drop them before quantizing."
        )
    return array


def _split(graph: Graph) -> tuple[tuple[Node, ...], list[tuple[Node, tuple[Node, ...]]]]:
    pre: list[Node] = []
    segments: list[tuple[Node, list[Node]]] = []
    for node in graph.nodes:
        if node.op == "input":
            continue
        if node.kind == "linear":
            segments.append((node, []))
        elif segments:
            segments[-1][1].append(node)
        else:
            pre.append(node)
        if node.name == graph.output_name:
            break
    if not segments:
        raise UnsupportedOpError(
            "a model without a linear layer",
            "model",
            "fhe_quant compiles models with at least one Linear layer.",
        )
    return tuple(pre), [(linear, tuple(chain)) for linear, chain in segments]


def _weight_quantizer(weight: np.ndarray, bits: int, per_channel: bool) -> UniformQuantizer:
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


def _unit_weight_quantizer(weight: np.ndarray, where: str) -> UniformQuantizer:
    """Exact quantizer of weights that are one positive constant per output channel
    (pooling): the codes are all 1 and the scale is the constant."""
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


def _activation_quantizer(
    values: np.ndarray, consumer: Node, bits: int, method: str, per_channel: bool
) -> UniformQuantizer:
    # NOTE: per channel = per feature on the axis the consuming layer mixes with its
    # weights: the last axis for a dense layer, the channel axis (1) for a convolution or
    # pooling (one scale shared by all spatial positions, so that it folds into weights).
    axis = OPS[consumer.op].channel_axis % values.ndim if per_channel else None
    observer = make_observer(method, axis=axis)
    observer.observe(values)
    return observer.quantizer(bits, signed=False, symmetric=False)


def _fold_input_scale(node: Node, quantizer: UniformQuantizer) -> np.ndarray:
    """``weight * s_in`` along the weight's input axis (axis 1 of a (out, in, ...) weight;
    with groups, output channel ``o`` reads the input channels of its group)."""
    weight = node.params["weight"]
    scale = np.asarray(quantizer.scale, dtype=np.float64)
    if scale.size == 1:
        return weight * scale.item()
    per_column = scale[weight_input_channels(node)]
    return weight * per_column.reshape(per_column.shape + (1,) * (weight.ndim - 2))


def quantize_graph(graph: Graph, x_calib: np.ndarray, config: QuantConfig) -> QuantizedGraph:
    """Calibrate and quantize a simplified chain graph.

    Args:
        graph: a float graph after :func:`fhe_quant.passes.simplify`.
        x_calib: representative inputs, ``(N, *graph.input_shape)``.
        config: bits per role and calibration method.

    Returns:
        The quantized graph: quantizers for every linear layer's input and weights.
    """
    x_calib = check_calibration_data(x_calib, graph.input_shape)
    values = graph.run(x_calib)
    pre, parts = _split(graph)
    segments: list[Segment] = []
    input_quantizer = _activation_quantizer(
        values[parts[0][0].inputs[0]],
        parts[0][0],
        config.n_bits_inputs,
        config.calibration,
        config.per_channel_activations,
    )
    for index, (node, chain) in enumerate(parts):
        last = index == len(parts) - 1
        bits = config.n_bits_outputs if last else config.n_bits_weights
        weight = _fold_input_scale(node, input_quantizer)
        if OPS[node.op].unit_weights:
            w_quantizer = _unit_weight_quantizer(weight, node.source or node.name)
        else:
            w_quantizer = _weight_quantizer(weight, bits, config.per_channel)
        linear = QuantizedLinear(node, w_quantizer.quantize(weight), w_quantizer, input_quantizer)
        output_quantizer = None
        if not last:
            chain_end = chain[-1].name if chain else node.name
            output_quantizer = _activation_quantizer(
                values[chain_end],
                parts[index + 1][0],
                config.n_bits_activations,
                config.calibration,
                config.per_channel_activations,
            )
            input_quantizer = output_quantizer
        segments.append(Segment(linear, chain, output_quantizer))
    return QuantizedGraph(graph, pre, tuple(segments), config)

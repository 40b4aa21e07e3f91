"""QAT's torch side of the op table: elementwise operations and linear layers in torch
(for the gradients), and the chain of layers QAT trains (:func:`split_chain`)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fhe_quant.errors import UnsupportedOpError
from fhe_quant.ir import ELEMENTWISE, ConvGeometry, Graph, Node

__all__ = [
    "TORCH_ELEMENTWISE",
    "torch_elementwise",
    "QAT_LINEAR_OPS",
    "split_chain",
    "torch_linear",
    "along",
]

TorchFn = Callable[[Node, Tensor, Mapping[str, Tensor]], Tensor]


def _tensor(value: np.ndarray, dtype: torch.dtype) -> Tensor:
    # NOTE: a copy: node constants are read-only arrays, which torch refuses to share.
    return torch.tensor(np.array(value), dtype=dtype)


def _torch_rule(op: str) -> TorchFn:
    """QAT's torch version of an elementwise op, from its row of the op table:
    ``f(x, *params, **attrs)`` with the row's torch function (the identity if none)."""
    row = ELEMENTWISE[op]
    if row.torch_function is None:
        return lambda n, x, p: x
    fn = functools.reduce(getattr, row.torch_function.split(".")[1:], torch)

    def apply(node: Node, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        attrs = {name: node.attrs.get(name, default) for name, default in row.attrs}
        return fn(x, *(params[name] for name in row.params), **attrs)

    return apply


#: Torch version of every elementwise operation of :data:`fhe_quant.ir.OPS`, for the
#: gradients of the QAT forward (its values are replaced by the integer program's),
#: derived from :data:`fhe_quant.ir.ELEMENTWISE`. ``params`` holds the node's constant
#: or trainable tensors (a PReLU's slopes).
TORCH_ELEMENTWISE: Mapping[str, TorchFn] = {op: _torch_rule(op) for op in ELEMENTWISE}


def torch_elementwise(node: Node, x: Tensor, params: Mapping[str, Tensor] | None = None) -> Tensor:
    """Apply an elementwise or reshape ``node`` to a torch batch ``x``.

    Args:
        node: an ``"elementwise"`` or ``"reshape"`` node of a graph.
        x: the batch (leading batch dimension).
        params: trainable tensors of the node (``{"weight": slopes}`` for PReLU); the
            node's own constants otherwise.

    Raises:
        UnsupportedOpError: the operation has no torch version here.

    Examples:
        >>> node = Node("r", "leaky_relu", ("x",), {"negative_slope": 0.5})
        >>> torch_elementwise(node, torch.tensor([[-2.0, 3.0]])).tolist()
        [[-1.0, 3.0]]
    """
    if node.op == "reshape":
        return x.reshape((x.shape[0],) + tuple(node.attrs["shape"]))
    fn = TORCH_ELEMENTWISE.get(node.op)
    if fn is None:
        raise UnsupportedOpError(
            node.op,
            node.source or node.name,
            "Quantization-aware training has no torch version of it.",
        )
    if params is None:
        params = {k: _tensor(v, x.dtype) for k, v in node.params.items()}
    return fn(node, x, params)


#: The linear-kind operations QAT trains: dense layers and convolutions (trainable
#: weights), and average pooling (fixed weights ``1/k``).
QAT_LINEAR_OPS = ("linear", "conv", "avg_pool")

_SUPPORTED = (
    "Quantization-aware training supports chains of Linear, Conv1d/Conv2d, "
    "AvgPool/AdaptiveAvgPool, Flatten and elementwise layers (batch norm folds into the "
    "layer before it); quantize other models after training with compile_torch_model."
)


def _check_supported(node: Node) -> None:
    where = node.source or node.name
    kind = node.kind
    if kind == "linear" and node.op not in QAT_LINEAR_OPS:
        raise UnsupportedOpError(node.op, where, _SUPPORTED)
    if kind == "elementwise" and node.op not in TORCH_ELEMENTWISE:
        raise UnsupportedOpError(
            node.op, where, "Quantization-aware training has no torch version of it."
        )
    if kind not in ("linear", "elementwise", "reshape"):
        raise UnsupportedOpError(node.op, where, _SUPPORTED)


def split_chain(graph: Graph) -> tuple[tuple[Node, ...], list[tuple[Node, tuple[Node, ...]]]]:
    """Check that QAT can train ``graph`` and cut it as post-training quantization does.

    The graph must be a chain (every node reads the one before it) of supported
    operations (:data:`QAT_LINEAR_OPS`, elementwise operations with a torch version,
    reshapes); it is cut into the client-side operations before the first linear layer
    and one ``(linear node, chain after it)`` pair per linear layer, up to the output.

    Raises:
        UnsupportedOpError: an operation QAT does not train, or a branch (residual
            connection, concatenation), naming the layer.

    Examples:
        >>> nodes = (Node("x", "input"), Node("fc", "linear", ("x",), {},
        ...          {"weight": np.ones((2, 3))}), Node("r", "relu", ("fc",)))
        >>> pre, parts = split_chain(Graph(nodes, "x", "r", (3,)))
        >>> pre, [(node.name, [n.name for n in chain]) for node, chain in parts]
        ((), [('fc', ['r'])])
    """
    pre: list[Node] = []
    parts: list[tuple[Node, list[Node]]] = []
    previous = graph.input_name
    for node in graph.nodes:
        if node.op == "input":
            continue
        if node.inputs != (previous,):
            raise UnsupportedOpError(
                f"{node.op} reading {', '.join(node.inputs) or 'nothing'}",
                node.source or node.name,
                "Quantization-aware training needs a chain of layers, each reading the "
                "one before it: no residual connection, concatenation or branch; quantize "
                "such models after training with compile_torch_model.",
            )
        _check_supported(node)
        previous = node.name
        if node.kind == "linear":
            parts.append((node, []))
        elif parts:
            parts[-1][1].append(node)
        else:
            pre.append(node)
        if node.name == graph.output_name:
            break
    if not parts:
        raise UnsupportedOpError(
            "a model without a linear layer",
            "model",
            "fhe_quant compiles models with at least one Linear layer.",
        )
    return tuple(pre), [(node, tuple(chain)) for node, chain in parts]


def torch_linear(node: Node, x: Tensor, weight: Tensor) -> Tensor:
    """A linear-kind ``node``'s operation (without bias) on a torch batch, with the
    given weights: ``x @ weight.T`` or the zero-padded convolution of its geometry.

    Examples:
        >>> from fhe_quant.ir import ConvGeometry
        >>> attrs = ConvGeometry((1,), ((1, 0),), (1,)).to_attrs()
        >>> node = Node("c", "conv", ("x",), attrs, {"weight": np.ones((1, 1, 2))})
        >>> torch_linear(node, torch.tensor([[[1.0, 2.0, 3.0]]]), torch.ones(1, 1, 2)).tolist()
        [[[1.0, 3.0, 5.0]]]
    """
    if node.op == "linear":
        return x @ weight.T
    geometry = ConvGeometry.from_attrs(node.attrs)
    # NOTE: F.pad takes (begin, end) pairs from the last axis backwards; padding apart,
    # torch's convolution is the same cross-correlation as fhe_quant.ir.conv_numpy.
    pad = [p for pair in reversed(geometry.padding) for p in pair]
    if any(pad):
        x = F.pad(x, pad)
    conv = F.conv1d if geometry.ndim == 1 else F.conv2d
    return conv(x, weight, None, geometry.stride, 0, geometry.dilation, geometry.groups)


def along(vector: Tensor, axis: int, ndim: int) -> Tensor:
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return vector.reshape(shape)

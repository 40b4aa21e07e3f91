"""A small typed graph of float operations, and the one table of operations.

A :class:`Graph` is what a frontend produces from a trained model: a topologically
ordered list of :class:`Node` objects, each naming its operation, its inputs, its
constant tensors (weights, biases, slopes) and where it came from in the user's model.
Tensors carry a leading batch dimension.

The :data:`OPS` table is the only place that says what an operation is. Each entry
gives the operation's *kind*, which decides how it is quantized and lowered:

* ``"linear"``: ``y = apply(x, weight) + bias`` with ``apply`` linear in ``x``; the
  same ``apply`` runs on floats, on integers, and under Concrete's tracer, and the
  accumulator range rule is derived from it (:func:`linear_bounds`).
* ``"elementwise"``: a float function applied value by value (activations, constant
  add/mul); a chain of them is fused into one table lookup.
* ``"reshape"``: moves no value, only the shape (row-major order is kept), so it
  commutes with elementwise tables.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import numpy as np

from fhe_quant.errors import UnsupportedOpError

__all__ = ["Node", "Graph", "OpSpec", "OPS", "op_spec", "linear_bounds"]

Kind = Literal["input", "linear", "elementwise", "reshape"]


@dataclass(frozen=True, eq=False)
class Node:
    """One operation of a :class:`Graph`.

    Args:
        name: unique name in the graph.
        op: key into :data:`OPS`.
        inputs: names of the nodes this one reads.
        attrs: scalar attributes (slopes, bounds, shapes).
        params: constant tensors (``weight``, ``bias``, ``constant``).
        source: where the node comes from in the user's model, for error messages.
    """

    name: str
    op: str
    inputs: tuple[str, ...] = ()
    attrs: Mapping[str, Any] = field(default_factory=dict)
    params: Mapping[str, np.ndarray] = field(default_factory=dict)
    source: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"The 'name' of a Node must be a non-empty str. Got {self.name!r}.")
        op_spec(self.op, self.source or self.name)  # unknown ops fail here, with their place
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "attrs", MappingProxyType(dict(self.attrs)))
        frozen = {}
        for key, value in self.params.items():
            array = np.array(value, dtype=np.float64)
            if not np.all(np.isfinite(array)):
                raise ValueError(
                    f"The constant {key!r} of node {self.name!r} ({self.source}) holds NaN or "
                    "inf values; a model with non-finite weights cannot be quantized."
                )
            array.setflags(write=False)
            frozen[key] = array
        object.__setattr__(self, "params", MappingProxyType(frozen))

    @property
    def kind(self) -> Kind:
        """The kind of the node's operation (see :data:`OPS`)."""
        return OPS[self.op].kind

    def evaluate(self, *args: np.ndarray) -> np.ndarray:
        """Evaluate the node in float on its input values."""
        return OPS[self.op].evaluate(self, *args)


@dataclass(frozen=True, eq=False)
class Graph:
    """A directed acyclic graph of :class:`Node`, in topological order.

    Args:
        nodes: the nodes, each after all the nodes it reads.
        input_name: the single graph input (an ``"input"`` node).
        output_name: the node whose value is the model's output.
        input_shape: the shape of one sample (without the batch dimension).
    """

    nodes: tuple[Node, ...]
    input_name: str
    output_name: str
    input_shape: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "nodes", tuple(self.nodes))
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))
        seen: set[str] = set()
        for node in self.nodes:
            if node.name in seen:
                raise ValueError(f"Graph has two nodes named {node.name!r}.")
            for name in node.inputs:
                if name not in seen:
                    raise ValueError(
                        f"Node {node.name!r} reads {name!r}, which is not defined before it."
                    )
            seen.add(node.name)
        if self.input_name not in seen or self.output_name not in seen:
            raise ValueError(
                f"Graph input {self.input_name!r} or output {self.output_name!r} is not a node."
            )

    def node(self, name: str) -> Node:
        """The node called ``name``."""
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def users(self, name: str) -> list[Node]:
        """The nodes that read ``name``."""
        return [node for node in self.nodes if name in node.inputs]

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Evaluate every node in float on a batch ``x``; returns all values by node name."""
        values: dict[str, np.ndarray] = {}
        for node in self.nodes:
            if node.op == "input":
                values[node.name] = np.asarray(x, dtype=np.float64)
            else:
                values[node.name] = node.evaluate(*(values[name] for name in node.inputs))
        return values

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.run(x)[self.output_name]

    def replace(self, nodes: list[Node], output_name: str | None = None) -> Graph:
        """A copy of the graph with other nodes (used by graph passes)."""
        return Graph(
            tuple(nodes), self.input_name, output_name or self.output_name, self.input_shape
        )


# --------------------------------------------------------------------------- op semantics


def _linear_apply(x: Any, weight: np.ndarray) -> Any:
    # NOTE: torch layout (out, in); works on floats, on int64 arrays and on Concrete tracers.
    return x @ weight.T


def _erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[np.float64])(x)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _softplus(x: np.ndarray, beta: float, threshold: float) -> np.ndarray:
    bx = beta * x
    soft = np.log1p(np.exp(-np.abs(bx))) + np.maximum(bx, 0.0)
    return np.where(bx > threshold, x, soft / beta)


def _prelu(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    # NOTE: PReLU's slope is per channel along axis 1 (torch convention) or a single value.
    slope = weight.reshape((1, -1) + (1,) * (x.ndim - 2)) if weight.size > 1 else weight.item()
    return np.where(x >= 0, x, slope * x)


def _const(node: Node) -> np.ndarray:
    return node.params["constant"]


ElementwiseFn = Callable[[Node, np.ndarray], np.ndarray]

_ELEMENTWISE: dict[str, ElementwiseFn] = {
    "identity": lambda n, x: x,
    "relu": lambda n, x: np.maximum(x, 0.0),
    "relu6": lambda n, x: np.clip(x, 0.0, 6.0),
    "hardtanh": lambda n, x: np.clip(x, n.attrs["min_val"], n.attrs["max_val"]),
    "leaky_relu": lambda n, x: np.where(x >= 0, x, n.attrs["negative_slope"] * x),
    "prelu": lambda n, x: _prelu(x, n.params["weight"]),
    "sigmoid": lambda n, x: _sigmoid(x),
    "tanh": lambda n, x: np.tanh(x),
    "gelu": lambda n, x: (
        0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
        if n.attrs.get("approximate") == "tanh"
        else 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))
    ),
    "silu": lambda n, x: x * _sigmoid(x),
    "hardswish": lambda n, x: x * np.clip(x + 3.0, 0.0, 6.0) / 6.0,
    "hardsigmoid": lambda n, x: np.clip(x / 6.0 + 0.5, 0.0, 1.0),
    "elu": lambda n, x: np.where(x > 0, x, n.attrs["alpha"] * np.expm1(np.minimum(x, 0.0))),
    "softplus": lambda n, x: _softplus(x, n.attrs["beta"], n.attrs["threshold"]),
    "add_const": lambda n, x: x + _const(n),
    "mul_const": lambda n, x: x * _const(n),
}


@dataclass(frozen=True)
class OpSpec:
    """What an operation is: its kind and how to evaluate it.

    Attributes:
        kind: ``"input"``, ``"linear"``, ``"elementwise"`` or ``"reshape"``.
        evaluate: ``evaluate(node, *inputs)`` in float.
        linear_apply: for linear ops, ``apply(x, weight)`` without the bias; it must be
            linear in ``x`` and run on float arrays, int64 arrays and Concrete tracers.
    """

    kind: Kind
    evaluate: Callable[..., np.ndarray]
    linear_apply: Callable[[Any, np.ndarray], Any] | None = None


def _eval_linear(node: Node, x: np.ndarray) -> np.ndarray:
    spec = OPS[node.op]
    assert spec.linear_apply is not None
    out = spec.linear_apply(x, node.params["weight"])
    bias = node.params.get("bias")
    return out if bias is None else out + bias.reshape((1, -1) + (1,) * (out.ndim - 2))


def _eval_reshape(node: Node, x: np.ndarray) -> np.ndarray:
    return x.reshape((x.shape[0],) + tuple(node.attrs["shape"]))


def _elementwise(name: str) -> OpSpec:
    fn = _ELEMENTWISE[name]
    return OpSpec("elementwise", lambda node, x: np.asarray(fn(node, x), dtype=np.float64))


#: The op table: every operation fhe_quant knows, by name. Convolutions and pooling
#: slot in as further ``"linear"`` entries with their own ``linear_apply``.
OPS: Mapping[str, OpSpec] = MappingProxyType(
    {
        "input": OpSpec("input", lambda node, x: x),
        "linear": OpSpec("linear", _eval_linear, _linear_apply),
        "reshape": OpSpec("reshape", _eval_reshape),
        **{name: _elementwise(name) for name in _ELEMENTWISE},
    }
)


def op_spec(op: str, where: str) -> OpSpec:
    """The :data:`OPS` entry of ``op``; raises :class:`UnsupportedOpError` naming ``where``."""
    try:
        return OPS[op]
    except KeyError:
        raise UnsupportedOpError(op, where) from None


def linear_bounds(
    op: str, weight: np.ndarray, lower: np.ndarray, upper: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Proven bounds of ``apply(x, weight)`` for every ``x`` with ``lower <= x <= upper``.

    Splitting ``weight = W+ + W-`` into its positive and negative parts, the largest
    value of a linear form is reached with ``x = upper`` where the weight is positive and
    ``x = lower`` where it is negative (and the reverse for the smallest). The bound is
    exact (reached by some input) when the inputs vary independently. ``lower`` and
    ``upper`` are integer arrays shaped like one batch of inputs (batch size 1) and
    ``weight`` an integer array.

    Examples:
        >>> linear_bounds("linear", np.array([[1, -2]]), np.array([[0, 0]]), np.array([[3, 3]]))
        (array([[-6]]), array([[3]]))
    """
    apply = op_spec(op, op).linear_apply
    if apply is None:
        raise ValueError(f"Operation {op!r} is not linear.")
    weight = np.asarray(weight, dtype=np.int64)
    w_pos, w_neg = np.maximum(weight, 0), np.minimum(weight, 0)
    lower = np.asarray(lower, dtype=np.int64)
    upper = np.asarray(upper, dtype=np.int64)
    hi = apply(upper, w_pos) + apply(lower, w_neg)
    lo = apply(lower, w_pos) + apply(upper, w_neg)
    return lo, hi

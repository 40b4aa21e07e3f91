"""A small typed graph of float operations, and the one table of operations.

A :class:`Graph` is what a frontend produces from a trained model: a topologically
ordered list of :class:`Node` objects, each naming its operation, its inputs, its
constant tensors (weights, biases, slopes) and where it came from in the user's model.
Tensors carry a leading batch dimension.

The :data:`OPS` table is the only place that says what an operation is. Each entry
gives the operation's *kind*, which decides how it is quantized and lowered:

* ``"linear"``: ``y = apply(x, weight) + bias`` with ``apply`` linear in ``x``; the
  same ``apply`` runs on floats, on integers, and under Concrete's tracer, and the
  accumulator range rule is derived from it (:func:`linear_bounds`). Dense layers
  (``"linear"``), convolutions (``"conv"``) and average pooling (``"avg_pool"``, a
  depthwise convolution whose weights are all ``1/k``) are linear ops. Where NumPy and
  Concrete's tracer need different code (convolution), ``apply`` asks the
  :class:`ArrayBackend` it is given.
* ``"elementwise"``: a float function applied value by value (activations, constant
  add/mul); a chain of them is fused into one table lookup.
* ``"reshape"``: moves no value, only the shape (row-major order is kept), so it
  commutes with elementwise tables.
* ``"add"``: ``sum_k c_k x_k`` of several tensors of one shape (residual connections),
  with coefficients ``c_k`` of +1 or -1 (``attrs["coefficients"]``).
* ``"concat"``: concatenation along ``attrs["axis"]`` (batch axis 0 excluded).
* ``"max_pool"``: maximum over windows (``attrs``: ``kernel`` and a
  :class:`ConvGeometry` without dilation); padded positions are never picked (torch
  pads with ``-inf``, and a window always holds at least one real value; torch's
  ``ceil_mode=True`` is more padding at the end).
* ``"gather"``: moves values without computing any: output element ``j`` (flat, one
  sample) is input element ``params["index"][j]`` (transpose, permute, channel shuffle,
  nearest upsampling); ``attrs["shape"]`` is the output shape of one sample.
* ``"mul"``: the elementwise product of two tensors (NumPy broadcasting; the
  squeeze-and-excitation gate ``x * sigmoid(fc(pool(x)))``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from types import MappingProxyType
from typing import Any, Literal, Protocol

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from fhe_quant.errors import UnsupportedOpError

__all__ = [
    "Node",
    "Graph",
    "OpSpec",
    "OPS",
    "ELEMENTWISE",
    "ElementwiseOp",
    "MonotoneRule",
    "op_spec",
    "linear_bounds",
    "ConvGeometry",
    "ArrayBackend",
    "NUMPY_ARRAYS",
    "conv_numpy",
    "weight_input_channels",
    "describe_mismatch",
    "max_pool_numpy",
    "max_pool_geometry",
    "chain_source",
    "gather_index",
    "plain_data",
    "attrs_from_data",
]

Kind = Literal[
    "input", "linear", "elementwise", "reshape", "add", "concat", "max_pool", "gather", "mul"
]


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
        spec = op_spec(self.op, self.source or self.name)  # unknown ops fail here, with their place
        object.__setattr__(self, "inputs", tuple(self.inputs))
        # NOTE: plain dicts (copies), so that a node is plain data: it pickles and
        # deep-copies; the constants themselves are read-only arrays.
        object.__setattr__(self, "attrs", dict(self.attrs))
        if spec.check_attrs is not None:
            try:
                spec.check_attrs(self.attrs)
            except ValueError as exc:
                raise ValueError(
                    f"Node {self.name!r} ({self.source or self.op}) has bad attributes: {exc}"
                ) from None
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
        object.__setattr__(self, "params", frozen)

    @property
    def kind(self) -> Kind:
        """The kind of the node's operation (see :data:`OPS`)."""
        return OPS[self.op].kind

    def evaluate(self, *args: np.ndarray) -> np.ndarray:
        """Evaluate the node in float on its input values."""
        return OPS[self.op].evaluate(self, *args)

    def to_dict(self) -> dict[str, Any]:
        """The node as data: JSON values (tuples as lists) and its constants as NumPy
        arrays (a deployment artifact stores those in its ``.npz``).

        Examples:
            >>> Node("r", "leaky_relu", ("x",), {"negative_slope": 0.1}).to_dict()["attrs"]
            {'negative_slope': 0.1}
        """
        return plain_data(asdict(self))

    @classmethod
    def from_dict(cls, data: Any) -> Node:
        """Rebuild a node from :meth:`to_dict` output, checking every field's type.

        Raises:
            ValueError: unknown or missing keys, a value of the wrong type, or a node the
                constructor refuses (bad attributes, non-finite constants).
            UnsupportedOpError: an unknown ``op``.
        """
        data = _fields_of(cls, data)
        params = _mapping(data["params"], "params")
        for key, value in params.items():
            if not isinstance(value, np.ndarray) or value.dtype.kind not in "biuf":
                raise ValueError(f"The constant {key!r} of a Node must be a numeric array.")
        return cls(
            _text(data["name"], "name"),
            _text(data["op"], "op"),
            tuple(_text(name, "inputs") for name in _sequence(data["inputs"], "inputs")),
            attrs_from_data(data["attrs"]),
            params,
            _text(data["source"], "source"),
        )


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

    def to_dict(self) -> dict[str, Any]:
        """The graph as data (see :meth:`Node.to_dict`); :meth:`from_dict` inverts it.

        Examples:
            >>> g = Graph((Node("x", "input"), Node("r", "relu", ("x",))), "x", "r", (2,))
            >>> Graph.from_dict(g.to_dict())(np.array([[-1.0, 2.0]]))
            array([[0., 2.]])
        """
        return plain_data(asdict(self))

    @classmethod
    def from_dict(cls, data: Any) -> Graph:
        """Rebuild a graph from :meth:`to_dict` output, checking every field.

        Raises:
            ValueError: unknown or missing keys, values of the wrong type, or a graph the
                constructor refuses (names read before they are defined, duplicates).
            UnsupportedOpError: a node with an unknown ``op``.
        """
        data = _fields_of(cls, data)
        shape = _sequence(data["input_shape"], "input_shape")
        if not all(_is_int(d) and d > 0 for d in shape):
            raise ValueError(f"The 'input_shape' of a Graph must hold positive ints. Got {shape}.")
        return cls(
            tuple(Node.from_dict(node) for node in _sequence(data["nodes"], "nodes")),
            _text(data["input_name"], "input_name"),
            _text(data["output_name"], "output_name"),
            tuple(shape),
        )


# --------------------------------------------------------------------------- as data


def plain_data(value: Any) -> Any:
    """``value`` (the ``asdict`` of a node, a graph, a step) with tuples as lists and
    NumPy scalars as Python numbers; arrays stay arrays.

    Examples:
        >>> plain_data({"shape": (2, np.int64(3))})
        {'shape': [2, 3]}
    """
    if isinstance(value, dict):
        return {key: plain_data(item) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return [plain_data(item) for item in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def attrs_from_data(data: Any) -> dict[str, Any]:
    """Node attributes (:attr:`Node.attrs`) from their data form: a dict of numbers,
    strings, booleans, ``None`` and lists of them (lists become tuples).

    Raises:
        ValueError: not a dict with str keys, or a value of another type.

    Examples:
        >>> attrs_from_data({"stride": [1, 2], "groups": 1})
        {'stride': (1, 2), 'groups': 1}
    """
    return {key: _attr(value, key) for key, value in _mapping(data, "attrs").items()}


def _fields_of(cls: type, data: Any) -> dict[str, Any]:
    """``data`` checked to be a dict with exactly the fields of the dataclass ``cls``."""
    if not isinstance(data, dict):
        raise ValueError(f"A {cls.__name__} must be a dict. Got {type(data).__name__}.")
    names = [f.name for f in fields(cls)]
    unknown = sorted(str(key) for key in data if key not in names)
    missing = [name for name in names if name not in data]
    if unknown or missing:
        raise ValueError(
            f"A {cls.__name__} has the keys {names}; got unknown keys {unknown} and "
            f"missing keys {missing}."
        )
    return data


def _text(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{key!r} must be a str. Got {type(value).__name__}.")
    return value


def _sequence(value: Any, key: str) -> list[Any]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{key!r} must be a list. Got {type(value).__name__}.")
    return list(value)


def _mapping(value: Any, key: str) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"{key!r} must be a dict with str keys. Got {type(value).__name__}.")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _attr(value: Any, key: str) -> Any:
    """A node attribute from its JSON form: lists become tuples, scalars stay."""
    if isinstance(value, (list, tuple)):
        return tuple(_attr(item, key) for item in value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(
        f"The attribute {key!r} of a Node must hold numbers, strings, booleans or lists of "
        f"them. Got {type(value).__name__}."
    )


def chain_source(graph: Graph, name: str, stop: str) -> tuple[str, tuple[Node, ...]]:
    """Walk back from ``name`` over elementwise/reshape nodes to the node that produces
    their input (or ``stop``); returns its name and the nodes walked, in graph order.

    Examples:
        >>> g = Graph((Node("x", "input"), Node("r", "relu", ("x",)),
        ...            Node("t", "tanh", ("r",))), "x", "t", (2,))
        >>> source, chain = chain_source(g, "t", "x")
        >>> source, [node.name for node in chain]
        ('x', ['r', 't'])
    """
    chain: list[Node] = []
    node = graph.node(name)
    while node.name != stop and node.kind in ("elementwise", "reshape"):
        chain.insert(0, node)
        node = graph.node(node.inputs[0])
    return node.name, tuple(chain)


# --------------------------------------------------------------------------- op semantics


def _int_tuple(value: Any, name: str, minimum: int) -> tuple[int, ...]:
    items = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    for item in items:
        if (
            isinstance(item, bool | np.bool_)
            or not isinstance(item, numbers.Integral)
            or int(item) < minimum
        ):
            raise ValueError(
                f"The {name!r} of a ConvGeometry must hold ints >= {minimum}. Got {value!r}."
            )
    return tuple(int(item) for item in items)


@dataclass(frozen=True)
class ConvGeometry:
    """Where a convolution's kernel reads its input (attributes of ``"conv"`` and
    ``"avg_pool"`` nodes, stored in :attr:`Node.attrs` as :meth:`to_attrs`).

    Attributes:
        stride: step of the kernel along each spatial axis (>= 1).
        padding: ``(begin, end)`` zeros added along each spatial axis (>= 0); they may
            differ (torch's ``padding="same"`` with an even kernel pads one more at the end).
        dilation: spacing of the kernel taps along each spatial axis (>= 1).
        groups: channels split into independent groups (``groups = channels``: depthwise).

    Examples:
        >>> g = ConvGeometry(stride=(2, 2), padding=((1, 1), (0, 1)), dilation=(1, 1))
        >>> g.output_shape((5, 5), (3, 3))
        (3, 2)
    """

    stride: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    dilation: tuple[int, ...]
    groups: int = 1

    def __post_init__(self) -> None:
        stride = _int_tuple(self.stride, "stride", 1)
        dilation = _int_tuple(self.dilation, "dilation", 1)
        if not isinstance(self.padding, (tuple, list)):
            raise ValueError(
                f"The 'padding' of a ConvGeometry must be one (begin, end) pair per spatial "
                f"axis. Got {self.padding!r}."
            )
        padding = tuple(_int_tuple(pair, "padding", 0) for pair in self.padding)
        if any(len(pair) != 2 for pair in padding):
            raise ValueError(
                f"The 'padding' of a ConvGeometry must be one (begin, end) pair per spatial "
                f"axis. Got {self.padding!r}."
            )
        if not len(stride) == len(dilation) == len(padding) or len(stride) not in (1, 2):
            raise ValueError(
                "A ConvGeometry needs one stride, padding pair and dilation per spatial axis, "
                f"for 1 or 2 axes. Got stride={self.stride!r}, padding={self.padding!r}, "
                f"dilation={self.dilation!r}."
            )
        (groups,) = _int_tuple(self.groups, "groups", 1)
        object.__setattr__(self, "stride", stride)
        object.__setattr__(self, "dilation", dilation)
        object.__setattr__(self, "padding", padding)
        object.__setattr__(self, "groups", groups)

    @property
    def ndim(self) -> int:
        """Number of spatial axes (1 or 2)."""
        return len(self.stride)

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> ConvGeometry:
        """Read (and validate) the geometry from a node's attributes."""
        missing = [key for key in ("stride", "padding", "dilation", "groups") if key not in attrs]
        if missing:
            raise ValueError(f"A convolution needs the attributes {missing}. Got {dict(attrs)}.")
        return cls(attrs["stride"], attrs["padding"], attrs["dilation"], attrs["groups"])

    def to_attrs(self) -> dict[str, Any]:
        """The geometry as node attributes."""
        return asdict(self)

    def output_shape(self, spatial: tuple[int, ...], kernel: tuple[int, ...]) -> tuple[int, ...]:
        """Output spatial shape for an input of spatial shape ``spatial``."""
        return tuple(
            (n + begin + end - d * (k - 1) - 1) // s + 1
            for n, k, (begin, end), s, d in zip(
                spatial, kernel, self.padding, self.stride, self.dilation, strict=True
            )
        )


class ArrayBackend(Protocol):
    """The array operations whose code differs between NumPy and Concrete's tracer."""

    def conv(self, x: Any, weight: np.ndarray, geometry: ConvGeometry) -> Any: ...


def conv_numpy(x: np.ndarray, weight: np.ndarray, geometry: ConvGeometry) -> np.ndarray:
    """Convolution (cross-correlation, as torch) of ``x (N, C, *spatial)`` with
    ``weight (F, C / groups, *kernel)``, zero padded, in NumPy.

    Every output is a sum of products of input values and weights, computed in the
    inputs' dtype: exact on int64 arrays (no float rounding, no overflow below 2**63),
    float64 on float arrays.

    Examples:
        >>> x = np.arange(5).reshape(1, 1, 5)
        >>> conv_numpy(x, np.array([[[1, 0, -1]]]), ConvGeometry((1,), ((1, 1),), (1,)))
        array([[[-1, -2, -2, -2,  3]]])
    """
    x = np.asarray(x)
    weight = np.asarray(weight)
    nd = geometry.ndim
    if x.ndim != nd + 2 or weight.ndim != nd + 2:
        raise ValueError(
            f"A {nd}-d convolution needs inputs (N, C, ...) and weights (F, C/groups, ...) "
            f"with {nd + 2} axes. Got {x.shape} and {weight.shape}."
        )
    n, c = x.shape[:2]
    f, g = weight.shape[0], geometry.groups
    kernel = weight.shape[2:]
    if c % g or f % g or weight.shape[1] != c // g:
        raise ValueError(
            f"A convolution with groups={g} over {c} input channels needs weights of shape "
            f"(F, {c // g if c % g == 0 else '?'}, ...) with F a multiple of {g}. "
            f"Got {weight.shape}."
        )
    padded = np.pad(x, ((0, 0), (0, 0)) + geometry.padding)
    span = tuple(d * (k - 1) + 1 for k, d in zip(kernel, geometry.dilation, strict=True))
    windows = sliding_window_view(padded, span, axis=tuple(range(2, 2 + nd)))
    # windows: (N, C, *positions, *span); keep every stride-th position, dilation-th tap
    windows = windows[
        (slice(None), slice(None))
        + tuple(slice(None, None, s) for s in geometry.stride)
        + tuple(slice(None, None, d) for d in geometry.dilation)
    ]
    windows = windows.reshape((n, g, c // g) + windows.shape[2:])
    grouped = weight.reshape((g, f // g, c // g) + kernel)
    out_axes, tap_axes = "xy"[:nd], "ij"[:nd]
    out = np.einsum(
        f"ngc{out_axes}{tap_axes},gfc{tap_axes}->ngf{out_axes}", windows, grouped, optimize=True
    )
    return out.reshape((n, f) + out.shape[3:])


class _NumpyArrays:
    def conv(self, x: Any, weight: np.ndarray, geometry: ConvGeometry) -> Any:
        return conv_numpy(x, weight, geometry)


#: NumPy's array operations (floats and exact int64).
NUMPY_ARRAYS: ArrayBackend = _NumpyArrays()

LinearApply = Callable[..., Any]


def _linear_apply(
    x: Any,
    weight: np.ndarray,
    attrs: Mapping[str, Any] | None = None,
    backend: ArrayBackend | None = None,
) -> Any:
    # NOTE: torch layout (out, in); works on floats, on int64 arrays and on Concrete tracers.
    return x @ weight.T


def _conv_apply(
    x: Any,
    weight: np.ndarray,
    attrs: Mapping[str, Any] | None = None,
    backend: ArrayBackend | None = None,
) -> Any:
    # NOTE: zero padding in every domain (floats, codes, tracer): the map stays linear,
    # and the lowering subtracts apply(z, W), padded the same way, to dequantize.
    geometry = ConvGeometry.from_attrs(attrs or {})
    return (backend or NUMPY_ARRAYS).conv(x, weight, geometry)


def weight_input_channels(node: Node) -> np.ndarray:
    """For a linear-kind node, the input channel each weight column reads.

    Weights are laid out ``(out, in / groups, ...)``; output channel ``o`` of group
    ``o // (out / groups)`` reads input channels ``group * in / groups + j``. Returns an
    int array of shape ``weight.shape[:2]``.

    Examples:
        >>> node = Node("p", "avg_pool", ("x",), ConvGeometry((1,), ((0, 0),), (1,), 3)
        ...             .to_attrs(), {"weight": np.ones((3, 1, 2))})
        >>> weight_input_channels(node).ravel().tolist()
        [0, 1, 2]
    """
    weight = node.params["weight"]
    out, per_group = weight.shape[:2]
    groups = int(node.attrs.get("groups", 1))
    group = np.arange(out) // (out // groups)
    return group[:, None] * per_group + np.arange(per_group)[None, :]


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


def _mish(x: np.ndarray) -> np.ndarray:
    return x * np.tanh(_softplus(x, 1.0, np.inf))


def _per_channel_constant(node: Node, ndim: int) -> np.ndarray | None:
    """The node's constant, if it is the same at every spatial position of an input with
    ``ndim`` axes (batch included); ``None`` if it varies along a spatial axis."""
    constant = node.params["constant"]
    shape = (1,) * (ndim - constant.ndim) + constant.shape
    if constant.ndim > ndim or any(d != 1 for d in shape[2:]):
        return None
    return constant


ElementwiseFn = Callable[[Node, np.ndarray], np.ndarray]
#: Whether a node is non-decreasing and the same at every spatial position, given the
#: number of axes of its input (batch included).
MonotoneRule = Callable[[Node, int], bool]

_F = "torch.nn.functional."


@dataclass(frozen=True)
class ElementwiseOp:
    """Every fact about one elementwise operation: its row of :data:`ELEMENTWISE`.

    The torch frontend, quantization-aware training, the float passes and the estimators
    read these rows; nothing else lists elementwise operations. The integer lowering is
    the same for all of them: the float function is fused into the table that follows
    the accumulator (see :mod:`fhe_quant.lower`).

    Attributes:
        fn: the float function ``fn(node, x)`` on float64 NumPy arrays.
        monotone: non-decreasing and the same at every spatial position (so that it
            commutes with a max pool): a bool, or a :data:`MonotoneRule` when it depends
            on the node's attributes or constants.
        attrs: the scalar attributes, ``(name, default)`` in the order of the torch
            function's arguments after ``x``; a torch module's attributes of the same
            names give them, and a functional call's arguments (or these defaults).
        params: the constant tensors (``"weight"``, ``"constant"``), passed after ``x``
            to the torch function; a torch module's attributes of the same names.
        torch_modules: names of the ``torch.nn`` classes that compute the operation.
        torch_functions: dotted names of the torch functions that compute it.
        torch_methods: names of the tensor methods that compute it.
        torch_function: the dotted name of the torch function that quantization-aware
            training computes it with, as ``f(x, *params, **attrs)`` (``None``: the
            identity); empty to let it be ``torch_functions[0]``.
        estimator: offered as the hidden activation of the ``NeuralNet*`` estimators.

    Examples:
        >>> ELEMENTWISE["relu"].torch_modules, ELEMENTWISE["relu"].monotone
        (('ReLU',), True)
        >>> ELEMENTWISE["leaky_relu"].attrs
        (('negative_slope', 0.01),)
    """

    fn: ElementwiseFn
    monotone: bool | MonotoneRule = False
    attrs: tuple[tuple[str, Any], ...] = ()
    params: tuple[str, ...] = ()
    torch_modules: tuple[str, ...] = ()
    torch_functions: tuple[str, ...] = ()
    torch_methods: tuple[str, ...] = ()
    torch_function: str | None = ""
    estimator: bool = False

    def __post_init__(self) -> None:
        if self.torch_function == "":
            first = self.torch_functions[0] if self.torch_functions else None
            object.__setattr__(self, "torch_function", first)

    def is_monotone(self, node: Node, ndim: int) -> bool:
        """Whether ``node`` (of this operation, on an input with ``ndim`` axes) is
        non-decreasing and the same at every spatial position."""
        if callable(self.monotone):
            return self.monotone(node, ndim)
        return bool(self.monotone)


def _add_const_monotone(node: Node, ndim: int) -> bool:
    return _per_channel_constant(node, ndim) is not None


def _mul_const_monotone(node: Node, ndim: int) -> bool:
    constant = _per_channel_constant(node, ndim)
    return constant is not None and bool(np.all(constant > 0))


#: The elementwise operations, one row each (see :class:`ElementwiseOp`), by op name.
ELEMENTWISE: Mapping[str, ElementwiseOp] = {
    "identity": ElementwiseOp(
        lambda n, x: x,
        monotone=True,
        torch_modules=("Identity", "Dropout", "Dropout1d", "Dropout2d"),
        torch_functions=(_F + "dropout",),
        torch_methods=("contiguous", "clone", "detach"),
        torch_function=None,
    ),
    "relu": ElementwiseOp(
        lambda n, x: np.maximum(x, 0.0),
        monotone=True,
        torch_modules=("ReLU",),
        torch_functions=(_F + "relu", "torch.relu"),
        torch_methods=("relu",),
        estimator=True,
    ),
    "relu6": ElementwiseOp(
        lambda n, x: np.clip(x, 0.0, 6.0),
        monotone=True,
        torch_modules=("ReLU6",),
        torch_functions=(_F + "relu6",),
        estimator=True,
    ),
    "hardtanh": ElementwiseOp(
        lambda n, x: np.clip(x, n.attrs["min_val"], n.attrs["max_val"]),
        monotone=True,
        attrs=(("min_val", -1.0), ("max_val", 1.0)),
        torch_modules=("Hardtanh",),
        torch_functions=(_F + "hardtanh",),
    ),
    "leaky_relu": ElementwiseOp(
        lambda n, x: np.where(x >= 0, x, n.attrs["negative_slope"] * x),
        monotone=lambda n, ndim: n.attrs["negative_slope"] >= 0,
        attrs=(("negative_slope", 0.01),),
        torch_modules=("LeakyReLU",),
        torch_functions=(_F + "leaky_relu",),
        estimator=True,
    ),
    "prelu": ElementwiseOp(
        lambda n, x: _prelu(x, n.params["weight"]),
        monotone=lambda n, ndim: bool(np.all(n.params["weight"] >= 0)),  # per channel
        params=("weight",),
        torch_modules=("PReLU",),
        torch_function=_F + "prelu",
    ),
    "sigmoid": ElementwiseOp(
        lambda n, x: _sigmoid(x),
        monotone=True,
        torch_modules=("Sigmoid",),
        torch_functions=("torch.sigmoid", _F + "sigmoid"),
        torch_methods=("sigmoid",),
        estimator=True,
    ),
    "tanh": ElementwiseOp(
        lambda n, x: np.tanh(x),
        monotone=True,
        torch_modules=("Tanh",),
        torch_functions=("torch.tanh", _F + "tanh"),
        torch_methods=("tanh",),
        estimator=True,
    ),
    "gelu": ElementwiseOp(
        lambda n, x: (
            0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
            if n.attrs.get("approximate") == "tanh"
            else 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))
        ),
        attrs=(("approximate", "none"),),
        torch_modules=("GELU",),
        torch_functions=(_F + "gelu",),
        estimator=True,
    ),
    "silu": ElementwiseOp(
        lambda n, x: x * _sigmoid(x),
        torch_modules=("SiLU",),
        torch_functions=(_F + "silu",),
        estimator=True,
    ),
    "hardswish": ElementwiseOp(
        lambda n, x: x * np.clip(x + 3.0, 0.0, 6.0) / 6.0,
        torch_modules=("Hardswish",),
        torch_functions=(_F + "hardswish",),
        estimator=True,
    ),
    "hardsigmoid": ElementwiseOp(
        lambda n, x: np.clip(x / 6.0 + 0.5, 0.0, 1.0),
        monotone=True,
        torch_modules=("Hardsigmoid",),
        torch_functions=(_F + "hardsigmoid",),
    ),
    "elu": ElementwiseOp(
        lambda n, x: np.where(x > 0, x, n.attrs["alpha"] * np.expm1(np.minimum(x, 0.0))),
        monotone=lambda n, ndim: n.attrs["alpha"] >= 0,
        attrs=(("alpha", 1.0),),
        torch_modules=("ELU",),
        torch_functions=(_F + "elu",),
        estimator=True,
    ),
    "softplus": ElementwiseOp(
        lambda n, x: _softplus(x, n.attrs["beta"], n.attrs["threshold"]),
        monotone=True,
        attrs=(("beta", 1.0), ("threshold", 20.0)),
        torch_modules=("Softplus",),
        torch_functions=(_F + "softplus",),
    ),
    "mish": ElementwiseOp(
        lambda n, x: _mish(x),
        torch_modules=("Mish",),
        torch_functions=(_F + "mish",),
        estimator=True,
    ),
    "softsign": ElementwiseOp(
        lambda n, x: x / (1.0 + np.abs(x)),
        monotone=True,
        torch_modules=("Softsign",),
        torch_functions=(_F + "softsign",),
        estimator=True,
    ),
    "add_const": ElementwiseOp(
        lambda n, x: x + _const(n),
        monotone=_add_const_monotone,
        params=("constant",),
        torch_function="torch.add",
    ),
    "mul_const": ElementwiseOp(
        lambda n, x: x * _const(n),
        monotone=_mul_const_monotone,
        params=("constant",),
        torch_function="torch.mul",
    ),
}


@dataclass(frozen=True)
class OpSpec:
    """What an operation is: its kind and how to evaluate it.

    Attributes:
        kind: ``"input"``, ``"linear"``, ``"elementwise"``, ``"reshape"``, ``"add"``,
            ``"concat"``, ``"max_pool"``, ``"gather"`` or ``"mul"``.
        evaluate: ``evaluate(node, *inputs)`` in float.
        linear_apply: for linear ops, ``apply(x, weight, attrs, backend)`` without the
            bias; it must be linear in ``x`` and run on float arrays, int64 arrays and
            Concrete tracers (``backend``, an :class:`ArrayBackend`, supplies the
            operations whose code differs; ``None`` means NumPy).
        channel_axis: for linear ops, the axis of the input features that the layer
            mixes with its weights' axis 1 and of its output channels (weights' axis 0):
            ``-1`` for dense layers, ``1`` for convolutions. Per-feature input scales
            and per-channel constants live on it.
        unit_weights: for linear ops, the float weights are one positive constant per
            output channel (average pooling: ``1/k``); they are quantized exactly to 1
            and the constant goes into the scale, whatever the quantization config.
        check_attrs: validates a node's attributes (raises ``ValueError``).
    """

    kind: Kind
    evaluate: Callable[..., np.ndarray]
    linear_apply: LinearApply | None = None
    channel_axis: int = -1
    unit_weights: bool = False
    check_attrs: Callable[[Mapping[str, Any]], Any] | None = None


def _eval_linear(node: Node, x: np.ndarray) -> np.ndarray:
    spec = OPS[node.op]
    assert spec.linear_apply is not None
    out = spec.linear_apply(x, node.params["weight"], node.attrs, NUMPY_ARRAYS)
    bias = node.params.get("bias")
    if bias is None:
        return out
    shape = [1] * out.ndim
    shape[spec.channel_axis % out.ndim] = -1
    return out + bias.reshape(shape)


def _eval_reshape(node: Node, x: np.ndarray) -> np.ndarray:
    return x.reshape((x.shape[0],) + tuple(node.attrs["shape"]))


def _check_add(attrs: Mapping[str, Any]) -> None:
    coefficients = attrs.get("coefficients")
    if not isinstance(coefficients, (tuple, list)) or len(coefficients) < 2:
        raise ValueError(f"an add needs two or more 'coefficients'. Got {coefficients!r}.")
    if any(c not in (1, -1) for c in coefficients):
        raise ValueError(f"add coefficients must be +1 or -1. Got {coefficients!r}.")


def _eval_add(node: Node, *xs: np.ndarray) -> np.ndarray:
    coefficients = node.attrs["coefficients"]
    if len(xs) != len(coefficients):
        raise ValueError(f"Node {node.name!r} adds {len(coefficients)} tensors, got {len(xs)}.")
    return sum((float(c) * x for c, x in zip(coefficients, xs, strict=True)), np.float64(0.0))


def _check_concat(attrs: Mapping[str, Any]) -> None:
    axis = attrs.get("axis")
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral) or axis < 1:
        raise ValueError(f"a concat needs an int 'axis' >= 1 (0 is the batch). Got {axis!r}.")


def _eval_concat(node: Node, *xs: np.ndarray) -> np.ndarray:
    return np.concatenate(xs, axis=int(node.attrs["axis"]))


def max_pool_geometry(attrs: Mapping[str, Any]) -> tuple[tuple[int, ...], ConvGeometry]:
    """The kernel and geometry of a ``"max_pool"`` node (validated: no dilation, and
    each side's padding at most half the kernel, so every window holds a real value)."""
    geometry = ConvGeometry.from_attrs(attrs)
    kernel = _int_tuple(attrs.get("kernel"), "kernel", 1)
    if len(kernel) != geometry.ndim or geometry.groups != 1:
        raise ValueError(f"a max pool needs one kernel size per axis. Got {attrs.get('kernel')}.")
    if any(d != 1 for d in geometry.dilation):
        raise ValueError(f"max pooling with dilation {geometry.dilation} is not supported.")
    for k, (begin, end) in zip(kernel, geometry.padding, strict=True):
        # NOTE: torch pads at most half the kernel on each side; ceil_mode adds up to
        # k - 1 at the end. Either way no window lies in the padding alone.
        if 2 * begin > k or end >= k:
            raise ValueError(
                f"max pool padding {geometry.padding} leaves windows without a real value "
                f"(kernel {kernel}: at most half the kernel before, less than it after)."
            )
    return kernel, geometry


def max_pool_numpy(x: np.ndarray, kernel: tuple[int, ...], geometry: ConvGeometry) -> np.ndarray:
    """Max pooling of ``x (N, C, *spatial)`` in NumPy, padding with ``-inf`` (floats).

    Examples:
        >>> g = ConvGeometry((2,), ((1, 1),), (1,))
        >>> max_pool_numpy(np.array([[[1.0, 5.0, 2.0, 3.0]]]), (2,), g).tolist()
        [[[1.0, 5.0, 3.0]]]
    """
    nd = geometry.ndim
    padded = np.pad(
        np.asarray(x, dtype=np.float64),
        ((0, 0), (0, 0)) + geometry.padding,
        constant_values=-np.inf,
    )
    windows = sliding_window_view(padded, kernel, axis=tuple(range(2, 2 + nd)))
    windows = windows[
        (slice(None), slice(None)) + tuple(slice(None, None, s) for s in geometry.stride)
    ]
    return windows.max(axis=tuple(range(-nd, 0)))


def _eval_max_pool(node: Node, x: np.ndarray) -> np.ndarray:
    kernel, geometry = max_pool_geometry(node.attrs)
    return max_pool_numpy(x, kernel, geometry)


def gather_index(in_shape: tuple[int, ...], move: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """The flat index of a ``"gather"`` node that does what ``move`` does to one sample
    of shape ``in_shape`` (``move`` takes and returns an array with a batch axis).

    Examples:
        >>> gather_index((2, 3), lambda a: a.transpose(0, 2, 1)).tolist()
        [0, 3, 1, 4, 2, 5]
    """
    positions = np.arange(int(np.prod(in_shape)), dtype=np.int64).reshape((1,) + in_shape)
    return np.asarray(move(positions)).reshape(-1)


def _check_gather(attrs: Mapping[str, Any]) -> None:
    shape = attrs.get("shape")
    if not isinstance(shape, (tuple, list)) or not shape:
        raise ValueError(f"a gather needs its output 'shape' (one sample). Got {shape!r}.")
    _int_tuple(shape, "shape", 1)


def _eval_gather(node: Node, x: np.ndarray) -> np.ndarray:
    index = node.params["index"].astype(np.int64)
    flat = x.reshape(x.shape[0], -1)
    if index.size != int(np.prod(node.attrs["shape"])) or index.max() >= flat.shape[1]:
        raise ValueError(
            f"Node {node.name!r} gathers {index.size} values up to index {index.max()} "
            f"into shape {tuple(node.attrs['shape'])} from {flat.shape[1]} values."
        )
    return flat[:, index].reshape((x.shape[0],) + tuple(node.attrs["shape"]))


def _eval_mul(node: Node, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return x * y


def _elementwise(name: str) -> OpSpec:
    fn = ELEMENTWISE[name].fn
    return OpSpec("elementwise", lambda node, x: np.asarray(fn(node, x), dtype=np.float64))


#: The op table: every operation fhe_quant knows, by name.
OPS: Mapping[str, OpSpec] = MappingProxyType(
    {
        "input": OpSpec("input", lambda node, x: x),
        "linear": OpSpec("linear", _eval_linear, _linear_apply),
        "conv": OpSpec(
            "linear", _eval_linear, _conv_apply, channel_axis=1, check_attrs=ConvGeometry.from_attrs
        ),
        "avg_pool": OpSpec(
            "linear",
            _eval_linear,
            _conv_apply,
            channel_axis=1,
            unit_weights=True,
            check_attrs=ConvGeometry.from_attrs,
        ),
        "reshape": OpSpec("reshape", _eval_reshape),
        "add": OpSpec("add", _eval_add, check_attrs=_check_add),
        "concat": OpSpec("concat", _eval_concat, check_attrs=_check_concat),
        "max_pool": OpSpec("max_pool", _eval_max_pool, check_attrs=max_pool_geometry),
        "gather": OpSpec("gather", _eval_gather, check_attrs=_check_gather),
        "mul": OpSpec("mul", _eval_mul),
        **{name: _elementwise(name) for name in ELEMENTWISE},
    }
)


def op_spec(op: str, where: str) -> OpSpec:
    """The :data:`OPS` entry of ``op``; raises :class:`UnsupportedOpError` naming ``where``."""
    try:
        return OPS[op]
    except KeyError:
        raise UnsupportedOpError(op, where) from None


def describe_mismatch(
    got: np.ndarray, expected: np.ndarray, rtol: float, atol: float
) -> str | None:
    """How ``got`` differs from ``expected`` (shape or largest difference), or ``None``
    when they agree within the tolerances; frontends use it to check a translation.

    Examples:
        >>> describe_mismatch(np.zeros(2), np.ones(2), 1e-6, 1e-8)
        'max abs difference 1'
    """
    if got.shape != expected.shape:
        return f"shape {got.shape} instead of {expected.shape}"
    if not np.allclose(got, expected, rtol=rtol, atol=atol):
        return f"max abs difference {np.max(np.abs(got - expected)):.3g}"
    return None


def linear_bounds(
    op: str,
    weight: np.ndarray,
    lower: np.ndarray,
    upper: np.ndarray,
    attrs: Mapping[str, Any] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Proven bounds of ``apply(x, weight)`` for every ``x`` with ``lower <= x <= upper``.

    Splitting ``weight = W+ + W-`` into its positive and negative parts, the largest
    value of a linear form is reached with ``x = upper`` where the weight is positive and
    ``x = lower`` where it is negative (and the reverse for the smallest). The bound is
    exact (reached by some input) when the inputs vary independently. ``lower`` and
    ``upper`` are integer arrays shaped like one batch of inputs (batch size 1) and
    ``weight`` an integer array; ``attrs`` are the node's attributes (a convolution's
    geometry). A convolution's zero padding is a constant 0 in ``apply``, so the bounds
    hold at the borders too.

    Examples:
        >>> linear_bounds("linear", np.array([[1, -2]]), np.array([[0, 0]]), np.array([[3, 3]]))
        (array([[-6]]), array([[3]]))
        >>> geometry = ConvGeometry((1,), ((1, 0),), (1,)).to_attrs()
        >>> linear_bounds("conv", np.array([[[2, -1]]]), np.zeros((1, 1, 2), int),
        ...               np.full((1, 1, 2), 3), geometry)
        (array([[[-3, -3]]]), array([[[0, 6]]]))
    """
    apply = op_spec(op, op).linear_apply
    if apply is None:
        raise ValueError(f"Operation {op!r} is not linear.")
    weight = np.asarray(weight, dtype=np.int64)
    w_pos, w_neg = np.maximum(weight, 0), np.minimum(weight, 0)
    lower = np.asarray(lower, dtype=np.int64)
    upper = np.asarray(upper, dtype=np.int64)
    attrs = attrs or {}
    hi = apply(upper, w_pos, attrs, NUMPY_ARRAYS) + apply(lower, w_neg, attrs, NUMPY_ARRAYS)
    lo = apply(lower, w_pos, attrs, NUMPY_ARRAYS) + apply(upper, w_neg, attrs, NUMPY_ARRAYS)
    return lo, hi

"""ONNX graphs (opsets 13 to 21) to fhe_quant's float :class:`~fhe_quant.ir.Graph`.

The ``onnx`` package reads the file (protobuf: data, no code runs); each ONNX node
becomes the node(s) of :data:`fhe_quant.ir.OPS` that compute the same function, as the
torch frontend emits them, so a model exported from torch compiles to the same integer
program as the module itself. Shapes are found by evaluating the graph being built on
the calibration samples, node by node; the finished graph is checked against ONNX's own
reference evaluator.

Supported (default domain): ``Gemm``, ``MatMul`` (with a constant right operand),
``Conv``, ``BatchNormalization`` (inference), ``Relu``, ``LeakyRelu``, ``PRelu``,
``Sigmoid``, ``Tanh``, ``Elu``, ``HardSigmoid`` (torch's slope 1/6), ``HardSwish``,
``Softplus``, ``Gelu``, ``Clip``, ``AveragePool``, ``MaxPool``, ``GlobalAveragePool``,
``GlobalMaxPool``, ``Flatten``, ``Reshape``, ``Squeeze``, ``Unsqueeze``, ``Add``,
``Sub``, ``Mul`` (by a constant or of two tensors), ``Div`` by a constant, ``Concat``,
``Identity``, ``Dropout``, ``ReduceMean`` over the spatial axes; ``Transpose``, ``Slice``,
``Split`` and ``Resize`` (nearest) as moves of values; ``MaxPool``/``AveragePool`` with
``ceil_mode=1``;
``Constant`` and shape arithmetic on constants (``Shape``, ``Gather``, ``Cast``, ...)
are folded. Anything else is refused by :class:`~fhe_quant.errors.UnsupportedOpError`
naming its op type and node.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from fhe_quant.errors import InputError, TraceError, UnsupportedOpError
from fhe_quant.ir import (
    ConvGeometry,
    Graph,
    Node,
    describe_mismatch,
    gather_index,
    max_pool_geometry,
)

__all__ = ["MIN_OPSET", "MAX_OPSET", "load_onnx", "onnx_to_graph"]

#: Opsets of the default domain that are read (the ops' meanings checked against them).
MIN_OPSET = 13
MAX_OPSET = 21


def _onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - the extra is installed in CI
        raise ImportError(
            "fhe_quant.onnx needs the onnx package: pip install 'fhe-quant[onnx]'."
        ) from exc
    return onnx


def load_onnx(model: Any) -> Any:
    """An ``onnx.ModelProto`` from a path, bytes or a ``ModelProto``, checked.

    Raises:
        InputError: the file is missing, not ONNX, or fails ONNX's checker.
        UnsupportedOpError: the default-domain opset is outside 13-21.
    """
    onnx = _onnx()
    if isinstance(model, (str, os.PathLike)):
        try:
            with open(model, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            raise InputError(f"Cannot read the ONNX file {str(model)!r}: {exc}.") from None
    elif isinstance(model, (bytes, bytearray)):
        data = bytes(model)
    elif isinstance(model, onnx.ModelProto):
        data = model.SerializeToString()
    else:
        raise InputError(
            f"Expected an ONNX file path, bytes or an onnx.ModelProto. Got {type(model).__name__}."
        )
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
        onnx.checker.check_model(proto)
    except Exception as exc:  # NOTE: protobuf's DecodeError and the checker's errors
        raise InputError(f"Not a valid ONNX model: {exc}".strip()) from None
    versions = {o.domain or "ai.onnx": o.version for o in proto.opset_import}
    version = versions.get("ai.onnx")
    if version is None or not MIN_OPSET <= version <= MAX_OPSET:
        raise UnsupportedOpError(
            f"opset {version}",
            "the model's opset_import",
            f"Opsets {MIN_OPSET} to {MAX_OPSET} of the default domain are supported: "
            "export again with one of them (torch.onnx.export(..., opset_version=17)).",
        )
    return proto


# --------------------------------------------------------------------------- translation


class _Builder:
    """Walks the ONNX nodes once, emitting our nodes and evaluating them on ``sample``."""

    def __init__(self, proto: Any, sample: np.ndarray) -> None:
        onnx = _onnx()
        graph = proto.graph
        self.numpy_helper = onnx.numpy_helper
        self.constants: dict[str, np.ndarray] = {
            init.name: onnx.numpy_helper.to_array(init) for init in graph.initializer
        }
        inputs = [i.name for i in graph.input if i.name not in self.constants]
        if len(inputs) != 1 or len(graph.output) != 1:
            raise UnsupportedOpError(
                f"{len(inputs)} inputs and {len(graph.output)} outputs",
                "the graph",
                "Models must take one tensor and return one.",
            )
        self.nodes: list[Node] = [Node(inputs[0], "input", (), {}, {}, "graph input")]
        self.names: dict[str, str] = {inputs[0]: inputs[0]}  # ONNX tensor -> our node
        self.values: dict[str, np.ndarray] = {inputs[0]: sample}
        self.output = graph.output[0].name
        self.opset = MAX_OPSET

    def emit(self, name: str, op: str, inputs: tuple[str, ...], where: str, **kw: Any) -> str:
        node = Node(
            name, op, inputs, kw.get("attrs", {}), kw.get("params", {}), where
        )  # unknown ops and bad attributes fail here, with the node's place
        self.nodes.append(node)
        self.values[name] = node.evaluate(*(self.values[i] for i in inputs))
        return name

    def tensor(self, onnx_name: str) -> str | None:
        return self.names.get(onnx_name)

    def constant(self, onnx_name: str) -> np.ndarray | None:
        if onnx_name == "":
            return None
        value = self.constants.get(onnx_name)
        return None if value is None else np.asarray(value)


def _attrs(node: Any) -> dict[str, Any]:
    onnx = _onnx()
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _where(node: Any) -> str:
    return f"{node.name or node.output[0]} ({node.op_type})"


def _refuse(node: Any, what: str, hint: str = "") -> UnsupportedOpError:
    return UnsupportedOpError(
        f"{node.op_type}({what})" if what else node.op_type, _where(node), hint
    )


def _geometry(
    node: Any, attrs: dict[str, Any], kernel: tuple[int, ...], groups: int = 1
) -> ConvGeometry:
    nd = len(kernel)
    stride = tuple(attrs.get("strides", (1,) * nd))
    dilation = tuple(attrs.get("dilations", (1,) * nd))
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID"):
        raise _refuse(node, f"auto_pad={auto_pad}", "Export with explicit pads.")
    pads = tuple(attrs.get("pads", (0,) * 2 * nd)) if auto_pad == "NOTSET" else (0,) * 2 * nd
    padding = tuple((int(pads[i]), int(pads[i + nd])) for i in range(nd))
    return ConvGeometry(stride, padding, dilation, groups)


def _gemm(b: _Builder, node: Any, x: str, attrs: dict[str, Any]) -> str:
    weight = b.constant(node.input[1])
    bias = b.constant(node.input[2]) if len(node.input) > 2 else None
    if weight is None or attrs.get("transA", 0) or b.values[x].ndim != 2:
        raise _refuse(node, "an encrypted or transposed operand", "Only x @ W + c is supported.")
    weight = weight.astype(np.float64) * float(attrs.get("alpha", 1.0))
    weight = weight if attrs.get("transB", 0) else weight.T  # ours: (out, in)
    params = {"weight": weight}
    if bias is not None:
        params["bias"] = np.broadcast_to(
            bias.astype(np.float64) * float(attrs.get("beta", 1.0)), (weight.shape[0],)
        )
    return b.emit(node.output[0], "linear", (x,), _where(node), params=params)


def _matmul(b: _Builder, node: Any, x: str, attrs: dict[str, Any]) -> str:
    weight = b.constant(node.input[1])
    if weight is None or weight.ndim != 2 or b.values[x].ndim != 2:
        raise _refuse(node, "an encrypted or batched operand", "Only x @ W (2-D) is supported.")
    params = {"weight": weight.astype(np.float64).T}
    return b.emit(node.output[0], "linear", (x,), _where(node), params=params)


def _conv(b: _Builder, node: Any, x: str, attrs: dict[str, Any]) -> str:
    weight = b.constant(node.input[1])
    bias = b.constant(node.input[2]) if len(node.input) > 2 else None
    if weight is None:
        raise _refuse(node, "an encrypted weight")
    geometry = _geometry(node, attrs, tuple(weight.shape[2:]), int(attrs.get("group", 1)))
    params = {"weight": weight.astype(np.float64)}
    if bias is not None:
        params["bias"] = bias.astype(np.float64)
    return b.emit(
        node.output[0], "conv", (x,), _where(node), attrs=geometry.to_attrs(), params=params
    )


def _batchnorm(b: _Builder, node: Any, x: str, attrs: dict[str, Any]) -> str:
    scale, shift, mean, var = (b.constant(name) for name in node.input[1:5])
    if scale is None or shift is None or mean is None or var is None or len(node.output) > 1:
        raise _refuse(node, "training mode", "Export the model in eval mode.")
    # NOTE: the same arithmetic as the torch frontend's batch norm (so the same weights).
    factor = scale.astype(np.float64) / np.sqrt(
        var.astype(np.float64) + float(attrs.get("epsilon", 1e-5))
    )
    offset = shift.astype(np.float64) - mean.astype(np.float64) * factor
    shape = (-1,) + (1,) * (b.values[x].ndim - 2)
    mul = b.emit(
        f"{node.output[0]}_scale",
        "mul_const",
        (x,),
        _where(node),
        params={"constant": factor.reshape(shape)},
    )
    return b.emit(
        node.output[0],
        "add_const",
        (mul,),
        _where(node),
        params={"constant": offset.reshape(shape)},
    )


def _pool(b: _Builder, node: Any, x: str, attrs: dict[str, Any]) -> str:
    spatial = b.values[x].shape[2:]
    is_global = node.op_type.startswith("Global")
    kernel = tuple(spatial) if is_global else tuple(attrs["kernel_shape"])
    geometry = _geometry(node, {} if is_global else attrs, kernel)
    ceil = bool(attrs.get("ceil_mode", 0))
    explicit = geometry
    if ceil:
        geometry = _ceil_geometry(b, node, x, kernel, geometry)
    if node.op_type.endswith("MaxPool"):
        if len(node.output) > 1 and node.output[1]:
            raise _refuse(
                node, "indices output", "Indices of the maxima cannot be computed encrypted."
            )
        pool_attrs = {**geometry.to_attrs(), "kernel": kernel}
        try:
            max_pool_geometry(pool_attrs)
        except ValueError as exc:
            raise _refuse(node, str(exc)) from None
        return b.emit(node.output[0], "max_pool", (x,), _where(node), attrs=pool_attrs)
    padded = any(p for pair in geometry.padding for p in pair)
    if padded and not attrs.get("count_include_pad", 0):
        raise _refuse(
            node, "count_include_pad=0 with pads", "The divisor must not depend on the position."
        )
    channels = b.values[x].shape[1]
    geometry = ConvGeometry(geometry.stride, geometry.padding, geometry.dilation, channels)
    weight = np.full((channels, 1) + kernel, 1.0 / float(np.prod(kernel)))
    # NOTE: ONNX counts the positions ceil_mode adds as padding when count_include_pad=1
    # (torch does not: torch.onnx.export of such a pooling is another function); with
    # count_include_pad=0 (and no pads) a window divides by the values it covers.
    exclude = ceil and not attrs.get("count_include_pad", 0)
    correction = _ceil_divisors(spatial, kernel, explicit, geometry) if exclude else None
    if correction is None or np.allclose(correction, 1.0):
        name = node.output[0]
    else:
        name = f"{node.output[0]}_sum"
    pooled = b.emit(
        name, "avg_pool", (x,), _where(node), attrs=geometry.to_attrs(), params={"weight": weight}
    )
    if name == node.output[0]:
        return pooled
    # NOTE: windows that hang over the end divide by the values they cover (as torch).
    return b.emit(
        node.output[0], "mul_const", (pooled,), _where(node), params={"constant": correction}
    )


def _ceil_geometry(
    b: _Builder, node: Any, x: str, kernel: tuple[int, ...], geometry: ConvGeometry
) -> ConvGeometry:
    """``ceil_mode=1``: the output size the reference evaluator gives, reached by more
    padding at the end of each axis."""
    out = _run_reference(b, node, b.values[x][:1]).shape[2:]
    spatial = b.values[x].shape[2:]
    padding = tuple(
        (begin, max(end, (o - 1) * s + k - n - begin))
        for n, k, s, o, (begin, end) in zip(
            spatial, kernel, geometry.stride, out, geometry.padding, strict=True
        )
    )
    return ConvGeometry(geometry.stride, padding, geometry.dilation, geometry.groups)


def _ceil_divisors(
    spatial: tuple[int, ...],
    kernel: tuple[int, ...],
    explicit: ConvGeometry,
    geometry: ConvGeometry,
) -> np.ndarray:
    """``k / divisor`` per output position: a window counts the values (and explicit
    pads) it covers, not the positions past the end that ``ceil_mode`` adds
    (``count_include_pad=0``)."""
    grid = np.ones(())
    for n, k, s, (begin, end), (_, pad) in zip(
        spatial, kernel, geometry.stride, geometry.padding, explicit.padding, strict=True
    ):
        out = (n + begin + end - k) // s + 1
        start = np.arange(out) * s - begin
        grid = np.multiply.outer(grid, k / (np.minimum(start + k, n + pad) - start))
    return grid.reshape((1,) + grid.shape)


def _reshape(b: _Builder, node: Any, x: str, attrs: dict[str, Any]) -> str:
    value = b.values[x]
    if node.op_type == "Flatten":
        axis = int(attrs.get("axis", 1)) % max(value.ndim, 1)
        if axis != 1:
            raise _refuse(
                node, f"axis={attrs.get('axis')}", "Only Flatten(axis=1) keeps the batch."
            )
        shape: tuple[int, ...] = (int(np.prod(value.shape[1:])),)
    else:
        shape = _reference_shape(b, node, value)
    return b.emit(node.output[0], "reshape", (x,), _where(node), attrs={"shape": shape})


def _reference_shape(b: _Builder, node: Any, value: np.ndarray) -> tuple[int, ...]:
    """The output shape of a shape-only node, from ONNX's reference implementation."""
    out = _run_reference(b, node, value)
    if out.ndim == 0 or out.shape[0] != value.shape[0]:
        raise _refuse(node, "", "Reshapes must keep the batch dimension first.")
    return tuple(int(d) for d in out.shape[1:])


def _run_reference(b: _Builder, node: Any, *tensors: np.ndarray) -> np.ndarray:
    return _run_reference_all(b, node, *tensors)[0]


def _run_reference_all(b: _Builder, node: Any, *tensors: np.ndarray) -> list[np.ndarray]:
    """Every output of one node, from ONNX's reference implementation; ``tensors`` feed
    its non-constant inputs in order."""
    onnx = _onnx()
    from onnx.reference import ReferenceEvaluator

    names = [n for n in node.input if n]
    feeds: dict[str, np.ndarray] = {}
    it = iter(tensors)
    for name in names:
        constant = b.constant(name)
        feeds[name] = constant if constant is not None else next(it).astype(np.float32)
    inputs = [
        onnx.helper.make_tensor_value_info(n, onnx.TensorProto.UNDEFINED, None) for n in names
    ]
    outputs = [
        onnx.helper.make_tensor_value_info(name, onnx.TensorProto.UNDEFINED, None)
        for name in node.output
        if name
    ]
    graph = onnx.helper.make_graph([node], "one", inputs, outputs)
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", b.opset)])
    return [np.asarray(out) for out in ReferenceEvaluator(proto).run(None, feeds)]


def _layout(b: _Builder, node: Any, x: str, attrs: dict[str, Any]) -> None:
    """An op that moves values (Transpose, Slice, Split, Resize in nearest mode): each
    output is a gather whose index is the op applied, by ONNX's reference evaluator, to
    the positions of one sample's values; checked on the sample (no batch mixing)."""
    if node.op_type == "Resize" and attrs.get("mode", b"nearest") not in (b"nearest", "nearest"):
        mode = attrs["mode"].decode() if isinstance(attrs["mode"], bytes) else attrs["mode"]
        raise _refuse(
            node, f"mode={mode}", "Only nearest resizing moves values without computing any."
        )
    value = b.values[x]
    # NOTE: every sample holds the positions (shapes computed from the batch still fit)
    positions = np.broadcast_to(
        np.arange(value[0].size, dtype=np.float64), (len(value), value[0].size)
    )
    moved = _run_reference_all(b, node, positions.reshape(value.shape))
    expected = _run_reference_all(b, node, value)
    for name, index, reference in zip((n for n in node.output if n), moved, expected, strict=True):
        if index.shape[0] != len(value) or not np.all(index == index[:1]):
            raise _refuse(node, "the batch axis", "Keep the batch axis first and whole.")
        index = index[:1]
        ours = b.emit(
            name,
            "gather",
            (x,),
            _where(node),
            attrs={"shape": tuple(int(d) for d in index.shape[1:])},
            params={"index": gather_index(value.shape[1:], lambda a, i=index: i).astype(float)},
        )
        if not np.allclose(b.values[ours], reference, rtol=1e-5, atol=1e-5):
            raise _refuse(node, "", "It mixes values of different samples.")
        b.names[name] = ours


def _reduce_mean(b: _Builder, node: Any, x: str, attrs: dict[str, Any]) -> str:
    """``ReduceMean`` over every spatial axis: a global average pooling."""
    value = b.values[x]
    axes = attrs.get("axes")
    if axes is None and len(node.input) > 1:
        axes = b.constant(node.input[1])
    axes = sorted(int(a) % value.ndim for a in (axes if axes is not None else ()))
    if value.ndim < 3 or axes != list(range(2, value.ndim)):
        raise _refuse(node, f"axes={axes}", "Only the mean over every spatial axis is supported.")
    spatial = tuple(value.shape[2:])
    channels = value.shape[1]
    geometry = ConvGeometry(spatial, ((0, 0),) * len(spatial), (1,) * len(spatial), channels)
    weight = np.full((channels, 1) + spatial, 1.0 / float(np.prod(spatial)))
    keep = bool(attrs.get("keepdims", 1))
    name = node.output[0] if keep else f"{node.output[0]}_pool"
    pooled = b.emit(
        name, "avg_pool", (x,), _where(node), attrs=geometry.to_attrs(), params={"weight": weight}
    )
    if keep:
        return pooled
    return b.emit(node.output[0], "reshape", (pooled,), _where(node), attrs={"shape": (channels,)})


_ACTIVATIONS: dict[str, Callable[[dict[str, Any]], tuple[str, dict[str, Any]]]] = {
    "Relu": lambda a: ("relu", {}),
    "Sigmoid": lambda a: ("sigmoid", {}),
    "Tanh": lambda a: ("tanh", {}),
    "HardSwish": lambda a: ("hardswish", {}),
    "LeakyRelu": lambda a: ("leaky_relu", {"negative_slope": float(a.get("alpha", 0.01))}),
    "Elu": lambda a: ("elu", {"alpha": float(a.get("alpha", 1.0))}),
    "Softplus": lambda a: ("softplus", {"beta": 1.0, "threshold": math.inf}),
    "Gelu": lambda a: (
        "gelu",
        {"approximate": "tanh" if a.get("approximate", b"none") in (b"tanh", "tanh") else "none"},
    ),
    "Identity": lambda a: ("identity", {}),
    "Dropout": lambda a: ("identity", {}),
}


def _activation(b: _Builder, node: Any, x: str, attrs: dict[str, Any]) -> str:
    op, op_attrs = _ACTIVATIONS[node.op_type](attrs)
    if node.op_type == "Dropout" and len(node.output) > 1 and node.output[1]:
        raise _refuse(node, "mask output", "Export the model in eval mode.")
    return b.emit(node.output[0], op, (x,), _where(node), attrs=op_attrs)


def _hard_sigmoid(b: _Builder, node: Any, x: str, attrs: dict[str, Any]) -> str:
    alpha, beta = float(attrs.get("alpha", 0.2)), float(attrs.get("beta", 0.5))
    if not (math.isclose(alpha, 1 / 6, rel_tol=1e-6) and math.isclose(beta, 0.5)):
        raise _refuse(node, f"alpha={alpha}, beta={beta}", "Only torch's (1/6, 0.5) is supported.")
    return b.emit(node.output[0], "hardsigmoid", (x,), _where(node))


def _clip(b: _Builder, node: Any, x: str, attrs: dict[str, Any]) -> str:
    low = b.constant(node.input[1]) if len(node.input) > 1 else None
    high = b.constant(node.input[2]) if len(node.input) > 2 else None
    low_v = -math.inf if low is None else float(low)
    high_v = math.inf if high is None else float(high)
    if low_v == 0.0 and high_v == math.inf:
        return b.emit(node.output[0], "relu", (x,), _where(node))
    if low_v == 0.0 and high_v == 6.0:
        return b.emit(node.output[0], "relu6", (x,), _where(node))
    attrs_ = {"min_val": low_v, "max_val": high_v}
    return b.emit(node.output[0], "hardtanh", (x,), _where(node), attrs=attrs_)


def _prelu(b: _Builder, node: Any, x: str, attrs: dict[str, Any]) -> str:
    slope = b.constant(node.input[1])
    if slope is None:
        raise _refuse(node, "an encrypted slope")
    params = {"weight": slope.astype(np.float64).reshape(-1)}
    return b.emit(node.output[0], "prelu", (x,), _where(node), params=params)


def _arithmetic(b: _Builder, node: Any, attrs: dict[str, Any]) -> str:
    first, second = node.input[0], node.input[1]
    a, c = b.tensor(first), b.tensor(second)
    where, out = _where(node), node.output[0]
    if a is not None and c is not None and node.op_type == "Mul":
        if b.values[a].shape[0] != b.values[c].shape[0]:
            raise _refuse(node, "operands of different batch sizes")
        return b.emit(out, "mul", (a, c), where)
    if a is not None and c is not None:
        if node.op_type not in ("Add", "Sub"):
            raise _refuse(
                node,
                "two encrypted operands",
                "Only a sum, difference or product of tensors is supported.",
            )
        if b.values[a].shape != b.values[c].shape:
            raise _refuse(node, "operands of different shapes")
        coefficients = (1, 1) if node.op_type == "Add" else (1, -1)
        return b.emit(out, "add", (a, c), where, attrs={"coefficients": coefficients})
    tensor, constant = (a, b.constant(second)) if a is not None else (c, b.constant(first))
    assert tensor is not None and constant is not None
    constant = constant.astype(np.float64)
    if node.op_type == "Add":
        return b.emit(out, "add_const", (tensor,), where, params={"constant": constant})
    if node.op_type == "Mul":
        return b.emit(out, "mul_const", (tensor,), where, params={"constant": constant})
    if node.op_type == "Div":
        if a is None:
            raise _refuse(node, "a division by an encrypted tensor")
        return b.emit(out, "mul_const", (tensor,), where, params={"constant": 1.0 / constant})
    if a is not None:  # x - c
        return b.emit(out, "add_const", (tensor,), where, params={"constant": -constant})
    negated = b.emit(
        f"{out}_negated", "mul_const", (tensor,), where, params={"constant": np.array(-1.0)}
    )
    return b.emit(out, "add_const", (negated,), where, params={"constant": constant})


def _concat(b: _Builder, node: Any, attrs: dict[str, Any]) -> str:
    names = [b.tensor(n) for n in node.input]
    if any(n is None for n in names):
        raise _refuse(
            node, "a constant operand", "Only tensors computed from the input can be joined."
        )
    ndim = b.values[names[0]].ndim  # type: ignore[index]
    axis = int(attrs["axis"]) % ndim
    if axis == 0:
        raise _refuse(node, "axis=0", "The batch axis cannot be concatenated.")
    return b.emit(node.output[0], "concat", tuple(names), _where(node), attrs={"axis": axis})  # type: ignore[arg-type]


#: ONNX op type -> translation of a node whose first input is a tensor.
_UNARY: dict[str, Callable[[_Builder, Any, str, dict[str, Any]], str]] = {
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Conv": _conv,
    "BatchNormalization": _batchnorm,
    "AveragePool": _pool,
    "MaxPool": _pool,
    "GlobalAveragePool": _pool,
    "GlobalMaxPool": _pool,
    "Flatten": _reshape,
    "Reshape": _reshape,
    "Squeeze": _reshape,
    "Unsqueeze": _reshape,
    "HardSigmoid": _hard_sigmoid,
    "Clip": _clip,
    "PRelu": _prelu,
    "ReduceMean": _reduce_mean,
    **dict.fromkeys(_ACTIVATIONS, _activation),
}
#: Ops that move values without computing any (each output a "gather").
_LAYOUT = ("Transpose", "Slice", "Split", "Resize")
_BINARY = {"Add": _arithmetic, "Sub": _arithmetic, "Mul": _arithmetic, "Div": _arithmetic}
#: Ops computed in clear when all their inputs are constants (shape arithmetic).
_CONSTANT_OPS = (
    "Shape",
    "Gather",
    "Unsqueeze",
    "Squeeze",
    "Concat",
    "Cast",
    "Reshape",
    "Slice",
    "Mul",
    "Add",
    "Sub",
    "Div",
    "Identity",
    "ConstantOfShape",
)


def _translate(b: _Builder, node: Any) -> None:
    if node.domain not in ("", "ai.onnx"):
        raise _refuse(node, f"domain {node.domain!r}", "Only the default ONNX domain is supported.")
    attrs = _attrs(node)
    if node.op_type == "Constant":
        b.constants[node.output[0]] = (
            b.numpy_helper.to_array(attrs["value"])
            if "value" in attrs
            else np.asarray(next(iter(attrs.values())))
        )
        return
    tensors = [n for n in node.input if n in b.names]
    if node.op_type == "Shape" and tensors:
        shape = np.asarray(b.values[b.names[node.input[0]]].shape, dtype=np.int64)
        start, end = attrs.get("start", 0), attrs.get("end", None)
        b.constants[node.output[0]] = shape[start:end]
        return
    if not tensors:
        if node.op_type not in _CONSTANT_OPS:
            raise _refuse(node, "", "Only shape arithmetic is computed on constants.")
        b.constants[node.output[0]] = _run_reference(b, node)
        return
    if node.op_type in _BINARY:
        name = _BINARY[node.op_type](b, node, attrs)
    elif node.op_type == "Concat":
        name = _concat(b, node, attrs)
    elif node.op_type in _LAYOUT and node.input[0] in b.names and len(tensors) == 1:
        _layout(b, node, b.names[node.input[0]], attrs)
        return
    elif node.op_type == "LayerNormalization":
        raise _refuse(node, "", _LAYER_NORM_HINT)
    elif node.op_type in _UNARY and node.input[0] in b.names and len(tensors) == 1:
        name = _UNARY[node.op_type](b, node, b.names[node.input[0]], attrs)
    else:
        raise _refuse(node, "", _hint(node.op_type))
    b.names[node.output[0]] = name


_LAYER_NORM_HINT = (
    "Layer normalization divides by a statistic of the encrypted values themselves "
    "(x - mean) / sqrt(var + eps); see docs/DESIGN-NOTES.md section 16 for why it is "
    "refused: fold it into the layers around it, or use a batch norm (folded for free)."
)


def _hint(op_type: str) -> str:
    if op_type in ("Upsample", "Softmax"):
        return f"{op_type} on encrypted tensors is not supported yet."
    return f"Supported ops: {', '.join(sorted({*_UNARY, *_BINARY, 'Concat'}))}."


def onnx_to_graph(model: Any, sample: np.ndarray) -> Graph:
    """The float graph of an ONNX model, checked against ONNX's reference evaluator.

    Args:
        model: a path, bytes or ``onnx.ModelProto`` (see :func:`load_onnx`).
        sample: a float batch ``(N, *input_shape)`` (shapes and the check).

    Raises:
        InputError: a malformed model, or a sample the model cannot take.
        UnsupportedOpError: an opset, op or option that cannot be compiled (named, with
            its node).
        TraceError: the graph does not reproduce the ONNX model.
    """
    proto = load_onnx(model)
    sample = np.asarray(sample, dtype=np.float64)[:8]
    builder = _Builder(proto, sample)
    builder.opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    for node in proto.graph.node:
        try:
            _translate(builder, node)
        except (UnsupportedOpError, InputError):
            raise
        except ValueError as exc:
            raise UnsupportedOpError(node.op_type, _where(node), str(exc)) from None
    if builder.output not in builder.names:
        raise UnsupportedOpError(
            "a constant output", "the graph", "The output must depend on the input."
        )
    graph = Graph(
        tuple(builder.nodes), builder.nodes[0].name, builder.names[builder.output], sample.shape[1:]
    )
    _check(proto, graph, sample)
    return graph


def _check(proto: Any, graph: Graph, sample: np.ndarray) -> None:
    from onnx.reference import ReferenceEvaluator

    try:
        (expected,) = ReferenceEvaluator(proto).run(
            None, {graph.input_name: sample.astype(np.float32)}
        )
    except Exception as exc:  # NOTE: the reference evaluator's own errors
        raise InputError(
            f"ONNX's reference evaluator cannot run the model on the sample: {exc}"
        ) from None
    ours = graph(sample.astype(np.float32).astype(np.float64))
    scale = float(np.abs(expected).max()) + 1.0
    difference = describe_mismatch(
        ours, np.asarray(expected, np.float64), rtol=1e-4, atol=1e-4 * scale
    )
    if difference is not None:
        raise TraceError(
            f"The translated graph does not reproduce the ONNX model ({difference}); an op was "
            "translated wrongly. Please report this with your model."
        )

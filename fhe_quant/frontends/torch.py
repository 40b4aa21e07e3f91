"""PyTorch frontend: trace a ``torch.nn.Module`` with torch.fx into a float :class:`Graph`.

Only this module (and the public :mod:`fhe_quant.torch`) imports torch. The module is
traced symbolically (``torch.fx.symbolic_trace``), shapes are propagated with one
calibration sample, and every traced node is translated by one of three small tables
below (modules, functions, methods). Anything else raises
:class:`~fhe_quant.errors.UnsupportedOpError` with the node's place in the model, before
anything is compiled. The translated graph is then checked against the module's own
eval-mode output, so that a mistranslation can never pass silently.

Convolutional chains: ``Conv1d``/``Conv2d`` (stride, zero padding as ints, tuples,
``"valid"`` or ``"same"``, dilation, groups, bias; also ``F.conv1d``/``F.conv2d`` with
constant weights) become ``"conv"`` nodes; ``AvgPool1d/2d`` and ``AdaptiveAvgPool1d/2d``
(modules or functions) become ``"avg_pool"`` nodes, depthwise convolutions with weights
``1/k``; ``BatchNorm1d/2d`` become a per-channel scale and shift that
:func:`fhe_quant.passes.fold_affine_into_linear` folds into the convolution before them.

Branching graphs: ``MaxPool1d/2d`` and ``AdaptiveMaxPool1d/2d`` (modules or functions;
``ceil_mode`` is padding at the end; no dilation or ``return_indices``) become
``"max_pool"`` nodes; the sum or
difference of two tensors (``x + y``, ``torch.add(x, y)``, ``x - y``; residual
connections) becomes an ``"add"`` node, and ``torch.cat`` along a non-batch axis a
``"concat"`` node. Multiplying a tensor by a constant (per channel: ``x * c`` with ``c``
of shape ``(C, 1, 1)``) is a ``"mul_const"``, folded into the layer before it or fused
into a table; the product of two tensors (``x * y``, squeeze-and-excitation gates) is a
``"mul"`` node.

Moves of values become ``"gather"`` nodes: ``permute``/``transpose``/``swapaxes``,
constant slicing (``x[:, a:b]``), ``chunk``/``split``, ``nn.ChannelShuffle`` and the
``view -> transpose -> view`` channel shuffle, nearest upsampling by an integer factor
(``nn.Upsample``, ``nn.UpsamplingNearest2d``, ``F.interpolate``). ``x.mean([2, 3])`` is a
global average pooling. ``LayerNorm`` is refused (``docs/DESIGN-NOTES.md`` section 16).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import itertools
import operator
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from fhe_quant.errors import ModelError, TraceError, UnsupportedOpError
from fhe_quant.ir import (
    ELEMENTWISE,
    ConvGeometry,
    Graph,
    Node,
    describe_mismatch,
    gather_index,
    max_pool_geometry,
)

__all__ = ["trace_module"]


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


# --------------------------------------------------------------------- module translations
# Each returns (op, attrs, params) for the traced call of a module instance, given the
# shape of its input (batch included); a ValueError means an unsupported option.

Translation = tuple[str, dict[str, Any], dict[str, np.ndarray]]
ModuleRule = Callable[[Any, tuple[int, ...]], Translation]


class _RefusedOptionError(ValueError):
    """A layer option we cannot compile: ``option`` names it, ``hint`` says what to do."""

    def __init__(self, option: str, hint: str = "") -> None:
        super().__init__(option)
        self.option = option
        self.hint = hint


def _linear(m: nn.Linear, shape: tuple[int, ...]) -> Translation:
    params = {"weight": _np(m.weight)}
    if m.bias is not None:
        params["bias"] = _np(m.bias)
    return "linear", {}, params


def _batchnorm(m: nn.BatchNorm1d, shape: tuple[int, ...]) -> Translation:
    if m.running_mean is None or m.running_var is None:
        raise ValueError("track_running_stats=False")
    scale = _np(m.weight) if m.weight is not None else np.ones(m.num_features)
    shift = _np(m.bias) if m.bias is not None else np.zeros(m.num_features)
    scale = scale / np.sqrt(_np(m.running_var) + m.eps)
    shift = shift - _np(m.running_mean) * scale
    return "affine", {}, {"scale": scale, "shift": shift}


def _spatial_dims(shape: tuple[int, ...], nd: int) -> tuple[int, ...]:
    if len(shape) != nd + 2:
        raise _RefusedOptionError(
            f"an input of shape {tuple(shape)}",
            f"Expected a batch of shape (N, C, {'L' if nd == 1 else 'H, W'}).",
        )
    return tuple(shape[2:])


def _ntuple(value: Any, nd: int) -> tuple[int, ...]:
    return tuple(int(v) for v in value) if isinstance(value, (tuple, list)) else (int(value),) * nd


def _conv_geometry(
    kernel: tuple[int, ...],
    stride: Any,
    padding: Any,
    dilation: Any,
    groups: int,
) -> ConvGeometry:
    """The :class:`ConvGeometry` of a torch convolution's arguments.

    ``padding`` is torch's: an int, a tuple, ``"valid"`` or ``"same"`` (which pads
    ``dilation * (kernel - 1)`` in total, the odd one at the end, as torch does).
    """
    nd = len(kernel)
    dilation = _ntuple(dilation, nd)
    if padding == "valid":
        pairs = ((0, 0),) * nd
    elif padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
        pairs = tuple((total // 2, total - total // 2) for total in totals)
    else:
        pairs = tuple((p, p) for p in _ntuple(padding, nd))
    return ConvGeometry(_ntuple(stride, nd), pairs, dilation, int(groups))


def _conv(m: nn.Conv1d | nn.Conv2d, shape: tuple[int, ...]) -> Translation:
    nd = len(m.kernel_size)
    _spatial_dims(shape, nd)
    if m.padding_mode != "zeros":
        raise _RefusedOptionError(
            f"padding_mode={m.padding_mode!r}",
            "Only zero padding (padding_mode='zeros') is supported.",
        )
    geometry = _conv_geometry(tuple(m.kernel_size), m.stride, m.padding, m.dilation, m.groups)
    params = {"weight": _np(m.weight)}
    if m.bias is not None:
        params["bias"] = _np(m.bias)
    return "conv", geometry.to_attrs(), params


def _avg_pool_node(
    channels: int,
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    extra: tuple[int, ...] | None = None,
) -> Translation:
    # NOTE: average pooling is a depthwise convolution with weights 1/k (zeros padded and
    # counted, as count_include_pad=True); quantization makes the weights exactly 1.
    extra = extra or (0,) * len(kernel)
    pairs = tuple((p, p + e) for p, e in zip(padding, extra, strict=True))
    geometry = ConvGeometry(stride, pairs, (1,) * len(kernel), channels)
    weight = np.full((channels, 1) + kernel, 1.0 / float(np.prod(kernel)))
    return "avg_pool", geometry.to_attrs(), {"weight": weight}


def ceil_mode_extra(
    spatial: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...], padding: Any
) -> tuple[int, ...]:
    """The padding ``ceil_mode=True`` adds at the end of each axis: torch rounds the
    output size up, but drops a last window that would start in the end padding.

    Examples:
        >>> ceil_mode_extra((5, 6), (2, 2), (2, 2), (0, 0))
        (1, 0)
    """
    extra = []
    for n, k, s, p in zip(spatial, kernel, stride, padding, strict=True):
        out = -(-(n + 2 * p - k) // s) + 1
        if (out - 1) * s >= n + p:
            out -= 1
        extra.append(max(0, (out - 1) * s + k - n - 2 * p))
    return tuple(extra)


def ceil_mode_divisors(
    spatial: tuple[int, ...],
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    extra: tuple[int, ...],
) -> np.ndarray:
    """``k / divisor`` per output position of a ``ceil_mode=True`` average pooling: torch
    divides a window by its size within the padded input, and the windows ``ceil_mode``
    adds hang over its end (shape ``(1, *out_spatial)``, broadcast over channels)."""
    factors = []
    for n, k, s, p, e in zip(spatial, kernel, stride, padding, extra, strict=True):
        out = (n + 2 * p + e - k) // s + 1
        start = np.arange(out) * s - p
        factors.append(k / (np.minimum(start + k, n + p) - start))
    grid = np.ones(())
    for factor in factors:
        grid = np.multiply.outer(grid, factor)
    return grid.reshape((1,) + grid.shape)


def _avg_pool(m: nn.AvgPool1d | nn.AvgPool2d, shape: tuple[int, ...]) -> Translation:
    nd = 1 if isinstance(m, nn.AvgPool1d) else 2
    _spatial_dims(shape, nd)
    kernel = _ntuple(m.kernel_size, nd)
    stride = _ntuple(m.stride, nd) if m.stride else kernel
    padding = _ntuple(m.padding, nd)
    if getattr(m, "divisor_override", None) is not None:
        raise _RefusedOptionError(
            f"divisor_override={m.divisor_override}", "Remove divisor_override."
        )
    if not m.count_include_pad and any(padding):
        raise _RefusedOptionError(
            "count_include_pad=False with padding",
            "The divisor must not depend on the position: use count_include_pad=True.",
        )
    if not m.ceil_mode:
        return _avg_pool_node(shape[1], kernel, stride, padding)
    spatial = tuple(shape[2:])
    extra = ceil_mode_extra(spatial, kernel, stride, padding)
    op, attrs, params = _avg_pool_node(shape[1], kernel, stride, padding, extra)
    correction = ceil_mode_divisors(spatial, kernel, stride, padding, extra)
    if not np.allclose(correction, 1.0):
        # NOTE: the windows that hang over the end divide by fewer values: a constant
        # per position after the sum, fused into the table that reads the pooling.
        params["correction"] = correction
    return op, attrs, params


def _adaptive_avg_pool(
    m: nn.AdaptiveAvgPool1d | nn.AdaptiveAvgPool2d, shape: tuple[int, ...]
) -> Translation:
    nd = 1 if isinstance(m, nn.AdaptiveAvgPool1d) else 2
    spatial = _spatial_dims(shape, nd)
    sizes = m.output_size if isinstance(m.output_size, (tuple, list)) else (m.output_size,) * nd
    out = tuple(n if o is None else int(o) for n, o in zip(spatial, sizes, strict=True))
    if any(n % o for n, o in zip(spatial, out, strict=True)):
        raise _RefusedOptionError(
            f"output_size={tuple(out)} for an input of size {spatial}",
            "The output size must divide the input size (then the pooling has one "
            "kernel size and stride).",
        )
    kernel = tuple(n // o for n, o in zip(spatial, out, strict=True))
    return _avg_pool_node(shape[1], kernel, kernel, (0,) * nd)


def _max_pool_node(
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    extra: tuple[int, ...] | None = None,
) -> Translation:
    # NOTE: ceil_mode=True is more padding at the end (-inf, never picked).
    extra = extra or (0,) * len(kernel)
    pairs = tuple((p, p + e) for p, e in zip(padding, extra, strict=True))
    geometry = ConvGeometry(stride, pairs, (1,) * len(kernel))
    attrs = {**geometry.to_attrs(), "kernel": kernel}
    try:
        max_pool_geometry(attrs)
    except ValueError as exc:
        raise _RefusedOptionError(f"padding={padding}", f"{exc}") from None
    return "max_pool", attrs, {}


def _max_pool(m: nn.MaxPool1d | nn.MaxPool2d, shape: tuple[int, ...]) -> Translation:
    nd = 1 if isinstance(m, nn.MaxPool1d) else 2
    _spatial_dims(shape, nd)
    kernel = _ntuple(m.kernel_size, nd)
    stride = _ntuple(m.stride, nd) if m.stride else kernel
    if any(d != 1 for d in _ntuple(m.dilation, nd)):
        raise _RefusedOptionError(f"dilation={m.dilation}", "Use dilation=1.")
    if m.return_indices:
        raise _RefusedOptionError(
            "return_indices=True", "Indices of the maxima cannot be computed encrypted."
        )
    padding = _ntuple(m.padding, nd)
    extra = ceil_mode_extra(tuple(shape[2:]), kernel, stride, padding) if m.ceil_mode else None
    return _max_pool_node(kernel, stride, padding, extra)


def _adaptive_max_pool(
    m: nn.AdaptiveMaxPool1d | nn.AdaptiveMaxPool2d, shape: tuple[int, ...]
) -> Translation:
    nd = 1 if isinstance(m, nn.AdaptiveMaxPool1d) else 2
    spatial = _spatial_dims(shape, nd)
    if m.return_indices:
        raise _RefusedOptionError(
            "return_indices=True", "Indices of the maxima cannot be computed encrypted."
        )
    sizes = m.output_size if isinstance(m.output_size, (tuple, list)) else (m.output_size,) * nd
    out = tuple(n if o is None else int(o) for n, o in zip(spatial, sizes, strict=True))
    if any(n % o for n, o in zip(spatial, out, strict=True)):
        raise _RefusedOptionError(
            f"output_size={tuple(out)} for an input of size {spatial}",
            "The output size must divide the input size.",
        )
    kernel = tuple(n // o for n, o in zip(spatial, out, strict=True))
    return _max_pool_node(kernel, kernel, (0,) * nd)


def _gather(in_shape: tuple[int, ...], move: Callable[[np.ndarray], np.ndarray]) -> Translation:
    """A ``"gather"`` node that does what ``move`` does (on arrays with a batch axis)."""
    index = gather_index(tuple(in_shape), move)
    out_shape = np.shape(move(np.zeros((1,) + tuple(in_shape))))[1:]
    return "gather", {"shape": tuple(int(d) for d in out_shape)}, {"index": index}


def _nearest(shape: tuple[int, ...], out_spatial: tuple[int, ...], mode: str) -> Translation:
    """Nearest upsampling of a ``(N, C, *spatial)`` batch to ``out_spatial``: every value
    repeated an integer number of times along each spatial axis (torch's
    ``floor(i * in / out)`` source index, the same for ``"nearest-exact"``)."""
    spatial = tuple(shape[2:])
    if mode not in ("nearest", "nearest-exact"):
        raise _RefusedOptionError(
            f"mode={mode!r}", "Only nearest upsampling moves values without computing any."
        )
    if len(out_spatial) != len(spatial) or any(
        o % n for n, o in zip(spatial, out_spatial, strict=True)
    ):
        raise _RefusedOptionError(
            f"an output of size {tuple(out_spatial)} for an input of size {spatial}",
            "Nearest upsampling needs an integer scale factor.",
        )
    factors = [o // n for n, o in zip(spatial, out_spatial, strict=True)]

    def move(a: np.ndarray) -> np.ndarray:
        for axis, factor in enumerate(factors, start=2):
            a = np.repeat(a, factor, axis=axis)
        return a

    return _gather(tuple(shape[1:]), move)


def _upsample(m: nn.Upsample, shape: tuple[int, ...]) -> Translation:
    spatial = tuple(shape[2:])
    if m.size is not None:
        size = m.size if isinstance(m.size, (tuple, list)) else (m.size,) * len(spatial)
        out = tuple(int(o) for o in size)
    else:
        factor = m.scale_factor
        factors = factor if isinstance(factor, (tuple, list)) else (factor,) * len(spatial)
        if any(float(f) != int(f) for f in factors):
            raise _RefusedOptionError(
                f"scale_factor={factor}", "Nearest upsampling needs an integer scale factor."
            )
        out = tuple(n * int(f) for n, f in zip(spatial, factors, strict=True))
    return _nearest(shape, out, m.mode)


def _channel_shuffle_move(groups: int) -> Callable[[np.ndarray], np.ndarray]:
    def move(a: np.ndarray) -> np.ndarray:
        n, c = a.shape[:2]
        grouped = a.reshape((n, groups, c // groups) + a.shape[2:])
        return grouped.swapaxes(1, 2).reshape(a.shape)

    return move


def _channel_shuffle(m: nn.ChannelShuffle, shape: tuple[int, ...]) -> Translation:
    if len(shape) < 3 or shape[1] % m.groups:
        raise _RefusedOptionError(
            f"groups={m.groups} on an input of shape {tuple(shape)}",
            "The channels must split into the groups.",
        )
    return _gather(tuple(shape[1:]), _channel_shuffle_move(int(m.groups)))


def _simple(op: str) -> ModuleRule:
    return lambda m, shape: (op, {}, {})


def _attr_value(value: Any, default: Any) -> Any:
    return float(value) if isinstance(default, float) else value


def _elementwise_rule(op: str) -> ModuleRule:
    """The rule of an elementwise layer: its attributes and constants are the module's
    attributes named by the op's row (:data:`fhe_quant.ir.ELEMENTWISE`)."""
    row = ELEMENTWISE[op]

    def rule(m: nn.Module, shape: tuple[int, ...]) -> Translation:
        attrs = {name: _attr_value(getattr(m, name), default) for name, default in row.attrs}
        return op, attrs, {name: _np(getattr(m, name)) for name in row.params}

    return rule


def _torch_object(dotted: str) -> Any:
    """``"torch.nn.functional.relu"`` -> the function."""
    return functools.reduce(getattr, dotted.split(".")[1:], torch)


_MODULES: dict[type, ModuleRule] = {
    nn.Linear: _linear,
    nn.BatchNorm1d: _batchnorm,
    nn.BatchNorm2d: _batchnorm,
    nn.Conv1d: _conv,
    nn.Conv2d: _conv,
    nn.AvgPool1d: _avg_pool,
    nn.AvgPool2d: _avg_pool,
    nn.AdaptiveAvgPool1d: _adaptive_avg_pool,
    nn.AdaptiveAvgPool2d: _adaptive_avg_pool,
    nn.MaxPool1d: _max_pool,
    nn.MaxPool2d: _max_pool,
    nn.AdaptiveMaxPool1d: _adaptive_max_pool,
    nn.AdaptiveMaxPool2d: _adaptive_max_pool,
    nn.Flatten: _simple("reshape"),
    nn.Unflatten: _simple("reshape"),
    nn.Upsample: _upsample,
    nn.UpsamplingNearest2d: _upsample,
    nn.ChannelShuffle: _channel_shuffle,
    # Elementwise layers: one entry per torch class of each row of the op table.
    **{
        getattr(nn, name): _elementwise_rule(op)
        for op, row in ELEMENTWISE.items()
        for name in row.torch_modules
    },
}
# NOTE: nn.ReLU6 subclasses nn.Hardtanh; lookups use the exact type, so order is irrelevant.

# Functional pooling, translated through the module of the same arguments.
_POOL_FUNCTIONS: dict[Any, type[nn.Module]] = {
    F.avg_pool1d: nn.AvgPool1d,
    F.avg_pool2d: nn.AvgPool2d,
    F.adaptive_avg_pool1d: nn.AdaptiveAvgPool1d,
    F.adaptive_avg_pool2d: nn.AdaptiveAvgPool2d,
    F.max_pool1d: nn.MaxPool1d,
    F.max_pool2d: nn.MaxPool2d,
    F.adaptive_max_pool1d: nn.AdaptiveMaxPool1d,
    F.adaptive_max_pool2d: nn.AdaptiveMaxPool2d,
}
_CONV_FUNCTIONS = {F.conv1d: 1, F.conv2d: 2}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}

# Functions and tensor methods that are elementwise operations (the op table's rows), with
# the arguments read after ``x`` and their defaults.
_ACTIVATION_FUNCTIONS: dict[Any, tuple[str, dict[str, Any]]] = {
    _torch_object(name): (op, dict(row.attrs))
    for op, row in ELEMENTWISE.items()
    for name in row.torch_functions
}
_ACTIVATION_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    name: (op, dict(row.attrs)) for op, row in ELEMENTWISE.items() for name in row.torch_methods
}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze"}
# Functions and methods that move values (translated to "gather" nodes).
_PERMUTE_FUNCTIONS = {
    torch.permute: "permute",
    torch.transpose: "transpose",
    torch.swapaxes: "transpose",
}
_PERMUTE_METHODS = {"permute": "permute", "transpose": "transpose", "swapaxes": "transpose"}
_SPLIT_FUNCTIONS = {torch.chunk: "chunk", torch.split: "split"}
_SPLIT_METHODS = {"chunk": "chunk", "split": "split"}
_ARITHMETIC = {
    operator.add: "add",
    torch.add: "add",
    operator.sub: "sub",
    torch.sub: "sub",
    operator.mul: "mul",
    torch.mul: "mul",
    operator.truediv: "div",
    torch.div: "div",
    operator.neg: "neg",
    torch.neg: "neg",
}
_ARITHMETIC_METHODS = {"add": "add", "sub": "sub", "mul": "mul", "div": "div", "neg": "neg"}
# Nodes that only compute shapes for a reshape (x.size(0), x.shape[1], ...).
_SHAPE_ONLY_METHODS = {"size", "dim"}
_CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}


def _where(node: torch.fx.Node, module: nn.Module) -> str:
    if node.op == "call_module":
        sub = module.get_submodule(str(node.target))
        return f"{node.target} ({type(sub).__name__})"
    target = getattr(node.target, "__name__", str(node.target))
    return f"{node.name} ({node.op} {target})"


class _Translator:
    """Walks the fx graph once and builds our nodes."""

    def __init__(self, module: nn.Module, gm: torch.fx.GraphModule) -> None:
        self.module = module
        self.gm = gm
        self.nodes: list[Node] = []
        self.names: dict[torch.fx.Node, str] = {}  # fx node -> our node producing its tensor
        self.constants: dict[torch.fx.Node, Any] = {}  # fx nodes that are clear constants
        # chunk/split results: the tensor split and the slice of each piece
        self.pieces: dict[torch.fx.Node, tuple[Any, list[tuple[Any, ...]]]] = {}

    # -- helpers
    def add(
        self,
        fx_node: torch.fx.Node,
        op: str,
        inputs: tuple[torch.fx.Node, ...],
        attrs: dict[str, Any] | None = None,
        params: dict[str, np.ndarray] | None = None,
    ) -> None:
        where = _where(fx_node, self.module)
        node = Node(
            fx_node.name, op, tuple(self.names[i] for i in inputs), attrs or {}, params or {}, where
        )
        self.nodes.append(node)
        self.names[fx_node] = node.name

    def out_shape(self, fx_node: torch.fx.Node) -> tuple[int, ...]:
        meta = fx_node.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            raise UnsupportedOpError(
                str(fx_node.target),
                _where(fx_node, self.module),
                "Its output is not a single tensor.",
            )
        return tuple(int(d) for d in meta.shape)

    def is_tensor(self, arg: Any) -> bool:
        return isinstance(arg, torch.fx.Node) and arg in self.names

    def constant_value(self, arg: Any) -> np.ndarray | None:
        if isinstance(arg, (int, float)) and not isinstance(arg, bool):
            return np.array(float(arg))
        if isinstance(arg, torch.fx.Node) and arg in self.constants:
            return np.asarray(self.constants[arg], dtype=np.float64)
        return None

    # -- translation of each fx node
    def translate(self, fx_node: torch.fx.Node) -> None:
        where = _where(fx_node, self.module)
        if fx_node.op == "placeholder":
            if self.nodes:
                raise UnsupportedOpError(
                    "a second model input", where, "Models must take exactly one tensor."
                )
            self.nodes.append(Node(fx_node.name, "input", (), {}, {}, where))
            self.names[fx_node] = fx_node.name
        elif fx_node.op == "get_attr":
            value: Any = self.gm
            for part in str(fx_node.target).split("."):
                value = getattr(value, part)
            self.constants[fx_node] = _np(value) if isinstance(value, torch.Tensor) else value
        elif fx_node.op == "call_module":
            self.translate_module(fx_node, where)
        elif fx_node.op in ("call_function", "call_method"):
            self.translate_call(fx_node, where)
        elif fx_node.op == "output":
            pass
        else:  # pragma: no cover - fx has no other node kinds
            raise UnsupportedOpError(fx_node.op, where)

    def translate_module(self, fx_node: torch.fx.Node, where: str) -> None:
        sub = self.module.get_submodule(str(fx_node.target))
        rule = _MODULES.get(type(sub))
        if rule is None:
            raise UnsupportedOpError(
                f"torch.nn.{type(sub).__name__}", where, _hint_for(type(sub).__name__)
            )
        inputs = self.tensor_args(fx_node, where)
        op, attrs, params = self.apply_rule(rule, sub, inputs[0], where)
        if op == "reshape":
            attrs = {"shape": self.out_shape(fx_node)[1:]}
        if op == "affine":
            self.add_affine(fx_node, inputs[0], params["scale"], params["shift"])
            return
        self.add_pool_or_op(fx_node, op, inputs[0], attrs, params)

    def add_pool_or_op(
        self,
        fx_node: torch.fx.Node,
        op: str,
        source: torch.fx.Node,
        attrs: dict[str, Any],
        params: dict[str, np.ndarray],
    ) -> None:
        """Add a translated node; a ``ceil_mode`` average pooling whose last windows hang
        over the input becomes the pooling and a ``mul_const`` by ``k / divisor``."""
        correction = params.pop("correction", None)
        if correction is None:
            self.add(fx_node, op, (source,), attrs, params)
            return
        where = _where(fx_node, self.module)
        pool = Node(f"{fx_node.name}_sum", op, (self.names[source],), attrs, params, where)
        self.nodes.append(pool)
        fix = Node(fx_node.name, "mul_const", (pool.name,), {}, {"constant": correction}, where)
        self.nodes.append(fix)
        self.names[fx_node] = fix.name

    def apply_rule(
        self, rule: ModuleRule, module: nn.Module, source: torch.fx.Node, where: str
    ) -> Translation:
        try:
            return rule(module, self.out_shape(source))
        except _RefusedOptionError as exc:
            raise UnsupportedOpError(
                f"{type(module).__name__}({exc.option})", where, exc.hint
            ) from None
        except ValueError as exc:
            raise UnsupportedOpError(f"{type(module).__name__}({exc})", where) from None

    def translate_pool_call(self, fx_node: torch.fx.Node, where: str) -> None:
        # F.avg_pool2d(x, 2, ...) is translated as nn.AvgPool2d(2, ...) on x.
        module_type = _POOL_FUNCTIONS[fx_node.target]
        bound = fx_node.normalized_arguments(self.gm, normalize_to_only_use_kwargs=True)
        if bound is None:
            raise UnsupportedOpError(str(fx_node.target), where, "Could not read its arguments.")
        kwargs = dict(bound.kwargs)
        source = kwargs.pop("input")
        if kwargs.pop("return_indices", False):
            kwargs["return_indices"] = True  # refused by the max pool rule, naming it
        if not self.is_tensor(source):
            raise UnsupportedOpError(module_type.__name__, where, "Its input is not a tensor.")
        module = module_type(**kwargs)
        op, attrs, params = self.apply_rule(_MODULES[module_type], module, source, where)
        self.add_pool_or_op(fx_node, op, source, attrs, params)

    def translate_conv_call(self, fx_node: torch.fx.Node, where: str) -> None:
        # F.conv2d(x, weight, bias, stride, padding, dilation, groups) with constant weights.
        args = dict(_CONV_DEFAULTS)
        args.update(zip(_CONV_ARGS, fx_node.args, strict=False))
        args.update(fx_node.kwargs)
        source = args["input"]
        if not self.is_tensor(source):
            raise UnsupportedOpError(str(fx_node.target), where, "Its input is not a tensor.")
        weight = self.constant_value(args["weight"])
        bias = None if args["bias"] is None else self.constant_value(args["bias"])
        if weight is None or (args["bias"] is not None and bias is None):
            raise UnsupportedOpError("a convolution with an encrypted weight", where)
        nd = _CONV_FUNCTIONS[fx_node.target]
        if weight.ndim != nd + 2 or len(self.out_shape(source)) != nd + 2:
            raise UnsupportedOpError(
                f"conv{nd}d on an input of shape {self.out_shape(source)}",
                where,
                f"Expected a batch of shape (N, C, {'L' if nd == 1 else 'H, W'}).",
            )
        geometry = _conv_geometry(
            tuple(weight.shape[2:]),
            args["stride"],
            args["padding"],
            args["dilation"],
            args["groups"],
        )
        params = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
        self.add(fx_node, "conv", (source,), geometry.to_attrs(), params)

    def add_affine(
        self, fx_node: torch.fx.Node, source: torch.fx.Node, scale: np.ndarray, shift: np.ndarray
    ) -> None:
        # NOTE: a per-channel affine map (batch norm) along axis 1, as mul then add.
        ndim = len(self.out_shape(fx_node))
        shape = (-1,) + (1,) * (ndim - 2)
        mul = Node(
            f"{fx_node.name}_scale",
            "mul_const",
            (self.names[source],),
            {},
            {"constant": scale.reshape(shape)},
            _where(fx_node, self.module),
        )
        self.nodes.append(mul)
        add = Node(
            fx_node.name,
            "add_const",
            (mul.name,),
            {},
            {"constant": shift.reshape(shape)},
            _where(fx_node, self.module),
        )
        self.nodes.append(add)
        self.names[fx_node] = add.name

    def tensor_args(self, fx_node: torch.fx.Node, where: str) -> tuple[torch.fx.Node, ...]:
        tensors = tuple(a for a in fx_node.args if self.is_tensor(a))
        if len(tensors) != 1:
            raise UnsupportedOpError(
                str(fx_node.target), where, f"Expected one tensor input, got {len(tensors)}."
            )
        return tensors

    def translate_call(self, fx_node: torch.fx.Node, where: str) -> None:
        target = fx_node.target
        is_method = fx_node.op == "call_method"
        args = fx_node.args
        if (is_method and target in _SHAPE_ONLY_METHODS) or target is getattr:
            return  # x.size(0), x.shape: only feed reshapes, whose shapes come from ShapeProp
        if not is_method and target in _CAT_FUNCTIONS:
            self.translate_cat(fx_node, where)
            return
        if self.translate_layout(fx_node, where) or self.translate_mean(fx_node, where):
            return
        if not any(self.is_tensor(a) for a in args):
            self.translate_constant_call(fx_node, where)
            return
        if (not is_method and target in _ACTIVATION_FUNCTIONS) or (
            is_method and target in _ACTIVATION_METHODS
        ):
            self.translate_activation(fx_node)
        elif (not is_method and target in _RESHAPE_FUNCTIONS) or (
            is_method and target in _RESHAPE_METHODS
        ):
            shape = self.out_shape(fx_node)
            source = args[0]
            if not self.is_tensor(source) or not shape or shape[0] != self.batch_dim(source):
                raise UnsupportedOpError(
                    str(target), where, "Reshapes must keep the batch dimension first."
                )
            self.add(fx_node, "reshape", (source,), {"shape": shape[1:]})  # type: ignore[arg-type]
        elif (not is_method and target in _ARITHMETIC) or (
            is_method and target in _ARITHMETIC_METHODS
        ):
            kind = _ARITHMETIC_METHODS[target] if is_method else _ARITHMETIC[target]  # type: ignore[index]
            self.translate_arithmetic(fx_node, kind, where)
        elif not is_method and target in _POOL_FUNCTIONS:
            self.translate_pool_call(fx_node, where)
        elif not is_method and target in _CONV_FUNCTIONS:
            self.translate_conv_call(fx_node, where)
        elif target == F.linear:
            weight = self.constant_value(args[1] if len(args) > 1 else fx_node.kwargs["weight"])
            bias_arg = args[2] if len(args) > 2 else fx_node.kwargs.get("bias")
            bias = None if bias_arg is None else self.constant_value(bias_arg)
            if weight is None or (bias_arg is not None and bias is None):
                raise UnsupportedOpError("F.linear with an encrypted weight", where)
            params = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
            self.add(fx_node, "linear", (args[0],), {}, params)  # type: ignore[arg-type]
        else:
            name = target if isinstance(target, str) else getattr(target, "__name__", target)
            raise UnsupportedOpError(str(name), where, _hint_for(str(name)))

    def add_gather(
        self, fx_node: torch.fx.Node, source: Any, move: Callable[[np.ndarray], np.ndarray]
    ) -> None:
        """A ``"gather"`` node doing what ``move`` does, checked against the traced shape."""
        op, attrs, params = _gather(self.out_shape(source)[1:], move)
        if (self.batch_dim(source),) + attrs["shape"] != self.out_shape(fx_node):
            raise UnsupportedOpError(  # pragma: no cover - ShapeProp ran the same operation
                str(fx_node.target), _where(fx_node, self.module), "Its shape is unexpected."
            )
        self.add(fx_node, op, (source,), attrs, params)

    def translate_layout(self, fx_node: torch.fx.Node, where: str) -> bool:
        """Operations that move values (permute, transpose, slicing, chunk/split,
        nearest interpolation): translated to gathers; ``False`` for any other call."""
        target, args = fx_node.target, fx_node.args
        table = _PERMUTE_METHODS if fx_node.op == "call_method" else _PERMUTE_FUNCTIONS
        splits = _SPLIT_METHODS if fx_node.op == "call_method" else _SPLIT_FUNCTIONS
        if target is operator.getitem and args and args[0] in self.pieces:
            source, pieces = self.pieces[args[0]]
            piece = pieces[int(args[1])]  # type: ignore[call-overload]
            self.add_gather(fx_node, source, lambda a: a[piece])
        elif target is operator.getitem and args and self.is_tensor(args[0]):
            self.translate_slice(fx_node, args[0], args[1], where)
        elif isinstance(target, str) == (fx_node.op == "call_method") and target in table:
            source = args[0]
            dims = _dims_argument(fx_node)
            ndim = len(self.out_shape(source))
            dims = tuple(int(d) % ndim for d in dims)
            if table[target] == "transpose":
                order = list(range(ndim))
                order[dims[0]], order[dims[1]] = order[dims[1]], order[dims[0]]
                dims = tuple(order)
            if dims[0] != 0:
                raise UnsupportedOpError(
                    f"{target} of the batch axis", where, "Keep the batch axis first."
                )
            self.add_gather(fx_node, source, lambda a: np.transpose(a, dims))
        elif isinstance(target, str) == (fx_node.op == "call_method") and target in splits:
            self.pieces[fx_node] = (args[0], self.split_pieces(fx_node, where))
        elif target is F.interpolate:
            source = args[0]
            mode = fx_node.kwargs.get("mode", args[3] if len(args) > 3 else "nearest")
            shape = self.out_shape(source)
            try:
                op, attrs, params = _nearest(shape, self.out_shape(fx_node)[2:], str(mode))
            except _RefusedOptionError as exc:
                raise UnsupportedOpError(f"interpolate({exc.option})", where, exc.hint) from None
            self.add(fx_node, op, (source,), attrs, params)
        else:
            return False
        return True

    def translate_mean(self, fx_node: torch.fx.Node, where: str) -> bool:
        """``x.mean([2, 3])`` / ``torch.mean(x, dim, keepdim)`` over every spatial axis:
        a global average pooling (and a reshape without ``keepdim``)."""
        is_method = fx_node.op == "call_method"
        if not ((is_method and fx_node.target == "mean") or fx_node.target is torch.mean):
            return False
        source = fx_node.args[0]
        bound = dict(zip(("input", "dim", "keepdim"), fx_node.args, strict=False))
        bound.update(fx_node.kwargs)
        shape = self.out_shape(source)  # type: ignore[arg-type]
        dims = bound.get("dim")
        dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
        if len(shape) < 3 or sorted(int(d) % len(shape) for d in dims) != list(
            range(2, len(shape))
        ):
            raise UnsupportedOpError(
                f"mean over dims {dims}",
                where,
                "Only the mean over every spatial axis (global average pooling) is supported.",
            )
        spatial = tuple(shape[2:])
        op, attrs, params = _avg_pool_node(shape[1], spatial, spatial, (0,) * len(spatial))
        if bound.get("keepdim", False):
            self.add(fx_node, op, (source,), attrs, params)  # type: ignore[arg-type]
            return True
        pool = Node(f"{fx_node.name}_pool", op, (self.names[source],), attrs, params, where)
        self.nodes.append(pool)
        reshape = Node(fx_node.name, "reshape", (pool.name,), {"shape": (shape[1],)}, {}, where)
        self.nodes.append(reshape)
        self.names[fx_node] = reshape.name
        return True

    def translate_slice(self, fx_node: torch.fx.Node, source: Any, key: Any, where: str) -> None:
        items = key if isinstance(key, tuple) else (key,)
        if (
            not items
            or items[0] != slice(None)
            or any(
                isinstance(i, torch.fx.Node) or not isinstance(i, (slice, int, type(Ellipsis)))
                for i in items
            )
        ):
            raise UnsupportedOpError(
                "indexing an encrypted tensor",
                where,
                "Only constant slices and integers after the batch axis (x[:, a:b]) move "
                "values without computing any.",
            )
        self.add_gather(fx_node, source, lambda a: a[items])

    def split_pieces(self, fx_node: torch.fx.Node, where: str) -> list[tuple[Any, ...]]:
        """The slices that ``chunk``/``split`` cut (read from the traced piece shapes)."""
        bound = dict(zip(("tensor", "sections", "dim"), fx_node.args, strict=False))
        bound.update(fx_node.kwargs)
        ndim = len(self.out_shape(fx_node.args[0]))
        dim = int(bound.get("dim", 0)) % ndim
        if dim == 0:
            raise UnsupportedOpError(
                f"{fx_node.target} along the batch axis", where, "Split along another axis."
            )
        metas = fx_node.meta.get("tensor_meta")
        sizes = [int(m.shape[dim]) for m in metas]  # type: ignore[union-attr]
        starts = np.cumsum([0] + sizes)
        return [
            (slice(None),) * dim + (slice(int(a), int(b)),) for a, b in itertools.pairwise(starts)
        ]

    def translate_activation(self, fx_node: torch.fx.Node) -> None:
        """An elementwise function or method: its row's attributes, from the call's
        arguments after ``x`` (or keywords), else the row's defaults."""
        args = fx_node.args
        if fx_node.op == "call_method":
            op, defaults = _ACTIVATION_METHODS[fx_node.target]  # type: ignore[index]
        else:
            op, defaults = _ACTIVATION_FUNCTIONS[fx_node.target]
        attrs = dict(defaults)
        names = list(defaults)
        for i, value in enumerate(args[1 : len(names) + 1]):
            attrs[names[i]] = value
        for key in names:
            if key in fx_node.kwargs:
                attrs[key] = fx_node.kwargs[key]
        attrs = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in attrs.items()}
        self.add(fx_node, op, (args[0],), attrs)  # type: ignore[arg-type]

    def translate_cat(self, fx_node: torch.fx.Node, where: str) -> None:
        tensors = fx_node.args[0] if fx_node.args else fx_node.kwargs.get("tensors")
        dim = fx_node.args[1] if len(fx_node.args) > 1 else None
        if dim is None:
            dim = fx_node.kwargs.get("dim", fx_node.kwargs.get("axis", 0))
        if not isinstance(tensors, (list, tuple)) or not all(self.is_tensor(t) for t in tensors):
            raise UnsupportedOpError(
                "torch.cat of constants and tensors",
                where,
                "Every concatenated tensor must be computed from the input.",
            )
        ndim = len(self.out_shape(fx_node))
        axis = int(dim) % ndim
        if axis == 0:
            raise UnsupportedOpError(
                "torch.cat along the batch axis", where, "Concatenate along another axis."
            )
        if len(tensors) == 1:
            self.add(fx_node, "identity", (tensors[0],))
            return
        self.add(fx_node, "concat", tuple(tensors), {"axis": axis})

    def batch_dim(self, fx_node: torch.fx.Node) -> int:
        return self.out_shape(fx_node)[0]

    def translate_constant_call(self, fx_node: torch.fx.Node, where: str) -> None:
        # Calls on constants or shapes only (x.size(0), weight * 2): evaluated now when
        # they are constants, skipped when they only feed reshapes.
        if fx_node.target is operator.getitem:
            return
        if any(isinstance(a, torch.fx.Node) and a not in self.constants for a in fx_node.args):
            return  # arithmetic on shapes (x.size(1) // groups): it only feeds reshapes
        values = [
            self.constants.get(a, a) if isinstance(a, torch.fx.Node) else a for a in fx_node.args
        ]
        fn = fx_node.target
        try:
            tensors = [torch.as_tensor(v) if isinstance(v, np.ndarray) else v for v in values]
            result = getattr(tensors[0], fn)(*tensors[1:]) if isinstance(fn, str) else fn(*tensors)  # type: ignore[operator]
        except Exception as exc:
            raise UnsupportedOpError(str(fn), where, f"Could not fold a constant: {exc}") from None
        self.constants[fx_node] = _np(result) if isinstance(result, torch.Tensor) else result

    def translate_arithmetic(self, fx_node: torch.fx.Node, kind: str, where: str) -> None:
        args = list(fx_node.args)
        if kind == "neg":
            self.add(fx_node, "mul_const", (args[0],), {}, {"constant": np.array(-1.0)})
            return
        if len(args) != 2:
            raise UnsupportedOpError(kind, where)
        tensor_first = self.is_tensor(args[0])
        tensor_arg, other = (args[0], args[1]) if tensor_first else (args[1], args[0])
        value = self.constant_value(other)
        alpha = fx_node.kwargs.get("alpha", 1)
        if value is None and kind in ("add", "sub") and self.is_tensor(other):
            if alpha not in (1, -1):
                raise UnsupportedOpError(
                    f"{kind} of two encrypted tensors with alpha={alpha}",
                    where,
                    "Only x + y and x - y are supported; scale one operand by a layer.",
                )
            sign = int(alpha) if kind == "add" else -int(alpha)
            self.add(fx_node, "add", (args[0], args[1]), {"coefficients": (1, sign)})
            return
        if value is None and kind == "mul" and self.is_tensor(other):
            self.add(fx_node, "mul", (args[0], args[1]))
            return
        if value is None:
            raise UnsupportedOpError(
                f"{kind} of two encrypted tensors",
                where,
                "Quotients of two encrypted tensors are not supported; sums, differences "
                "and products are.",
            )
        if kind == "add":
            op, constant = "add_const", value * alpha
        elif kind == "sub" and tensor_first:
            op, constant = "add_const", -value * alpha
        elif kind == "mul":
            op, constant = "mul_const", value
        elif kind == "div" and tensor_first:
            op, constant = "mul_const", 1.0 / value
        else:  # constant - x or constant / x
            if kind == "sub":
                mul = Node(
                    f"{fx_node.name}_neg",
                    "mul_const",
                    (self.names[tensor_arg],),
                    {},
                    {"constant": np.array(-1.0)},
                    where,
                )
                self.nodes.append(mul)
                self.nodes.append(
                    Node(fx_node.name, "add_const", (mul.name,), {}, {"constant": value}, where)
                )
                self.names[fx_node] = fx_node.name
                return
            raise UnsupportedOpError("division by an encrypted tensor", where)
        self.add(fx_node, op, (tensor_arg,), {}, {"constant": constant})


def _dims_argument(fx_node: torch.fx.Node) -> tuple[int, ...]:
    """The axes of ``permute(*dims)``, ``permute(dims)`` or ``transpose(d0, d1)``."""
    args = fx_node.args[1:]
    if "dims" in fx_node.kwargs:
        args = (fx_node.kwargs["dims"],)
    elif "dim0" in fx_node.kwargs:
        args = (fx_node.kwargs["dim0"], fx_node.kwargs["dim1"])
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        args = tuple(args[0])
    return tuple(int(d) for d in args)  # type: ignore[arg-type]


def _hint_for(name: str) -> str:
    if "LayerNorm" in name or "layer_norm" in name:
        return (
            "Layer normalization divides by a statistic of the encrypted values themselves "
            "(x - mean) / sqrt(var + eps); see docs/DESIGN-NOTES.md section 16 for why it is "
            "refused: fold it into the layers around it, or use a batch norm (folded for free)."
        )
    if "3d" in name:
        return "3-dimensional layers are not supported yet (1-d and 2-d convolutions are)."
    if "Conv" in name or "Pool" in name or "BatchNorm" in name:
        return (
            "Supported: Conv1d, Conv2d, BatchNorm1d/2d, AvgPool1d/2d, AdaptiveAvgPool1d/2d, "
            "MaxPool1d/2d and AdaptiveMaxPool1d/2d."
        )
    if "Softmax" in name or "softmax" in name:
        return (
            "Remove the softmax from the module: argmax of the logits is the same, and "
            "the client can apply softmax after decryption."
        )
    return "See the supported layers in the fhe_quant.frontends.torch module documentation."


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    # NOTE: torch warns that padding="same" with an even kernel copies the input; that
    # is about torch's own speed when we run the model, not about the user's model.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using padding='same'", category=UserWarning)
        yield


def trace_module(module: nn.Module, sample: np.ndarray) -> Graph:
    """Trace ``module`` into a float :class:`Graph`.

    Args:
        module: a trained ``torch.nn.Module`` with one tensor input. It is not modified
            (a copy is traced in eval mode).
        sample: a float batch of inputs of shape ``(N, *input_shape)``, used to
            propagate shapes and to check the translation.

    Returns:
        The float graph, checked to agree with the module's eval-mode output.

    Raises:
        TraceError: the module cannot be traced symbolically.
        UnsupportedOpError: a layer or function is not supported (named, with its place).
    """
    if not isinstance(module, nn.Module):
        hint = (
            " Wrap a function in a torch.nn.Module whose forward calls it."
            if callable(module)
            else ""
        )
        raise ModelError(
            f"The model must be a torch.nn.Module; got {type(module).__name__} "
            f"({module!r:.60}).{hint}"
        )
    model = copy.deepcopy(module).eval().double()
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as exc:
        raise TraceError(
            f"torch.fx could not trace {type(module).__name__}: {exc}. Models with "
            "data-dependent control flow must be rewritten without it."
        ) from exc
    inputs = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise UnsupportedOpError(
            f"a module with {len(inputs)} inputs {inputs}",
            f"{type(module).__name__}.forward",
            "fhe_quant compiles modules with one tensor input: concatenate the inputs "
            "into one tensor (and split it inside forward).",
        )
    x = torch.as_tensor(np.asarray(sample[:2], dtype=np.float64))
    try:
        # NOTE: ShapeProp prints torch's traceback to stderr before re-raising; the
        # error below says what failed, so that print is swallowed.
        with _quiet_torch(), contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(gm).propagate(x)
    except Exception as exc:
        root: BaseException = exc
        while root.__cause__ is not None:
            root = root.__cause__
        raise TraceError(
            f"Running {type(module).__name__} on calibration data of shape {sample.shape} "
            f"failed: {root}. Check that the data has the shape the model expects."
        ) from exc
    translator = _Translator(model, gm)
    output: Any = None
    for fx_node in gm.graph.nodes:
        translator.translate(fx_node)
        if fx_node.op == "output":
            output = fx_node.args[0]
    if not isinstance(output, torch.fx.Node) or output not in translator.names:
        raise UnsupportedOpError(
            "a non-tensor or multiple outputs", "output", "The model must return a single tensor."
        )
    graph = Graph(
        tuple(translator.nodes),
        translator.nodes[0].name,
        translator.names[output],
        tuple(sample.shape[1:]),
    )
    _check_translation(model, graph, sample)
    return graph


def _check_translation(model: nn.Module, graph: Graph, sample: np.ndarray) -> None:
    x = np.asarray(sample[:64], dtype=np.float64)
    with torch.no_grad():
        with _quiet_torch():
            expected = model(torch.as_tensor(x)).numpy()
    difference = describe_mismatch(graph(x), expected, rtol=1e-6, atol=1e-8)
    if difference is None:
        return
    raise TraceError(
        f"The traced graph does not reproduce the module's output ({difference}); an "
        "operation was translated wrongly. Please report this with your model."
    )

"""Post-training quantization: a float :class:`~fhe_quant.ir.Graph` and calibration data
in, a :class:`QuantizedGraph` out.

Every graph (after :func:`fhe_quant.passes.simplify`), a chain or a branching one with
residual adds, concatenations or max pooling, gets one plan (:class:`QuantizedDag`,
see :func:`quantize_dag`): the quantizer of every tensor the program reads as codes and
the integer weights of every linear layer. A chain is also described, as a view of that
plan, by its segments, each a linear-kind layer (dense, convolution, average pooling)
followed by the elementwise and reshape operations up to the next one::

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

import dataclasses
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, get_args

import numpy as np

from fhe_quant.errors import CalibrationWarning, FHEQuantWarning, InputError, UnsupportedOpError
from fhe_quant.ir import OPS, ConvGeometry, Graph, Node, chain_source, plain_data
from fhe_quant.quant import axe
from fhe_quant.quant.calibrate import make_observer
from fhe_quant.quant.config import MAX_ACCUMULATOR_BITS, QuantConfig
from fhe_quant.quant.quantizer import MIN_SCALE, UniformQuantizer
from fhe_quant.quant.weights import fold_input_scale, unit_weight_quantizer, weight_quantizer
from fhe_quant.quant.widths import ProductPlan, bits_for, table_bits

__all__ = [
    "QuantizedLinear",
    "Segment",
    "QuantizedGraph",
    "quantize_graph",
    "check_calibration_data",
    "check_calibration_count",
    "MIN_CALIBRATION_SAMPLES",
    "AddOperand",
    "QuantizedDag",
    "quantize_dag",
    "is_chain",
    "is_dense_chain",
    "accumulator_aware_weights",
    "AddScaling",
    "channel_vector",
    "chain_plan",
    "LayerInput",
    "budgeted_weights",
    "auto_accumulator_bits",
    "model_accumulator_bits",
    "AccumulatorFallbackWarning",
]


class AccumulatorFallbackWarning(FHEQuantWarning):
    """``accumulator_bits="auto"`` could not bound a layer, whose weights are then
    rounded to nearest (the warning names the layer and the reason)."""


class _PlanData:
    """The data form every class of the plan shares (:class:`QuantizedGraph` and what it
    holds): its dataclass fields as JSON values and NumPy arrays (tuples as lists), read
    back field by field by declared type (:data:`_LEAVES`; ``X | None``, ``tuple[X, ...]``
    and ``Mapping[str, X]`` of them)."""

    def to_dict(self) -> dict[str, Any]:
        """Its fields as data; :meth:`from_dict` inverts it."""
        return plain_data(asdict(self))  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: Any) -> Any:
        """Rebuild it from :meth:`to_dict` output, checking every field's type.

        Raises:
            InputError: unknown or missing keys, or a value of the wrong type (naming the
                field, e.g. ``QuantizedGraph.dag.linears['fc'].weight_q``), or values the
                constructors refuse.
        """
        return _plan_from_dict(cls, data, cls.__name__)


@dataclass(frozen=True, eq=False)
class QuantizedLinear(_PlanData):
    """A linear layer with integer weights.

    Attributes:
        node: the float node (its bias stays float: it is folded into the next table or
            applied by the client).
        weight_q: the integer weights, same layout as ``node.params["weight"]``; they
            approximate ``weight * input scale`` (the input scales are folded in).
        weight_quantizer: symmetric signed quantizer of the folded weights (per channel
            on axis 0, or per tensor; always per channel and exact for pooling).
        input_quantizer: unsigned quantizer of the codes entering the layer (for a
            concatenation or a reshape of codes, one scale and zero point per input
            feature); ``None`` when the layer reads a sum of codes (a residual add).
        scaling: how the layer's accumulator enters a residual add, when it does.
    """

    node: Node
    weight_q: np.ndarray
    weight_quantizer: UniformQuantizer
    input_quantizer: UniformQuantizer | None
    scaling: AddScaling | None = None


@dataclass(frozen=True, eq=False)
class AddScaling(_PlanData):
    """A linear layer whose raw accumulator enters a residual add (``mode="acc"``): its
    weight scales are integer ratios of the add's common scale ``s``, per output channel
    ``s / m`` or ``k * s``; the add multiplies the accumulator by ``accumulator`` (``k``,
    else 1) and the codes operands by ``codes`` (``m``, else 1), and the sum's scale per
    channel is ``unit``."""

    accumulator: np.ndarray
    codes: np.ndarray
    unit: np.ndarray


@dataclass(frozen=True, eq=False)
class Segment(_PlanData):
    """A linear layer and the elementwise/reshape chain after it.

    ``output_quantizer`` quantizes the chain's output for the next linear layer; it is
    ``None`` for the last segment, whose chain runs on the client in float.
    """

    linear: QuantizedLinear
    chain: tuple[Node, ...]
    output_quantizer: UniformQuantizer | None


@dataclass(frozen=True, eq=False)
class QuantizedGraph(_PlanData):
    """The quantized model: client pre-processing, segments, client post-processing.

    A chain graph is described by its ``segments`` (a view of its plan, which
    :attr:`plan` rebuilds; QAT and the estimators' pickles build chains this way); a
    branching graph (residual adds, concatenations, max pooling) by ``dag`` (its
    ``segments`` are then empty). The lowering reads :attr:`plan` only.
    """

    graph: Graph
    pre: tuple[Node, ...]
    segments: tuple[Segment, ...]
    config: QuantConfig
    dag: QuantizedDag | None = None

    @property
    def input_quantizer(self) -> UniformQuantizer:
        if self.dag is not None:
            return self.dag.input_quantizer
        return self.segments[0].linear.input_quantizer

    @property
    def post(self) -> tuple[Node, ...]:
        if self.dag is not None:
            return self.dag.post
        return self.segments[-1].chain

    @property
    def plan(self) -> QuantizedDag:
        """The plan of any graph: ``dag``, or the plan of the chain ``segments``."""
        return self.dag if self.dag is not None else chain_plan(self.pre, self.segments)


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


#: Below this many calibration samples, quantization ranges are unreliable: a warning.
MIN_CALIBRATION_SAMPLES = 100


def check_calibration_count(x: np.ndarray) -> np.ndarray:
    """Refuse fewer than 2 calibration samples; warn below :data:`MIN_CALIBRATION_SAMPLES`.

    Raises:
        InputError: fewer than 2 samples (no range can be measured from one).

    Examples:
        >>> check_calibration_count(np.zeros((1, 3)))
        Traceback (most recent call last):
        ...
        fhe_quant.errors.InputError: The calibration data holds 1 sample; at least 2 ...
    """
    n = len(x)
    if n < 2:
        raise InputError(
            f"The calibration data holds {n} sample; at least 2 are needed (and "
            f"{MIN_CALIBRATION_SAMPLES} or more for reliable ranges): pass the training data "
            "or a representative sample of it."
        )
    if n < MIN_CALIBRATION_SAMPLES:
        warnings.warn(
            f"The calibration data holds only {n} samples: the quantization ranges may miss "
            f"values seen later (clipped, less accurate). Pass {MIN_CALIBRATION_SAMPLES} or "
            "more representative samples.",
            CalibrationWarning,
            stacklevel=3,
        )
    return x


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


def _silence_dead_features(quantizer: UniformQuantizer, *arrays: np.ndarray) -> UniformQuantizer:
    """Features that were exactly 0 on every calibration sample (of every array the
    quantizer serves) get the smallest scale.

    A feature calibrated to ``[0, 0]`` (a ReLU channel never active, a constant pixel)
    would otherwise get scale 1.0, and folding that scale into the next layer's weights
    would inflate their per-row maximum and coarsen every other weight of the row (a
    hypothesis case saw a 0.39 error on a 1.3 range). With the smallest scale its folded
    weights quantize to 0: the feature counts as 0, as clipping to its calibrated range
    makes it anyway.
    """
    if quantizer.axis is None:
        return quantizer
    dead = None
    for values in arrays:
        axis = quantizer.axis % values.ndim
        other = tuple(d for d in range(values.ndim) if d != axis)
        zero = np.all(values == 0, axis=other)
        dead = zero if dead is None else dead & zero
    assert dead is not None
    if not dead.any():
        return quantizer
    scale = np.where(dead, MIN_SCALE, np.asarray(quantizer.scale, dtype=np.float64))
    return dataclasses.replace(quantizer, scale=tuple(float(s) for s in scale))


@dataclass(frozen=True, eq=False)
class LayerInput:
    """What a linear layer reads on the calibration data, for accumulator-aware weights.

    Attributes:
        x: the float values in units of the input scale (``x / s_in``).
        x_q: the codes the integer program sees, less their zero point (``q - z``).
        code_range: the width of the proven interval of the codes (``qmax`` for the
            codes of one quantizer; ``n * qmax`` for a sum of ``n`` of them).
    """

    x: np.ndarray
    x_q: np.ndarray
    code_range: int

    @staticmethod
    def of(
        values: np.ndarray, quantizer: UniformQuantizer, seen: np.ndarray | None = None
    ) -> LayerInput:
        """The codes of one quantizer; ``seen``: the values the quantized model computes
        there (default: the float ``values``)."""
        ndim = values.ndim
        seen = values if seen is None else seen
        x_q = quantizer.quantize(seen) - quantizer.zero_point_array(ndim)
        x = values / quantizer.scale_array(ndim)
        return LayerInput(x, x_q.astype(np.float64), quantizer.qmax)


def _calibration_columns(
    node: Node, layer: LayerInput
) -> list[tuple[slice, np.ndarray, np.ndarray]]:
    """The activations every group of output channels reads, as ``(rows, x, x_q)``
    (see :class:`LayerInput`), both ``(samples [x positions], columns)`` matching the
    weight's ``(out, in / groups * kernel)`` flattening."""
    x, x_q = layer.x, layer.x_q
    weight = node.params["weight"]
    out = weight.shape[0]
    if node.op != "conv":
        return [(slice(0, out), x.reshape(-1, x.shape[-1]), x_q.reshape(-1, x.shape[-1]))]
    g = ConvGeometry.from_attrs(node.attrs)
    kernel = tuple(weight.shape[2:])
    shape = (g.stride, g.padding, g.dilation)
    patches, patches_q = axe.im2col(x, kernel, *shape), axe.im2col(x_q, kernel, *shape)
    per_group, out_group = weight.shape[1], out // g.groups
    columns = []
    for group in range(g.groups):
        channels = slice(group * per_group, (group + 1) * per_group)
        columns.append(
            (
                slice(group * out_group, (group + 1) * out_group),
                patches[:, channels].reshape(len(patches), -1),
                patches_q[:, channels].reshape(len(patches), -1),
            )
        )
    return columns


def _check_fixed_accumulator(
    node: Node, weight_q: np.ndarray, code_range: int, config: QuantConfig
) -> None:
    """An average pooling's weights are fixed (all 1): its accumulator must fit as is
    (with ``accumulator_bits="auto"`` it is what it is)."""
    if not isinstance(config.accumulator_bits, int):
        return
    widest = int(axe.proven_range(weight_q, code_range).max())
    if widest > 2**config.accumulator_bits - 1:
        raise axe.AccumulatorBudgetError(
            _where(node),
            config.accumulator_bits,
            widest.bit_length(),
            f"its fixed weights (a sum of {widest // code_range} codes) reach {widest}",
        )


def accumulator_aware_weights(
    node: Node,
    weight: np.ndarray,
    values: np.ndarray,
    input_quantizer: UniformQuantizer,
    bits: int,
    config: QuantConfig,
    table_bits: int | None = None,
) -> tuple[np.ndarray, UniformQuantizer]:
    """Integer weights of a linear layer whose proven accumulator fits
    ``config.accumulator_bits`` (see :mod:`fhe_quant.quant.axe`), their roundings chosen
    on the calibration ``values`` entering the layer; ``table_bits`` is the width of the
    table after it (``None`` for the last layer), for which the budget keeps rounding
    room.

    Raises:
        AccumulatorBudgetError: the width leaves no room for a single non-zero weight.
    """
    layer = LayerInput.of(values, input_quantizer)
    return budgeted_weights(node, weight, layer, bits, config, table_bits)


def budgeted_weights(
    node: Node,
    weight: np.ndarray,
    layer: LayerInput,
    bits: int,
    config: QuantConfig,
    table_bits: int | None = None,
    width: int | None = None,
) -> tuple[np.ndarray, UniformQuantizer]:
    """:func:`accumulator_aware_weights` of a layer reading ``layer``, at ``width`` bits
    (default ``config.accumulator_bits``; for ``"auto"``, the width
    :func:`auto_accumulator_bits` picks for this layer alone)."""
    assert config.accumulator_bits is not None
    qmax = 2 ** (bits - 1) - 1
    flat = weight.reshape(len(weight), -1)
    columns = _subsampled_columns(node, layer)
    accumulator_bits = config.accumulator_bits if width is None else width
    if accumulator_bits == "auto":
        accumulator_bits = auto_accumulator_bits(flat, columns, layer, qmax, table_bits)
    assert isinstance(accumulator_bits, int)
    budget = axe.l1_budget(accumulator_bits, layer.code_range, table_bits)
    if budget < 1:
        raise axe.AccumulatorBudgetError(
            _where(node),
            accumulator_bits,
            axe.smallest_accumulator_bits(layer.code_range, table_bits),
        )
    q, scale, _ = _budget_rows(flat, columns, qmax, budget)
    quantizer = UniformQuantizer(
        bits=bits,
        scale=tuple(float(s) for s in scale),
        zero_point=(0,) * len(scale),
        signed=True,
        narrow_range=True,
        axis=0,
    )
    return q.reshape(weight.shape), quantizer


_Columns = list[tuple[slice, np.ndarray, np.ndarray]]

#: :func:`auto_accumulator_bits` stops widening once the SQNR is this far below its best.
AUTO_PAST_PEAK_DB = 6.0


def _subsampled_columns(node: Node, layer: LayerInput) -> _Columns:
    """:func:`_calibration_columns`, each at most ``axe.MAX_CALIBRATION_ROWS`` rows
    (subsampled deterministically)."""
    rng = np.random.default_rng(0)
    columns = []
    for rows, x, x_q in _calibration_columns(node, layer):
        if len(x) > axe.MAX_CALIBRATION_ROWS:
            keep = np.sort(rng.choice(len(x), axe.MAX_CALIBRATION_ROWS, replace=False))
            x, x_q = x[keep], x_q[keep]
        columns.append((rows, x, x_q))
    return columns


def _budget_rows(
    flat: np.ndarray,
    columns: _Columns,
    qmax: int,
    budget: int,
    multipliers: tuple[float, ...] = axe.SCALE_MULTIPLIERS,
    lsbs: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integer weights, scales and :func:`~fhe_quant.quant.axe.layer_error` of every row
    of ``flat`` under an l1 ``budget`` (``lsbs``: the bits dropped before the table)."""
    q = np.zeros(flat.shape, dtype=np.int64)
    scale, error = np.ones(len(flat)), np.zeros(len(flat))
    for rows, x, x_q in columns:
        # NOTE: a column 0 on every calibration row (a dead feature, clipped to 0) gets
        # weight 0, so that its (tiny, folded) weight cannot move the row's budget scale.
        dead = ~np.any(x, axis=0) & ~np.any(x_q, axis=0)
        weight = np.where(dead, 0.0, flat[rows])
        # NOTE: the budget binds every output channel separately, so the scales are per
        # channel even with per_channel=False (they cost nothing in FHE).
        q[rows], scale[rows] = axe.quantize_rows(weight, x, x_q, qmax, budget, True, multipliers)
        error[rows] = axe.layer_error(weight, q[rows], scale[rows], x, x_q, lsbs)
    return q, scale, error


def auto_accumulator_bits(
    flat: np.ndarray, columns: _Columns, layer: LayerInput, qmax: int, table_bits: int | None
) -> int:
    """``accumulator_bits="auto"`` for one layer: among the widths from the smallest that
    fits one weight up to ``MAX_ACCUMULATOR_BITS``, the narrowest whose mean
    :func:`~fhe_quant.quant.axe.layer_error` is within
    :data:`~fhe_quant.quant.axe.AUTO_MARGIN` of the least
    (:func:`~fhe_quant.quant.axe.smallest_within`).

    The error is the layer's own, on the codes it reads (its float weights on the same
    codes are the reference, so the upstream error it cannot remove does not hide its
    own), and each width is tried with the plain budget scale only (the final weights
    then try every multiple)."""
    low = axe.smallest_accumulator_bits(layer.code_range, table_bits)
    local = [(rows, x_q, x_q) for rows, _, x_q in columns]
    signal = np.concatenate([np.var(x_q @ flat[rows].T, axis=0) for rows, _, x_q in columns])
    sqnr: dict[int, float] = {}
    for bits in range(low, max(low, MAX_ACCUMULATOR_BITS) + 1):
        budget = axe.l1_budget(bits, layer.code_range, table_bits)
        lsbs = max(0, bits - table_bits) if table_bits is not None else 0
        error = _budget_rows(flat, local, qmax, budget, (1.0,), lsbs)[2]
        sqnr[bits] = float(10 * np.log10(max(signal.mean(), 1e-300) / max(error.mean(), 1e-300)))
        if sqnr[bits] < max(sqnr.values()) - AUTO_PAST_PEAK_DB:
            # NOTE: past the peak the budget no longer binds (the weights are as fine as
            # their bits allow) and each wider bit only drops one more bit before the
            # table: the SQNR falls ~6 dB per bit from there, so wider widths cannot win.
            break
    return axe.smallest_within(sqnr)


def quantize_graph(graph: Graph, x_calib: np.ndarray, config: QuantConfig) -> QuantizedGraph:
    """Calibrate and quantize a simplified graph.

    Args:
        graph: a float graph after :func:`fhe_quant.passes.simplify`.
        x_calib: representative inputs, ``(N, *graph.input_shape)``.
        config: bits per role and calibration method.

    Returns:
        The quantized graph: its plan (:func:`quantize_dag`), as ``segments`` for a
        chain, as ``dag`` for a branching graph.
    """
    x_calib = check_calibration_count(check_calibration_data(x_calib, graph.input_shape))
    dag = quantize_dag(graph, graph.run(x_calib), config)
    if is_chain(graph):
        return QuantizedGraph(graph, dag.pre, chain_segments(graph, dag), config)
    return QuantizedGraph(graph, dag.pre, (), config, dag)


def chain_segments(graph: Graph, dag: QuantizedDag) -> tuple[Segment, ...]:
    """The segments of a chain graph's plan (see :class:`Segment`)."""
    _, parts = _split(graph)
    segments = []
    for index, (node, chain) in enumerate(parts):
        last = index == len(parts) - 1
        end = chain[-1].name if chain else node.name
        segments.append(Segment(dag.linears[node.name], chain, None if last else dag.tables[end]))
    return tuple(segments)


def chain_plan(pre: tuple[Node, ...], segments: tuple[Segment, ...]) -> QuantizedDag:
    """The plan of a chain described by its segments: a table after every segment but
    the last, producing the codes the next linear layer reads."""
    first, last = segments[0].linear, segments[-1]
    assert first.input_quantizer is not None
    tables = {}
    for segment in segments[:-1]:
        assert segment.output_quantizer is not None
        end = segment.chain[-1].name if segment.chain else segment.linear.node.name
        tables[end] = segment.output_quantizer
    return QuantizedDag(
        first.node.inputs[0],
        last.linear.node.name,
        pre,
        last.chain,
        first.input_quantizer,
        tables,
        {},
        {},
        {segment.linear.node.name: segment.linear for segment in segments},
    )


# --------------------------------------------------------------------------- branching graphs

AddMode = Literal["codes", "acc"]


@dataclass(frozen=True, eq=False)
class AddOperand(_PlanData):
    """One operand of a residual add.

    ``mode="codes"``: the operand enters as codes on the add's common quantizer (produced
    by a table, the input or a max pool on that quantizer: 0 lookups at the add);
    ``mode="acc"``: the operand is a linear layer's raw accumulator, whose weight scales
    are integer ratios of the common scale (0 lookups, see :class:`AddScaling`).
    """

    node: str
    sign: int
    mode: AddMode


@dataclass(frozen=True, eq=False)
class QuantizedDag(_PlanData):
    """The quantization plan of a graph, chain or branching (residual adds,
    concatenations, max pooling): which tensors tables produce, on which quantizers, and
    the integer weights of every linear layer. It is all the lowering reads.

    Attributes:
        input_name: the node whose value the client quantizes (the graph input, or the
            last client-side elementwise operation).
        output_name: the node whose value the program returns (a linear layer or an add);
            the client dequantizes it and runs ``post``.
        pre: client-side operations before ``input_name`` (elementwise, reshapes and
            max pools of the input: free in clear).
        post: client-side operations after ``output_name``.
        input_quantizer: the client's quantizer.
        tables: the nodes whose codes a table produces (fusing the elementwise operations
            since the last linear layer, add, concatenation or max pool), with the
            table's output quantizer. Tensors added together share one quantizer.
        adds: for every add node, how each operand enters.
        add_quantizers: for every add node, the common quantizer of its codes operands.
        linears: for every linear layer, its integer weights and their scales.
        products: for every product of two tensors, how it is computed.
    """

    input_name: str
    output_name: str
    pre: tuple[Node, ...]
    post: tuple[Node, ...]
    input_quantizer: UniformQuantizer
    tables: Mapping[str, UniformQuantizer]
    adds: Mapping[str, tuple[AddOperand, ...]]
    add_quantizers: Mapping[str, UniformQuantizer]
    linears: Mapping[str, QuantizedLinear] = field(default_factory=dict)
    products: Mapping[str, ProductPlan] = field(default_factory=dict)


def is_chain(graph: Graph) -> bool:
    """Whether ``graph`` is a chain of linear, elementwise and reshape operations (every
    node read at most once): the graphs :class:`Segment` describes."""
    for node in graph.nodes:
        if node.kind not in ("input", "linear", "elementwise", "reshape"):
            return False
        if len(graph.users(node.name)) > 1:
            return False
    return True


def is_dense_chain(graph: Graph) -> bool:
    """Whether ``graph`` is a chain (:func:`is_chain`) whose linear layers are all dense:
    the models ``accumulator_bits="auto"`` is the default for. A convolution reads all
    its pixels through one input quantizer, and on the digits CNN with per-pixel
    standardized inputs (values up to 36 standard deviations) the 4-bit tables of
    "auto" lost 46 points (45.8% against 91.6%; 44.7% with 4-bit tables and no budget),
    so convolutional chains keep ``None`` unless asked (docs/DESIGN-NOTES.md section 19)."""
    return is_chain(graph) and all(
        node.op == "linear" for node in graph.nodes if node.kind == "linear"
    )


def _where(node: Node) -> str:
    return node.source or node.name


class _DagPlanner:
    """Decides, from the output backwards, which values the program materializes."""

    def __init__(self, graph: Graph, input_name: str, accumulate: bool = True) -> None:
        self.graph = graph
        self.input_name = input_name
        self.accumulate = accumulate  # may a linear layer's accumulator enter an add?
        self.visited: set[str] = set()
        # codes producer -> channel axes its users need (None: per tensor)
        self.axes: dict[str, set[int | None]] = {}
        self.tables: list[str] = []
        self.adds: dict[str, tuple[AddOperand, ...]] = {}
        self.parent: dict[str, str] = {}  # union-find of codes producers sharing a quantizer
        probe = self._probe()
        self.ndim = {n.name: v.ndim for n, v in zip(graph.nodes, probe, strict=True)}
        self.shapes = {n.name: v.shape[1:] for n, v in zip(graph.nodes, probe, strict=True)}

    def _probe(self) -> list[np.ndarray]:
        values = self.graph.run(np.zeros((1,) + self.graph.input_shape))
        return [values[n.name] for n in self.graph.nodes]

    # -- union-find
    def find(self, name: str) -> str:
        while self.parent.get(name, name) != name:
            name = self.parent[name]
        return name

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra

    # -- demands
    def raw(self, name: str) -> None:
        """The value of ``name`` as its operation computes it (linear, add, concat, max
        pool)."""
        if name in self.visited:
            return
        self.visited.add(name)
        node = self.graph.node(name)
        if node.kind == "linear":
            axis = OPS[node.op].channel_axis % self.ndim[node.inputs[0]]
            self.codes(node.inputs[0], axis)
        elif node.kind == "max_pool":
            self.codes(node.inputs[0], 1)
        elif node.kind == "concat":
            for operand in node.inputs:
                self.codes(operand, 1)
        elif node.kind == "add":
            self.plan_add(node)
        elif node.kind == "gather":
            self.codes(node.inputs[0], self.gather_axis(node))
        elif node.kind == "mul":
            for operand in node.inputs:
                ndim = self.ndim[operand]
                self.codes(operand, 1 if ndim in (2, 4) else None)  # type: ignore[arg-type]
        else:  # pragma: no cover - callers only ask for these kinds
            raise AssertionError(node.kind)

    def gather_axis(self, node: Node) -> int | None:
        """The axis the codes a gather moves are quantized along: the channel axis (1)
        when the gather keeps channels apart (a channel permutation, an upsampling, a
        transpose before a dense layer), else per tensor (``None``)."""
        in_shape = self.shapes[node.inputs[0]]
        out_shape = tuple(node.attrs["shape"])
        channel = node.params["index"].astype(np.int64) // int(np.prod(in_shape[1:]))
        channel = channel.reshape(out_shape)
        if len(out_shape) == 1:
            return 1
        flat = channel.reshape(out_shape[0], -1)
        return 1 if bool(np.all(flat == flat[:, :1])) else None

    def codes(self, name: str, axis: int | None) -> None:
        """The value of ``name`` as unsigned codes (for a linear layer, max pool, concat
        or add); a table produces them unless they already are."""
        node = self.graph.node(name)
        if name == self.input_name:
            self.axes.setdefault(name, set()).add(axis)
            return
        if node.kind in ("max_pool", "concat", "gather", "mul"):
            self.raw(name)
            return
        if node.kind == "add":
            self.raw(name)
            if self.pure_add(name):
                return
        if node.kind == "reshape":
            source, chain = chain_source(self.graph, name, self.input_name)
            if all(n.kind == "reshape" for n in chain) and self.is_codes(source):
                self.codes(source, 1)
                return
        if name not in self.tables:
            self.tables.append(name)
        self.axes.setdefault(name, set()).add(axis)
        source, _ = chain_source(self.graph, name, self.input_name)
        if source == name:  # a linear layer or an add re-quantized by an empty chain
            self.raw(name)
        elif source == self.input_name:
            self.codes(source, 1)
        else:
            self.raw(source)

    def is_codes(self, name: str) -> bool:
        node = self.graph.node(name)
        if name == self.input_name or node.kind in ("max_pool", "concat", "gather", "mul"):
            return True
        if node.kind == "add":
            self.raw(name)
            return self.pure_add(name)
        return False

    def pure_add(self, name: str) -> bool:
        """An add of codes only: its sum is codes too (one bit wider, same scale), which
        a linear layer or a max pool reads at no cost."""
        return all(o.mode == "codes" for o in self.adds[name])

    def plan_add(self, node: Node) -> None:
        coefficients = node.attrs["coefficients"]
        operands = []
        trick = None
        linears = [
            i for i, operand in enumerate(node.inputs) if self._accumulator_fits(operand, node)
        ]
        if linears:
            trick = linears[0]  # the others enter as codes: at least one operand does
        for i, (operand, sign) in enumerate(zip(node.inputs, coefficients, strict=True)):
            mode: AddMode = "acc" if i == trick else "codes"
            operands.append(AddOperand(operand, int(sign), mode))
        self.adds[node.name] = tuple(operands)
        for operand in operands:
            if operand.mode == "acc":
                self.raw(operand.node)
            else:
                self.codes(operand.node, 1)
                for producer in self.producers(operand.node, node):
                    self.union(node.name, producer)

    def _accumulator_fits(self, operand: str, add: Node) -> bool:
        node = self.graph.node(operand)
        return (
            self.accumulate
            and node.kind == "linear"
            and not OPS[node.op].unit_weights
            and [u.name for u in self.graph.users(operand)] == [add.name]
            and OPS[node.op].channel_axis % self.ndim[operand] == 1
        )

    def producers(self, name: str, add: Node) -> list[str]:
        """The tables (or input) whose quantizer the codes of ``name`` are on."""
        node = self.graph.node(name)
        if name == self.input_name or name in self.tables:
            return [name]
        if node.kind == "max_pool":
            return self.producers(node.inputs[0], add)
        if node.kind == "add":
            return [name]  # a pure add: its own group
        raise UnsupportedOpError(
            f"a residual add of a {node.kind} result",
            _where(add),
            "The operands of an add must come from a layer, an activation or a max pool; "
            "apply an activation (or add) before concatenating or reshaping.",
        )


def _dag_pre_post(graph: Graph) -> tuple[list[Node], str, list[Node], str]:
    pre: list[Node] = []
    current = graph.input_name
    while current != graph.output_name:
        users = graph.users(current)
        # NOTE: a max pool of the input runs on the client, in clear, like activations.
        if len(users) != 1 or users[0].kind not in ("elementwise", "reshape", "max_pool"):
            break
        pre.append(users[0])
        current = users[0].name
    post: list[Node] = []
    node = graph.node(graph.output_name)
    while node.kind in ("elementwise", "reshape") and node.name != current:
        if len(graph.users(node.inputs[0])) != 1:
            break
        post.insert(0, node)
        node = graph.node(node.inputs[0])
    if node.kind not in ("linear", "add"):
        raise UnsupportedOpError(
            f"a model whose encrypted part ends with a {node.kind} operation",
            _where(node),
            "The last encrypted operation must be a linear layer or a residual add "
            "(elementwise operations after it run on the client).",
        )
    return pre, current, post, node.name


def _observe(method: str, axis: int | None, arrays: list[np.ndarray]) -> Any:
    observer = make_observer(method, axis=axis)
    for array in arrays:
        observer.observe(array)
    return observer


def quantize_dag(
    graph: Graph, values: Mapping[str, np.ndarray], config: QuantConfig
) -> QuantizedDag:
    """Plan the quantization of a graph (see :class:`QuantizedDag`).

    Every tensor read as codes gets an unsigned quantizer calibrated on the float model's
    values there, per channel (axis 1, or the last axis for a dense layer) by default;
    the operands of an add share one quantizer, calibrated on all of them, so that the
    add needs no lookup. Then every linear layer gets its integer weights
    (:func:`quantize_linears`), with its input's scales folded in.

    With ``config.accumulator_bits``, no linear layer's accumulator enters an add as it
    is (its weight scales would have to be integer ratios of the add's scale, which the
    accumulator-aware weights choose themselves): every operand of an add is codes.
    """
    if not any(n.kind == "linear" for n in graph.nodes):
        raise UnsupportedOpError(
            "a model without a linear layer",
            "model",
            "fhe_quant compiles models with at least one Linear layer.",
        )
    pre, input_name, post, output_name = _dag_pre_post(graph)
    planner = _DagPlanner(graph, input_name, accumulate=config.accumulator_bits is None)
    planner.raw(output_name)
    quantizers = _plan_quantizers(planner, values, config)
    dag = QuantizedDag(
        input_name,
        output_name,
        tuple(pre),
        tuple(post),
        quantizers[input_name],
        {name: quantizers[name] for name in planner.tables},
        dict(planner.adds),
        {add: quantizers[planner.find(add)] for add in planner.adds},
    )
    codes = _Codes(graph, dag, values)
    bits = max(bits_for(dag.input_quantizer.qmax), config.n_bits_activations) + 2
    products = {
        n.name: codes.product_plan(n, bits)
        for n in graph.nodes
        if n.kind == "mul" and n.name in planner.visited
    }
    dag = dataclasses.replace(dag, products=products)
    used = [n for n in graph.nodes if n.kind == "linear" and n.name in planner.visited]
    return dataclasses.replace(dag, linears=quantize_linears(graph, dag, used, values, config))


def _plan_quantizers(
    planner: _DagPlanner, values: Mapping[str, np.ndarray], config: QuantConfig
) -> dict[str, UniformQuantizer]:
    """The quantizer of every codes producer (the input, the tables), and of every root
    of a group of tensors added together."""
    per_channel = config.per_channel_activations

    def axis_of(name: str) -> int | None:
        axes = planner.axes.get(name, {1})
        return next(iter(axes)) if per_channel and len(axes) == 1 else None

    producers = [planner.input_name, *planner.tables]
    components: dict[str, list[str]] = {}
    for name in producers:
        components.setdefault(planner.find(name), []).append(name)
    grouped = {planner.find(add) for add in planner.adds}
    quantizers: dict[str, UniformQuantizer] = {}
    for root, members in components.items():
        if root in grouped:
            # Tensors added together share one quantizer, on the channel axis.
            axis = 1 if per_channel and all(axis_of(m) == 1 for m in members) else None
        else:
            (name,) = members
            axis = axis_of(name)
        inputs = planner.input_name in members
        bits = config.n_bits_inputs if inputs else config.n_bits_activations
        observer = _observe(config.calibration, axis, [values[m] for m in members])
        quantizer = observer.quantizer(bits, signed=False, symmetric=False)
        quantizer = _silence_dead_features(quantizer, *(values[m] for m in members))
        for member in members:
            quantizers[member] = quantizer
        quantizers[root] = quantizer
    return quantizers


# --------------------------------------------------------------------------- linear layers


def channel_vector(array: np.ndarray, axis: int, node: Node, what: str) -> np.ndarray:
    """The per-channel values of a ``(1, *shape)`` array along ``axis``; refuses arrays
    that vary along the other axes (they would not fold into the weights).

    Raises:
        UnsupportedOpError: the values vary within a channel (names ``node``).
    """
    moved = np.moveaxis(array[0], axis - 1, 0).reshape(array.shape[axis], -1)
    if not np.all(moved == moved[:, :1]):
        raise UnsupportedOpError(
            f"a {node.op} whose input {what} varies within a channel",
            _where(node),
            "Its input mixes tensors quantized per channel along another axis (a "
            "concatenation or reshape); add an activation before it.",
        )
    return moved[:, 0]


class _Codes:
    """The scale and zero point of every element of the codes the program computes
    (arrays shaped ``(1, *shape)``), as the lowering will derive them: from the input's
    and the tables' quantizers, through reshapes, max pools and concatenations; a sum of
    codes (an add) is on the add's common scale, its zero point is the lowering's."""

    def __init__(self, graph: Graph, dag: QuantizedDag, values: Mapping[str, np.ndarray]):
        self.graph, self.dag = graph, dag
        self.shapes = {name: (1,) + tuple(v.shape[1:]) for name, v in values.items()}
        self.memo: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}

    def quantizer(self, name: str) -> UniformQuantizer | None:
        """The quantizer of the codes ``name`` when one quantizer produced them."""
        node = self.graph.node(name)
        if name == self.dag.input_name:
            return self.dag.input_quantizer
        if name in self.dag.tables:
            return self.dag.tables[name]
        if node.kind == "max_pool":
            return self.quantizer(node.inputs[0])
        return None

    def arrays(self, name: str) -> tuple[np.ndarray, np.ndarray | None]:
        """``(scale, zero)`` of the codes ``name``; ``zero`` is ``None`` for a sum."""
        if name not in self.memo:
            self.memo[name] = self._arrays(name)
        return self.memo[name]

    def _arrays(self, name: str) -> tuple[np.ndarray, np.ndarray | None]:
        node, shape = self.graph.node(name), self.shapes[name]
        quantizer = self.quantizer(name) if node.kind != "max_pool" else None
        if quantizer is not None:
            ndim = len(shape)
            zero = np.broadcast_to(quantizer.zero_point_array(ndim), shape)
            return np.broadcast_to(quantizer.scale_array(ndim), shape), zero
        if node.kind == "reshape":
            source, _ = chain_source(self.graph, name, self.dag.input_name)
            scale, zero = self.arrays(source)
            return scale.reshape(shape), None if zero is None else zero.reshape(shape)
        if node.kind == "max_pool":
            scale, zero = self.arrays(node.inputs[0])
            channel = (1, -1) + (1,) * (len(shape) - 2)
            scale = np.broadcast_to(channel_vector(scale, 1, node, "scale").reshape(channel), shape)
            if zero is not None:
                zero = channel_vector(zero, 1, node, "zero point").reshape(channel)
                zero = np.broadcast_to(zero, shape)
            return scale, zero
        if node.kind == "concat":
            parts = [self.arrays(operand) for operand in node.inputs]
            axis = int(node.attrs["axis"])
            zeros = [zero for _, zero in parts]
            zero = None if any(z is None for z in zeros) else np.concatenate(zeros, axis=axis)
            return np.concatenate([scale for scale, _ in parts], axis=axis), zero
        if node.kind == "gather":
            return self._gathered(node)
        if node.kind == "mul":
            (scale_a, _), (scale_b, _) = (self.arrays(operand) for operand in node.inputs)
            factor = self.dag.products[name].factor
            return np.broadcast_to(scale_a * scale_b / (4 * factor), shape), None
        common = self.dag.add_quantizers[name]  # a sum of codes
        return np.broadcast_to(common.scale_array(len(shape)), shape), None

    def _gathered(self, node: Node) -> tuple[np.ndarray, np.ndarray | None]:
        """``(scale, zero)`` of a gather's codes: its source's, moved as the values are."""
        index = node.params["index"].astype(np.int64)
        shape = self.shapes[node.name]

        def moved(array: np.ndarray) -> np.ndarray:
            flat = np.broadcast_to(array, self.shapes[node.inputs[0]]).reshape(1, -1)
            return flat[:, index].reshape(shape)

        scale, zero = self.arrays(node.inputs[0])
        return moved(scale), None if zero is None else moved(zero)

    def bound(self, name: str) -> int:
        """The largest code of the codes ``name`` (its quantizer's capacity, at least the
        maximum the lowering proves)."""
        node = self.graph.node(name)
        quantizer = self.quantizer(name)
        if quantizer is not None:
            return quantizer.qmax
        if node.kind == "reshape":
            return self.bound(chain_source(self.graph, name, self.dag.input_name)[0])
        if node.kind == "gather":
            return self.bound(node.inputs[0])
        if node.kind == "concat":
            return max(self.bound(operand) for operand in node.inputs)
        raise UnsupportedOpError(  # a sum or a product of codes: no quantizer of its own
            f"a product of an encrypted {node.kind}",
            _where(node),
            "Each factor of a product must be codes of one quantizer; add an activation "
            "(or any elementwise operation) before the product.",
        )

    def product_plan(self, node: Node, bits: int) -> ProductPlan:
        """How the product ``node`` of two tensors of codes is computed (the factor of its
        squares on ``bits`` bits, from its operands' bounds and zero points)."""
        a, b = node.inputs
        bound_a, bound_b = self.bound(a), self.bound(b)
        shape = self.shapes[node.name]
        (_, zero_a), (_, zero_b) = self.arrays(a), self.arrays(b)
        if zero_a is None or zero_b is None:  # pragma: no cover - bound() refused sums
            raise AssertionError(f"a sum entering {node.name}")
        zero_sum = np.broadcast_to(zero_a, shape) + np.broadcast_to(zero_b, shape)
        return ProductPlan.of(bound_a, bound_b, zero_sum, bits)

    def layer_input(
        self,
        node: Node,
        values: Mapping[str, np.ndarray],
        seen: Mapping[str, np.ndarray] | None = None,
    ) -> LayerInput | None:
        """What ``node`` reads on the calibration data: the codes of its input quantizer,
        or a sum of codes (a residual add of codes only, all on the add's quantizer);
        ``None`` for other sums (a max pool of a sum). The codes are those of ``seen``
        (the quantized model's values, :class:`_QuantizedPath`) when given, else of the
        float ``values``."""
        source = node.inputs[0]
        seen = values if seen is None else seen
        quantizer = self.input_quantizer(node)
        if quantizer is not None:
            return LayerInput.of(values[source], quantizer, seen[source])
        if source not in self.dag.adds:
            return None
        common = self.dag.add_quantizers[source]
        operands = self.dag.adds[source]
        ndim = values[source].ndim
        z = common.zero_point_array(ndim)
        x_q = sum(o.sign * (common.quantize(seen[o.node]) - z) for o in operands)
        x = values[source] / common.scale_array(ndim)
        return LayerInput(x, np.asarray(x_q, dtype=np.float64), len(operands) * common.qmax)

    def input_quantizer(self, node: Node) -> UniformQuantizer | None:
        """The quantizer of the codes a linear layer reads: the producer's, or one scale
        and zero point per input feature (a concatenation or reshape of codes)."""
        source = node.inputs[0]
        quantizer = self.quantizer(source)
        if quantizer is not None:
            return quantizer
        scale, zero = self.arrays(source)
        if zero is None:
            return None
        axis = OPS[node.op].channel_axis % scale.ndim
        scales = channel_vector(scale, axis, node, "scale")
        zeros = channel_vector(zero, axis, node, "zero point")
        bits = max(q.bits for q in [self.dag.input_quantizer, *self.dag.tables.values()])
        return UniformQuantizer(
            bits=bits,
            scale=tuple(float(v) for v in scales),
            zero_point=tuple(int(v) for v in zeros),
            axis=axis,
        )


def quantize_linears(
    graph: Graph,
    dag: QuantizedDag,
    nodes: list[Node],
    values: Mapping[str, np.ndarray],
    config: QuantConfig,
) -> dict[str, QuantizedLinear]:
    """The integer weights of the linear layers ``nodes`` of a planned graph, their input
    scales folded in (see the module docstring). Accumulator-aware weights are chosen in
    graph order against the quantized model's own values (:class:`_QuantizedPath`); with
    ``accumulator_bits="auto"`` at one width, :func:`model_accumulator_bits`."""
    codes = _Codes(graph, dag, values)
    path = _QuantizedPath(graph, dag, values, codes)
    last, into_add = _last_and_into_add(dag, graph)
    width = config.accumulator_bits
    if width == "auto":
        width = model_accumulator_bits(graph, dag, nodes, values, config)
    linears = {}
    for node in nodes:
        scale, _ = codes.arrays(node.inputs[0])
        s_in = channel_vector(scale, OPS[node.op].channel_axis % scale.ndim, node, "scale")
        folded = fold_input_scale(node, s_in)
        bits = config.n_bits_outputs if node.name in last else config.n_bits_weights
        input_quantizer = codes.input_quantizer(node)
        scaling = None
        if node.name in into_add:
            common = dag.add_quantizers[into_add[node.name]]
            w_quantizer, scaling = _add_scaled_weights(folded, bits, common)
            weight_q = w_quantizer.quantize(folded)
        else:
            table = None if node.name in last else _table_after(graph, dag, node, config)
            layer = None if width is None else codes.layer_input(node, values, path)
            weight_q, w_quantizer = _linear_weights(
                node, folded, layer, bits, config, table, width
            )
        linears[node.name] = QuantizedLinear(node, weight_q, w_quantizer, input_quantizer, scaling)
        path.linears[node.name] = linears[node.name]
    return linears


def _last_and_into_add(dag: QuantizedDag, graph: Graph) -> tuple[set[str], dict[str, str]]:
    """The layers whose accumulator is the program's output (no table after them), and
    those whose accumulator enters a residual add (layer name -> add name)."""
    output = graph.node(dag.output_name)
    if output.kind == "linear":
        last = {output.name}
    else:
        last = {o.node for o in dag.adds[output.name] if o.mode == "acc"}
    into_add = {o.node: add for add, ops in dag.adds.items() for o in ops if o.mode == "acc"}
    return last, into_add


def model_accumulator_bits(
    graph: Graph,
    dag: QuantizedDag,
    nodes: list[Node],
    values: Mapping[str, np.ndarray],
    config: QuantConfig,
) -> int:
    """``accumulator_bits="auto"``: the widest of the widths every accumulator-aware
    layer picks for itself (:func:`auto_accumulator_bits`, on the codes of the float
    model's values), at least 2.

    One width for the whole model: the circuit's widest accumulator sets the cost of
    every bootstrap, so a narrower layer saves only its own dropped-bit bootstraps while
    its coarser weights cost accuracy (digits MLP, 4-bit tables: widths 11/9/11 gave
    5.26e10 and 95.8%, 11/11/11 5.86e10 and 96.9%).
    """
    codes = _Codes(graph, dag, values)
    last, into_add = _last_and_into_add(dag, graph)
    widths = [2]
    for node in nodes:
        layer = codes.layer_input(node, values)
        if node.name in into_add or layer is None or OPS[node.op].unit_weights:
            continue
        scale, _ = codes.arrays(node.inputs[0])
        s_in = channel_vector(scale, OPS[node.op].channel_axis % scale.ndim, node, "scale")
        flat = fold_input_scale(node, s_in).reshape(len(node.params["weight"]), -1)
        bits = config.n_bits_outputs if node.name in last else config.n_bits_weights
        table = None if node.name in last else _table_after(graph, dag, node, config)
        columns = _subsampled_columns(node, layer)
        widths.append(auto_accumulator_bits(flat, columns, layer, 2 ** (bits - 1) - 1, table))
    return max(widths)


class _QuantizedPath:
    """The values the quantized model computes on the calibration data, as a read-only
    mapping by node name, evaluated in graph order as the linear layers get their
    integer weights (:func:`quantize_linears` quantizes them in that order).

    Accumulator-aware weights are chosen against these (GPFQ, Lybrand and Saab, 2021):
    each layer's roundings correct the error of the layers before it, not only its own.
    A table's output (and the program input) is its quantizer's codes, dequantized; a
    quantized linear layer computes with its integer weights on the codes it reads; the
    other operations (and a layer not yet quantized, or feeding a residual add as an
    accumulator) are evaluated in float. The dropped accumulator bits are not modelled.
    """

    def __init__(
        self, graph: Graph, dag: QuantizedDag, values: Mapping[str, np.ndarray], codes: _Codes
    ) -> None:
        self.graph, self.dag, self.values, self.codes = graph, dag, values, codes
        self.linears: dict[str, QuantizedLinear] = {}
        self.seen: dict[str, np.ndarray] = {n.name: values[n.name] for n in dag.pre}
        self.order = {n.name: i for i, n in enumerate(graph.nodes)}

    def __getitem__(self, name: str) -> np.ndarray:
        for node in self.graph.nodes[: self.order[name] + 1]:
            if node.name not in self.seen:
                self.seen[node.name] = self._evaluate(node)
        return self.seen[name]

    def _evaluate(self, node: Node) -> np.ndarray:
        quantized = self.linears.get(node.name)
        if node.name == self.dag.input_name or node.op == "input":
            value = self.values[node.name]
        elif quantized is not None and quantized.scaling is None:
            value = self._linear(node, quantized)
        else:
            value = node.evaluate(*(self.seen[name] for name in node.inputs))
        quantizer = self.dag.tables.get(node.name)
        if node.name == self.dag.input_name:
            quantizer = self.dag.input_quantizer
        if quantizer is None:
            return value
        return quantizer.dequantize(quantizer.quantize(value))

    def _linear(self, node: Node, quantized: QuantizedLinear) -> np.ndarray:
        layer = self.codes.layer_input(node, self.values, self)
        if layer is None:
            return node.evaluate(*(self.seen[name] for name in node.inputs))
        if OPS[node.op].unit_weights:
            scale, _ = self.codes.arrays(node.inputs[0])
            return node.evaluate(layer.x_q * scale)
        scale = np.asarray(quantized.weight_quantizer.scale, dtype=np.float64)
        weight = quantized.weight_q * scale.reshape((-1,) + (1,) * (quantized.weight_q.ndim - 1))
        integer = dataclasses.replace(node, params={**node.params, "weight": weight})
        return integer.evaluate(layer.x_q)


def _table_after(graph: Graph, dag: QuantizedDag, node: Node, config: QuantConfig) -> int | None:
    """The narrowest input width of the tables that read ``node``'s accumulator."""
    widths = [
        table_bits(config.rounding_bits, quantizer.qmax)
        for name, quantizer in dag.tables.items()
        if chain_source(graph, name, dag.input_name)[0] == node.name
    ]
    return min(widths, default=None)


def _linear_weights(
    node: Node,
    folded: np.ndarray,
    layer: LayerInput | None,
    bits: int,
    config: QuantConfig,
    table: int | None,
    width: int | None,
) -> tuple[np.ndarray, UniformQuantizer]:
    """Integer weights and their quantizer: exact for pooling, accumulator-aware at
    ``width`` bits (``layer``: what the layer reads), else from the weights' own range.
    ``accumulator_bits="auto"`` falls back to the latter, with a warning, for a layer
    whose codes are unknown (a max pool of a residual sum)."""
    if width is not None and layer is None:
        if config.accumulator_bits != "auto":
            raise UnsupportedOpError(
                "accumulator_bits on a layer that reads a max pool of a residual sum",
                _where(node),
                "Accumulator-aware quantization needs the codes a layer reads; apply an "
                "activation after the add, or use accumulator_bits=None.",
            )
        warnings.warn(
            f"accumulator_bits='auto' does not bound layer {_where(node)!r}: it reads a max "
            "pool of a residual sum, whose codes accumulator-aware quantization needs; its "
            "weights are rounded to nearest (as with accumulator_bits=None).",
            AccumulatorFallbackWarning,
            stacklevel=2,
        )
    if OPS[node.op].unit_weights:
        w_quantizer = unit_weight_quantizer(folded, _where(node))
        weight_q = w_quantizer.quantize(folded)
        if layer is not None:
            _check_fixed_accumulator(node, weight_q, layer.code_range, config)
        return weight_q, w_quantizer
    if layer is not None and width is not None:
        return budgeted_weights(node, folded, layer, bits, config, table, width)
    w_quantizer = weight_quantizer(folded, bits, config.per_channel)
    return w_quantizer.quantize(folded), w_quantizer


def _add_scaled_weights(
    folded: np.ndarray, bits: int, common: UniformQuantizer
) -> tuple[UniformQuantizer, AddScaling]:
    """Per-channel weight scales that are integer ratios of the add's common scale
    ``s``: ``s / m`` (``m = floor(s / s_w)``, at most ``(m + 1) / m`` coarser than the
    natural ``s_w``) when ``s >= s_w``, else ``k * s`` (``k = ceil(s_w / s)``); the add
    then multiplies the codes by ``m`` or the accumulator by ``k`` (free)."""
    natural = np.asarray(weight_quantizer(folded, bits, True).scale)
    n_out = folded.shape[0]
    s = np.broadcast_to(np.asarray(common.scale, dtype=np.float64), (n_out,))
    m = np.floor(s / natural)
    k = np.ceil(natural / s)
    finer = m >= 1
    scale = np.where(finer, s / np.maximum(m, 1), k * s)
    scaling = AddScaling(
        np.where(finer, 1, k).astype(np.int64),
        np.where(finer, m, 1).astype(np.int64),
        np.where(finer, scale, s),
    )
    quantizer = UniformQuantizer(
        bits=bits,
        scale=tuple(float(v) for v in scale),
        zero_point=(0,) * n_out,
        signed=True,
        narrow_range=True,
        axis=0,
    )
    return quantizer, scaling


# --------------------------------------------------------------------------- as data
# NOTE: a plan's data form is its fields (``asdict``); a field is read back by its
# declared type, so a new field of a known type needs nothing here.


def _plan_from_dict(cls: type, data: Any, where: str) -> Any:
    """The plan object of dataclass ``cls`` whose ``asdict`` is ``data``."""
    names = [f.name for f in fields(cls)]
    if not isinstance(data, dict):
        raise InputError(f"{where} must be a dict (a {cls.__name__}). Got {type(data).__name__}.")
    unknown = sorted(str(key) for key in data if key not in names)
    missing = [name for name in names if name not in data]
    if unknown or missing:
        raise InputError(
            f"{where}: a {cls.__name__} has the keys {names}; got unknown keys {unknown} and "
            f"missing keys {missing}."
        )
    values = {f.name: _read(str(f.type), data[f.name], f"{where}.{f.name}") for f in fields(cls)}
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{where}: not a valid {cls.__name__}: {exc}") from None


def _read(kind: str, value: Any, where: str) -> Any:
    """``value`` read back as the declared type ``kind`` (a type's text)."""
    if kind.endswith(" | None"):
        return None if value is None else _read(kind[: -len(" | None")], value, where)
    if kind.startswith("tuple[") and kind.endswith(", ...]"):
        return tuple(
            _read(kind[6:-6], item, f"{where}[{i}]") for i, item in enumerate(_list(value, where))
        )
    if kind.startswith("Mapping[str, ") and kind.endswith("]"):
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise InputError(f"{where} must be a dict with str keys. Got {value!r:.60}.")
        return {k: _read(kind[13:-1], v, f"{where}[{k!r}]") for k, v in value.items()}
    reader = _LEAVES.get(kind)
    if reader is None:
        raise TypeError(f"{where}: a field of type {kind} has no data form (see _LEAVES).")
    return reader(value, where)


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, (list, tuple)):
        raise InputError(f"{where} must be a list. Got {type(value).__name__}.")
    return list(value)


def _scalar(kinds: tuple[type, ...]) -> Any:
    def read(value: Any, where: str) -> Any:
        if isinstance(value, bool) != (bool in kinds) or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise InputError(f"{where} must be a {names}. Got {value!r:.60}.")
        return value

    return read


def _array(value: Any, where: str) -> np.ndarray:
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "biuf":
        raise InputError(f"{where} must be a numeric NumPy array. Got {type(value).__name__}.")
    return value


def _mode(value: Any, where: str) -> str:
    if value not in get_args(AddMode):
        raise InputError(f"{where} must be one of {list(get_args(AddMode))}. Got {value!r:.60}.")
    return value


def _by(reader: Any) -> Any:
    """A reader calling ``reader(value)`` (another class's ``from_dict``), its errors
    named by the field."""

    def read(value: Any, where: str) -> Any:
        try:
            return reader(value)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{where}: {exc}") from None

    return read


def _exact_config(data: Any) -> QuantConfig:
    """A :class:`QuantConfig` from all its fields (no default fills a missing one)."""
    names = [f.name for f in fields(QuantConfig)]
    missing = [name for name in names if not isinstance(data, dict) or name not in data]
    if missing:
        raise ValueError(f"a QuantConfig needs every field; missing {missing}")
    return QuantConfig.from_dict(data)


def _plan(cls: type) -> Any:
    return lambda value, where: _plan_from_dict(cls, value, where)


#: How a plan field is read back, by its declared type (the classes of the plan read
#: their own fields the same way).
_LEAVES: dict[str, Any] = {
    "str": _scalar((str,)),
    "int": _scalar((int,)),
    "float": lambda value, where: float(_scalar((float, int))(value, where)),
    "np.ndarray": _array,
    "AddMode": _mode,
    "Node": _by(Node.from_dict),
    "Graph": _by(Graph.from_dict),
    "UniformQuantizer": _by(UniformQuantizer.from_dict),
    "QuantConfig": _by(_exact_config),
    **{
        cls.__name__: _plan(cls)
        for cls in (QuantizedLinear, AddScaling, Segment, AddOperand, QuantizedDag, ProductPlan)
    },
}

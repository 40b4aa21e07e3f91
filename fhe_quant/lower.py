"""Lowering: a :class:`~fhe_quant.quant.ptq.QuantizedGraph` becomes an integer-only
program (:class:`IntegerProgram`) that runs the same on NumPy arrays and under
Concrete's tracer.

Every encrypted value in the program is a non-negative integer with a proven upper
bound, so its width never depends on the data Concrete sees at compile time:

* the input is the client's quantized tensor, clipped to ``[0, qmax]``;
* a linear layer (dense, convolution, average pooling) computes
  ``acc = apply(q, W) - lo`` where ``lo`` is the proven per-output minimum of
  ``apply(q, W)`` (:func:`fhe_quant.ir.linear_bounds`), so ``0 <= acc <= hi - lo``; the
  zero points and the bias are not added here: they are constants of the next table or
  of the client's dequantization;
* a convolution pads its codes with 0, not with the zero point ``z`` that codes the real
  value 0: ``apply`` stays linear, and the real output
  ``s_w * apply(q - z, W) = s_w * (apply(q, W) - apply(z, W))`` subtracts
  ``apply(z, W)`` computed with the same zero padding, one constant per output
  position, so at the borders the padded taps contribute exactly the real 0;
* when ``acc`` is wider than the table input width, its low bits are rounded away
  (``fhe.round_bit_pattern``, exact by default), and the table reads the
  ``index_bits`` high bits; the rounding width is chosen so that rounding up can never
  carry into a new bit (which would widen the table);
* one table per element then applies, in one lookup: dequantization, bias, the whole
  chain of activations and constant operations, and the next layer's input
  quantization (with its clipping);
* the last linear layer's accumulator is returned as is: the client dequantizes it.

The bounds are handed to Concrete as bit-width hints, which also rule out the silent
overflow of a value wider than the compile-time inputset showed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from fhe_quant.errors import RangeError
from fhe_quant.ir import OPS, ConvGeometry, Node, conv_numpy, linear_bounds
from fhe_quant.quant.ptq import QuantizedGraph, Segment
from fhe_quant.quant.quantizer import UniformQuantizer

__all__ = [
    "Backend",
    "NUMPY",
    "LinearStep",
    "TableStep",
    "IntegerProgram",
    "lower",
    "bits_for",
    "MAX_TABLE_BITS",
    "auto_table_bits",
]

#: Concrete refuses table lookups on inputs wider than this.
MAX_TABLE_BITS = 16
#: The widest table the automatic default picks (see :func:`auto_table_bits`).
MAX_AUTO_TABLE_BITS = 7


class Backend(Protocol):
    """The operations whose code differs between NumPy and Concrete's tracer (it is an
    :class:`~fhe_quant.ir.ArrayBackend`: linear ops call its ``conv``)."""

    def hint(self, x: Any, bit_width: int) -> Any: ...

    def conv(self, x: Any, weight: np.ndarray, geometry: ConvGeometry) -> Any: ...

    def round(self, x: Any, lsbs: int, exact: bool) -> Any: ...

    def lookup(self, fn: Any, x: Any) -> Any: ...


class _NumpyBackend:
    """Clear integers: hints are no-ops, convolutions are exact int64 sums, truncation
    clears low bits, lookups call ``fn``."""

    def hint(self, x: Any, bit_width: int) -> Any:
        return x

    def conv(self, x: Any, weight: np.ndarray, geometry: ConvGeometry) -> Any:
        # NOTE: exact int64 arithmetic (im2col + einsum, no float rounding); the proven
        # accumulator bounds keep every value far below 2**63.
        return conv_numpy(x, weight, geometry)

    def round(self, x: Any, lsbs: int, exact: bool) -> Any:
        # NOTE: round half up, as Concrete's round_bit_pattern does in clear.
        return ((np.asarray(x) + (1 << (lsbs - 1))) >> lsbs) << lsbs

    def lookup(self, fn: Any, x: Any) -> Any:
        return fn(x)


#: The clear backend, used by ``fhe="disable"``.
NUMPY: Backend = _NumpyBackend()


def bits_for(value: int) -> int:
    """Bits of an unsigned integer able to hold ``0..value``.

    Examples:
        >>> bits_for(0), bits_for(1), bits_for(255), bits_for(256)
        (1, 1, 8, 9)
    """
    return max(1, int(value).bit_length())


def auto_table_bits(activation_bits: int) -> int:
    """Default table input width for a layer whose output has ``activation_bits`` bits.

    At least one bit more than the output, so that the table's rounding error stays
    below one output step, and at least 5 bits: up to 5 bits a lookup costs about the
    same (6 bits costs about 4x more), while every accumulator bit dropped to reach a
    narrower table is one more bootstrap (measured: 2-bit QAT on digits, 4-bit tables
    576 PBS and 94.0%, 5-bit tables 448 PBS and 96.4%). Never over 7 bits: Concrete 2.11
    found no parameters for 8-bit tables after the 18-bit accumulators of a 7-bit,
    64-wide layer (measured on the digits MLP).

    Examples:
        >>> [auto_table_bits(b) for b in range(1, 9)]
        [5, 5, 5, 5, 6, 7, 7, 7]
    """
    return min(max(5, activation_bits + 1), MAX_AUTO_TABLE_BITS)


@dataclass(frozen=True, eq=False)
class LinearStep:
    """``acc = apply(q, weight) + offset``, with ``0 <= acc <= acc_max`` proven.

    Its real value is ``scale * (acc - zero) + bias`` (all broadcast to the
    accumulator's shape for one sample). ``attrs`` are the op's attributes (a
    convolution's :class:`~fhe_quant.ir.ConvGeometry`).
    """

    name: str
    op: str
    weight: np.ndarray
    offset: np.ndarray
    acc_max: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    bias: np.ndarray
    attrs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def acc_bits(self) -> int:
        return bits_for(int(self.acc_max.max()))

    def dequantize(self, acc: np.ndarray) -> np.ndarray:
        return self.scale * (np.asarray(acc, dtype=np.float64) - self.zero) + self.bias

    def __call__(self, q: Any, backend: Backend) -> Any:
        apply = OPS[self.op].linear_apply
        assert apply is not None
        acc = apply(q, self.weight, self.attrs, backend) + self.offset
        return backend.hint(acc, self.acc_bits)


@dataclass(frozen=True, eq=False)
class TableStep:
    """Drop ``lsbs`` low bits of the accumulator, then look up one table per element.

    ``table[j, i]`` is the output for element ``j`` (flat index within one sample) when
    the accumulator's high bits are ``i``. Output values are in ``[0, 2**out_bits)``.

    The accumulator is rounded to a multiple of ``2**lsbs`` (half up) at width
    ``round_bits``, wide enough that rounding up never carries out. With
    ``exact_rounding`` the low bits are removed exactly (one small bootstrap per bit in
    FHE); without it the lookup itself rounds approximately (no extra bootstrap), which in
    FHE may land one cell off near a cell border, so ``simulate``/``execute`` may then
    differ from ``disable`` by one table entry.
    """

    name: str
    lsbs: int
    round_bits: int
    exact_rounding: bool
    index_max: np.ndarray
    table: np.ndarray
    out_bits: int
    out_shape: tuple[int, ...]
    out_min: np.ndarray
    out_max: np.ndarray
    exact: Callable[[np.ndarray], np.ndarray]

    @property
    def index_bits(self) -> int:
        return bits_for(int(self.index_max.max()))

    def lookup(self, acc: np.ndarray) -> np.ndarray:
        acc = np.asarray(acc)
        index = np.clip(acc >> self.lsbs, 0, self.table.shape[1] - 1)  # NOTE: Concrete
        # evaluates the lookup on every value of the input's width, reachable or not
        flat = index.reshape(index.shape[0], -1)
        out = self.table[np.arange(flat.shape[1]), flat]
        return out.reshape(acc.shape)

    def __call__(self, acc: Any, backend: Backend) -> Any:
        if self.lsbs:
            # NOTE: the hints matter: Concrete sizes the rounding and the table from these
            # widths, which it would otherwise take from the inputset, not from the proof;
            # equal widths before and after also tell it that no carry can occur.
            acc = backend.hint(acc, self.round_bits)
            acc = backend.hint(backend.round(acc, self.lsbs, self.exact_rounding), self.round_bits)
        out = backend.hint(backend.lookup(self.lookup, acc), self.out_bits)
        return out.reshape((out.shape[0],) + self.out_shape)


Step = LinearStep | TableStep


@dataclass(frozen=True, eq=False)
class IntegerProgram:
    """The integer program: input quantizer, steps, and the last layer's dequantization.

    Calling it on an int64 batch ``(B, *input_shape)`` in ``[0, qmax]`` runs it in NumPy;
    Concrete traces the same call, with its own :class:`Backend`, to build the circuit
    (with ``B = 1``).
    """

    input_quantizer: UniformQuantizer
    input_shape: tuple[int, ...]
    steps: tuple[Step, ...]

    @property
    def input_bits(self) -> int:
        return bits_for(self.input_quantizer.qmax)

    @property
    def output_step(self) -> LinearStep:
        last = self.steps[-1]
        assert isinstance(last, LinearStep)
        return last

    def __call__(self, q: Any, backend: Backend = NUMPY) -> Any:
        value = backend.hint(q, self.input_bits)
        for step in self.steps:
            value = step(value, backend)
        return value

    def lookups_by_width(self) -> dict[int, int]:
        """Table lookups per sample by input width; width 1 counts the exactly dropped
        accumulator bits (Concrete drops each with a one-bit bootstrap)."""
        counts: dict[int, int] = {}
        for step in self.steps:
            if isinstance(step, TableStep):
                n = int(step.table.shape[0])
                counts[step.index_bits] = counts.get(step.index_bits, 0) + n
                if step.exact_rounding and step.lsbs:
                    counts[1] = counts.get(1, 0) + n * step.lsbs
        return counts

    def run_without_rounding(self, q: np.ndarray) -> np.ndarray:
        """The program with every table applied to the full accumulator (no dropped
        bits); the difference to ``self(q)`` is the effect of the table width."""
        value = q
        for step in self.steps:
            if isinstance(step, LinearStep):
                value = step(value, NUMPY)
            else:
                value = step.exact(value).reshape((value.shape[0],) + step.out_shape)
        return value

    def source(self) -> str:
        """A readable listing of the program (what runs encrypted)."""
        lines = [f"def program(q):  # q: uint{self.input_bits}{list(self.input_shape)}"]
        for step in self.steps:
            if isinstance(step, LinearStep):
                geometry = ""
                if "stride" in step.attrs:
                    g = ConvGeometry.from_attrs(step.attrs)
                    geometry = (
                        f", stride={g.stride}, padding={g.padding}, dilation={g.dilation}"
                        f", groups={g.groups}"
                    )
                lines.append(
                    f"    acc = {step.op}(q, W_{step.name}{list(step.weight.shape)}{geometry}) + "
                    f"offset_{step.name}  # 0 <= acc <= {int(step.acc_max.max())} "
                    f"({step.acc_bits} bits, proven)"
                )
            else:
                if step.lsbs:
                    how = "exact" if step.exact_rounding else "approximate"
                    lines.append(
                        f"    acc = round_bit_pattern(acc, lsbs_to_remove={step.lsbs}, {how})"
                        f"  # table reads {step.index_bits} bits"
                    )
                lines.append(
                    f"    q = table_{step.name}[acc >> {step.lsbs}]  # one lookup per element, "
                    f"{step.table.shape[0]} tables of {step.table.shape[1]} entries -> "
                    f"uint{step.out_bits}, reshape to {list(step.out_shape)}"
                )
        lines.append("    return acc  # decrypted and dequantized by the client")
        return "\n".join(lines)


def _broadcast(values: np.ndarray, shape: tuple[int, ...], axis: int) -> np.ndarray:
    """Per-output-channel constants (on ``axis`` of the accumulator) broadcast to ``shape``."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 1:
        return np.full(shape, values.item())
    channel_shape = [1] * len(shape)
    channel_shape[axis % len(shape)] = -1
    return np.broadcast_to(values.reshape(channel_shape), shape).copy()


def _lower_linear(segment: Segment, lower: np.ndarray, upper: np.ndarray) -> LinearStep:
    linear = segment.linear
    node: Node = linear.node
    spec = OPS[node.op]
    assert spec.linear_apply is not None
    weight = linear.weight_q
    lo, hi = linear_bounds(node.op, weight, lower, upper, node.attrs)
    shape = lo.shape
    x_q = linear.input_quantizer
    # NOTE: input x_i = s_i * (q_i - z_i) and the integer weights W approximate
    # w * s_in / s_w (input scales folded in, see quant/ptq.py), so
    #   apply(x, w) + b  =  s_w * (apply(q, W) - apply(z, W)) + b  =  scale * (acc - zero) + bias
    # with acc = apply(q, W) - lo: zero = apply(z, W) - lo, an integer per output. A
    # convolution pads z with 0 as it pads q, so `zero` differs at the borders and a
    # padded tap contributes s_w * (0 - 0) = 0: the real zero padding, for any z.
    z_x = np.broadcast_to(x_q.zero_point_array(lower.ndim), lower.shape).astype(np.int64)
    zero = spec.linear_apply(z_x, weight, node.attrs, NUMPY) - lo
    scale = _broadcast(np.asarray(linear.weight_quantizer.scale), shape, spec.channel_axis)
    bias = _broadcast(node.params.get("bias", np.zeros(1)), shape, spec.channel_axis)
    return LinearStep(
        node.name,
        node.op,
        weight,
        -lo,
        hi - lo,
        scale,
        zero.astype(np.float64),
        bias,
        node.attrs,
    )


def _chain(nodes: tuple[Node, ...], value: np.ndarray) -> np.ndarray:
    for node in nodes:
        value = node.evaluate(value)
    return value


def _lower_table(
    segment: Segment, linear: LinearStep, table_bits: int, exact_rounding: bool
) -> TableStep:
    out_q = segment.output_quantizer
    assert out_q is not None
    round_bits = linear.acc_bits
    lsbs = max(0, round_bits - table_bits)
    half = 2 ** (lsbs - 1) if lsbs else 0
    if lsbs and int(linear.acc_max.max()) + half >= 2**round_bits:
        # Rounding the largest accumulators up would carry into a new bit: round at one
        # more bit instead, dropping one more bit, so the table keeps table_bits inputs.
        round_bits, lsbs = round_bits + 1, lsbs + 1
        half = 2 ** (lsbs - 1)
    # Index i holds the accumulators nearest to i*2^lsbs (halves up), i.e. the cell
    # i*2^lsbs - half ... i*2^lsbs + half - 1; the table evaluates the layer at its centre.
    index_max = (linear.acc_max + half) >> lsbs
    centre_shift = -0.5 if lsbs else 0.0
    n_index = int(index_max.max()) + 1
    centres = np.arange(n_index, dtype=np.float64) * 2**lsbs + centre_shift
    acc_grid = centres.reshape((n_index,) + (1,) * (linear.scale.ndim - 1))
    real = linear.scale[0] * (acc_grid - linear.zero[0]) + linear.bias[0]
    out = _chain(segment.chain, real)
    out_shape = tuple(out.shape[1:])
    table = out_q.quantize(out).reshape(n_index, -1).T.astype(np.int64)
    # Proven output bounds per element: the table's extremes over reachable indices.
    reachable = np.arange(n_index)[None, :] <= index_max.reshape(-1, 1)
    out_min = np.where(reachable, table, np.iinfo(np.int64).max).min(axis=1)
    out_max = np.where(reachable, table, np.iinfo(np.int64).min).max(axis=1)

    def exact(acc: np.ndarray) -> np.ndarray:
        # The same layer without dropping bits: the reference for the rounding's effect.
        out = out_q.quantize(_chain(segment.chain, linear.dequantize(acc)))
        return out.reshape(out.shape[0], -1).reshape(acc.shape)

    return TableStep(
        f"{linear.name}",
        lsbs,
        round_bits,
        exact_rounding or lsbs == 0,
        index_max,
        table,
        bits_for(out_q.qmax),
        out_shape,
        out_min.reshape((1,) + out_shape),
        out_max.reshape((1,) + out_shape),
        exact,
    )


def lower(quantized: QuantizedGraph, table_bits: int | None = None) -> IntegerProgram:
    """Lower a quantized graph to an :class:`IntegerProgram`.

    Args:
        quantized: the output of :func:`fhe_quant.quant.ptq.quantize_graph`.
        table_bits: width of every table's input (the accumulator is rounded to it);
            ``None`` uses ``quantized.config.rounding_bits`` or, if that is ``None``
            too, :func:`auto_table_bits` of each layer's output bits.

    Raises:
        RangeError: a table input would exceed Concrete's 16-bit limit.
    """
    steps: list[Step] = []
    first = quantized.segments[0].linear
    input_q = first.input_quantizer
    input_shape = _input_shape(quantized)
    # NOTE: inputs are unsigned quantized values, clipped by the client to [0, qmax].
    lower_b = np.zeros((1,) + input_shape, dtype=np.int64)
    upper_b = np.full((1,) + input_shape, input_q.qmax, dtype=np.int64)
    configured = table_bits if table_bits is not None else quantized.config.rounding_bits
    for segment in quantized.segments:
        linear = _lower_linear(segment, lower_b, upper_b)
        steps.append(linear)
        if segment.output_quantizer is None:
            break
        bits = configured or auto_table_bits(bits_for(segment.output_quantizer.qmax))
        if bits > MAX_TABLE_BITS:
            raise RangeError(
                f"The table after layer {linear.name!r} would read {bits} bits; Concrete "
                f"accepts at most {MAX_TABLE_BITS}. Lower rounding_bits."
            )
        table = _lower_table(segment, linear, bits, quantized.config.rounding_exact)
        steps.append(table)
        lower_b, upper_b = table.out_min, table.out_max
    return IntegerProgram(input_q, input_shape, tuple(steps))


def _input_shape(quantized: QuantizedGraph) -> tuple[int, ...]:
    values = quantized.graph.run(np.zeros((1,) + quantized.graph.input_shape))
    return tuple(values[quantized.segments[0].linear.node.inputs[0]].shape[1:])

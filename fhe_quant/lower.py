"""Lowering: a :class:`~fhe_quant.quant.ptq.QuantizedGraph` becomes an integer-only
program (:class:`IntegerProgram`) that runs the same on NumPy arrays and under
Concrete's tracer.

Every encrypted value in the program is a non-negative integer with a proven upper
bound, so its width never depends on the data Concrete sees at compile time:

* the input is the client's quantized tensor, clipped to ``[0, qmax]``;
* a linear layer computes ``acc = apply(q, W) - lo`` where ``lo`` is the proven
  per-output minimum of ``apply(q, W)`` (:func:`fhe_quant.ir.linear_bounds`), so
  ``0 <= acc <= hi - lo``; the zero points and the bias are not added here: they are
  constants of the next table or of the client's dequantization;
* when ``acc`` is wider than the table input width, its low bits are dropped exactly
  (``fhe.truncate_bit_pattern``), and the table reads the ``index_bits`` high bits;
* one table per element then applies, in one lookup: dequantization, bias, the whole
  chain of activations and constant operations, and the next layer's input
  quantization (with its clipping);
* the last linear layer's accumulator is returned as is: the client dequantizes it.

The bounds are handed to Concrete as bit-width hints, which also rule out the silent
overflow of a value wider than the compile-time inputset showed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from fhe_quant.errors import RangeError
from fhe_quant.ir import OPS, Node, linear_bounds
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


class Backend(Protocol):
    """The three operations whose meaning differs between NumPy and Concrete's tracer."""

    def hint(self, x: Any, bit_width: int) -> Any: ...

    def truncate(self, x: Any, lsbs: int) -> Any: ...

    def round(self, x: Any, lsbs: int) -> Any: ...

    def lookup(self, fn: Any, x: Any) -> Any: ...


class _NumpyBackend:
    """Clear integers: hints are no-ops, truncation clears low bits, lookups call ``fn``."""

    def hint(self, x: Any, bit_width: int) -> Any:
        return x

    def truncate(self, x: Any, lsbs: int) -> Any:
        return (np.asarray(x) >> lsbs) << lsbs

    def round(self, x: Any, lsbs: int) -> Any:
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

    Two bits more than the output keep the table's rounding error well below one output
    step; 5 bits is where a lookup stops being cheap (6 bits costs about 4x more), so
    the default never goes over it unless the activation itself needs more.
    """
    return max(min(activation_bits + 2, 5), activation_bits + 1)


@dataclass(frozen=True, eq=False)
class LinearStep:
    """``acc = apply(q, weight) + offset``, with ``0 <= acc <= acc_max`` proven.

    Its real value is ``scale * (acc - zero) + bias`` (all broadcast to the
    accumulator's shape for one sample).
    """

    name: str
    op: str
    weight: np.ndarray
    offset: np.ndarray
    acc_max: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    bias: np.ndarray

    @property
    def acc_bits(self) -> int:
        return bits_for(int(self.acc_max.max()))

    def dequantize(self, acc: np.ndarray) -> np.ndarray:
        return self.scale * (np.asarray(acc, dtype=np.float64) - self.zero) + self.bias

    def __call__(self, q: Any, backend: Backend) -> Any:
        acc = OPS[self.op].linear_apply(q, self.weight) + self.offset  # type: ignore[misc]
        return backend.hint(acc, self.acc_bits)


@dataclass(frozen=True, eq=False)
class TableStep:
    """Drop ``lsbs`` low bits of the accumulator, then look up one table per element.

    ``table[j, i]`` is the output for element ``j`` (flat index within one sample) when
    the accumulator's high bits are ``i``. Output values are in ``[0, 2**out_bits)``.

    With ``exact_rounding`` the low bits are truncated exactly (one small bootstrap per
    dropped bit in FHE); without it they are rounded approximately by the table lookup
    itself (no extra bootstrap), which in FHE may land one cell off near a cell border,
    so ``simulate``/``execute`` may then differ from ``disable`` by one table entry.
    """

    name: str
    lsbs: int
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
        index = np.clip(acc >> self.lsbs, 0, self.table.shape[1] - 1)  # clip: Concrete
        # evaluates the lookup on every value of the input's width, reachable or not
        flat = index.reshape(index.shape[0], -1)
        out = self.table[np.arange(flat.shape[1]), flat]
        return out.reshape(acc.shape)

    def __call__(self, acc: Any, backend: Backend) -> Any:
        if self.lsbs:
            dropped = (backend.truncate if self.exact_rounding else backend.round)(acc, self.lsbs)
            # NOTE: the hint matters: Concrete sizes the table from the rounded value's
            # width, which it would otherwise take from the inputset, not from the proof.
            acc = backend.hint(dropped, self.index_bits + self.lsbs)
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
                lines.append(
                    f"    acc = {step.op}(q, W_{step.name}{list(step.weight.shape)}) + "
                    f"offset_{step.name}  # 0 <= acc <= {int(step.acc_max.max())} "
                    f"({step.acc_bits} bits, proven)"
                )
            else:
                if step.lsbs:
                    how = "truncate" if step.exact_rounding else "round (approximate)"
                    lines.append(
                        f"    acc = {how}_bit_pattern(acc, lsbs_to_remove={step.lsbs})"
                        f"  # table reads {step.index_bits} bits"
                    )
                lines.append(
                    f"    q = table_{step.name}[acc >> {step.lsbs}]  # one lookup per element, "
                    f"{step.table.shape[0]} tables of {step.table.shape[1]} entries -> "
                    f"uint{step.out_bits}, reshape to {list(step.out_shape)}"
                )
        lines.append("    return acc  # decrypted and dequantized by the client")
        return "\n".join(lines)


def _broadcast(values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Per-output-channel constants (axis 1 of the accumulator) broadcast to ``shape``."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 1:
        return np.full(shape, values.item())
    return np.broadcast_to(values.reshape((1, -1) + (1,) * (len(shape) - 2)), shape).copy()


def _lower_linear(segment: Segment, lower: np.ndarray, upper: np.ndarray) -> LinearStep:
    linear = segment.linear
    node: Node = linear.node
    weight = linear.weight_q
    lo, hi = linear_bounds(node.op, weight, lower, upper)
    shape = lo.shape
    x_q = linear.input_quantizer
    # NOTE: input x_i = s_i * (q_i - z_i) and the integer weights W approximate
    # w * s_in / s_w (input scales folded in, see quant/ptq.py), so
    #   apply(x, w) + b  =  s_w * (apply(q, W) - apply(z, W)) + b  =  scale * (acc - zero) + bias
    # with acc = apply(q, W) - lo: zero = apply(z, W) - lo, an integer per output.
    z_x = np.broadcast_to(x_q.zero_point_array(lower.ndim), lower.shape).astype(np.int64)
    zero = OPS[node.op].linear_apply(z_x, weight) - lo  # type: ignore[misc]
    scale = _broadcast(np.asarray(linear.weight_quantizer.scale), shape)
    bias = _broadcast(node.params.get("bias", np.zeros(1)), shape)
    return LinearStep(
        node.name, node.op, weight, -lo, hi - lo, scale, zero.astype(np.float64), bias
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
    acc_bits = linear.acc_bits
    lsbs = max(0, acc_bits - table_bits)
    if exact_rounding or lsbs == 0:
        # Truncation: index i holds accumulators i*2^lsbs ... i*2^lsbs + 2^lsbs - 1;
        # the table evaluates the layer at the centre of that cell.
        index_max = linear.acc_max >> lsbs
        centre_shift = (2**lsbs - 1) / 2
    else:
        # Rounding to nearest: index i holds the accumulators nearest to i*2^lsbs.
        index_max = (linear.acc_max + 2 ** (lsbs - 1)) >> lsbs
        centre_shift = 0.0
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
        table_bits: width of every table's input (the accumulator is truncated to it);
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

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

Every graph is lowered from its plan (:attr:`~fhe_quant.quant.ptq.QuantizedGraph.plan`,
a :class:`~fhe_quant.quant.ptq.QuantizedDag`: the quantizers and the integer weights,
all chosen by :mod:`fhe_quant.quant.ptq`), one node kind at a time
(:attr:`_DagLowering.RAW`); the program of a chain names no operands (each step reads the
previous value). Branching graphs add steps that name their operands: a residual add
(:class:`AddStep`, operands times clear integers plus an offset, 0 lookups), a
concatenation and a reshape (0 lookups), max pooling
(:class:`MaxPoolStep`, ``k - 1`` lookups per output element and pooled axis), moves of
values (:class:`GatherStep`: transpose, channel shuffle, upsampling; 0 lookups) and the
product of two encrypted tensors (:class:`ProductStep`, 2 lookups per element); see
``docs/DESIGN-NOTES.md`` sections 7 and 16 for the lookup counts.

The bounds are handed to Concrete as bit-width hints, which also rule out the silent
overflow of a value wider than the compile-time inputset showed.

Every step implements one protocol (:class:`ProgramStep`, defaults in
:class:`StepBase`): it picks its operands, runs (exactly too, without dropped bits),
writes its line of :meth:`IntegerProgram.source`, counts its lookups by width and
gives its row of the model's statistics (:class:`StepStatistics`). The program, the
model's statistics, the report and the verifier call only these, so a new kind of step
(the tree programs of :mod:`fhe_quant.lower_tree`, the k-NN stages of
:mod:`fhe_quant.lower_knn`) needs no change here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from typing import Any, ClassVar, Protocol, get_args, runtime_checkable

import numpy as np

from fhe_quant.errors import RangeError
from fhe_quant.ir import (
    OPS,
    ConvGeometry,
    Graph,
    Node,
    attrs_from_data,
    chain_source,
    conv_numpy,
    linear_bounds,
    max_pool_geometry,
    plain_data,
)
from fhe_quant.quant.config import QuantConfig
from fhe_quant.quant.ptq import QuantizedDag, QuantizedGraph, channel_vector
from fhe_quant.quant.quantizer import ThresholdGrid, UniformQuantizer
from fhe_quant.quant.widths import (
    MAX_AUTO_TABLE_BITS,
    MAX_TABLE_BITS,
    ProductPlan,
    auto_table_bits,
    bits_for,
    product_scale,
)
from fhe_quant.quant.widths import table_bits as table_width

__all__ = [
    "Backend",
    "NUMPY",
    "LinearStep",
    "TableStep",
    "TableFunction",
    "TableRead",
    "IntegerProgram",
    "lower",
    "bits_for",
    "MAX_TABLE_BITS",
    "MAX_AUTO_TABLE_BITS",
    "auto_table_bits",
    "AddStep",
    "MaxPoolStep",
    "ConcatStep",
    "ReshapeStep",
    "GatherStep",
    "ProductStep",
    "product_scale",
    "ProgramStep",
    "StepBase",
    "StepStatistics",
    "statistics_rows",
    "run_steps",
    "add_counts",
]

# NOTE: MAX_TABLE_BITS, MAX_AUTO_TABLE_BITS, bits_for and auto_table_bits live in
# fhe_quant.quant.widths (PTQ needs them too) and keep their names here.


class Backend(Protocol):
    """The operations whose code differs between NumPy and Concrete's tracer (it is an
    :class:`~fhe_quant.ir.ArrayBackend`: linear ops call its ``conv``)."""

    def hint(self, x: Any, bit_width: int) -> Any: ...

    def conv(self, x: Any, weight: np.ndarray, geometry: ConvGeometry) -> Any: ...

    def round(self, x: Any, lsbs: int, exact: bool) -> Any: ...

    def lookup(self, fn: Any, x: Any) -> Any: ...

    def pad(self, x: Any, pads: tuple[tuple[int, int], ...]) -> Any: ...


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

    def pad(self, x: Any, pads: tuple[tuple[int, int], ...]) -> Any:
        return np.pad(np.asarray(x), pads)


#: The clear backend, used by ``fhe="disable"``.
NUMPY: Backend = _NumpyBackend()


class _Data:
    """The data form every step (and :class:`TableFunction`) shares: its dataclass fields
    as JSON values and NumPy arrays, read back field by field by declared type."""

    def to_dict(self) -> dict[str, Any]:
        """Its fields as data (JSON values and NumPy arrays); :meth:`from_dict` inverts it."""
        return _step_to_dict(self)

    @classmethod
    def from_dict(cls, data: Any) -> Any:
        """Rebuild it from :meth:`to_dict` output, each field read back by its type."""
        return _step_from_dict(cls, data)


@dataclass(frozen=True)
class StepStatistics:
    """One step's row of a model's per-layer statistics
    (:attr:`~fhe_quant.model.QuantizedModule.statistics`): its widths and lookups, each
    field ``None`` when the step has no such figure (it is then left out of the row).

    A table that reads the accumulator of the layer before it (``extends_previous``)
    completes that layer's row rather than starting one (:func:`statistics_rows`).

    Examples:
        >>> StepStatistics("fc", accumulator_bits=9, accumulator_max=300).row()
        {'layer': 'fc', 'accumulator_bits': 9, 'accumulator_max': 300}
    """

    layer: str
    accumulator_bits: int | None = None
    accumulator_max: int | None = None
    truncated_bits: int | None = None
    table_input_bits: int | None = None
    table_output_bits: int | None = None
    lookups: int | None = None
    lookups_per_output: float | None = None
    extends_previous: bool = False

    def row(self) -> dict[str, Any]:
        """The figures it has, as a dict (``layer`` first; ``None`` fields left out)."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name != "extends_previous" and getattr(self, f.name) is not None
        }


def statistics_rows(steps: Sequence[ProgramStep]) -> list[dict[str, Any]]:
    """The per-layer rows of a program's steps: each step's :meth:`~ProgramStep.statistics`
    row, a table's merged into the row of the layer it reads when that row has no lookups
    yet (a linear layer and its table are one layer); steps without lookups or widths
    (reshapes, concatenations, moves of values) have none.

    Examples:
        >>> class Fixed(StepBase):  # a step that only reports its row
        ...     def __init__(self, stats): self.stats = stats
        ...     def statistics(self): return self.stats
        >>> rows = [StepStatistics("fc", 9, 300), StepStatistics("fc", truncated_bits=3,
        ...         table_input_bits=6, table_output_bits=4, lookups=8, extends_previous=True)]
        >>> [(row["layer"], row["accumulator_max"], row["lookups"])
        ...  for row in statistics_rows([Fixed(r) for r in rows])]
        [('fc', 300, 8)]
    """
    layers: list[dict[str, Any]] = []
    for step in steps:
        stats = step.statistics()
        if stats is None:
            continue
        if stats.extends_previous and layers and "lookups" not in layers[-1]:
            layers[-1].update({k: v for k, v in stats.row().items() if k != "layer"})
        else:
            layers.append(stats.row())
    return layers


@runtime_checkable
class ProgramStep(Protocol):
    """What every step of an integer program implements (the one step protocol): the
    program runs, lists, counts and reports its steps through these calls only.

    ``inputs`` names the operands: indices into the values computed so far (0 is the
    program input, ``k + 1`` the output of ``steps[k]``); empty means the previous
    value, as in a chain. ``produces`` says what the output is: ``"accumulator"`` (a
    linear layer's or an add's sum, real value ``scale * (v - zero) + bias``),
    ``"product"`` (a :class:`ProductStep`'s, likewise) or ``"codes"`` (a table's or a
    move's output, the codes a later step reads).
    """

    name: str
    inputs: tuple[int, ...]
    produces: ClassVar[str]
    #: Whether it reads several operands (a tuple of them) rather than one.
    multi_operand: ClassVar[bool]
    #: The names it reads and writes in the listing of a chain (``q``: codes, ``acc``: an
    #: accumulator).
    chain_names: ClassVar[tuple[str, str]]

    def operands(self, values: Sequence[Any]) -> Any:
        """What it reads of ``values``: one value, or a tuple for a multi-operand step."""
        ...

    def operand_names(self, names: Sequence[str]) -> list[str]:
        """The names of the values it reads (:meth:`operands` on names, as a list)."""
        ...

    def run(self, operands: Any, backend: Backend) -> Any:
        """Its output on :meth:`operands` (NumPy arrays or Concrete tracers)."""
        ...

    def run_exact(self, operands: Any) -> Any:
        """Its output in NumPy with no accumulator bits dropped (a table applies its
        exact function to the full accumulator; every other step runs as it is)."""
        ...

    def describe(self, names: Sequence[str]) -> str:
        """Its line of :meth:`IntegerProgram.source` (the right-hand side), reading its
        operands by name: ``names[i]`` is value ``i``, ``names[-1]`` the previous one."""
        ...

    def rounding_text(self, source: str) -> str | None:
        """The line that drops accumulator bits before it (a rounded table), or ``None``."""
        ...

    def lookups_by_width(self) -> dict[int, int]:
        """Table lookups per sample by input width (width 1: exactly dropped bits)."""
        ...

    def statistics(self) -> StepStatistics | None:
        """Its statistics row, or ``None`` for a step with no lookups or widths to show."""
        ...


class StepBase:
    """The defaults of :class:`ProgramStep`: one operand (or the previous value), no
    lookups, no statistics, no rounding, the exact output is the output; a step's own
    ``__call__(operands, backend)`` is :meth:`run`."""

    inputs: tuple[int, ...]
    multi_operand: ClassVar[bool] = False
    produces: ClassVar[str] = "codes"
    chain_names: ClassVar[tuple[str, str]] = ("q", "q")

    def operands(self, values: Sequence[Any]) -> Any:
        if self.multi_operand:
            return tuple(values[i] for i in self.inputs)
        return values[self.inputs[0]] if self.inputs else values[-1]

    def run(self, operands: Any, backend: Backend) -> Any:
        raise NotImplementedError(f"{type(self).__name__} does not define run")

    def __call__(self, operands: Any, backend: Backend) -> Any:
        return self.run(operands, backend)

    def run_exact(self, operands: Any) -> Any:
        return self.run(operands, NUMPY)

    def describe(self, names: Sequence[str]) -> str:
        return f"{type(self).__name__}({', '.join(self.operand_names(names))})"

    def operand_names(self, names: Sequence[str]) -> list[str]:
        """The names of the values it reads (:meth:`operands` on names)."""
        picked = self.operands(names)
        return list(picked) if self.multi_operand else [picked]

    def rounding_text(self, source: str) -> str | None:
        return None

    def lookups_by_width(self) -> dict[int, int]:
        return {}

    def statistics(self) -> StepStatistics | None:
        return None


def add_counts(total: dict[int, int], counts: Mapping[int, int]) -> dict[int, int]:
    """``total`` with ``counts`` added, width by width (lookups by width)."""
    for width, n in counts.items():
        total[width] = total.get(width, 0) + n
    return total


def run_steps(steps: Sequence[ProgramStep], values: list[Any], backend: Backend) -> list[Any]:
    """Run ``steps`` in order, each on its :meth:`~ProgramStep.operands` among ``values``
    (the program input first), appending each output; returns ``values``. The public way
    to run a program step by step (:meth:`IntegerProgram.values`)."""
    for step in steps:
        values.append(step.run(step.operands(values), backend))
    return values


class _Dequantized:
    """A value whose real value is ``scale * (v - zero) + bias`` (dataclass fields
    ``scale``, ``zero``, ``bias``)."""

    scale: np.ndarray
    zero: np.ndarray
    bias: np.ndarray

    def dequantize(self, acc: np.ndarray) -> np.ndarray:
        return self.scale * (np.asarray(acc, dtype=np.float64) - self.zero) + self.bias


class _Accumulator(_Dequantized, StepBase, _Data):
    """What the steps that produce an accumulator share (their dataclass field
    ``acc_max`` too): its proven width, its real value, its data form."""

    acc_max: np.ndarray
    produces: ClassVar[str] = "accumulator"

    def accumulator_statistics(self, **more: Any) -> StepStatistics:
        """Its statistics row: its name, its proven width and maximum, and ``more``."""
        return StepStatistics(self.name, self.acc_bits, int(self.acc_max.max()), **more)

    @property
    def acc_bits(self) -> int:
        return bits_for(int(self.acc_max.max()))


@dataclass(frozen=True, eq=False)
class LinearStep(_Accumulator):
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
    inputs: tuple[int, ...] = ()
    chain_names: ClassVar[tuple[str, str]] = ("q", "acc")

    def run(self, q: Any, backend: Backend) -> Any:
        apply = OPS[self.op].linear_apply
        assert apply is not None
        acc = apply(q, self.weight, self.attrs, backend) + self.offset
        return backend.hint(acc, self.acc_bits)

    def describe(self, names: Sequence[str]) -> str:
        return _linear_text(self, self.operand_names(names)[0])

    def statistics(self) -> StepStatistics:
        return self.accumulator_statistics()


@dataclass(frozen=True, eq=False)
class TableFunction(_Dequantized, _Data):
    """What a table computes, as data: dequantize the accumulator
    (``scale * (acc - zero) + bias``, arrays shaped ``(1, *shape)``), evaluate the float
    ``chain`` of elementwise/reshape nodes, quantize with ``output``. Called on a full
    accumulator it is the layer without dropped bits (the reference for the rounding's
    effect, :meth:`IntegerProgram.run_without_rounding`); a table holds its values at the
    centre of each rounding cell.
    """

    scale: np.ndarray
    zero: np.ndarray
    bias: np.ndarray
    chain: tuple[Node, ...]
    output: UniformQuantizer

    def __call__(self, acc: np.ndarray) -> np.ndarray:
        out = self.output.quantize(_chain(self.chain, self.dequantize(acc)))
        return out.reshape(out.shape[0], -1).reshape(np.shape(acc))


@dataclass(frozen=True, eq=False)
class TableRead(_Data):
    """The exact function of a table whose index is never rounded (a tree's tables, a
    product's squares, an identity copy): the table itself, read at the index, as data."""

    table: np.ndarray

    def __call__(self, acc: np.ndarray) -> np.ndarray:
        acc = np.asarray(acc)
        index = np.clip(acc, 0, self.table.shape[1] - 1).reshape(acc.shape[0], -1)
        return self.table[np.arange(index.shape[1]), index].reshape(acc.shape)


@dataclass(frozen=True, eq=False)
class TableStep(StepBase, _Data):
    """Drop ``lsbs`` low bits of the accumulator, then look up one table per element.

    ``table[j, i]`` is the output for element ``j`` (flat index within one sample) when
    the accumulator's high bits are ``i``. Output values are in ``[0, 2**out_bits)``.

    The accumulator is rounded to a multiple of ``2**lsbs`` (half up) at width
    ``round_bits``, wide enough that rounding up never carries out. With
    ``exact_rounding`` the low bits are removed exactly (one small bootstrap per bit in
    FHE); without it the lookup itself rounds approximately (no extra bootstrap), which in
    FHE may land one cell off near a cell border, so ``simulate``/``execute`` may then
    differ from ``disable`` by one table entry.

    ``inputs`` (here and in every step) names the operand: an index into the values
    computed so far (0 is the program input, ``k + 1`` the output of ``steps[k]``);
    empty means the previous value, as in a chain.
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
    exact: TableFunction | TableRead | Callable[[np.ndarray], np.ndarray]
    inputs: tuple[int, ...] = ()
    chain_names: ClassVar[tuple[str, str]] = ("acc", "q")

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

    def run(self, acc: Any, backend: Backend) -> Any:
        if self.lsbs:
            # NOTE: the hints matter: Concrete sizes the rounding and the table from these
            # widths, which it would otherwise take from the inputset, not from the proof;
            # equal widths before and after also tell it that no carry can occur.
            acc = backend.hint(acc, self.round_bits)
            acc = backend.hint(backend.round(acc, self.lsbs, self.exact_rounding), self.round_bits)
        out = backend.hint(backend.lookup(self.lookup, acc), self.out_bits)
        return out.reshape((out.shape[0],) + self.out_shape)

    def run_exact(self, acc: Any) -> Any:
        return self.exact(acc).reshape((acc.shape[0],) + self.out_shape)

    def describe(self, names: Sequence[str]) -> str:
        return _table_text(self, self.operand_names(names)[0])

    def rounding_text(self, source: str) -> str | None:
        return _round_text(self, source) if self.lsbs else None

    def lookups_by_width(self) -> dict[int, int]:
        n = int(self.table.shape[0])
        counts = {self.index_bits: n}
        if self.exact_rounding and self.lsbs:
            add_counts(counts, {1: n * self.lsbs})
        return counts

    def statistics(self) -> StepStatistics:
        return StepStatistics(
            self.name,
            truncated_bits=self.lsbs,
            table_input_bits=self.index_bits,
            table_output_bits=self.out_bits,
            lookups=int(self.table.shape[0]),
            extends_previous=True,
        )


def _positive_first(multipliers: tuple[np.ndarray, ...]) -> list[int]:
    # NOTE: operands with positive multipliers first, so that every partial sum (offset
    # included) is non-negative: see AddStep.
    signs = [int(np.sign(m.flat[0])) for m in multipliers]
    return sorted(range(len(multipliers)), key=lambda k: -signs[k])


@dataclass(frozen=True, eq=False)
class AddStep(_Accumulator):
    """``acc = sum_k multipliers[k] * v[inputs[k]] + offset``, with ``0 <= acc <= acc_max``
    proven (residual connections).

    Each multiplier is a clear integer array (one sign per operand); multiplying by clear
    constants and adding encrypted values costs no bootstrap. The operands with positive
    multipliers are added first, then the offset, then the negative ones are subtracted:
    with ``offset = -(proven minimum of the sum)`` every partial sum is non-negative, so
    no value Concrete sees is ever negative. The real value is
    ``scale * (acc - zero) + bias``, like a :class:`LinearStep`'s.
    """

    name: str
    inputs: tuple[int, ...]
    multipliers: tuple[np.ndarray, ...]
    offset: np.ndarray
    acc_max: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    bias: np.ndarray
    multi_operand = True

    def run(self, operands: tuple[Any, ...], backend: Backend) -> Any:
        order = _positive_first(self.multipliers)
        acc: Any = None
        for k in order:
            m = self.multipliers[k]
            positive = m.flat[0] > 0
            term = operands[k] if np.all(np.abs(m) == 1) else operands[k] * np.abs(m)
            if acc is None:
                acc = term + self.offset
            else:
                acc = acc + term if positive else acc - term
            acc = backend.hint(acc, self.acc_bits)
        return acc

    def statistics(self) -> StepStatistics:
        return self.accumulator_statistics(lookups=0)

    def describe(self, names: Sequence[str]) -> str:
        terms = " ".join(
            f"{'+' if m.flat[0] > 0 else '-'} {_multiplier_text(m)}{names[i]}"
            for i, m in zip(self.inputs, self.multipliers, strict=True)
        ).removeprefix("+ ")
        return (
            f"{terms} + offset_{self.name}  # residual add, 0 lookups, 0 <= acc <= "
            f"{int(self.acc_max.max())} ({self.acc_bits} bits, proven)"
        )


def _identity(x: np.ndarray) -> np.ndarray:
    return np.asarray(x)


def _multiplier_text(m: np.ndarray) -> str:
    magnitudes = np.unique(np.abs(m))
    if magnitudes.size == 1:
        return "" if magnitudes[0] == 1 else f"{int(magnitudes[0])}*"
    return f"m[{int(magnitudes.min())}..{int(magnitudes.max())}]*"


@dataclass(frozen=True, eq=False)
class MaxPoolStep(StepBase, _Data):
    """Max pooling of codes that share one scale and zero point per channel.

    The maximum is taken one spatial axis at a time (separably, in ``axes`` order), each
    as ``k - 1`` pairwise maxima ``max(a, b) = b + relu(a - b)``: one table lookup on
    ``d = (a + K) - b`` with ``K = max proven code``, so ``0 <= d <= 2K`` (one bit more
    than the codes) and every value stays non-negative. The padded borders hold code 0,
    which is no larger than any code, so a padded position never changes a maximum (every
    window holds a real value); each axis is padded just before it is reduced. A last
    identity lookup per output (at the codes' width) separates the narrow codes from the
    wide integers of the layer that reads them (Concrete gives one width to all values
    linked by additions). Lookups per output element: ``(k_1 - 1) * n_1 / n_out +
    (k_2 - 1) + 1`` for 2-d pooling (``n_1``: elements after the first axis), ``k`` for
    1-d: ``k*k`` for non-overlapping 2-d windows (4 for 2x2), fewer than a tree of
    pairwise maxima for overlapping ones (3x3, stride 1: about 5 instead of 9).
    """

    name: str
    inputs: tuple[int, ...]
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    axes: tuple[int, ...]
    code_max: int
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    @property
    def bits(self) -> int:
        return bits_for(self.code_max)

    @property
    def index_bits(self) -> int:
        return bits_for(2 * self.code_max)

    def _relu_shifted(self, d: np.ndarray) -> np.ndarray:
        return np.maximum(np.asarray(d) - self.code_max, 0)

    def stage_shapes(self, in_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        """The shape (one sample) after each axis of the separable maximum."""
        shape = list(in_shape)
        shapes = []
        for axis in self.axes:
            i = axis - 2
            k, s, (begin, end) = self.kernel[i], self.stride[i], self.padding[i]
            shape[axis - 1] = (shape[axis - 1] + begin + end - k) // s + 1
            shapes.append(tuple(shape))
        return shapes

    def lookups(self, in_shape: tuple[int, ...]) -> int:
        """Table lookups per sample (``in_shape`` without the batch axis): the pairwise
        maxima, and one identity lookup per output (see ``__call__``)."""
        shapes = self.stage_shapes(in_shape)
        maxima = sum(
            (self.kernel[axis - 2] - 1) * int(np.prod(shape))
            for axis, shape in zip(self.axes, shapes, strict=True)
        )
        return maxima + int(np.prod(shapes[-1]))

    def lookups_by_width(self) -> dict[int, int]:
        n_out = int(np.prod(self.stage_shapes(self.in_shape)[-1]))
        counts = {self.index_bits: self.lookups(self.in_shape) - n_out}
        counts[self.bits] = counts.get(self.bits, 0) + n_out
        return counts

    def statistics(self) -> StepStatistics:
        return StepStatistics(
            self.name,
            table_input_bits=self.index_bits,
            lookups=self.lookups(self.in_shape),
            lookups_per_output=self.lookups(self.in_shape) / int(np.prod(self.out_shape)),
        )

    def run(self, x: Any, backend: Backend) -> Any:
        for axis in self.axes:
            i = axis - 2
            k, s = self.kernel[i], self.stride[i]
            if any(self.padding[i]):
                # NOTE: padded one axis at a time, just before it is reduced: the first
                # axis' maxima are not computed on the second axis' padding.
                pads = [(0, 0)] * len(x.shape)
                pads[axis] = self.padding[i]
                x = backend.pad(x, tuple(pads))
            n_out = (x.shape[axis] - k) // s + 1
            taps = []
            for t in range(k):
                index = [slice(None)] * len(x.shape)
                index[axis] = slice(t, t + s * (n_out - 1) + 1, s)
                taps.append(x[tuple(index)])
            value = taps[0]
            for tap in taps[1:]:
                d = backend.hint((value + self.code_max) - tap, self.index_bits)
                r = backend.hint(backend.lookup(self._relu_shifted, d), self.bits)
                value = backend.hint(tap + r, self.bits)
            x = value
        # NOTE: Concrete gives every value linked by additions one width, so without this
        # lookup the codes (and d) would take the width of the accumulator that reads the
        # pooled values, and the max tables would read that many bits: an identity lookup
        # separates the narrow codes from the next layer's wide integers.
        return backend.lookup(_identity, x)

    def describe(self, names: Sequence[str]) -> str:
        return (
            f"max_pool({self.operand_names(names)[0]}, kernel={self.kernel}, stride={self.stride}, "
            f"padding={self.padding})  # separable over axes {self.axes}: "
            f"{self.lookups(self.in_shape)} lookups of {self.index_bits} bits "
            f"(max(a, b) = b + relu(a - b)) -> uint{self.bits}{list(self.out_shape)}"
        )


@dataclass(frozen=True, eq=False)
class ConcatStep(StepBase, _Data):
    """Concatenation of encrypted tensors along ``axis`` (batch axis included): no
    bootstrap; each part keeps its own scales (folded into the next linear layer)."""

    name: str
    inputs: tuple[int, ...]
    axis: int
    bits: int
    multi_operand = True

    def run(self, operands: tuple[Any, ...], backend: Backend) -> Any:
        return backend.hint(np.concatenate(tuple(operands), axis=self.axis), self.bits)

    def describe(self, names: Sequence[str]) -> str:
        parts = ", ".join(self.operand_names(names))
        return f"concatenate([{parts}], axis={self.axis})  # 0 lookups, uint{self.bits}"


@dataclass(frozen=True, eq=False)
class ReshapeStep(StepBase, _Data):
    """A reshape of an encrypted tensor (row-major order kept): no bootstrap."""

    name: str
    inputs: tuple[int, ...]
    shape: tuple[int, ...]

    def run(self, x: Any, backend: Backend) -> Any:
        return x.reshape((x.shape[0],) + self.shape)

    def describe(self, names: Sequence[str]) -> str:
        return f"{self.operand_names(names)[0]}.reshape({list(self.shape)})  # 0 lookups"


@dataclass(frozen=True, eq=False)
class GatherStep(StepBase, _Data):
    """Values moved, none computed (transpose, permute, channel shuffle, slicing,
    nearest upsampling): output element ``j`` (flat, one sample) is input element
    ``index[j]``. No bootstrap; the output keeps the input's width."""

    name: str
    inputs: tuple[int, ...]
    index: np.ndarray
    shape: tuple[int, ...]
    bits: int

    def run(self, x: Any, backend: Backend) -> Any:
        flat = x.reshape((x.shape[0], -1))[:, self.index]
        return backend.hint(flat.reshape((x.shape[0],) + self.shape), self.bits)

    def describe(self, names: Sequence[str]) -> str:
        return (
            f"{self.operand_names(names)[0]}.reshape(-1)[index_{self.name}].reshape("
            f"{list(self.shape)})  # gather, 0 lookups, uint{self.bits}"
        )


@dataclass(frozen=True, eq=False)
class ProductStep(_Accumulator):
    """The product of two encrypted tensors of codes ``a`` and ``b`` (broadcast), by
    quarter squares: with ``a' = a - z_a`` and ``b' = b - z_b``,
    ``a' b' = ((a' + b')**2 - (a' - b')**2) / 4``, so two table lookups per element
    (``squares[0]`` reads ``a + b``, ``squares[1]`` reads ``a + B - b``, both in
    ``[0, A + B]``), a subtraction and an offset: ``v = T1 - T2 + offset``, proven in
    ``[0, acc_max]``. The tables hold ``floor(c * t**2)`` (:func:`product_scale`): with
    ``c = 1/4`` the parities match and ``v - offset = a' b'`` exactly; a smaller ``c``
    keeps ``v`` narrow (an error of at most one unit of ``1 / (4c)``). The real value is
    ``scale * (v - zero)``, like an :class:`AddStep`'s; a linear layer reads ``v`` as
    codes (the scale per channel folds into its weights), any other operation through a
    table."""

    name: str
    inputs: tuple[int, ...]
    b_max: int
    sum_bits: int
    squares: tuple[TableStep, TableStep]
    factor: float
    offset: int
    acc_max: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    bias: np.ndarray
    multi_operand = True
    produces: ClassVar[str] = "product"

    def run(self, operands: tuple[Any, ...], backend: Backend) -> Any:
        a, b = operands
        total = backend.hint(a + b, self.sum_bits)
        difference = backend.hint((a + self.b_max) - b, self.sum_bits)
        t1 = self.squares[0](total, backend)
        t2 = self.squares[1](difference, backend)
        acc = backend.hint(t1 + self.offset, self.acc_bits)
        return backend.hint(acc - t2, self.acc_bits)

    def lookups_by_width(self) -> dict[int, int]:
        return {self.sum_bits: 2 * int(self.squares[0].table.shape[0])}

    def statistics(self) -> StepStatistics:
        return self.accumulator_statistics(
            table_input_bits=self.sum_bits, lookups=sum(self.lookups_by_width().values())
        )

    def describe(self, names: Sequence[str]) -> str:
        a, b = self.operand_names(names)
        return (
            f"sq1_{self.name}[{a} + {b}] + {self.offset} - sq2_{self.name}[{a} + "
            f"{self.b_max} - {b}]  # product by quarter squares, 2 lookups of "
            f"{self.sum_bits} bits per element, 0 <= acc <= {int(self.acc_max.max())} "
            f"({self.acc_bits} bits, proven)"
        )


def _square_table(name: str, centre: np.ndarray, n_index: int, c: float) -> TableStep:
    """A table ``floor(c * (i - centre_j)**2)`` per element ``j`` (``centre``: one
    sample's shape, batch axis included)."""
    grid = np.arange(n_index, dtype=np.float64)[None, :]
    table = np.floor(c * (grid - centre.reshape(-1, 1)) ** 2 + 1e-9).astype(np.int64)
    high = int(table.max())
    shape = tuple(centre.shape[1:])
    return TableStep(
        name,
        0,
        bits_for(n_index - 1),
        True,
        np.full(centre.shape, n_index - 1),
        table,
        bits_for(high),
        shape,
        np.zeros(centre.shape, dtype=np.int64),
        np.full(centre.shape, high),
        TableRead(table),
    )


def _reachable(table: TableStep, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, ...]:
    """Each element's smallest and largest table entry over its reachable inputs."""
    index = np.arange(table.table.shape[1])[None, :]
    inside = (index >= lo.reshape(-1, 1)) & (index <= hi.reshape(-1, 1))
    high = np.where(inside, table.table, np.iinfo(np.int64).min).max(axis=1)
    low = np.where(inside, table.table, np.iinfo(np.int64).max).min(axis=1)
    return low.reshape(lo.shape), high.reshape(hi.shape)


def _product_step(
    name: str, a: _Value, b: _Value, plan: ProductPlan, inputs: tuple[int, int]
) -> ProductStep:
    """The :class:`ProductStep` of codes ``a`` and ``b`` as ``plan`` (chosen when the
    model was quantized) says."""
    shape = np.broadcast_shapes(a.hi.shape, b.hi.shape)
    if int(a.hi.max()) > plan.bound_a or int(b.hi.max()) > plan.bound_b:  # pragma: no cover
        raise AssertionError(f"codes entering {name} exceed their planned bounds")
    big_b = plan.bound_b
    n_index = plan.bound_a + big_b + 1
    za, zb = (np.broadcast_to(v.zero, shape) for v in (a, b))
    lo_a, hi_a, lo_b, hi_b = (np.broadcast_to(x, shape) for x in (a.lo, a.hi, b.lo, b.hi))
    c = plan.factor
    sq1 = _square_table(f"{name}_sum", za + zb, n_index, c)
    sq2 = _square_table(f"{name}_difference", big_b + za - zb, n_index, c)
    t1_lo, t1_hi = _reachable(sq1, lo_a + lo_b, hi_a + hi_b)
    t2_lo, t2_hi = _reachable(sq2, lo_a + big_b - hi_b, hi_a + big_b - lo_b)
    offset = int(np.max(t2_hi - t1_lo))
    offset = max(offset, 0)
    acc_max = t1_hi - t2_lo + offset
    scale = np.broadcast_to(a.scale, shape) * np.broadcast_to(b.scale, shape) / (4 * c)
    return ProductStep(
        name,
        inputs,
        big_b,
        bits_for(n_index - 1),
        (sq1, sq2),
        c,
        offset,
        acc_max.astype(np.int64),
        np.array(scale, dtype=np.float64),
        np.full(shape, float(offset)),
        np.zeros(shape),
    )


Step = (
    LinearStep | TableStep | AddStep | MaxPoolStep | ConcatStep | ReshapeStep | GatherStep
) | ProductStep


@dataclass(frozen=True, eq=False)
class IntegerProgram:
    """The integer program: input quantizer, steps, and the last layer's dequantization.

    Calling it on an int64 batch ``(B, *input_shape)`` in ``[0, qmax]`` runs it in NumPy;
    Concrete traces the same call, with its own :class:`Backend`, to build the circuit
    (with ``B = 1``). Steps run in order; each reads the values named by its ``inputs``
    (indices into the values computed so far: 0 is the input, ``k + 1`` the output of
    ``steps[k]``), or the previous value when it names none, so a chain of
    :class:`LinearStep`/:class:`TableStep` is a program as it stands, and branching
    graphs (residual adds, concatenations) are programs whose steps name their inputs.
    The program returns the last step's value.
    """

    input_quantizer: UniformQuantizer
    input_shape: tuple[int, ...]
    steps: tuple[Step, ...]

    @property
    def input_bits(self) -> int:
        return bits_for(self.input_quantizer.qmax)

    @property
    def output_step(self) -> LinearStep:
        """The last step, whose accumulator the client dequantizes (a linear layer or an
        add)."""
        return self.steps[-1]  # type: ignore[return-value]

    @property
    def is_chain(self) -> bool:
        """Whether every step reads the previous value (no branches)."""
        return all(not step.inputs for step in self.steps)

    def __call__(self, q: Any, backend: Backend = NUMPY) -> Any:
        return self.values(q, backend)[-1]

    def values(self, q: Any, backend: Backend = NUMPY) -> list[Any]:
        """Every value the program computes on ``q``: the input (hinted to its width),
        then each step's output in order (:func:`run_steps`)."""
        return run_steps(self.steps, [backend.hint(q, self.input_bits)], backend)

    def lookups_by_width(self) -> dict[int, int]:
        """Table lookups per sample by input width; width 1 counts the exactly dropped
        accumulator bits (Concrete drops each with a one-bit bootstrap)."""
        counts: dict[int, int] = {}
        for step in self.steps:
            add_counts(counts, step.lookups_by_width())
        return counts

    def statistics(self) -> dict[str, Any]:
        """Its per-layer rows (:func:`statistics_rows`) and input width."""
        return {"layers": statistics_rows(self.steps), "input_bits": self.input_bits}

    def run_without_rounding(self, q: np.ndarray) -> np.ndarray:
        """The program with every table applied to the full accumulator (no dropped
        bits); the difference to ``self(q)`` is the effect of the table width."""
        values = [q]
        for step in self.steps:
            values.append(step.run_exact(step.operands(values)))
        return values[-1]

    def source(self) -> str:
        """A readable listing of the program (what runs encrypted)."""
        if not self.is_chain:
            return self._dag_source()
        lines = [f"def program(q):  # q: uint{self.input_bits}{list(self.input_shape)}"]
        for step in self.steps:
            read, write = step.chain_names
            rounding = step.rounding_text(read)
            if rounding is not None:
                lines.append(f"    {read} = {rounding}")
            lines.append(f"    {write} = {step.describe([read])}")
        lines.append("    return acc  # decrypted and dequantized by the client")
        return "\n".join(lines)

    def _dag_source(self) -> str:
        names = ["v0"] + [f"v{k + 1}" for k in range(len(self.steps))]
        lines = [f"def program(v0):  # v0: uint{self.input_bits}{list(self.input_shape)}"]
        for k, step in enumerate(self.steps):
            target = names[k + 1]
            seen = names[: k + 1]
            rounding = step.rounding_text(step.operand_names(seen)[0])
            if rounding is not None:
                # NOTE: the step then reads the rounded value, under its own name.
                lines.append(f"    {target} = {rounding}")
                read = step.inputs or (k,)
                seen = [target if i in read else n for i, n in enumerate(seen)]
            lines.append(f"    {target} = {step.describe(seen)}")
        lines.append(f"    return {names[-1]}  # decrypted and dequantized by the client")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """The program as data: its input quantizer, input shape and steps, each step's
        fields (:meth:`LinearStep.to_dict`, ...) under its type's name.

        Raises:
            TypeError: a step holds something that is not data (a closure).
        """
        return {
            "input_quantizer": plain_data(self.input_quantizer.to_dict()),
            "input_shape": list(self.input_shape),
            "steps": [{"step_type": type(step).__name__, **step.to_dict()} for step in self.steps],
        }

    @classmethod
    def from_dict(cls, data: Any) -> IntegerProgram:
        """Rebuild a program from :meth:`to_dict` output, checking every field's type.

        Raises:
            ValueError: unknown or missing keys, an unknown step type, or a value of the
                wrong type.
        """
        data = _exact_keys(cls, data, [f.name for f in fields(cls)])
        steps = []
        for item in _data_list(data["steps"], "IntegerProgram.steps"):
            if not isinstance(item, dict) or item.get("step_type") not in _STEP_TYPES:
                raise ValueError(
                    f"Every step of an IntegerProgram needs a 'step_type' among "
                    f"{sorted(_STEP_TYPES)}. Got {str(item)[:80]}."
                )
            fields_only = {k: v for k, v in item.items() if k != "step_type"}
            steps.append(_STEP_TYPES[item["step_type"]].from_dict(fields_only))
        return cls(
            _decode("input encoding", data["input_quantizer"], "IntegerProgram.input_quantizer"),
            _decode("tuple[int, ...]", data["input_shape"], "IntegerProgram.input_shape"),
            tuple(steps),
        )


def _linear_text(step: LinearStep, source: str) -> str:
    geometry = ""
    if "stride" in step.attrs:
        g = ConvGeometry.from_attrs(step.attrs)
        geometry = (
            f", stride={g.stride}, padding={g.padding}, dilation={g.dilation}, groups={g.groups}"
        )
    return (
        f"{step.op}({source}, W_{step.name}{list(step.weight.shape)}{geometry}) + "
        f"offset_{step.name}  # 0 <= acc <= {int(step.acc_max.max())} "
        f"({step.acc_bits} bits, proven)"
    )


def _round_text(step: TableStep, source: str) -> str:
    how = "exact" if step.exact_rounding else "approximate"
    return (
        f"round_bit_pattern({source}, lsbs_to_remove={step.lsbs}, {how})"
        f"  # table reads {step.index_bits} bits"
    )


def _table_text(step: TableStep, source: str) -> str:
    return (
        f"table_{step.name}[{source} >> {step.lsbs}]  # one lookup per element, "
        f"{step.table.shape[0]} tables of {step.table.shape[1]} entries -> "
        f"uint{step.out_bits}, reshape to {list(step.out_shape)}"
    )


def _broadcast(values: np.ndarray, shape: tuple[int, ...], axis: int) -> np.ndarray:
    """Per-output-channel constants (on ``axis`` of the accumulator) broadcast to ``shape``."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 1:
        return np.full(shape, values.item())
    channel_shape = [1] * len(shape)
    channel_shape[axis % len(shape)] = -1
    return np.broadcast_to(values.reshape(channel_shape), shape).copy()


def _linear_step(
    node: Node,
    weight: np.ndarray,
    weight_scale: Any,
    lo: np.ndarray,
    hi: np.ndarray,
    input_zero: np.ndarray,
    inputs: tuple[int, ...] = (),
) -> LinearStep:
    """``acc = apply(q, weight) - lo`` (``0 <= acc <= hi - lo``) and its dequantization
    ``scale * (acc - zero) + bias``, with ``zero = apply(input_zero, weight) - lo``."""
    spec = OPS[node.op]
    assert spec.linear_apply is not None
    zero = spec.linear_apply(input_zero, weight, node.attrs, NUMPY) - lo
    scale = _broadcast(np.asarray(weight_scale), lo.shape, spec.channel_axis)
    bias = _broadcast(node.params.get("bias", np.zeros(1)), lo.shape, spec.channel_axis)
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
        inputs,
    )


def _chain(nodes: tuple[Node, ...], value: np.ndarray) -> np.ndarray:
    for node in nodes:
        value = node.evaluate(value)
    return value


@dataclass(frozen=True, eq=False)
class _Source(_Dequantized):
    """What a table reads: a value in ``[0, hi]`` whose real value is
    ``scale * (v - zero) + bias`` (arrays shaped ``(1, *shape)``)."""

    hi: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    bias: np.ndarray

    @property
    def bits(self) -> int:
        return bits_for(int(self.hi.max()))


def _table(
    name: str,
    source: _Source,
    chain: tuple[Node, ...],
    out_q: UniformQuantizer,
    table_bits: int,
    exact_rounding: bool,
    inputs: tuple[int, ...] = (),
) -> TableStep:
    round_bits = source.bits
    lsbs = max(0, round_bits - table_bits)
    half = 2 ** (lsbs - 1) if lsbs else 0
    if lsbs and int(source.hi.max()) + half >= 2**round_bits:
        # Rounding the largest accumulators up would carry into a new bit: round at one
        # more bit instead, dropping one more bit, so the table keeps table_bits inputs.
        round_bits, lsbs = round_bits + 1, lsbs + 1
        half = 2 ** (lsbs - 1)
    # Index i holds the accumulators nearest to i*2^lsbs (halves up), i.e. the cell
    # i*2^lsbs - half ... i*2^lsbs + half - 1; the table evaluates the layer at its centre.
    index_max = (source.hi + half) >> lsbs
    centre_shift = -0.5 if lsbs else 0.0
    n_index = int(index_max.max()) + 1
    centres = np.arange(n_index, dtype=np.float64) * 2**lsbs + centre_shift
    acc_grid = centres.reshape((n_index,) + (1,) * (source.scale.ndim - 1))
    real = source.scale[0] * (acc_grid - source.zero[0]) + source.bias[0]
    out = _chain(chain, real)
    out_shape = tuple(out.shape[1:])
    table = out_q.quantize(out).reshape(n_index, -1).T.astype(np.int64)
    # Proven output bounds per element: the table's extremes over reachable indices.
    reachable = np.arange(n_index)[None, :] <= index_max.reshape(-1, 1)
    out_min = np.where(reachable, table, np.iinfo(np.int64).max).min(axis=1)
    out_max = np.where(reachable, table, np.iinfo(np.int64).min).max(axis=1)

    exact = TableFunction(source.scale, source.zero, source.bias, chain, out_q)
    return TableStep(
        name,
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
        inputs,
    )


def lower(
    quantized: QuantizedGraph, table_bits: int | Mapping[str, int] | None = None
) -> IntegerProgram:
    """Lower a quantized graph to an :class:`IntegerProgram`.

    Args:
        quantized: the output of :func:`fhe_quant.quant.ptq.quantize_graph` (or of QAT).
        table_bits: width of every table's input (the accumulator is rounded to it);
            ``None`` uses ``quantized.config.rounding_bits`` or, if that is ``None``
            too, :func:`auto_table_bits` of each layer's output bits. A mapping gives
            the width per source: the name of the layer (or add) whose accumulator the
            table reads; sources it omits are lowered as with ``None``.

    Raises:
        RangeError: a table input would exceed Concrete's 16-bit limit.
    """
    lowering = _DagLowering(quantized.graph, quantized.plan, quantized.config, table_bits)
    program = lowering.program()
    return _as_chain(program) if quantized.dag is None else program


def _as_chain(program: IntegerProgram) -> IntegerProgram:
    """The program of a chain graph as a chain: no step names its operand (each reads the
    previous value), and a table is named after the layer whose accumulator it reads."""
    steps: list[Step] = []
    for k, step in enumerate(program.steps):
        assert step.inputs == (k,) and not step.multi_operand
        if step.chain_names[0] == "acc":  # a table reading the layer before it
            step = replace(step, name=steps[-1].name, inputs=())
        else:
            step = replace(step, inputs=())
        steps.append(step)
    return replace(program, steps=tuple(steps))


# --------------------------------------------------------------------------- branching graphs


@dataclass(frozen=True, eq=False)
class _Value:
    """An encrypted value of a branching program: ``values[index]`` of the program, in
    ``[lo, hi]`` (proven), with real value ``scale * (v - zero) + bias`` (arrays shaped
    ``(1, *shape)``). Codes (input, tables, max pools, pure adds) have ``bias = 0`` and
    integer zero points."""

    index: int
    scale: np.ndarray
    zero: np.ndarray
    bias: np.ndarray
    lo: np.ndarray
    hi: np.ndarray

    def source(self) -> _Source:
        return _Source(self.hi, self.scale, self.zero, self.bias)


def _codes_value(index: int, quantizer: UniformQuantizer, lo: Any, hi: Any) -> _Value:
    shape = np.shape(hi)
    return _Value(
        index,
        np.broadcast_to(quantizer.scale_array(len(shape)), shape).astype(np.float64),
        np.broadcast_to(quantizer.zero_point_array(len(shape)), shape).astype(np.float64),
        np.zeros(shape),
        np.asarray(lo, dtype=np.int64),
        np.asarray(hi, dtype=np.int64),
    )


def _identity_table(name: str, value: _Value) -> TableStep:
    """One identity lookup per element of codes (a fresh value for Concrete's widths)."""
    n = int(value.hi.max()) + 1
    shape = tuple(value.hi.shape[1:])
    table = np.tile(np.arange(n, dtype=np.int64), (value.hi.size, 1))
    return TableStep(
        name,
        0,
        bits_for(n - 1),
        True,
        value.hi.copy(),
        table,
        bits_for(n - 1),
        shape,
        value.lo.copy(),
        value.hi.copy(),
        TableRead(table),
        (value.index,),
    )


class _DagLowering:
    """Builds the steps of a program, each value once, operands first.

    ``RAW`` maps a node kind to the method that lowers it (a value as its operation
    computes it); a table, a reshape or the input produce the codes other steps read
    (:meth:`codes`). A new kind of operation is one method and one entry of ``RAW``.
    """

    RAW: ClassVar[dict[str, Callable[[_DagLowering, Node], _Value]]]

    def __init__(
        self,
        graph: Graph,
        dag: QuantizedDag,
        config: QuantConfig,
        table_bits: int | Mapping[str, int] | None,
    ) -> None:
        self.graph = graph
        self.dag = dag
        self.config = config
        self.table_bits = table_bits if table_bits is not None else config.rounding_bits
        self.steps: list[Step] = []
        self.raw_values: dict[str, _Value] = {}
        self.codes_values: dict[str, _Value] = {}
        probe = self.graph.run(np.zeros((1,) + self.graph.input_shape))
        self.shapes = {name: tuple(value.shape[1:]) for name, value in probe.items()}
        self.input_shape = self.shapes[self.dag.input_name]
        q = self.dag.input_quantizer
        shape = (1,) + self.input_shape
        self.codes_values[self.dag.input_name] = _codes_value(
            0, q, np.zeros(shape), np.full(shape, q.qmax)
        )
        output = self.graph.node(self.dag.output_name)
        if output.kind == "linear":
            self.output_linears = {output.name}
        else:
            self.output_linears = {o.node for o in self.dag.adds[output.name] if o.mode == "acc"}

    def emit(self, step: Step) -> int:
        self.steps.append(step)
        return len(self.steps)

    def program(self) -> IntegerProgram:
        self.raw(self.dag.output_name)
        return IntegerProgram(self.dag.input_quantizer, self.input_shape, tuple(self.steps))

    # -- values as their operation computes them
    def raw(self, name: str) -> _Value:
        if name not in self.raw_values:
            node = self.graph.node(name)
            self.raw_values[name] = self.RAW[node.kind](self, node)
        return self.raw_values[name]

    def codes(self, name: str) -> _Value:
        if name not in self.codes_values:
            node = self.graph.node(name)
            if name in self.dag.tables:
                value = self.table(node)
            elif node.kind == "reshape":
                value = self.reshape(node)
            else:  # max pool, concatenation, add of codes
                value = self.raw(name)
            self.codes_values[name] = value
        return self.codes_values[name]

    # -- steps
    def linear(self, node: Node) -> _Value:
        source = self.codes(node.inputs[0])
        quantized = self.dag.linears[node.name]
        w = quantized.weight_q
        lo, hi = linear_bounds(node.op, w, source.lo, source.hi, node.attrs)
        if np.any(source.zero != np.rint(source.zero)):  # pragma: no cover - codes only
            raise AssertionError(f"non-integer zero points entering {node.name}")
        # NOTE: input x_i = s_i * (q_i - z_i) and the integer weights W approximate
        # w * s_in / s_w (input scales folded in, see quant/ptq.py), so
        #   apply(x, w) + b = s_w * (apply(q, W) - apply(z, W)) + b = scale * (acc - zero) + bias
        # with acc = apply(q, W) - lo: zero = apply(z, W) - lo, an integer per output. A
        # convolution pads z with 0 as it pads q, so `zero` differs at the borders and a
        # padded tap contributes s_w * (0 - 0) = 0: the real zero padding, for any z.
        scale = quantized.weight_quantizer.scale
        zero = source.zero.astype(np.int64)
        step = _linear_step(node, w, scale, lo, hi, zero, (source.index,))
        return _Value(self.emit(step), step.scale, step.zero, step.bias, np.zeros_like(lo), hi - lo)

    def add(self, node: Node) -> _Value:
        operands = self.dag.adds[node.name]
        common = self.dag.add_quantizers[node.name]
        values = []
        for operand in operands:
            if operand.mode == "acc":
                values.append(self.raw(operand.node))
            else:
                values.append(self.codes(operand.node))
        shape = values[0].hi.shape
        channel = (1, -1) + (1,) * (len(shape) - 2)
        acc = [o.node for o in operands if o.mode == "acc"]
        if acc:
            scaling = self.dag.linears[acc[0]].scaling
            assert scaling is not None
            mult_acc = scaling.accumulator.reshape(channel)
            mult_codes = scaling.codes.reshape(channel)
            unit = np.broadcast_to(scaling.unit.reshape(channel), shape)
        else:
            mult_acc = mult_codes = np.ones((1,) * len(shape), dtype=np.int64)
            unit = np.broadcast_to(common.scale_array(len(shape)), shape)
        multipliers, lo, hi = [], np.zeros(shape, np.int64), np.zeros(shape, np.int64)
        zero, bias = np.zeros(shape), np.zeros(shape)
        for operand, value in zip(operands, values, strict=True):
            magnitude = mult_acc if operand.mode == "acc" else mult_codes
            if operand.mode == "codes" and not np.allclose(value.scale, unit * magnitude):
                raise AssertionError(f"operand {operand.node} of {node.name} off scale")
            m = np.broadcast_to(operand.sign * magnitude, shape).astype(np.int64)
            multipliers.append(m)
            lo = lo + np.where(m > 0, m * value.lo, m * value.hi)
            hi = hi + np.where(m > 0, m * value.hi, m * value.lo)
            zero = zero + m * value.zero
            bias = bias + operand.sign * value.bias
        lo = self._channel_shift(node, lo)
        step = AddStep(
            node.name,
            tuple(v.index for v in values),
            tuple(multipliers),
            -lo,
            hi - lo,
            np.array(unit, dtype=np.float64),
            zero - lo,
            bias,
        )
        return _Value(self.emit(step), step.scale, step.zero, bias, np.zeros_like(lo), hi - lo)

    def _channel_shift(self, node: Node, lo: np.ndarray) -> np.ndarray:
        """The shift that makes an add's sum non-negative: its proven minimum, or, when a
        max pool reads the sum, the smallest minimum of each channel (a max pool compares
        codes with one zero point per channel; the proven minimum can vary over positions
        where the operands' tables reach different ranges). Where the minimum is already
        constant per channel both are the same."""
        if not any(user.kind == "max_pool" for user in self.graph.users(node.name)):
            return lo
        axes = tuple(a for a in range(lo.ndim) if a != 1)
        return np.broadcast_to(lo.min(axis=axes, keepdims=True), lo.shape)

    def table(self, node: Node) -> _Value:
        source_name, chain = chain_source(self.graph, node.name, self.dag.input_name)
        if source_name == self.dag.input_name:
            source = self.codes(source_name)
        else:
            source = self.raw(source_name)
        out_q = self.dag.tables[node.name]
        configured = self.table_bits
        if isinstance(configured, Mapping):
            configured = configured.get(source_name, self.config.rounding_bits)
        bits = table_width(configured, out_q.qmax)
        if bits > MAX_TABLE_BITS:
            raise RangeError(
                f"The table producing {node.source or node.name!r} would read {bits} bits; "
                f"Concrete accepts at most {MAX_TABLE_BITS}. Lower rounding_bits."
            )
        step = _table(
            node.name,
            source.source(),
            chain,
            out_q,
            bits,
            self.config.rounding_exact,
            (source.index,),
        )
        return _codes_value(self.emit(step), out_q, step.out_min, step.out_max)

    def reshape(self, node: Node) -> _Value:
        source_name, _ = chain_source(self.graph, node.name, self.dag.input_name)
        source = self.codes(source_name)
        shape = self.shapes[node.name]
        step = ReshapeStep(node.name, (source.index,), shape)
        full = (1,) + shape
        return _Value(
            self.emit(step),
            *(a.reshape(full) for a in (source.scale, source.zero, source.bias)),
            source.lo.reshape(full),
            source.hi.reshape(full),
        )

    def max_pool(self, node: Node) -> _Value:
        # NOTE: codes that a linear layer also reads take its accumulator's width in
        # Concrete (see MaxPoolStep): the pool reads a lookup's output that only it reads,
        # its own copy of the table producing its input, or an identity lookup of it.
        name = node.inputs[0]
        own = len(self.graph.users(name)) == 1 and name != self.dag.input_name
        if name in self.dag.tables and not own:
            source = self.table(self.graph.node(name))
        elif name in self.dag.tables or (own and self.graph.node(name).kind == "max_pool"):
            source = self.codes(name)
        else:
            codes = self.codes(name)
            step = _identity_table(f"{name}_copy", codes)
            source = replace(codes, index=self.emit(step))
        kernel, geometry = max_pool_geometry(node.attrs)
        scale = channel_vector(source.scale, 1, node, "scale")
        zero = channel_vector(source.zero, 1, node, "zero point")
        in_shape = tuple(source.hi.shape[1:])
        spatial = tuple(range(2, 2 + geometry.ndim))
        orders = [spatial, spatial[::-1]] if geometry.ndim == 2 else [spatial]
        candidates = [
            MaxPoolStep(
                node.name,
                (source.index,),
                kernel,
                geometry.stride,
                geometry.padding,
                axes,
                int(source.hi.max()),
                in_shape,
                self.shapes[node.name],
            )
            for axes in orders
        ]
        step = min(candidates, key=lambda c: c.lookups(in_shape))
        lo, hi = step(source.lo, NUMPY), step(source.hi, NUMPY)
        channel = (1, -1) + (1,) * geometry.ndim
        return _Value(
            self.emit(step),
            np.broadcast_to(scale.reshape(channel), hi.shape).astype(np.float64),
            np.broadcast_to(zero.reshape(channel), hi.shape).astype(np.float64),
            np.zeros(hi.shape),
            lo,
            hi,
        )

    def concat(self, node: Node) -> _Value:
        values = [self.codes(name) for name in node.inputs]
        axis = int(node.attrs["axis"])
        hi = np.concatenate([v.hi for v in values], axis=axis)
        step = ConcatStep(node.name, tuple(v.index for v in values), axis, bits_for(int(hi.max())))
        return _Value(
            self.emit(step),
            *(
                np.concatenate([getattr(v, f) for v in values], axis=axis)
                for f in ("scale", "zero", "bias", "lo")
            ),
            hi,
        )

    # -- moved values and products (issue 17)
    def gather(self, node: Node) -> _Value:
        source = self.codes(node.inputs[0])
        index = node.params["index"].astype(np.int64)
        shape = self.shapes[node.name]

        def moved(array: np.ndarray) -> np.ndarray:
            return np.asarray(array).reshape(1, -1)[:, index].reshape((1,) + shape)

        step = GatherStep(node.name, (source.index,), index, shape, bits_for(int(source.hi.max())))
        return _Value(
            self.emit(step),
            *(moved(getattr(source, f)) for f in ("scale", "zero", "bias", "lo", "hi")),
        )

    def own_codes(self, name: str) -> _Value:
        """Codes of ``name`` that no linear layer also reads (Concrete would give them,
        and every value added to them, the layer's accumulator width; see max_pool): a
        table's output only this reader takes, its own copy of the table, or an
        identity lookup."""
        own = len(self.graph.users(name)) == 1 and name != self.dag.input_name
        if name in self.dag.tables:
            return self.codes(name) if own else self.table(self.graph.node(name))
        codes = self.codes(name)
        return replace(codes, index=self.emit(_identity_table(f"{name}_copy", codes)))

    def product(self, node: Node) -> _Value:
        a, b = (self.own_codes(name) for name in node.inputs)
        for value in (a, b):
            if np.any(value.zero != np.rint(value.zero)):  # pragma: no cover - codes only
                raise AssertionError(f"non-integer zero points entering {node.name}")
        step = _product_step(node.name, a, b, self.dag.products[node.name], (a.index, b.index))
        return _Value(
            self.emit(step),
            step.scale,
            step.zero,
            step.bias,
            np.zeros_like(step.acc_max),
            step.acc_max,
        )


_DagLowering.RAW = {
    "linear": _DagLowering.linear,
    "add": _DagLowering.add,
    "max_pool": _DagLowering.max_pool,
    "concat": _DagLowering.concat,
    "gather": _DagLowering.gather,
    "mul": _DagLowering.product,
}


# --------------------------------------------------------------------------- as data
# NOTE: every step is a frozen dataclass of arrays, ints, tuples, nodes and quantizers:
# its data form is its fields (``asdict``), and a field is read back by its declared
# type (the table below), so a new field of a known type needs nothing here.


def _step_to_dict(step: Any) -> dict[str, Any]:
    """A step's fields as data (``asdict``: tuples as lists, arrays kept).

    Raises:
        TypeError: a field holds something that is not data (a closure).
    """
    for f in fields(step):
        value = getattr(step, f.name)
        if is_dataclass(value) and not isinstance(
            value, (TableFunction, TableRead, UniformQuantizer)
        ):
            raise TypeError(
                f"{type(step).__name__}.{f.name} is a {type(value).__name__}, which "
                "from_dict cannot read back: it has no data form here."
            )
    data = plain_data(asdict(step))
    for name, value in data.items():
        _check_data(value, f"{type(step).__name__}.{name}")
    return data


def _step_from_dict(cls: type, data: Any) -> Any:
    """The step of type ``cls`` whose :func:`_step_to_dict` is ``data``.

    Raises:
        ValueError: unknown or missing keys, or a value of the wrong type.
    """
    data = _exact_keys(cls, data, [f.name for f in fields(cls)])
    return cls(
        **{f.name: _decode(f.type, data[f.name], f"{cls.__name__}.{f.name}") for f in fields(cls)}
    )


def _check_data(value: Any, where: str) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _check_data(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_data(item, f"{where}[{i}]")
    elif not (value is None or isinstance(value, (bool, int, float, str, np.ndarray))):
        raise TypeError(f"{where} is a {type(value).__name__}, not data: it has no data form.")


def _exact_keys(cls: type, data: Any, names: list[str]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ValueError(f"A {cls.__name__} must be a dict. Got {type(data).__name__}.")
    unknown = sorted(str(key) for key in data if key not in names)
    missing = [name for name in names if name not in data]
    if unknown or missing:
        raise ValueError(
            f"A {cls.__name__} has the keys {names}; got unknown keys {unknown} and missing "
            f"keys {missing}."
        )
    return data


def _data_list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{where} must be a list. Got {type(value).__name__}.")
    return list(value)


def _data_int(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{where} must be an int. Got {value!r:.40}.")
    return value


def _data_array(value: Any, where: str) -> np.ndarray:
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "biuf":
        raise ValueError(f"{where} must be a numeric array. Got {type(value).__name__}.")
    return value


def _data_of(kind: type) -> Callable[[Any, str], Any]:
    def check(value: Any, where: str) -> Any:
        if type(value) is not kind:
            raise ValueError(f"{where} must be a {kind.__name__}. Got {value!r:.40}.")
        return value

    return check


def _table_function(value: Any, where: str) -> TableFunction | TableRead:
    """A table's exact function: a :class:`TableRead` (its one field, ``table``) or a
    :class:`TableFunction`."""
    if isinstance(value, dict) and set(value) == {"table"}:
        return TableRead.from_dict(value)
    return TableFunction.from_dict(value)


def _input_encoding(value: Any, where: str) -> UniformQuantizer | ThresholdGrid:
    """A program's input encoding: a :class:`ThresholdGrid` (trees, ``kind``
    ``"threshold_grid"``) or a :class:`UniformQuantizer`."""
    try:
        if isinstance(value, dict) and value.get("kind") == "threshold_grid":
            return ThresholdGrid.from_dict(value)
        return UniformQuantizer.from_dict(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None


#: How a field is read back, by its declared type.
_DECODERS: dict[str, Callable[[Any, str], Any]] = {
    "str": _data_of(str),
    "bool": _data_of(bool),
    "int": _data_int,
    "np.ndarray": _data_array,
    "tuple[int, ...]": lambda v, w: tuple(_data_int(i, w) for i in _data_list(v, w)),
    "tuple[tuple[int, int], ...]": lambda v, w: tuple(
        _decode("tuple[int, ...]", pair, w) for pair in _data_list(v, w)
    ),
    "tuple[np.ndarray, ...]": lambda v, w: tuple(_data_array(a, w) for a in _data_list(v, w)),
    "tuple[Node, ...]": lambda v, w: tuple(Node.from_dict(n) for n in _data_list(v, w)),
    "Mapping[str, Any]": lambda v, w: attrs_from_data(v),
    "UniformQuantizer": lambda v, w: UniformQuantizer.from_dict(v),
    "input encoding": _input_encoding,
    "TableFunction": _table_function,
    "TableFunction | TableRead | Callable[[np.ndarray], np.ndarray]": _table_function,
    "float": _data_of(float),
    "tuple[TableStep, TableStep]": lambda v, w: tuple(
        TableStep.from_dict(t) for t in _data_list(v, w)
    ),
}


def _decode(kind: Any, value: Any, where: str) -> Any:
    decoder = _DECODERS.get(str(kind))
    if decoder is None:
        raise TypeError(f"{where}: a field of type {kind} has no data form (see _DECODERS).")
    return decoder(value, where)


#: The step types an :class:`IntegerProgram` holds, by name.
_STEP_TYPES: dict[str, type] = {cls.__name__: cls for cls in get_args(Step)}

"""Integer widths the quantization and the lowering agree on: bits of a code range, the
widest table input Concrete accepts, and the table width the lowering picks by default.

They live in ``quant/`` (not in ``fhe_quant.lower``, which re-exports them) because
accumulator-aware quantization (:mod:`fhe_quant.quant.axe`) keeps rounding room for the
table after each layer, so it must know that width when it chooses the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "MAX_TABLE_BITS",
    "MAX_AUTO_TABLE_BITS",
    "ProductPlan",
    "bits_for",
    "auto_table_bits",
    "MIN_KEPT_BITS",
    "MIN_WIDENED_ACCUMULATOR_BITS",
    "kept_table_bits",
    "product_scale",
    "table_bits",
]

#: Concrete refuses table lookups on inputs wider than this.
MAX_TABLE_BITS = 16
#: The widest table the automatic default picks (see :func:`auto_table_bits`).
MAX_AUTO_TABLE_BITS = 7


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


def table_bits(configured: int | None, out_qmax: int) -> int:
    """The input width of a table whose output codes reach ``out_qmax``: ``configured``
    (``rounding_bits``, or the lowering's ``table_bits``) or :func:`auto_table_bits`.

    Examples:
        >>> table_bits(None, 15), table_bits(9, 15)
        (5, 9)
    """
    return configured or auto_table_bits(bits_for(out_qmax))


#: A table that keeps fewer bits than this of the spread of its accumulator's values on
#: calibration data has lost the signal, and is widened (see :func:`kept_table_bits`).
MIN_KEPT_BITS = 3
#: Only tables after accumulators at least this wide are widened by default. Narrower
#: circuits compile, and there a wider table is a latency trade-off left to
#: ``rounding_bits`` (5 to 7 bits costs ~10x per lookup; the 4-bit digits MLP's first
#: table keeps under 3 bits and would widen); Concrete 2.11 found no parameters for
#: 8-bit tables after 18-bit accumulators (digits MLP), and deep networks' accumulators
#: are 19-24 bits, far from compiling at any table width.
MIN_WIDENED_ACCUMULATOR_BITS = 18


def kept_table_bits(
    table_bits: int,
    lsbs: int,
    observed_bits: int,
    kept_bits: int,
    min_kept: int = MIN_KEPT_BITS,
) -> int:
    """The input width of a table that reads ``table_bits`` bits of its accumulator
    (rounding ``lsbs`` bits away), where the accumulator's values on calibration data
    spread over ``observed_bits`` bits (typically the median over elements): unchanged
    when the table keeps ``observed_bits - lsbs >= min_kept`` bits of that spread,
    otherwise widened to keep ``kept_bits`` (the lowering asks for the table's output
    bits: as many bits of the signal in as out).

    The proven accumulator range is the worst case over every input; the values that
    occur span far less (a 3x3x256 convolution's 7-8 bits less: random signs cancel), so
    a table sized from the proof may read one or two bits of the signal. The table is
    widened by the missing bits, never past the accumulator itself (``lsbs``) nor past
    :data:`MAX_TABLE_BITS`; the accumulator and its proof are unchanged, only fewer bits
    are dropped before the lookup. Tables keeping ``min_kept`` bits or more stay as they
    are: small networks keep 3-6 bits at the automatic widths, and a wider table costs
    4x per bit from 6 bits up.

    Examples:
        >>> kept_table_bits(7, lsbs=15, observed_bits=16, kept_bits=6)  # keeps 1: +5
        12
        >>> kept_table_bits(7, lsbs=7, observed_bits=10, kept_bits=8)  # keeps 3: as is
        7
        >>> kept_table_bits(7, 2, 3, kept_bits=6), kept_table_bits(7, 14, 10, kept_bits=20)
        (9, 16)
    """
    if observed_bits - lsbs >= min_kept:
        return table_bits
    missing = kept_bits - (observed_bits - lsbs)
    return min(table_bits + min(missing, lsbs), MAX_TABLE_BITS)


def product_scale(span: int, bits: int) -> float:
    """The factor ``c`` of a product's squares ``floor(c * t**2)``: ``1/4`` (the product
    is exact) when the products of a ``span`` wide range of codes fit ``bits`` bits, else
    smaller, so that they do (one unit of error per square).

    Examples:
        >>> product_scale(14, 8), round(product_scale(510, 10), 6)
        (0.25, 0.001965)
    """
    return min(0.25, (2**bits - 2) / (2 * span * span))


@dataclass(frozen=True)
class ProductPlan:
    """How the product of two tensors of codes is computed (``fhe_quant.lower``'s
    ``ProductStep``), fixed when the model is quantized so that the layer reading the
    product can fold its scale: the operands' largest codes (each is the capacity of its
    quantizer, at least the proven maximum) and the squares' factor ``c``.

    Attributes:
        bound_a: the largest code of the first operand.
        bound_b: the largest code of the second operand.
        factor: ``c`` (:func:`product_scale`); the product's scale is
            ``s_a * s_b / (4 c)``.
    """

    bound_a: int
    bound_b: int
    factor: float

    @classmethod
    def of(cls, bound_a: int, bound_b: int, zero_sum: np.ndarray, bits: int) -> ProductPlan:
        """The plan for operands with largest codes ``bound_a``, ``bound_b`` and zero
        points summing to ``zero_sum``, the squares on ``bits`` bits.

        Examples:
            >>> ProductPlan.of(7, 7, np.array([0]), 8).factor
            0.25
        """
        n_index = bound_a + bound_b + 1
        zeros = np.asarray(zero_sum, dtype=np.int64).reshape(-1, 1)
        span = int(max(np.abs(np.arange(n_index)[None] - zeros).max(), 1))
        return cls(int(bound_a), int(bound_b), product_scale(span, bits))

"""Integer widths the quantization and the lowering agree on: bits of a code range, the
widest table input Concrete accepts, and the table width the lowering picks by default.

They live in ``quant/`` (not in ``fhe_quant.lower``, which re-exports them) because
accumulator-aware quantization (:mod:`fhe_quant.quant.axe`) keeps rounding room for the
table after each layer, so it must know that width when it chooses the weights.
"""

from __future__ import annotations

__all__ = ["MAX_TABLE_BITS", "MAX_AUTO_TABLE_BITS", "bits_for", "auto_table_bits", "table_bits"]

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

"""How a QAT module quantizes: :class:`QATConfig`, and QAT's defaults.

The defaults are the fast path (issue 14 part 6): tables of 4-bit inputs at 2-3 bit
activations and an accumulator budget per layer, so that few low bits are dropped
before each table (docs/DESIGN-NOTES.md, ``benchmarks/qat.py``).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from fhe_quant.quant.config import MAX_ROUNDING_BITS, QuantConfig
from fhe_quant.quant.widths import auto_table_bits

__all__ = [
    "ACTIVATION_SCALES",
    "WEIGHT_MODES",
    "WEIGHT_SCALES",
    "AUTO_BUDGET_MAX_BITS",
    "AUTO_BUDGET_MIN_BITS",
    "AUTO_DROPPED_BITS",
    "AUTO_MIN_TABLE_BITS",
    "MAX_TABLE_BITS",
    "QATConfig",
    "check_choice",
    "default_table_bits",
    "default_accumulator_bits",
    "default_input_bits",
]

#: Ways the activation step sizes are set: learned (LSQ) or moving-average min/max.
ACTIVATION_SCALES = ("lsq", "ema")

#: Ways the weights are quantized.
WEIGHT_MODES = ("uniform", "binary", "binary_stochastic")

#: Ways the uniform weight scales are set from the weights at every step.
WEIGHT_SCALES = ("mse", "max")

#: Activations of this many bits get QAT's default accumulator budget (``"auto"``):
#: from 3 to 4. At 2 bits the budget cost 3 points on the digits MLP (93.8% against 96.9%
#: without one, docs/DESIGN-NOTES.md §18), so 2-bit models keep the unbudgeted default.
AUTO_BUDGET_MIN_BITS = 3
AUTO_BUDGET_MAX_BITS = 4

#: Accumulator bits the ``"auto"`` budget leaves above the table input, in every layer:
#: the low bits dropped exactly before each table, one small bootstrap each.
AUTO_DROPPED_BITS = 3

#: Bits of the activations whose int ``n_bits`` gives the model inputs one bit fewer under
#: the ``"auto"`` budget (:func:`default_input_bits`): the first layer then drops one bit
#: fewer at the same weight budget per input code. Measured on the digits MLP with the
#: plain loop of ``benchmarks/qat.py`` (loop seeds 0, 1, 2): 2-bit inputs and a 6-bit
#: first accumulator gave 96.9 / 95.6 / 96.7% at complexity 2.43e10 (448 bootstraps),
#: 3-bit inputs and 7 bits 97.1 / 96.4 / 96.0% at 2.68e10 (512); a 6-bit first
#: accumulator on 3-bit inputs 94.4%, 1-bit inputs and 5 bits 92.0%.
AUTO_NARROW_INPUT_BITS = (3,)

#: Narrowest table input of QAT's default (``rounding_bits=None``): measured on the
#: digits MLP (docs/DESIGN-NOTES.md §16), a 4-bit lookup costs Concrete about a third of
#: a 5-bit one, and 3-bit tables lost 5-8 points of accuracy at 2-bit activations.
AUTO_MIN_TABLE_BITS = 4

#: Widest table of QAT's default width: post-training quantization's
#: (``fhe_quant.lower.MAX_AUTO_TABLE_BITS``; Concrete 2.11 found no parameters for 8-bit
#: tables after the 18-bit accumulators of a 7-bit, 64-wide layer).
MAX_TABLE_BITS = 7

_OWNER = "QATConfig"


def default_table_bits(activation_bits: int) -> int:
    """QAT's table input width when ``rounding_bits`` is not given. With the default
    accumulator budget (activations of :data:`AUTO_BUDGET_MIN_BITS` to
    :data:`AUTO_BUDGET_MAX_BITS` bits): one bit more than the activations, at least
    :data:`AUTO_MIN_TABLE_BITS`; without it, post-training quantization's automatic
    width (``fhe_quant.quant.widths.auto_table_bits``); at most :data:`MAX_TABLE_BITS`.

    Examples:
        >>> [default_table_bits(b) for b in range(1, 9)]
        [5, 5, 4, 5, 6, 7, 7, 7]
    """
    if not AUTO_BUDGET_MIN_BITS <= activation_bits <= AUTO_BUDGET_MAX_BITS:
        return min(auto_table_bits(activation_bits), MAX_TABLE_BITS)
    return min(max(AUTO_MIN_TABLE_BITS, activation_bits + 1), MAX_TABLE_BITS)


def default_input_bits(n_bits: int) -> int:
    """Bits of the model inputs for an int ``n_bits`` with the ``"auto"`` budget: one
    fewer at :data:`AUTO_NARROW_INPUT_BITS`, else ``n_bits``.

    Examples:
        >>> [default_input_bits(b) for b in (2, 3, 4)]
        [2, 2, 4]
    """
    return n_bits - 1 if n_bits in AUTO_NARROW_INPUT_BITS else n_bits


def default_accumulator_bits(activation_bits: int, table_bits: int) -> int | None:
    """QAT's accumulator budget of a layer for ``accumulator_bits="auto"``: the table
    width plus 3 (3 low bits dropped exactly before each table). Measured on the digits
    MLP with a plain training loop (docs/DESIGN-NOTES.md §18): 7 bits in every layer
    97.1% at complexity 2.68e10, against 95.6% at 2.43e10 for 7 bits in the first layer
    and 6 after it, and 96.9% at 6.70e10 without a budget. ``None`` (no budget) for
    activations of more than :data:`AUTO_BUDGET_MAX_BITS` bits, where a fan-in of 64
    codes leaves too few weight codes in so narrow an accumulator, and of fewer than
    :data:`AUTO_BUDGET_MIN_BITS` (2-bit codes lost 3 points with it).

    Examples:
        >>> default_accumulator_bits(3, 4)
        7
        >>> [default_accumulator_bits(b, 5) for b in (2, 6)]
        [None, None]
    """
    if not AUTO_BUDGET_MIN_BITS <= activation_bits <= AUTO_BUDGET_MAX_BITS:
        return None
    return table_bits + AUTO_DROPPED_BITS


def check_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(
            f"The {name!r} parameter of {_OWNER} must be one of "
            f"{', '.join(repr(c) for c in choices)}. Got {value!r} instead."
        )
    return value


@dataclass(frozen=True)
class QATConfig:
    """How a :class:`~fhe_quant.qat_module.QATModule` quantizes.

    Attributes:
        quant: bit widths per role and table width (``rounding_bits``); the
            ``calibration`` field is not used (QAT learns its ranges).
        activation_scale: ``"lsq"`` (learned step sizes) or ``"ema"`` (moving average
            of the min/max seen in training).
        weight_mode: ``"uniform"``, ``"binary"`` or ``"binary_stochastic"``. Binary modes
            apply to every linear layer but the last, whose weights take
            ``quant.n_bits_outputs`` bits (uniform), as is usual for binary networks.
        weight_scale: how uniform weight scales follow the weights at every step:
            ``"mse"`` (least squared error per channel, the default) or ``"max"``.
        accumulator_bits: ``"auto"``: QAT's default budget per layer
            (:func:`default_accumulator_bits`, uniform weights only; average poolings
            keep their fixed accumulator). When set to an int (2 to 16), every layer's
            proven accumulator range fits
            in this many bits (uniform weights only; an average pooling, whose weights are
            fixed, is refused when its ``qmax * k`` does not fit); ``None``: no
            constraint.
        ema_momentum: weight of each new batch in the moving averages (``"ema"``).
        seed: seed of the stochastic binarization (``None``: torch's global generator).

    Examples:
        >>> QATConfig(QuantConfig.from_n_bits(3), weight_mode="binary").weight_mode
        'binary'
        >>> QATConfig(QuantConfig.from_n_bits(3), activation_scale="max")
        Traceback (most recent call last):
        ...
        ValueError: The 'activation_scale' parameter of QATConfig must be one of 'lsq', \
'ema'. Got 'max' instead.
    """

    quant: QuantConfig
    activation_scale: str = "lsq"
    weight_mode: str = "uniform"
    weight_scale: str = "mse"
    accumulator_bits: int | str | None = None
    ema_momentum: float = 0.1
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.quant, QuantConfig):
            raise ValueError(
                f"The 'quant' parameter of {_OWNER} must be a QuantConfig. "
                f"Got {type(self.quant).__name__} instead."
            )
        check_choice(self.activation_scale, "activation_scale", ACTIVATION_SCALES)
        check_choice(self.weight_mode, "weight_mode", WEIGHT_MODES)
        check_choice(self.weight_scale, "weight_scale", WEIGHT_SCALES)
        quant = self.quant
        if self.weight_mode == "uniform" and quant.n_bits_weights < 2:
            raise ValueError(
                f"The weights need at least 2 bits with weight_mode='uniform' (symmetric "
                f"codes {{-1, 0, 1}}). Got n_bits weights={quant.n_bits_weights} instead; "
                "use weight_mode='binary' for 1-bit weights."
            )
        if quant.n_bits_outputs < 2:
            raise ValueError(
                "The last layer's weights ('outputs' in n_bits) need at least 2 bits. "
                f"Got {quant.n_bits_outputs} instead."
            )
        if self.accumulator_bits is not None and self.accumulator_bits != "auto":
            value = self.accumulator_bits
            if (
                isinstance(value, bool | np.bool_)
                or not isinstance(value, numbers.Integral)
                or not 2 <= int(value) <= MAX_ROUNDING_BITS
            ):
                raise ValueError(
                    f"The 'accumulator_bits' parameter of {_OWNER} must be 'auto', None or "
                    f"an int in [2, {MAX_ROUNDING_BITS}]. Got {value!r} instead."
                )
            if self.weight_mode != "uniform":
                raise ValueError(
                    f"The 'accumulator_bits' parameter of {_OWNER} needs "
                    f"weight_mode='uniform' (binary weights cannot be zero, so their "
                    f"accumulator is fixed). Got weight_mode={self.weight_mode!r}."
                )
            object.__setattr__(self, "accumulator_bits", int(value))
        momentum = self.ema_momentum
        if (
            isinstance(momentum, bool)
            or not isinstance(momentum, numbers.Real)
            or not 0 < float(momentum) <= 1
        ):
            raise ValueError(
                f"The 'ema_momentum' parameter of {_OWNER} must be a float in (0, 1]. "
                f"Got {momentum!r} instead."
            )
        object.__setattr__(self, "ema_momentum", float(momentum))
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral)
        ):
            raise ValueError(
                f"The 'seed' parameter of {_OWNER} must be None or an int. "
                f"Got {self.seed!r} instead."
            )

    def layer_accumulator_bits(self, index: int, table_bits: int) -> int | None:
        """The accumulator budget of linear layer ``index`` (``None``: no budget), its
        table reading ``table_bits`` bits. Under ``"auto"``, a first layer whose input
        codes are narrower than the activations gets :func:`default_accumulator_bits`
        of the activations less one bit per missing input bit (at least the table).

        Examples:
            >>> from fhe_quant.quant.config import QuantConfig
            >>> quant = QuantConfig(2, 3, 3, 3, rounding_bits=4)
            >>> config = QATConfig(quant, accumulator_bits="auto")
            >>> [config.layer_accumulator_bits(i, 4) for i in (0, 1)]
            [6, 7]
        """
        if self.accumulator_bits != "auto":
            return self.accumulator_bits  # type: ignore[return-value]
        if self.weight_mode != "uniform":
            return None
        activations, inputs = self.quant.n_bits_activations, self.input_bits(index)
        if index == 0 and inputs < activations:
            # NOTE: narrower input codes leave the same weight budget per code in an
            # accumulator one bit narrower per input bit: fewer low bits to drop.
            budget = default_accumulator_bits(activations, table_bits)
            if budget is not None:
                return max(table_bits, budget - (activations - inputs))
        return default_accumulator_bits(inputs, table_bits)

    def is_binary(self, last: bool) -> bool:
        """Whether a layer's weights are binary (never the last layer's)."""
        return self.weight_mode != "uniform" and not last

    def weight_bits(self, last: bool) -> int:
        """Bits of a layer's uniform weights (the last layer takes the ``outputs`` role)."""
        return self.quant.n_bits_outputs if last else self.quant.n_bits_weights

    def input_bits(self, index: int) -> int:
        """Bits of the codes entering linear layer ``index`` (0: the model inputs)."""
        return self.quant.n_bits_inputs if index == 0 else self.quant.n_bits_activations

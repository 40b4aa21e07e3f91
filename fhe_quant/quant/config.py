"""Quantization settings: bit widths per tensor role, calibration and rounding options.

Examples:
    >>> config = QuantConfig.from_n_bits({"weights": 4, "activations": 5})
    >>> (config.n_bits_inputs, config.n_bits_weights, config.n_bits_activations,
    ...  config.n_bits_outputs)
    (5, 4, 5, 5)
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from fhe_quant.quant.calibrate import CALIBRATION_METHODS
from fhe_quant.quant.quantizer import MAX_BITS

__all__ = [
    "AUTO_TABLE_BITS",
    "MAX_ACCUMULATOR_BITS",
    "MAX_ROUNDING_BITS",
    "ROLES",
    "QuantConfig",
    "default_calibration",
    "chain_default",
]

#: Tensor roles that get their own bit width, in the order of the ``n_bits_*`` fields.
ROLES = ("inputs", "weights", "activations", "outputs")

#: Widest table input allowed for ``rounding_bits``.
MAX_ROUNDING_BITS = 16

#: Widest accumulator budget allowed for ``accumulator_bits``.
MAX_ACCUMULATOR_BITS = 16

#: Table input width of ``accumulator_bits="auto"`` when ``rounding_bits`` is ``None``.
#: Every accumulator bit dropped before a table is one bootstrap, each costing about
#: what the table's width costs: measured on the digits MLP (Concrete 2.11), 4-bit
#: tables cost 5.7e7 per bootstrap against 8.5e7 for 5-bit ones, and 4-bit activation
#: codes leave four times the weight budget of 6-bit ones.
AUTO_TABLE_BITS = 4

_OWNER = "QuantConfig"


def chain_default(accumulator_bits: Any, chain: bool) -> Any:
    """The frontends' ``accumulator_bits`` for a traced model: ``"auto"`` applies to
    chain models (each layer's input is the previous table's codes); a branching model
    (residual adds, concatenations, max pooling, products) keeps ``None``, the behaviour
    before the default changed, which its result's ``quantized.config`` records (its
    adds, pools and products would lose their accumulator shortcuts under a budget, and
    "auto" was measured on chains only). Any other value is kept.

    Examples:
        >>> chain_default("auto", chain=False), chain_default("auto", chain=True)
        (None, 'auto')
        >>> chain_default(11, chain=False)
        11
    """
    if isinstance(accumulator_bits, str) and accumulator_bits == "auto" and not chain:
        return None
    return accumulator_bits


def default_calibration(calibration: str | None, accumulator_bits: Any) -> str:
    """The calibration method of a frontend's ``calibration=None``: ``"mse"`` with
    ``accumulator_bits="auto"`` (its activation codes are at most
    :data:`AUTO_TABLE_BITS` wide, where clipping the tails buys resolution: digits MLP,
    96.9% against 96.0% with ``"minmax"``), else ``"minmax"``; an explicit method is
    kept.

    Examples:
        >>> default_calibration(None, "auto"), default_calibration(None, None)
        ('mse', 'minmax')
        >>> default_calibration("percentile", "auto")
        'percentile'
    """
    if calibration is not None:
        return calibration
    return "mse" if isinstance(accumulator_bits, str) and accumulator_bits == "auto" else "minmax"


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)


def _check_bits(value: Any, name: str, high: int = MAX_BITS) -> int:
    if not _is_int(value) or not 1 <= int(value) <= high:
        raise ValueError(
            f"The {name!r} parameter of {_OWNER} must be an int in [1, {high}]. "
            f"Got {value!r} instead."
        )
    return int(value)


def _check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise ValueError(
            f"The {name!r} parameter of {_OWNER} must be a bool. Got {value!r} instead."
        )
    return bool(value)


def _n_bits_error(value: Any) -> ValueError:
    keys = "{" + ", ".join(repr(role) for role in ROLES) + "}"
    return ValueError(
        f"The 'n_bits' parameter must be an int in [1, {MAX_BITS}] or a dict with keys "
        f"{keys}. Got {value!r} instead."
    )


@dataclass(frozen=True)
class QuantConfig:
    """How a model is quantized.

    Attributes:
        n_bits_inputs: bits of the quantized model inputs (1 to 8).
        n_bits_weights: bits of the weights of every linear layer but the last (1 to 8).
        n_bits_activations: bits of the activations between layers (1 to 8).
        n_bits_outputs: bits of the final layer's weights, which set the precision of
            the model outputs (1 to 8).
        per_channel: one weight scale per output channel (instead of one per layer).
        per_channel_activations: one scale and range per feature for every tensor that
            enters a linear layer (the scales fold into that layer's weights, and the
            tables produce per-feature codes at no extra cost in FHE).
        calibration: how activation ranges are calibrated, one of
            :data:`~fhe_quant.quant.calibrate.CALIBRATION_METHODS`.
        rounding_bits: input width of every table lookup, 1 to 16; the accumulator's
            low bits are rounded away down to it. ``None`` chooses it automatically.
        rounding_exact: round exactly (``True``) or allow the cheaper approximate
            rounding (``False``).
        accumulator_bits: when set (2 to 16), every linear layer's integer weights are
            chosen so that its *proven* accumulator fits this many bits (accumulator-aware
            quantization, :mod:`fhe_quant.quant.axe`): fewer low bits to drop before each
            table. The weight scales are then per output channel whatever ``per_channel``
            says (each channel has its own budget). ``"auto"``: a width per layer, the
            narrowest whose calibration error stays within
            :data:`~fhe_quant.quant.axe.AUTO_MARGIN` of the widest's
            (:func:`~fhe_quant.quant.axe.smallest_within`); ``rounding_bits`` then
            defaults to :data:`AUTO_TABLE_BITS` and the activation codes are no wider
            than the tables that produce them (``n_bits_activations`` is lowered to
            ``rounding_bits``: a ``T``-bit table has at most ``2**T`` outputs, and wider
            codes would only widen the next accumulator). ``None``: weights rounded to
            nearest.

    Examples:
        >>> QuantConfig().n_bits_outputs
        8
        >>> QuantConfig(n_bits_weights=9)
        Traceback (most recent call last):
        ...
        ValueError: The 'n_bits_weights' parameter of QuantConfig must be an int in [1, 8]. \
Got 9 instead.
    """

    n_bits_inputs: int = 6
    n_bits_weights: int = 6
    n_bits_activations: int = 6
    n_bits_outputs: int = 8
    per_channel: bool = True
    per_channel_activations: bool = True
    calibration: str = "minmax"
    rounding_bits: int | None = None
    rounding_exact: bool = True
    accumulator_bits: int | str | None = None

    def __post_init__(self) -> None:
        for role in ROLES:
            name = f"n_bits_{role}"
            object.__setattr__(self, name, _check_bits(getattr(self, name), name))
        object.__setattr__(self, "per_channel", _check_bool(self.per_channel, "per_channel"))
        object.__setattr__(
            self,
            "per_channel_activations",
            _check_bool(self.per_channel_activations, "per_channel_activations"),
        )
        if not isinstance(self.calibration, str) or self.calibration not in CALIBRATION_METHODS:
            raise ValueError(
                f"The 'calibration' parameter of {_OWNER} must be one of "
                f"{', '.join(repr(m) for m in CALIBRATION_METHODS)}. "
                f"Got {self.calibration!r} instead."
            )
        if self.rounding_bits is not None:
            object.__setattr__(
                self,
                "rounding_bits",
                _check_bits(self.rounding_bits, "rounding_bits", MAX_ROUNDING_BITS),
            )
        object.__setattr__(
            self, "rounding_exact", _check_bool(self.rounding_exact, "rounding_exact")
        )
        if self.accumulator_bits == "auto":
            self._auto_widths()
        elif self.accumulator_bits is not None:
            bits = self.accumulator_bits
            if not _is_int(bits) or not 2 <= int(bits) <= MAX_ACCUMULATOR_BITS:
                raise ValueError(
                    f"The 'accumulator_bits' parameter of {_OWNER} must be None, 'auto' or "
                    f"an int in [2, {MAX_ACCUMULATOR_BITS}]. Got {bits!r} instead."
                )
            object.__setattr__(self, "accumulator_bits", int(bits))

    def _auto_widths(self) -> None:
        """``accumulator_bits="auto"``: the default table width, and activation codes no
        wider than the tables."""
        if self.rounding_bits is None:
            object.__setattr__(self, "rounding_bits", AUTO_TABLE_BITS)
        bits = min(self.n_bits_activations, int(self.rounding_bits))
        object.__setattr__(self, "n_bits_activations", bits)

    def n_bits(self, role: str) -> int:
        """The bit width of a role in :data:`ROLES`.

        Examples:
            >>> QuantConfig().n_bits("outputs")
            8
        """
        if role not in ROLES:
            raise ValueError(
                f"The 'role' parameter must be one of {', '.join(map(repr, ROLES))}. "
                f"Got {role!r} instead."
            )
        return int(getattr(self, f"n_bits_{role}"))

    @classmethod
    def from_n_bits(cls, n_bits: int | Mapping[str, int], **kwargs: Any) -> QuantConfig:
        """A config from user-facing ``n_bits`` plus the other fields.

        Args:
            n_bits: an int sets all four roles; a dict with keys from :data:`ROLES` sets
                those roles, and the missing ones take the dict's ``"activations"`` value
                if present, else the field defaults.
            **kwargs: the other fields (``per_channel``, ``calibration``,
                ``rounding_bits``, ``rounding_exact``, ``accumulator_bits``).

        Returns:
            The validated config.

        Raises:
            ValueError: ``n_bits`` of the wrong type or out of range, an unknown dict key,
                an unknown or ``n_bits_*`` keyword, or an invalid field.

        Examples:
            >>> QuantConfig.from_n_bits(4).n_bits_outputs
            4
            >>> QuantConfig.from_n_bits({"weights": 3}).n_bits_outputs
            8
        """
        other = [f.name for f in fields(cls) if not f.name.startswith("n_bits_")]
        unknown = sorted(key for key in kwargs if key not in other)
        if unknown:
            raise ValueError(
                f"QuantConfig.from_n_bits got unexpected keyword arguments {unknown}; "
                f"valid ones are {other} (bit widths go in 'n_bits')."
            )
        if isinstance(n_bits, Mapping):
            bad = [key for key in n_bits if key not in ROLES]
            if bad:
                raise ValueError(
                    f"The 'n_bits' parameter has an unknown key {bad[0]!r}; valid keys are "
                    f"{', '.join(repr(role) for role in ROLES)}."
                )
            for role, value in n_bits.items():
                if not _is_int(value) or not 1 <= int(value) <= MAX_BITS:
                    raise ValueError(
                        f"The 'n_bits' parameter's {role!r} entry must be an int in "
                        f"[1, {MAX_BITS}]. Got {value!r} instead."
                    )
            values = {role: int(value) for role, value in n_bits.items()}
            if "activations" in values:
                values = {role: values.get(role, values["activations"]) for role in ROLES}
        elif _is_int(n_bits) and 1 <= int(n_bits) <= MAX_BITS:
            values = dict.fromkeys(ROLES, int(n_bits))
        else:
            raise _n_bits_error(n_bits)
        return cls(**{f"n_bits_{role}": value for role, value in values.items()}, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-serialisable dict.

        Examples:
            >>> QuantConfig().to_dict()["calibration"]
            'minmax'
        """
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantConfig:
        """Rebuild a config from :meth:`to_dict` output; missing keys take the defaults.

        Raises:
            ValueError: unknown keys or invalid values.

        Examples:
            >>> QuantConfig.from_dict(QuantConfig(per_channel=False).to_dict()).per_channel
            False
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"QuantConfig.from_dict needs a dict. Got {data!r} instead.")
        names = [f.name for f in fields(cls)]
        unknown = sorted(str(key) for key in data if key not in names)
        if unknown:
            raise ValueError(
                f"QuantConfig.from_dict got unknown keys {unknown}; valid keys are {names}."
            )
        return cls(**dict(data))

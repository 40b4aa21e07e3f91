"""What an encrypted model will cost, read from its compiled circuit before any key exists.

Concrete's optimizer chooses the cryptographic parameters at compile time, so a compiled
circuit already knows its ``complexity`` (Concrete's deterministic cost estimate of one
run), its bootstrap counts per parameter set, and the sizes of the evaluation keys it
will need. Key generation is what takes minutes and gigabytes; nothing here needs it.

A :class:`CostModel` turns those figures into seconds with two straight lines fitted on
runs measured on this kind of machine (2 cores, concrete-python 2.11)::

    seconds per sample = a * complexity + b
    key generation     = c * evaluation key bytes + d

The fit ships as package data (``fhe_quant/data/cost_model.json``), with its residuals
and the load average it was measured at; ``python benchmarks/cost_calibration.py
--write`` measures it again and rewrites the file. The same file holds the relative
price of one lookup by table input width (width 1: one exactly dropped accumulator bit),
read from Concrete's complexity of single-width circuits; :func:`layer_costs` uses it
to share a model's estimate between its layers.

Examples:
    >>> model = CostModel.default()
    >>> model.seconds_per_sample(0.0) >= 0.0
    True
    >>> model.seconds_per_sample(2e10) < model.seconds_per_sample(4e10)
    True
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

import numpy as np

from fhe_quant.errors import NotCompiledError, ParameterError

__all__ = [
    "CostModel",
    "CostEstimate",
    "Fit",
    "estimate_cost",
    "layer_costs",
    "fit_line",
    "circuit_figures",
]


@dataclass(frozen=True)
class Fit:
    """A least-squares line ``y = slope * x + intercept`` and how well it fits.

    Attributes:
        slope, intercept: the line.
        max_relative_residual: largest ``|fit - measured| / measured`` over the runs.
        n_runs: how many measured runs it was fitted on.

    Examples:
        >>> fit = fit_line([1.0, 2.0, 3.0], [2.0, 4.0, 6.0])
        >>> round(fit.slope, 6), round(fit.intercept, 6), fit.n_runs
        (2.0, 0.0, 3)
        >>> fit(10.0)
        20.0
    """

    slope: float
    intercept: float
    max_relative_residual: float
    n_runs: int

    def __post_init__(self) -> None:
        for name in ("slope", "intercept", "max_relative_residual"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not np.isfinite(value):
                raise ParameterError(
                    f"The {name!r} of a Fit must be a finite number. Got {value!r}."
                )
        if self.slope < 0:
            raise ParameterError(f"The 'slope' of a Fit must be >= 0. Got {self.slope!r}.")
        if not isinstance(self.n_runs, int) or self.n_runs < 1:
            raise ParameterError(f"The 'n_runs' of a Fit must be an int >= 1. Got {self.n_runs!r}.")

    def __call__(self, x: float) -> float:
        return max(0.0, round(self.slope * float(x) + self.intercept, 12))


def fit_line(x: Sequence[float], y: Sequence[float], *, relative: bool = True) -> Fit:
    """Fit ``y = slope * x + intercept`` to measured runs.

    With ``relative`` the squared *relative* errors are minimised (each run weighted by
    ``1 / y``), so a fast circuit counts as much as a slow one; a negative intercept
    or slope is refused and the fit falls back to a line through the origin.

    Raises:
        ParameterError: fewer than one run, lengths differ, or a value that is not
            finite and positive.
    """
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if xs.shape != ys.shape or xs.ndim != 1 or len(xs) == 0:
        raise ParameterError(f"fit_line needs two equal 1-d sequences. Got {xs.shape}, {ys.shape}.")
    if not (np.all(np.isfinite(xs)) and np.all(np.isfinite(ys)) and np.all(ys > 0)):
        raise ParameterError("fit_line needs finite values and positive measurements.")
    w = 1.0 / ys if relative else np.ones_like(ys)
    slope, intercept = 0.0, 0.0
    if len(xs) >= 2 and np.ptp(xs) > 0:
        design = np.stack([xs, np.ones_like(xs)], axis=1) * w[:, None]
        slope, intercept = np.linalg.lstsq(design, ys * w, rcond=None)[0]
    if len(xs) < 2 or np.ptp(xs) == 0 or slope < 0 or intercept < 0:
        intercept = 0.0
        slope = float(np.sum(w * w * xs * ys) / max(np.sum(w * w * xs * xs), 1e-300))
    predicted = slope * xs + intercept
    worst = float(np.max(np.abs(predicted - ys) / ys))
    return Fit(float(slope), float(intercept), worst, len(xs))


@dataclass(frozen=True)
class CostModel:
    """Seconds from a compiled circuit's figures (see the module docstring).

    Attributes:
        latency: seconds per sample against ``complexity``.
        keygen: key generation seconds against evaluation key bytes.
        lookup_price: relative price of one lookup by table input width (bits), width 1
            being one exactly dropped accumulator bit; used to share a total between
            layers, never to compute it.
        load_average: the 1-minute load average while it was measured.
        measured: where and with what it was measured (free text).
    """

    latency: Fit
    keygen: Fit
    lookup_price: Mapping[int, float]
    load_average: float = 0.0
    measured: str = ""

    def __post_init__(self) -> None:
        prices = {int(k): float(v) for k, v in dict(self.lookup_price).items()}
        if not prices or any(k < 1 or not np.isfinite(v) or v <= 0 for k, v in prices.items()):
            raise ParameterError(
                "The 'lookup_price' of a CostModel must map table widths >= 1 to positive "
                f"prices. Got {dict(self.lookup_price)!r}."
            )
        object.__setattr__(self, "lookup_price", dict(sorted(prices.items())))

    def seconds_per_sample(self, complexity: float) -> float:
        """Estimated encrypted seconds for one sample."""
        return self.latency(complexity)

    def keygen_seconds(self, key_bytes: float) -> float:
        """Estimated key generation seconds for evaluation keys of ``key_bytes``."""
        return self.keygen(key_bytes)

    def price(self, width: int) -> float:
        """Relative price of one lookup reading ``width`` bits (widths past the widest
        measured one double per bit, as Concrete's parameters grow).

        Examples:
            >>> model = CostModel.default()
            >>> model.price(3) < model.price(5)
            True
        """
        prices = self.lookup_price
        if width in prices:
            return prices[width]
        known = [w for w in prices if w <= width]
        if not known:
            return prices[min(prices)]
        top = max(known)
        return prices[top] * 2.0 ** (width - top)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["lookup_price"] = {str(k): v for k, v in self.lookup_price.items()}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CostModel:
        """The model of :meth:`to_dict`'s output (JSON-compatible, no code).

        Raises:
            ParameterError: a missing or malformed field.
        """
        try:
            return cls(
                Fit(**data["latency"]),
                Fit(**data["keygen"]),
                {int(k): float(v) for k, v in data["lookup_price"].items()},
                float(data.get("load_average", 0.0)),
                str(data.get("measured", "")),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, ParameterError):
                raise
            raise ParameterError(
                f"A cost model needs latency, keygen and lookup_price: {exc}"
            ) from None

    @classmethod
    def default(cls) -> CostModel:
        """The model shipped in ``fhe_quant/data/cost_model.json``."""
        return _shipped()


@lru_cache(maxsize=1)
def _shipped() -> CostModel:
    text = resources.files("fhe_quant").joinpath("data/cost_model.json").read_text()
    return CostModel.from_dict(json.loads(text))


@dataclass(frozen=True)
class CostEstimate:
    """A compiled circuit's cost, estimated before key generation.

    Attributes:
        complexity: Concrete's cost estimate of one run.
        pbs_count: programmable bootstraps per sample.
        pbs_per_parameter: bootstraps per bootstrap key, as
            ``((polynomial_size, glwe_dimension, input_lwe_dimension), count)``.
        bootstrap_key_bytes, keyswitch_key_bytes: evaluation key sizes.
        seconds_per_sample: estimated encrypted latency.
        keygen_seconds: estimated key generation time.
    """

    complexity: float
    pbs_count: int
    pbs_per_parameter: tuple[tuple[tuple[int, int, int], int], ...]
    bootstrap_key_bytes: int
    keyswitch_key_bytes: int
    seconds_per_sample: float
    keygen_seconds: float
    layers: tuple[tuple[str, float], ...] = field(default=())

    def __post_init__(self) -> None:
        if not np.isfinite(self.complexity) or self.complexity < 0:
            raise ParameterError(f"complexity must be finite and >= 0. Got {self.complexity!r}.")
        if self.pbs_count < 0 or self.bootstrap_key_bytes < 0 or self.keyswitch_key_bytes < 0:
            raise ParameterError("PBS count and key sizes must be >= 0.")

    @property
    def key_bytes(self) -> int:
        """Evaluation keys (bootstrap + keyswitch), what the server must hold."""
        return self.bootstrap_key_bytes + self.keyswitch_key_bytes


def circuit_figures(circuit: Any) -> dict[str, Any]:
    """Concrete's figures of a compiled ``fhe.Circuit`` that exist without keys."""
    stats = circuit.statistics
    per_parameter = []
    for param, count in circuit.programmable_bootstrap_count_per_parameter.items():
        # NOTE: the parameter's fields are methods in concrete-python 2.11.
        key = tuple(
            int(getattr(param, name)())
            for name in ("polynomial_size", "glwe_dimension", "input_lwe_dimension")
        )
        per_parameter.append((key, int(count)))
    return {
        "complexity": float(stats.get("complexity", 0.0)),
        "pbs_count": int(stats.get("programmable_bootstrap_count", 0)),
        "pbs_per_parameter": tuple(sorted(per_parameter)),
        "bootstrap_key_bytes": int(stats.get("size_of_bootstrap_keys", 0)),
        "keyswitch_key_bytes": int(stats.get("size_of_keyswitch_keys", 0)),
    }


def _concrete_circuit(target: Any) -> Any:
    """The ``fhe.Circuit`` of a QuantizedModule, an estimator, an FHECircuit or itself."""
    module = getattr(target, "quantized_module_", target)
    if hasattr(module, "_circuit") and hasattr(module, "program"):
        if module._circuit is None:
            raise NotCompiledError(
                "The cost is read from the compiled circuit: call compile() first (no key "
                "generation is needed)."
            )
        return module._circuit.circuit
    if hasattr(module, "circuit") and hasattr(module, "program"):  # an FHECircuit
        return module.circuit
    if hasattr(module, "statistics") and hasattr(module, "programmable_bootstrap_count"):
        return module
    raise ParameterError(
        "estimate_cost needs a compiled model, an estimator, an FHECircuit or a "
        f"concrete fhe.Circuit. Got {type(target).__name__}."
    )


def estimate_cost(target: Any, model: CostModel | None = None) -> CostEstimate:
    """Estimated latency, key generation time and key size of a compiled model.

    Args:
        target: a compiled :class:`~fhe_quant.model.QuantizedModule`, a fitted and
            compiled estimator, an ``FHECircuit`` or a concrete ``fhe.Circuit``.
        model: the cost model (default: the shipped one).

    Returns:
        A :class:`CostEstimate`; for a model, ``layers`` shares the latency between its
        layers by their lookups (:func:`layer_costs`).

    Raises:
        NotCompiledError: the model has no circuit yet.
    """
    model = model or CostModel.default()
    figures = circuit_figures(_concrete_circuit(target))
    seconds = model.seconds_per_sample(figures["complexity"])
    module = getattr(target, "quantized_module_", target)
    layers: tuple[tuple[str, float], ...] = ()
    if hasattr(module, "statistics") and hasattr(module, "program"):
        shares = layer_costs(module.statistics["layers"], model)
        layers = tuple((name, seconds * share) for name, share in shares)
    return CostEstimate(
        **figures,
        seconds_per_sample=seconds,
        keygen_seconds=model.keygen_seconds(
            figures["bootstrap_key_bytes"] + figures["keyswitch_key_bytes"]
        ),
        layers=layers,
    )


def layer_costs(
    layers: Sequence[Mapping[str, Any]], model: CostModel | None = None
) -> list[tuple[str, float]]:
    """Each layer's share (summing to 1) of a model's bootstrap cost.

    A layer's cost is its lookups times the price of their input width, plus one
    one-bit price per exactly dropped accumulator bit and lookup.

    Examples:
        >>> layers = [{"layer": "fc1", "lookups": 4, "table_input_bits": 5,
        ...            "truncated_bits": 2}, {"layer": "fc2"}]
        >>> [(name, round(share, 2)) for name, share in layer_costs(layers)]
        [('fc1', 1.0), ('fc2', 0.0)]
    """
    model = model or CostModel.default()
    costs = []
    for layer in layers:
        lookups = float(layer.get("lookups", 0) or 0)
        width = layer.get("table_input_bits")
        cost = 0.0
        if lookups and width:
            cost = lookups * model.price(int(width))
            cost += lookups * int(layer.get("truncated_bits", 0) or 0) * model.price(1)
        costs.append((str(layer.get("layer", "?")), cost))
    total = sum(c for _, c in costs)
    return [(name, c / total if total > 0 else 0.0) for name, c in costs]

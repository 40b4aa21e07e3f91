"""What an encrypted model will cost, read from its compiled circuit before any key exists.

Concrete's optimizer chooses the cryptographic parameters at compile time, so a compiled
circuit already knows its ``complexity`` (Concrete's deterministic cost estimate of one
run), its bootstraps per parameter set (polynomial size ``N``, GLWE dimension ``k``,
input LWE dimension ``n``, decomposition level ``l``), and the sizes of the evaluation
keys it will need. Key generation is what takes minutes and gigabytes; nothing here
needs it.

A :class:`CostModel` turns those figures (:func:`cost_features`) into seconds with two
non-negative linear fits on runs measured on this kind of machine (2 cores,
concrete-python 2.11)::

    seconds per sample = a * complexity + b * bootstrap key traffic + c
    key generation     = d * bootstrap key work + e * keyswitch key bytes + f

The *bootstrap key traffic* is the bytes of bootstrap key that the run streams: every
bootstrap reads its whole key, ``8 * n * (k + 1)**2 * l * N`` bytes. Concrete's
complexity counts arithmetic; bootstraps with a large ``k`` and small ``N`` are slower
than it says (measured: 1.7-2x for ``k`` of 4 to 6), and the traffic term accounts for
them (worst residual 34% instead of 55% on the calibration runs).

The *bootstrap key work* of a key is ``n * (k + 1) * l * k * N**2``: the key holds
``n * (k + 1) * l`` GLWE encryptions, each ``k`` schoolbook products of polynomials of
``N`` coefficients. Key bytes alone miss that a key of large ``N`` costs more per byte
(measured: 10x between ``N = 256`` and ``N = 4096``).

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

import itertools
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
    "LinearFit",
    "estimate_cost",
    "layer_costs",
    "fit_linear",
    "circuit_figures",
    "cost_features",
]

#: The features a fit may use (see :func:`cost_features`).
FEATURES = (
    "complexity",
    "pbs_count",
    "bootstrap_key_work",
    "bootstrap_key_traffic",
    "bootstrap_key_bytes",
    "keyswitch_key_bytes",
    "key_bytes",
)


@dataclass(frozen=True)
class LinearFit:
    """``y = sum(coefficients[f] * x[f]) + intercept``, every term >= 0, and how well it
    fitted its runs.

    Attributes:
        coefficients: feature name (one of :data:`FEATURES`) -> coefficient >= 0.
        intercept: constant seconds >= 0.
        max_relative_residual: largest ``|fit - measured| / measured`` over the runs.
        n_runs: how many measured runs it was fitted on.

    Examples:
        >>> fit = fit_linear([{"complexity": 1.0}, {"complexity": 2.0}, {"complexity": 3.0}],
        ...                  [2.0, 4.0, 6.0], ["complexity"])
        >>> round(fit.coefficients["complexity"], 6), round(fit.intercept, 6), fit.n_runs
        (2.0, 0.0, 3)
        >>> fit({"complexity": 10.0})
        20.0
    """

    coefficients: Mapping[str, float]
    intercept: float
    max_relative_residual: float
    n_runs: int

    def __post_init__(self) -> None:
        coefficients = dict(self.coefficients) if isinstance(self.coefficients, Mapping) else None
        if not coefficients:
            raise ParameterError(
                f"The 'coefficients' of a fit must map feature names to numbers. "
                f"Got {self.coefficients!r}."
            )
        for name, value in [*coefficients.items(), ("intercept", self.intercept)]:
            if name != "intercept" and name not in FEATURES:
                raise ParameterError(f"Unknown cost feature {name!r}; known: {FEATURES}.")
            if not isinstance(value, int | float) or not np.isfinite(value) or value < 0:
                raise ParameterError(
                    f"The {name!r} term of a fit must be a finite number >= 0. Got {value!r}."
                )
        residual = self.max_relative_residual
        if not isinstance(residual, int | float) or not np.isfinite(residual) or residual < 0:
            raise ParameterError(
                f"The 'max_relative_residual' of a fit must be finite and >= 0. Got {residual!r}."
            )
        if not isinstance(self.n_runs, int) or self.n_runs < 1:
            raise ParameterError(f"The 'n_runs' of a fit must be an int >= 1. Got {self.n_runs!r}.")
        object.__setattr__(self, "coefficients", {k: float(v) for k, v in coefficients.items()})

    def __call__(self, features: Mapping[str, float]) -> float:
        missing = [name for name in self.coefficients if name not in features]
        if missing:
            raise ParameterError(
                f"This fit needs the features {missing} (see fhe_quant.cost.cost_features)."
            )
        total = sum(c * float(features[name]) for name, c in self.coefficients.items())
        return max(0.0, round(total + self.intercept, 12))


def _nonnegative_lstsq(design: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0: the best of the unconstrained solutions
    on each subset of the columns that comes out non-negative (few columns)."""
    best, best_error = np.zeros(design.shape[1]), float(np.sum(target**2))
    columns = range(design.shape[1])
    for size in range(1, design.shape[1] + 1):
        for subset in itertools.combinations(columns, size):
            sub = design[:, list(subset)]
            scale = np.maximum(np.abs(sub).max(axis=0), 1e-300)
            solution = np.linalg.lstsq(sub / scale, target, rcond=None)[0] / scale
            if np.any(solution < 0):
                continue
            error = float(np.sum((sub @ solution - target) ** 2))
            if error < best_error * (1 - 1e-12):
                best_error = error
                best = np.zeros(design.shape[1])
                best[list(subset)] = solution
    return best


def fit_linear(
    rows: Sequence[Mapping[str, float]],
    y: Sequence[float],
    features: Sequence[str],
    *,
    intercept: bool = True,
) -> LinearFit:
    """Fit ``y`` against ``features`` of measured runs (non-negative terms).

    The squared *relative* errors are minimised (each run weighted by ``1 / y``), so a
    fast circuit counts as much as a slow one; every coefficient and the intercept stay
    >= 0, so an estimate never decreases when a feature grows.

    Raises:
        ParameterError: no run, lengths differ, an unknown or missing feature, or a
            value that is not finite (measurements must be > 0).
    """
    ys = np.asarray(y, dtype=np.float64)
    names = list(features)
    if len(rows) != len(ys) or ys.ndim != 1 or len(ys) == 0 or not names:
        raise ParameterError(
            f"fit_linear needs as many runs as measurements and one feature or more. "
            f"Got {len(rows)} runs, {ys.shape} measurements, features {names}."
        )
    try:
        xs = np.array([[float(row[name]) for name in names] for row in rows], dtype=np.float64)
    except KeyError as exc:
        raise ParameterError(f"A run lacks the feature {exc}.") from None
    if not (np.all(np.isfinite(xs)) and np.all(np.isfinite(ys)) and np.all(ys > 0)):
        raise ParameterError("fit_linear needs finite values and positive measurements.")
    design = np.concatenate([xs, np.ones((len(ys), 1))], axis=1) if intercept else xs
    weights = 1.0 / ys
    solution = _nonnegative_lstsq(design * weights[:, None], ys * weights)
    predicted = design @ solution
    worst = float(np.max(np.abs(predicted - ys) / ys))
    coefficients = dict(zip(names, (float(v) for v in solution[: len(names)]), strict=True))
    return LinearFit(coefficients, float(solution[-1]) if intercept else 0.0, worst, len(ys))


def _old_fit(data: Mapping[str, Any], feature: str) -> dict[str, Any]:
    """A fit of the first format (``slope`` on one feature) in the current format."""
    if "slope" not in data:
        return dict(data)
    rest = {k: v for k, v in data.items() if k != "slope"}
    return {**rest, "coefficients": {feature: data["slope"]}}


@dataclass(frozen=True)
class CostModel:
    """Seconds from a compiled circuit's figures (see the module docstring).

    Attributes:
        latency: seconds per sample against :func:`cost_features`.
        keygen: key generation seconds against :func:`cost_features`.
        lookup_price: relative price of one lookup by table input width (bits), width 1
            being one exactly dropped accumulator bit; used to share a total between
            layers, never to compute it.
        load_average: the 1-minute load average while it was measured.
        measured: where and with what it was measured (free text).
        cpus: cores of the machine it was measured on.
        load_exponent: on a busy machine (load average ``L`` above ``cpus``) every
            estimate is multiplied by ``(L / cpus) ** load_exponent``: the circuit gets
            its fair share of the cores (fitted on loaded runs; 1 is a fair share).
    """

    latency: LinearFit
    keygen: LinearFit
    lookup_price: Mapping[int, float]
    load_average: float = 0.0
    measured: str = ""
    cpus: int = 2
    load_exponent: float = 1.0

    def __post_init__(self) -> None:
        prices = {int(k): float(v) for k, v in dict(self.lookup_price).items()}
        if not prices or any(k < 1 or not np.isfinite(v) or v <= 0 for k, v in prices.items()):
            raise ParameterError(
                "The 'lookup_price' of a CostModel must map table widths >= 1 to positive "
                f"prices. Got {dict(self.lookup_price)!r}."
            )
        object.__setattr__(self, "lookup_price", dict(sorted(prices.items())))
        if not isinstance(self.cpus, int) or self.cpus < 1:
            raise ParameterError(
                f"The 'cpus' of a CostModel must be an int >= 1. Got {self.cpus!r}."
            )
        exponent = self.load_exponent
        if not isinstance(exponent, int | float) or not np.isfinite(exponent) or exponent < 0:
            raise ParameterError(
                f"The 'load_exponent' of a CostModel must be finite and >= 0. Got {exponent!r}."
            )

    def slowdown(self, load_average: float | None) -> float:
        """How much slower runs are at ``load_average`` than on an idle machine (1 when
        ``None`` or at most ``cpus``).

        Examples:
            >>> model = CostModel.default()
            >>> model.slowdown(None), model.slowdown(1.0), model.slowdown(8.0) > 2
            (1.0, 1.0, True)
        """
        if load_average is None:
            return 1.0
        if not isinstance(load_average, int | float) or not np.isfinite(load_average):
            raise ParameterError(f"A load average must be a finite number. Got {load_average!r}.")
        return max(1.0, float(load_average) / self.cpus) ** self.load_exponent

    def seconds_per_sample(
        self, figures: float | Mapping[str, Any], load_average: float | None = None
    ) -> float:
        """Estimated encrypted seconds for one sample, from :func:`circuit_figures` (or
        :func:`cost_features`), or from a ``complexity`` alone (other features 0); on an
        idle machine, or at ``load_average`` (:meth:`slowdown`)."""
        return self.latency(_features(figures, "complexity")) * self.slowdown(load_average)

    def keygen_seconds(
        self, figures: float | Mapping[str, Any], load_average: float | None = None
    ) -> float:
        """Estimated key generation seconds, from :func:`circuit_figures` (or
        :func:`cost_features`); a number is read as evaluation key bytes, which only a
        fit on key bytes can use. Idle, or at ``load_average`` (:meth:`slowdown`)."""
        return self.keygen(_features(figures, "key_bytes")) * self.slowdown(load_average)

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
        """The model of :meth:`to_dict`'s output (JSON-compatible, no code); the first
        format (one ``slope`` per fit, on complexity and on key bytes) is read too.

        Raises:
            ParameterError: a missing or malformed field.
        """
        try:
            return cls(
                LinearFit(**_old_fit(data["latency"], "complexity")),
                LinearFit(**_old_fit(data["keygen"], "key_bytes")),
                {int(k): float(v) for k, v in data["lookup_price"].items()},
                float(data.get("load_average", 0.0)),
                str(data.get("measured", "")),
                int(data.get("cpus", 2)),
                float(data.get("load_exponent", 1.0)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ParameterError(
                f"A cost model needs latency, keygen and lookup_price: {exc!r}"
            ) from None

    @classmethod
    def from_json(cls, text: str, where: str = "the cost model") -> CostModel:
        """The model of a JSON text (:meth:`from_dict`).

        Raises:
            ParameterError: the text is not JSON, or not a cost model (named with
                ``where``).

        Examples:
            >>> CostModel.from_json("{]", "model.json")
            Traceback (most recent call last):
            ...
            fhe_quant.errors.ParameterError: model.json is not JSON: ...
        """
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ParameterError(f"{where} is not JSON: {exc}") from None
        if not isinstance(data, Mapping):
            raise ParameterError(f"{where} must hold a JSON object. Got {type(data).__name__}.")
        try:
            return cls.from_dict(data)
        except ParameterError as exc:
            raise ParameterError(f"{where}: {exc}") from None

    @classmethod
    def default(cls) -> CostModel:
        """The model shipped in ``fhe_quant/data/cost_model.json``."""
        return _shipped()


def _features(figures: float | Mapping[str, Any], single: str) -> dict[str, float]:
    if isinstance(figures, Mapping):
        return cost_features(figures)
    if not isinstance(figures, int | float) or not np.isfinite(figures) or figures < 0:
        raise ParameterError(f"Expected circuit figures or a number >= 0. Got {figures!r}.")
    return {name: 0.0 for name in FEATURES} | {single: float(figures)}


def cost_features(figures: Mapping[str, Any]) -> dict[str, float]:
    """The fit features of a circuit's :func:`circuit_figures`.

    ``bootstrap_key_traffic`` sums ``count * 8 * n * (k + 1)**2 * l * N`` over the
    bootstrap parameters (the key bytes that the bootstraps read);
    ``bootstrap_key_work`` sums ``n * (k + 1) * l * k * N**2`` over the bootstrap keys
    (``pbs_per_parameter`` entries ``((N, k, n, l), count)``; an entry without ``l``
    takes the level that makes the key sizes add up, else 1).

    Examples:
        >>> f = cost_features({"complexity": 5.0, "pbs_count": 2,
        ...                    "pbs_per_parameter": (((512, 2, 700, 3), 2),),
        ...                    "bootstrap_key_bytes": 0, "keyswitch_key_bytes": 8})
        >>> f["bootstrap_key_work"] == 700 * 3 * 3 * 2 * 512**2, f["key_bytes"]
        (True, 8.0)
    """
    try:
        params = [(tuple(int(v) for v in key), int(n)) for key, n in figures["pbs_per_parameter"]]
        out = {name: float(figures[name]) for name in FEATURES if name in figures}
        out.setdefault("pbs_count", float(sum(n for _, n in params)))
        bsk, ksk = out["bootstrap_key_bytes"], out["keyswitch_key_bytes"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ParameterError(f"Circuit figures need {exc!r} (see circuit_figures).") from None
    out["key_bytes"] = bsk + ksk
    levels = _levels([key for key, _ in params], bsk)
    out["bootstrap_key_traffic"] = float(
        sum(
            count * 8 * n * (k + 1) ** 2 * level * size
            for ((size, k, n, *_), count), level in zip(params, levels, strict=True)
        )
    )
    out["bootstrap_key_work"] = float(
        sum(
            n * (k + 1) * level * k * size**2
            for (size, k, n, *_), level in zip([key for key, _ in params], levels, strict=True)
        )
    )
    return out


def _levels(keys: Sequence[tuple[int, ...]], bsk_bytes: float) -> list[int]:
    """Each key's decomposition level: given, or the one that makes the sizes add up."""
    if all(len(key) >= 4 for key in keys):
        return [key[3] for key in keys]
    sizes = [8 * key[2] * (key[1] + 1) ** 2 * key[0] for key in keys]
    if len(keys) <= 4:
        for levels in itertools.product(range(1, 16), repeat=len(keys)):
            if sum(s * lv for s, lv in zip(sizes, levels, strict=True)) == bsk_bytes:
                return list(levels)
    return [1] * len(keys)


@lru_cache(maxsize=1)
def _shipped() -> CostModel:
    text = resources.files("fhe_quant").joinpath("data/cost_model.json").read_text()
    return CostModel.from_json(text, "fhe_quant/data/cost_model.json")


@dataclass(frozen=True)
class CostEstimate:
    """A compiled circuit's cost, estimated before key generation.

    Attributes:
        complexity: Concrete's cost estimate of one run.
        pbs_count: programmable bootstraps per sample.
        pbs_per_parameter: bootstraps per bootstrap key, as
            ``((polynomial_size, glwe_dimension, input_lwe_dimension, level), count)``.
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
            for name in ("polynomial_size", "glwe_dimension", "input_lwe_dimension", "level")
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
    seconds = model.seconds_per_sample(figures)
    module = getattr(target, "quantized_module_", target)
    layers: tuple[tuple[str, float], ...] = ()
    if hasattr(module, "statistics") and hasattr(module, "program"):
        shares = layer_costs(module.statistics["layers"], model)
        layers = tuple((name, seconds * share) for name, share in shares)
    return CostEstimate(
        **figures,
        seconds_per_sample=seconds,
        keygen_seconds=model.keygen_seconds(figures),
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

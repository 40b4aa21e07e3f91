"""Automatic choice of bit widths (``n_bits="auto"``): the cheapest model within an
accuracy budget.

The candidates are every combination of weight bits, activation bits (the input grid
too), table width (``rounding_bits``), per-channel weights and, when the installed
:class:`~fhe_quant.quant.config.QuantConfig` has it, an accumulator budget
(``accumulator_bits``). Rounding is exact unless the user asked for
``rounding="approximate"``.

The search, top to bottom (:func:`search_torch`):

1. the float model's validation metric is the reference; a candidate *passes* when the
   metric of its exact integer program (``fhe="disable"``, which the tests prove equal
   to ``simulate``) is at most ``max_accuracy_drop`` below it;
2. candidates are quantized and scored in clear, fewest bits first; a failing candidate
   prunes every candidate with no more bits of each kind and the same other settings
   (accuracy only grows with bits), and within a (weights, activations) pair the table
   widths are tried widest first, so a branch stops at its first failure;
3. the passing programs are ranked by the price of their lookups (table widths and
   dropped bits, :meth:`fhe_quant.cost.CostModel.price`); the :data:`COMPILED` cheapest
   are compiled (never keyed) and the one of least estimated latency
   (:func:`fhe_quant.cost.estimate_cost`) wins.

Every candidate tried is a :class:`SearchRow` in the returned model's
``search_report_``. Nothing is random: the same inputs give the same choice (``seed``
only picks the validation subset when it is larger than :data:`MAX_VALIDATION`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from fhe_quant.cost import CostModel, estimate_cost
from fhe_quant.errors import CompilationError, InputError, ParameterError, RangeError
from fhe_quant.lower import auto_table_bits
from fhe_quant.quant.config import QuantConfig
from fhe_quant.report import score

__all__ = [
    "AccuracyBudgetError",
    "Candidate",
    "SearchRow",
    "SearchSpace",
    "check_validation",
    "search_torch",
    "search_tree",
    "COMPILED",
    "MAX_VALIDATION",
]

#: Passing candidates compiled (cheapest by lookup price first); the best is kept.
COMPILED = 4
#: Validation samples scored per candidate (a seeded subset beyond it).
MAX_VALIDATION = 2000


class AccuracyBudgetError(ParameterError):
    """No candidate of the search stays within ``max_accuracy_drop`` of the float model.

    Attributes:
        float_metric: the float model's validation metric.
        best_metric: the best metric a candidate reached.
        best_seconds: that candidate's estimated latency per sample (``None`` when it
            was not compiled).
        rows: every candidate tried (:class:`SearchRow`).
    """

    def __init__(
        self,
        float_metric: float,
        best_metric: float,
        best_seconds: float | None,
        max_drop: float,
        rows: Sequence[SearchRow],
    ) -> None:
        self.float_metric = float_metric
        self.best_metric = best_metric
        self.best_seconds = best_seconds
        self.rows = tuple(rows)
        cost = "" if best_seconds is None else f", estimated {best_seconds:.2f} s/sample"
        super().__init__(
            f"No candidate of n_bits='auto' stays within max_accuracy_drop={max_drop} of the "
            f"float model's {float_metric:.4f} on the validation data: the best reached "
            f"{best_metric:.4f}{cost} ({len(self.rows)} candidates tried). Allow a larger "
            "max_accuracy_drop, or give n_bits explicitly."
        )


@dataclass(frozen=True)
class Candidate:
    """One point of the search space.

    Attributes:
        weights: bits of the weights (the last layer's too).
        activations: bits of the activations and of the input grid.
        rounding_bits: table input width, ``None`` for the automatic one.
        per_channel: per-output-channel weight scales.
        accumulator_bits: accumulator budget, ``None`` for none (or not supported).

    Examples:
        >>> Candidate(4, 5, None).n_bits()["outputs"]
        6
        >>> Candidate(9, 5, None)
        Traceback (most recent call last):
        ...
        fhe_quant.errors.ParameterError: Candidate.weights must be an int in [1, 8]. Got 9.
    """

    weights: int
    activations: int
    rounding_bits: int | None
    per_channel: bool = True
    accumulator_bits: int | None = None

    def __post_init__(self) -> None:
        for name in ("weights", "activations"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 8:
                raise ParameterError(f"Candidate.{name} must be an int in [1, 8]. Got {value!r}.")
        for name, high in (("rounding_bits", 16), ("accumulator_bits", 32)):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or not 1 <= value <= high):
                raise ParameterError(
                    f"Candidate.{name} must be None or an int in [1, {high}]. Got {value!r}."
                )

    def n_bits(self) -> dict[str, int]:
        """The ``n_bits`` dict of this candidate (the last layer keeps >= 6 bits: no
        table reads its accumulator, so its width is nearly free)."""
        return {
            "inputs": self.activations,
            "weights": self.weights,
            "activations": self.activations,
            "outputs": max(self.weights, 6),
        }

    def config(self, rounding_exact: bool, **fixed: Any) -> QuantConfig:
        """The :class:`QuantConfig` of this candidate."""
        extra = {} if self.accumulator_bits is None else {"accumulator_bits": self.accumulator_bits}
        try:
            return QuantConfig.from_n_bits(
                self.n_bits(),
                rounding_bits=self.rounding_bits,
                rounding_exact=rounding_exact,
                per_channel=self.per_channel,
                **fixed,
                **extra,
            )
        except ValueError as exc:
            raise ParameterError(str(exc)) from None

    @property
    def table_bits(self) -> int:
        """The table input width (``rounding_bits``, or the automatic one)."""
        if self.rounding_bits is not None:
            return self.rounding_bits
        return auto_table_bits(self.activations)

    def dominates(self, other: Candidate) -> bool:
        """Same other settings but no fewer bits of each kind, tables included (so,
        as accuracy grows with bits, at least as accurate)."""
        return (
            self.per_channel == other.per_channel
            and _budget(self.accumulator_bits) >= _budget(other.accumulator_bits)
            and self.table_bits >= other.table_bits
            and self.weights >= other.weights
            and self.activations >= other.activations
        )


def _budget(bits: int | None) -> float:
    return float("inf") if bits is None else float(bits)


@dataclass(frozen=True)
class SearchRow:
    """One candidate tried: its settings, validation metric and (when compiled) cost.

    ``status`` is ``"passed"``, ``"failed"`` (metric out of budget), ``"pruned"`` (a
    candidate with more bits already failed), ``"error"`` (could not be quantized or
    compiled, ``detail`` says why), or ``"chosen"``.
    """

    candidate: Any  # a Candidate, or a TreeQuantConfig for trees
    status: str
    metric: float | None = None
    estimated_seconds: float | None = None
    complexity: float | None = None
    lookup_price: float | None = None
    detail: str = ""


@dataclass(frozen=True)
class SearchSpace:
    """The values each knob may take.

    Examples:
        >>> len(SearchSpace().candidates(accumulator=False))
        80
    """

    weights: tuple[int, ...] = (3, 4, 5, 6)
    activations: tuple[int, ...] = (3, 4, 5, 6)
    rounding_bits: tuple[int | None, ...] = (None, 6, 5, 4)
    per_channel: tuple[bool, ...] = (True, False)
    #: Used only when QuantConfig has ``accumulator_bits`` (accumulator-aware PTQ).
    accumulator_bits: tuple[int | None, ...] = field(default=(None, 12, 10, 8))

    def candidates(self, accumulator: bool) -> list[Candidate]:
        """Every candidate, fewest bits first (``accumulator``: budgets supported)."""
        budgets = self.accumulator_bits if accumulator else (None,)
        out = [
            Candidate(w, a, r, pc, p)
            for w, a, r, pc, p in itertools.product(
                self.weights, self.activations, self.rounding_bits, self.per_channel, budgets
            )
            if r is None or a <= r != auto_table_bits(a)
        ]
        return sorted(out, key=_order)


def _order(c: Candidate) -> tuple:
    # NOTE: fewest bits first; within a bit pair the widest table first, so that a
    # branch stops at its first failure.
    return (
        c.weights + c.activations,
        c.weights,
        -c.table_bits,
        -_budget(c.accumulator_bits),
        not c.per_channel,
    )


def supports_accumulator_bits() -> bool:
    """Whether the installed :class:`QuantConfig` has an ``accumulator_bits`` field."""
    return any(f.name == "accumulator_bits" for f in fields(QuantConfig))


def check_validation(validation: Any, input_shape: tuple[int, ...] | None) -> tuple:
    """Validate ``validation=(X_val, y_val)``; returns float64 ``X`` and ``y`` arrays.

    Raises:
        InputError: not a pair, no labels, wrong shape, NaN/inf, or lengths differ.

    Examples:
        >>> check_validation((np.zeros((2, 3)), None), (3,))
        Traceback (most recent call last):
        ...
        fhe_quant.errors.InputError: n_bits='auto' needs validation=(X_val, y_val) with \
labels; y_val is None.
    """
    from fhe_quant.quant.ptq import check_calibration_data

    if not isinstance(validation, tuple | list) or len(validation) != 2:
        raise InputError(
            "n_bits='auto' needs validation=(X_val, y_val), a pair of inputs and labels. "
            f"Got {type(validation).__name__}"
            + (f" of length {len(validation)}." if isinstance(validation, tuple | list) else ".")
        )
    x, y = validation
    if y is None:
        raise InputError(
            "n_bits='auto' needs validation=(X_val, y_val) with labels; y_val is None."
        )
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    if hasattr(y, "detach"):
        y = y.detach().cpu().numpy()
    x = check_calibration_data(np.asarray(x), input_shape, "validation X_val")
    try:
        y = np.asarray(y, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"The validation y_val must be numeric labels or targets: {exc}") from None
    if y.ndim == 0 or len(y) != len(x):
        raise InputError(
            f"The validation X_val has {len(x)} samples but y_val has "
            f"{'no length' if y.ndim == 0 else len(y)}."
        )
    if not np.all(np.isfinite(y)):
        raise InputError("The validation y_val holds NaN or inf values.")
    return x, y


def _metric_of(y: np.ndarray) -> str:
    integral = np.all(np.equal(np.mod(y, 1), 0))
    return "accuracy" if integral and y.ndim == 1 else "r2"


def _check_budget(max_accuracy_drop: Any) -> float:
    if (
        isinstance(max_accuracy_drop, bool)
        or not isinstance(max_accuracy_drop, int | float)
        or not 0 <= max_accuracy_drop < 1
    ):
        raise ParameterError(
            f"The 'max_accuracy_drop' parameter must be a number in [0, 1). Got "
            f"{max_accuracy_drop!r} instead."
        )
    return float(max_accuracy_drop)


def _subset(x: np.ndarray, y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if len(x) <= MAX_VALIDATION:
        return x, y
    keep = np.sort(np.random.default_rng(seed).choice(len(x), MAX_VALIDATION, replace=False))
    return x[keep], y[keep]


def _program_price(program: Any, model: CostModel) -> float:
    return float(sum(n * model.price(w) for w, n in program.lookups_by_width().items()))


def search_torch(
    build: Callable[[QuantConfig], Any],
    float_forward: Callable[[np.ndarray], np.ndarray],
    x_calib: np.ndarray,
    validation: tuple[np.ndarray, np.ndarray],
    *,
    max_accuracy_drop: float = 0.01,
    rounding_exact: bool = True,
    space: SearchSpace | None = None,
    seed: int = 0,
    verbose: bool = False,
    **fixed: Any,
) -> Any:
    """Search the cheapest quantized model within the accuracy budget (module docstring).

    Args:
        build: config -> an uncompiled :class:`~fhe_quant.model.QuantizedModule`.
        float_forward: the float model on a batch.
        x_calib: calibration data (also Concrete's inputset).
        validation: checked ``(X_val, y_val)`` (:func:`check_validation`).
        max_accuracy_drop: largest drop of the validation metric allowed.
        rounding_exact: exact rounding (``False`` only when the user asked).
        space: the knobs' values (default :class:`SearchSpace`).
        seed: picks the validation subset when it is large.
        verbose: a progress bar.
        **fixed: other :class:`QuantConfig` fields, the same for every candidate.

    Returns:
        The compiled model of the chosen candidate, with ``search_report_``.

    Raises:
        AccuracyBudgetError: no candidate is within the budget.
    """
    budget = _check_budget(max_accuracy_drop)
    x_val, y_val = _subset(*validation, seed)
    metric = _metric_of(y_val)
    reference = score(float_forward(x_val), y_val, metric)
    candidates = (space or SearchSpace()).candidates(supports_accumulator_bits())
    return _run(
        candidates,
        lambda c: build(c.config(rounding_exact, **fixed)),
        lambda c, other: c.dominates(other),
        lambda module: score(module.forward(x_val, fhe="disable"), y_val, metric),
        (metric, reference, budget),
        x_calib,
        verbose,
    )


#: Tree candidates: input grid bits x leaf-sum bits.
TREE_INPUT_BITS = (2, 3, 4, 5, 6, 7)
TREE_LEAF_BITS = (4, 6, 8)


def search_tree(
    build: Callable[[Any], Any],
    x_calib: np.ndarray,
    validation: tuple[np.ndarray, np.ndarray],
    score_module: Callable[[Any, np.ndarray, np.ndarray], float],
    reference: float,
    *,
    max_accuracy_drop: float = 0.01,
    verbose: bool = False,
) -> Any:
    """The tree counterpart of :func:`search_torch`: candidates are the input grid bits
    and leaf-sum bits (:class:`~fhe_quant.lower_tree.TreeQuantConfig`), a
    config with no more bits of either kind than a failing one is pruned.

    Args:
        build: config -> an uncompiled tree module.
        x_calib: calibration data (Concrete's inputset).
        validation: checked ``(X_val, y_val)``.
        score_module: ``(module, X, y)`` -> the estimator's metric in clear.
        reference: the float model's metric on the validation data.
        max_accuracy_drop: largest drop allowed.
        verbose: a progress bar.
    """
    from fhe_quant.lower_tree import TreeQuantConfig

    budget = _check_budget(max_accuracy_drop)
    x_val, y_val = validation
    candidates = sorted(
        (TreeQuantConfig(i, o) for i in TREE_INPUT_BITS for o in TREE_LEAF_BITS),
        key=lambda c: (c.input_bits, c.leaf_bits),
    )
    return _run(
        candidates,
        build,
        lambda c, other: c.input_bits >= other.input_bits and c.leaf_bits >= other.leaf_bits,
        lambda module: score_module(module, x_val, y_val),
        ("metric", reference, budget),
        x_calib,
        verbose,
    )


def _run(
    candidates: Sequence[Any],
    build: Callable[[Any], Any],
    dominates: Callable[[Any, Any], bool],
    evaluate: Callable[[Any], float],
    reference: tuple[str, float, float],
    x_calib: np.ndarray,
    verbose: bool,
) -> Any:
    """Score every candidate not pruned, compile the cheapest passing ones, pick."""
    metric, value_float, budget = reference
    cost_model = CostModel.default()
    rows: dict[Any, SearchRow] = {}
    passing: list[tuple[float, Any, Any]] = []
    failed: list[Any] = []
    closest: tuple[float, Any, Any] | None = None
    for candidate in tqdm(candidates, desc="n_bits='auto'", disable=not verbose, leave=False):
        if any(dominates(f, candidate) for f in failed):
            rows[candidate] = SearchRow(candidate, "pruned")
            continue
        try:
            module = build(candidate)
        except (ParameterError, RangeError, InputError) as exc:
            rows[candidate] = SearchRow(candidate, "error", detail=str(exc))
            continue
        value = evaluate(module)
        price = _program_price(module.program, cost_model)
        status = "passed" if value >= value_float - budget else "failed"
        rows[candidate] = SearchRow(candidate, status, value, lookup_price=price)
        if status == "passed":
            passing.append((price, candidate, module))
            continue
        failed.append(candidate)
        if closest is None or value > closest[0]:
            closest = (value, candidate, module)
    best = _compile_cheapest(passing, rows, x_calib, cost_model)
    if best is None:
        if closest is not None:  # its cost, for the error message
            _compile_cheapest([(0.0, closest[1], closest[2])], rows, x_calib, cost_model)
        report = [rows[c] for c in candidates]
        scored = [r for r in report if r.metric is not None]
        top = max(scored, key=lambda r: r.metric, default=None)
        raise AccuracyBudgetError(
            value_float,
            float("nan") if top is None else float(top.metric),
            None if top is None else top.estimated_seconds,
            budget,
            report,
        )
    chosen, module = best
    rows[chosen] = replace(rows[chosen], status="chosen")
    module.search_report_ = [rows[c] for c in candidates]
    module.search_reference_ = (metric, value_float)
    return module


def _compile_cheapest(
    passing: list[tuple[float, Candidate, Any]],
    rows: dict[Candidate, SearchRow],
    x_calib: np.ndarray,
    cost_model: CostModel,
) -> tuple[Candidate, Any] | None:
    """Compile the :data:`COMPILED` cheapest passing programs; the least estimated
    latency wins (ties: the earlier, fewer bits)."""
    best: tuple[float, Candidate, Any] | None = None
    ranked = sorted(passing, key=lambda item: item[0])
    for _, candidate, module in ranked[:COMPILED]:
        try:
            module.compile(x_calib)
        except CompilationError as exc:
            rows[candidate] = replace(rows[candidate], status="error", detail=str(exc))
            continue
        estimate = estimate_cost(module, cost_model)
        row = rows[candidate]
        rows[candidate] = SearchRow(
            candidate,
            row.status,
            row.metric,
            estimate.seconds_per_sample,
            estimate.complexity,
            row.lookup_price,
        )
        if best is None or estimate.seconds_per_sample < best[0]:
            best = (estimate.seconds_per_sample, candidate, module)
    return None if best is None else (best[1], best[2])

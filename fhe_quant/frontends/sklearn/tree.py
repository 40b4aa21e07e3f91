"""Tree models (decision trees, random forests, extra trees, gradient boosting) as integer
programs, converted here without any other library.

A fitted tree model becomes, first, a float *tensor form* (:class:`TreeEnsemble`):

* one **compare** per internal node of every tree: ``x[feature] <= threshold``;
* one **path row** per leaf: ``+1`` on each compare the leaf needs true (left branch),
  ``-1`` on each it needs false, so that ``bits @ path.T + n_negated`` counts the
  satisfied conditions, and the leaf is reached iff that count equals its depth;
* the **leaf values**, already scaled so that the model's raw output is their sum over
  the reached leaves plus a constant (``init``): class probabilities divided by the
  number of trees for decision trees, forests and extra trees, ``learning_rate`` times
  the tree outputs plus the initial prediction for gradient boosting.

:func:`TreeEnsemble.evaluate` runs that form in float; :func:`check_ensemble` compares
it with scikit-learn's own ``predict_proba``/``decision_function``/``predict`` so that a
mistranslation cannot pass silently.

Then :func:`quantize_ensemble` turns it into an
:class:`~fhe_quant.lower.IntegerProgram` (a chain of the lowering's own steps, no PTQ):

1. The client shifts every feature (a ``pre`` node) and quantizes it on a uniform grid
   of ``2**input_bits`` points spanning its calibrated range, clipping values outside
   it (never wrapping). The grid spends one spare code to slide by up to one step, so
   that its cell borders fall as near as possible to the feature's thresholds.
2. A split ``x[f] <= t`` becomes ``code[f] <= K`` where ``K + 1`` is the number of grid
   points of feature ``f`` that scikit-learn itself sends left (it compares
   ``float32(x) <= t``): the quantized tree decides exactly like the float tree on
   every grid point, by construction rather than by float arithmetic. A compare whose
   ``K`` is outside ``[0, qmax)`` is a constant and a compare already decided higher on
   the same path is determined: both keep only the side they take, without a lookup.
   Compares with the same ``(f, K)`` are computed once for the whole ensemble (a 5-bit
   grid has 31 thresholds per feature, so forests share many of theirs).
3. Each tree on the grid is cut into **groups**: subtrees whose ``k`` compares and
   ``d`` path conditions above them fit one table index
   ``2**k * (satisfied path conditions) + (the k compare bits)``, at most
   ``(d + 1) * 2**k - 1``. The group's table returns the integer value of the leaf
   those bits select when all ``d`` conditions hold, else 0; each tree reaches exactly
   one leaf, so the sum over groups is the sum of the reached leaves. A tree adding to
   several outputs (a forest's class probabilities) instead gets one 0/1 match table
   per leaf (``k = 0``), its values summed as clear weights. The program::

       acc = q @ G.T               # gather: G is 0/1, one row per distinct compare
       b   = table_compare[acc]    # 1 iff code <= K, input_bits-wide tables
       acc = b @ P.T + offset      # each group's table index, proven in range
       v   = table_leaves[acc]     # leaf value (or 0/1 match) per group
       acc = v @ S.T               # integer leaf values summed over every tree

   Concrete gives one lookup tensor a single width, so the group width is chosen for
   the whole model: the cheapest ``count x price`` from the deepest leaf's width up
   to :data:`GROUP_TABLE_BITS`, always narrower than the compares (measured: same-width
   leaf tables made the compares dearer). A depth-5 tree on breast_cancer: 13
   compares on 5 bits + 7 groups on 4 bits = 20 lookups. Trees constant on the grid
   are constants of the dequantization.
4. Leaf values are quantized per output so that the proven range of the sum (the sum
   over trees of each tree's smallest to largest value) fits ``leaf_bits`` (8 by
   default): no table reads the sum, but its width still sizes Concrete's parameters.
   Each tree's values are shifted by its minimum, so every encrypted value is
   non-negative. The client dequantizes the sum (``scale * (acc - zero) + bias``)
   into the raw output and applies the output function (probabilities, sigmoid or
   softmax of a boosted model's scores).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import cached_property
from numbers import Integral
from typing import Any

import numpy as np
from sklearn import ensemble as _ensemble
from sklearn import tree as _tree
from sklearn.base import is_classifier

from fhe_quant.errors import InputError, ParameterError, TraceError, UnsupportedOpError
from fhe_quant.fhe import FHECircuit
from fhe_quant.ir import Node, describe_mismatch, linear_bounds
from fhe_quant.lower import IntegerProgram, LinearStep, TableStep, bits_for
from fhe_quant.model import QuantizedModule
from fhe_quant.quant.quantizer import MAX_BITS, UniformQuantizer

__all__ = [
    "TREE_CLASSES",
    "LEAF_BITS",
    "MAX_LEAF_BITS",
    "TreeQuantConfig",
    "TreeEnsemble",
    "TreeQuantized",
    "ensemble_from_sklearn",
    "ensemble_from_leaves",
    "check_ensemble",
    "quantize_ensemble",
    "TreeModule",
    "build_tree_module",
]

#: Default bits of the encrypted sum of leaf values, per output. No table reads it, but
#: its width still sizes Concrete's parameters (a depth-5 tree: +25% complexity from 2
#: to 8 bits; a 17-bit sum found no parameters at all).
LEAF_BITS = 8
#: Widest table of a group of leaves, and always narrower than the compare tables:
#: measured on concrete-python 2.11, leaf tables as wide as the 5-bit compares made
#: the compares dearer too (a depth-5 tree: 17 lookups cost 1.4x more than 20 with
#: 4-bit leaf tables).
GROUP_TABLE_BITS = 4
#: Widest leaf values accepted.
MAX_LEAF_BITS = 16

#: The scikit-learn tree models this module converts.
TREE_CLASSES: tuple[type, ...] = (
    _tree.DecisionTreeClassifier,
    _tree.DecisionTreeRegressor,
    _ensemble.RandomForestClassifier,
    _ensemble.RandomForestRegressor,
    _ensemble.ExtraTreesClassifier,
    _ensemble.ExtraTreesRegressor,
    _ensemble.GradientBoostingClassifier,
    _ensemble.GradientBoostingRegressor,
)

_GRADIENT_BOOSTING = (_ensemble.GradientBoostingClassifier, _ensemble.GradientBoostingRegressor)
_ROLES = ("inputs", "outputs")


@dataclass(frozen=True)
class TreeQuantConfig:
    """How a tree model is quantized.

    Attributes:
        input_bits: bits of the per-feature input grid, 1 to 8; also the input width of
            every compare table (5 or fewer keeps lookups cheap).
        leaf_bits: bits of the encrypted sum of leaf values (per output), 2 to 16;
            the leaf values are quantized to fit it.

    Examples:
        >>> TreeQuantConfig.from_n_bits(5)
        TreeQuantConfig(input_bits=5, leaf_bits=8)
        >>> TreeQuantConfig.from_n_bits({"inputs": 4, "outputs": 12}).leaf_bits
        12
        >>> TreeQuantConfig.from_n_bits({"weights": 4})
        Traceback (most recent call last):
        ...
        fhe_quant.errors.ParameterError: The 'n_bits' parameter of a tree model has an \
unknown key 'weights'; valid keys are 'inputs' (the feature grid) and 'outputs' (the \
leaf values): trees have no weights or activations.
    """

    input_bits: int
    leaf_bits: int = LEAF_BITS

    def __post_init__(self) -> None:
        for name, low, high in (("input_bits", 1, MAX_BITS), ("leaf_bits", 2, MAX_LEAF_BITS)):
            value = getattr(self, name)
            if (
                isinstance(value, bool | np.bool_)
                or not isinstance(value, Integral)
                or not low <= int(value) <= high
            ):
                raise ParameterError(
                    f"The {name!r} parameter of TreeQuantConfig must be an int in "
                    f"[{low}, {high}]. Got {value!r} instead."
                )
            object.__setattr__(self, name, int(value))

    @classmethod
    def from_n_bits(cls, n_bits: Any) -> TreeQuantConfig:
        """The config of an estimator's ``n_bits``: an int sets the input grid (leaf
        values keep :data:`LEAF_BITS`); a dict may set ``inputs`` and ``outputs``.

        Raises:
            ParameterError: a wrong type, an unknown key or a value out of range.
        """
        if isinstance(n_bits, Mapping):
            bad = [key for key in n_bits if key not in _ROLES]
            if bad:
                raise ParameterError(
                    f"The 'n_bits' parameter of a tree model has an unknown key {bad[0]!r}; "
                    "valid keys are 'inputs' (the feature grid) and 'outputs' (the leaf "
                    "values): trees have no weights or activations."
                )
            return cls(n_bits.get("inputs", 6), n_bits.get("outputs", LEAF_BITS))
        return cls(n_bits)


# --------------------------------------------------------------------------- tensor form


@dataclass(frozen=True, eq=False)
class TreeEnsemble:
    """The float tensor form of a fitted tree model (see the module docstring).

    Attributes:
        n_features: number of input features.
        feature: ``(C,)`` feature of each compare.
        threshold: ``(C,)`` threshold of each compare (``x <= threshold`` goes left).
        path: ``(L, C)`` int, ``+1``/``-1`` where a leaf needs a compare true/false.
        values: ``(L, O)`` float, each leaf's contribution to the raw outputs.
        init: ``(O,)`` float, the constant part of the raw outputs.
        tree: ``(L,)`` int, the tree of each leaf (each tree reaches exactly one leaf).
        node: ``(L,)`` int, each leaf's node id in its scikit-learn tree (``apply``).
        output: the client's output function (a key of ``OUTPUT_FUNCTIONS``).
        ravel: scikit-learn returns the single output as a 1-D array.
        float32_inputs: the model compares ``float32(x)`` with the thresholds
            (scikit-learn, XGBoost); ``False``: it compares the float64 input (LightGBM).
    """

    n_features: int
    feature: np.ndarray
    threshold: np.ndarray
    path: np.ndarray
    values: np.ndarray
    init: np.ndarray
    tree: np.ndarray
    node: np.ndarray
    output: str
    ravel: bool
    float32_inputs: bool = True

    def __post_init__(self) -> None:
        n_compares, n_leaves = len(self.feature), len(self.values)
        if self.tree.shape != (n_leaves,) or self.node.shape != (n_leaves,):
            raise ValueError(f"TreeEnsemble needs one tree index per leaf. Got {self.tree.shape}.")
        if self.threshold.shape != (n_compares,) or self.path.shape != (n_leaves, n_compares):
            raise ValueError(
                f"TreeEnsemble shapes disagree: {n_compares} features, thresholds "
                f"{self.threshold.shape}, path {self.path.shape}, {n_leaves} leaf values."
            )
        if self.values.ndim != 2 or self.init.shape != (self.values.shape[1],):
            raise ValueError(
                f"TreeEnsemble values must be (leaves, outputs) and init (outputs,). Got "
                f"{self.values.shape} and {self.init.shape}."
            )

    @property
    def depth(self) -> np.ndarray:
        """``(L,)`` number of conditions of each leaf."""
        return np.abs(self.path).sum(axis=1)

    @property
    def n_negated(self) -> np.ndarray:
        """``(L,)`` number of conditions each leaf needs false."""
        return (self.path < 0).sum(axis=1)

    def evaluate(self, x: np.ndarray) -> np.ndarray:
        """The raw outputs ``(N, O)`` in float, deciding like scikit-learn (float32
        inputs against float64 thresholds)."""
        x32 = np.asarray(x, dtype=np.float32 if self.float32_inputs else np.float64)
        x32 = x32.astype(np.float64)
        # NOTE: float64 products of small integers are exact, and use BLAS.
        bits = (x32[:, self.feature] <= self.threshold).astype(np.float64)
        satisfied = bits @ self.path.T.astype(np.float64) + self.n_negated
        reached = (satisfied == self.depth).astype(np.float64)
        return reached @ self.values + self.init


def _tree_paths(tree: Any, first_compare: int) -> tuple[list[int], list[float], list[dict]]:
    """Compares (one per internal node) and, per leaf, ``{compare: +1/-1}`` and its node."""
    t = tree.tree_
    features: list[int] = []
    thresholds: list[float] = []
    leaves: list[dict] = []
    stack: list[tuple[int, dict[int, int]]] = [(0, {})]
    index_of: dict[int, int] = {}
    while stack:
        node, conditions = stack.pop()
        left, right = int(t.children_left[node]), int(t.children_right[node])
        if left == -1:
            leaves.append({"node": node, "conditions": conditions})
            continue
        index_of[node] = first_compare + len(features)
        features.append(int(t.feature[node]))
        thresholds.append(float(t.threshold[node]))
        c = index_of[node]
        stack.append((right, {**conditions, c: -1}))
        stack.append((left, {**conditions, c: +1}))
    return features, thresholds, leaves


def _leaf_value_fn(kind: str) -> Any:
    def proba(t: Any, node: int) -> np.ndarray:
        value = np.asarray(t.value[node, 0], dtype=np.float64)
        total = value.sum()
        return value / total if total > 0 else value

    def regression(t: Any, node: int) -> np.ndarray:
        return np.asarray(t.value[node, :, 0], dtype=np.float64)

    return proba if kind == "proba" else regression


def _assemble(
    trees: list[tuple[Any, np.ndarray]],
    kind: str,
    n_features: int,
    init: np.ndarray,
    output: str,
    ravel: bool,
) -> TreeEnsemble:
    """Concatenate the trees; ``trees`` holds ``(tree, weight)`` where ``weight`` maps
    a tree output to the raw outputs: ``(O,)`` (elementwise) or an ``(O,)`` one-hot for
    a tree of one boosting class."""
    value_of = _leaf_value_fn(kind)
    features: list[int] = []
    thresholds: list[float] = []
    leaf_rows: list[dict[int, int]] = []
    leaf_values: list[np.ndarray] = []
    leaf_tree: list[int] = []
    leaf_node: list[int] = []
    for i, (tree, weight) in enumerate(trees):
        f, th, leaves = _tree_paths(tree, len(features))
        features += f
        thresholds += th
        for leaf in leaves:
            leaf_rows.append(leaf["conditions"])
            leaf_values.append(value_of(tree.tree_, leaf["node"]) * weight)
            leaf_tree.append(i)
            leaf_node.append(leaf["node"])
    return ensemble_from_leaves(
        n_features,
        features,
        thresholds,
        leaf_rows,
        leaf_values,
        init,
        (leaf_tree, leaf_node),
        output,
        ravel,
    )


def ensemble_from_leaves(
    n_features: int,
    features: list[int],
    thresholds: list[float],
    rows: list[dict[int, int]],
    values: list[np.ndarray],
    init: Any,
    leaves: tuple[list[int], list[int]],
    output: str,
    ravel: bool,
    float32_inputs: bool = True,
) -> TreeEnsemble:
    """The tensor form of an ensemble read leaf by leaf: ``rows[i]`` maps each compare
    on leaf ``i``'s path to ``+1`` (taken when true) or ``-1``; ``values[i]`` is its
    contribution to the raw outputs; ``leaves`` its (tree, node) origin."""
    path = np.zeros((len(rows), len(features)), dtype=np.int64)
    for i, row in enumerate(rows):
        for c, sign in row.items():
            path[i, c] = sign
    leaf_tree, leaf_node = leaves
    return TreeEnsemble(
        n_features,
        np.asarray(features, dtype=np.int64),
        np.asarray(thresholds, dtype=np.float64),
        path,
        np.asarray(values, dtype=np.float64).reshape(len(rows), len(init)),
        np.asarray(init, dtype=np.float64),
        np.asarray(leaf_tree, dtype=np.int64),
        np.asarray(leaf_node, dtype=np.int64),
        output,
        ravel,
        float32_inputs,
    )


def _check_classifier_outputs(model: Any) -> None:
    if getattr(model, "n_outputs_", 1) != 1:
        raise UnsupportedOpError(
            f"{type(model).__name__} fitted on {model.n_outputs_} target columns",
            type(model).__name__,
            "Multi-output tree classifiers are not supported; fit one classifier per "
            "target column.",
        )


def _gradient_boosting(model: Any) -> TreeEnsemble:
    name = type(model).__name__
    if model.init not in (None, "zero"):
        raise UnsupportedOpError(
            f"{name}(init={type(model.init).__name__})",
            name,
            "Only init=None (a constant prior) or 'zero' is supported: another "
            "estimator's prediction cannot be added inside the encrypted program.",
        )
    is_classifier = isinstance(model, _ensemble.GradientBoostingClassifier)
    if is_classifier and model.loss == "exponential":
        raise UnsupportedOpError(
            f"{name}(loss='exponential')",
            name,
            "Use loss='log_loss' (the default).",
        )
    n_columns = model.estimators_.shape[1]
    probe = np.zeros((1, model.n_features_in_))
    init = np.asarray(model._raw_predict_init(probe), dtype=np.float64).reshape(-1)
    trees = []
    for stage in model.estimators_:
        for k, tree in enumerate(stage):
            weight = np.zeros(n_columns)
            weight[k] = model.learning_rate
            trees.append((tree, weight))
    if is_classifier:
        output = "sigmoid" if n_columns == 1 else "softmax"
    else:
        output = "identity"
    return _assemble(trees, "regression", model.n_features_in_, init, output, True)


def ensemble_from_sklearn(model: Any) -> TreeEnsemble:
    """The :class:`TreeEnsemble` of a fitted scikit-learn tree model.

    Raises:
        UnsupportedOpError: a class or option that cannot be converted (named).

    Examples:
        >>> from sklearn.tree import DecisionTreeClassifier
        >>> x = np.array([[0.0], [1.0], [2.0], [3.0]])
        >>> tree = DecisionTreeClassifier().fit(x, [0, 0, 1, 2])
        >>> ensemble = ensemble_from_sklearn(tree)
        >>> ensemble.threshold.tolist(), ensemble.path.tolist(), ensemble.output
        ([1.5, 2.5], [[1, 0], [-1, 1], [-1, -1]], 'normalize')
        >>> ensemble.evaluate(x).tolist()
        [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    """
    n_features = int(model.n_features_in_)
    if isinstance(
        model, _ensemble.GradientBoostingClassifier | _ensemble.GradientBoostingRegressor
    ):
        return _gradient_boosting(model)
    trees = list(getattr(model, "estimators_", [model]))
    if is_classifier(model):
        _check_classifier_outputs(model)
        n_classes = len(model.classes_)
        if n_classes == 2:
            # NOTE: one output, p(class 1) - 1/2: half the leaf tables, and the label is
            # its sign (ties go to class 0, as scikit-learn's argmax).
            weight = np.array([0.0, 1.0 / len(trees)])
            ensemble = _assemble(
                [(t, weight) for t in trees], "proba", n_features, np.zeros(2), "", False
            )
            return replace(
                ensemble,
                values=ensemble.values[:, 1:],
                init=np.array([-0.5]),
                output="centered_proba",
            )
        weight = np.full(n_classes, 1.0 / len(trees))
        return _assemble(
            [(t, weight) for t in trees],
            "proba",
            n_features,
            np.zeros(n_classes),
            "normalize",
            False,
        )
    n_outputs = int(model.n_outputs_)
    weight = np.full(n_outputs, 1.0 / len(trees))
    return _assemble(
        [(t, weight) for t in trees],
        "regression",
        n_features,
        np.zeros(n_outputs),
        "identity",
        n_outputs == 1,
    )


def check_ensemble(model: Any, ensemble: TreeEnsemble, x: np.ndarray) -> None:
    """Check that the tensor form reproduces ``model`` on up to 64 samples of ``x``.

    Raises:
        TraceError: ``predict_proba``/``decision_function``/``predict`` differ.
    """
    from fhe_quant.frontends.sklearn import OUTPUT_FUNCTIONS

    x = np.asarray(x, dtype=np.float64)[:64]
    raw = ensemble.evaluate(x)
    pairs = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="X does not have valid feature names")
        if hasattr(model, "classes_"):
            if hasattr(model, "decision_function"):
                ours = raw[:, 0] if raw.shape[1] == 1 else raw
                pairs.append(("decision_function", ours, model.decision_function(x)))
            pairs.append(
                ("predict_proba", OUTPUT_FUNCTIONS[ensemble.output](raw), model.predict_proba(x))
            )
        else:
            ours = raw.reshape(-1) if ensemble.ravel else raw
            pairs.append(("predict", ours, model.predict(x)))
    for method, ours, expected in pairs:
        difference = describe_mismatch(
            np.asarray(ours, dtype=np.float64),
            np.asarray(expected, dtype=np.float64),
            rtol=1e-6,
            atol=1e-9,
        )
        if difference is not None:
            raise TraceError(
                f"The tensor form of {type(model).__name__} does not reproduce its {method} "
                f"({difference}); the model was translated wrongly. Please report this "
                "with your model."
            )


# --------------------------------------------------------------------------- quantization


@dataclass(frozen=True, eq=False)
class TreeQuantized:
    """What the client runs around a tree program: ``pre`` (the per-feature shift
    before quantization), ``post`` (nothing: the output function is applied by the
    estimator), the config and calibrated range, and ``leaf_codes``: the integer value
    ``(L, O)`` each leaf of the ensemble adds to the encrypted sum when reached (0 for
    the leaves of trees constant on the grid, which are in the bias). Same surface as a
    :class:`~fhe_quant.quant.ptq.QuantizedGraph` for the deployment code."""

    pre: tuple[Node, ...]
    post: tuple[Node, ...]
    config: TreeQuantConfig
    low: np.ndarray
    high: np.ndarray
    leaf_codes: np.ndarray | None = None


#: Offsets tried per feature when aligning the grid with the thresholds.
_ALIGN_STEPS = 64


def _aligned_grid(
    ensemble: TreeEnsemble, low: np.ndarray, high: np.ndarray, qmax: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature grid ``origin + k * scale`` (``k = 0..qmax``) covering ``[low, high]``.

    An input is decided like the float tree unless it lies between a threshold and the
    border of its grid cell (the inputs that round to a grid point on the other side).
    So the grid spends one spare code to be free to slide by up to one step, and slides
    to put the cell borders as near as possible to the feature's thresholds (the sum of
    distances, in steps, is minimized over :data:`_ALIGN_STEPS` offsets): a feature
    split once is then decided exactly for every input.
    """
    span = high - low
    scale = np.where(span > 0, span / max(qmax - 1, 1), 1.0)
    origin = low.astype(np.float64).copy()
    shifts = np.arange(_ALIGN_STEPS) / _ALIGN_STEPS
    for f in range(ensemble.n_features):
        thresholds = ensemble.threshold[ensemble.feature == f]
        inside = thresholds[(thresholds > low[f]) & (thresholds < high[f])]
        if span[f] <= 0 or qmax < 2 or inside.size == 0:
            continue
        # Cell borders sit at origin + (k + 1/2) * scale, origin = low - shift * scale.
        position = (inside[None, :] - low[f]) / scale[f] + shifts[:, None] - 0.5
        distance = np.abs(position - np.rint(position)).sum(axis=1)
        origin[f] = low[f] - shifts[int(np.argmin(distance))] * scale[f]
    return origin, scale


def _grid_thresholds(
    ensemble: TreeEnsemble, low: np.ndarray, scale: np.ndarray, qmax: int
) -> np.ndarray:
    """``K`` per compare: the last grid code scikit-learn sends left, -1 if none."""
    codes = np.arange(qmax + 1, dtype=np.float64)
    # NOTE: the grid value of code k is what the client's quantizer maps to k; the tree
    # compares it as float32, like scikit-learn does on any input.
    grid = low[:, None] + codes[None, :] * scale[:, None]
    if ensemble.float32_inputs:
        grid = grid.astype(np.float32)
    left = grid[ensemble.feature].astype(np.float64) <= ensemble.threshold[:, None]
    return left.sum(axis=1) - 1  # float32 of a monotone grid is monotone: a prefix


def _shift_node(low: np.ndarray) -> Node:
    return Node(
        "shift_to_grid",
        "add_const",
        ("input",),
        params={"constant": -low},
        source="tree input grid",
    )


def quantize_ensemble(
    ensemble: TreeEnsemble, x: np.ndarray, config: TreeQuantConfig
) -> tuple[IntegerProgram, TreeQuantized]:
    """The integer program of a tree ensemble, with its input grid calibrated on ``x``.

    Args:
        ensemble: the tensor form.
        x: calibration data ``(N, n_features)``: each feature's grid spans its range.
        config: input grid and leaf value bits.

    Returns:
        The program and the client-side processing (:class:`TreeQuantized`).

    Examples:
        >>> from sklearn.tree import DecisionTreeRegressor
        >>> x = np.arange(8.0).reshape(-1, 1)
        >>> tree = DecisionTreeRegressor(max_depth=2).fit(x, x[:, 0] ** 2)
        >>> program, _ = quantize_ensemble(ensemble_from_sklearn(tree), x, TreeQuantConfig(3))
        >>> program.lookups_by_width()  # 3 compares on 3 bits, 2 pairs of leaves on 2 bits
        {3: 3, 2: 2}
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != ensemble.n_features or len(x) == 0:
        raise InputError(
            f"The calibration data must have shape (n_samples, {ensemble.n_features}). "
            f"Got {x.shape} instead."
        )
    low, high = x.min(axis=0), x.max(axis=0)
    return _build_program(ensemble, low, high, config)


@dataclass(frozen=True, eq=False)
class _QNode:
    """A node of a tree on the grid: a split on quantized compare ``compare`` (left when
    true), or a leaf (``leaf``: its index in the ensemble)."""

    compare: int = -1
    left: _QNode | None = None
    right: _QNode | None = None
    leaf: int = -1

    @cached_property
    def compares(self) -> frozenset[int]:
        if self.left is None or self.right is None:
            return frozenset()
        return frozenset({self.compare}) | self.left.compares | self.right.compares

    def walk(self, bits: Mapping[int, int]) -> int:
        node = self
        while node.left is not None and node.right is not None:
            node = node.left if bits[node.compare] else node.right
        return node.leaf


def _grid_tree(
    path: np.ndarray,
    leaves: list[int],
    kept: np.ndarray,
    compare_of: np.ndarray,
    decided: frozenset[int] = frozenset(),
    prefix: Mapping[int, bool] | None = None,
) -> _QNode:
    """The tree of ``leaves`` (one subtree of one tree; ``path``, ``kept`` and
    ``compare_of`` restricted to that tree's compares) on the grid: constant compares
    keep only the side they always take, and a quantized compare already decided on
    the path (two float splits landing on one grid compare) keeps the side it took, so
    that every path tests distinct compares and every leaf is reachable."""
    prefix = prefix or {}
    if len(leaves) == 1:
        return _QNode(leaf=leaves[0])
    rows = path[leaves]
    # NOTE: compares are numbered in preorder, so the subtree's root is the smallest
    # compare of its leaves not decided yet.
    root = int(min(c for c in np.nonzero(np.any(rows != 0, axis=0))[0] if c not in decided))
    left = [leaf for leaf, row in zip(leaves, rows, strict=True) if row[root] > 0]
    right = [leaf for leaf, row in zip(leaves, rows, strict=True) if row[root] < 0]
    decided = decided | {root}
    q = int(compare_of[root])
    if q < 0 or q in prefix:
        goes_left = bool(kept[root]) if q < 0 else prefix[q]
        return _grid_tree(path, left if goes_left else right, kept, compare_of, decided, prefix)
    return _QNode(
        q,
        _grid_tree(path, left, kept, compare_of, decided, {**prefix, q: True}),
        _grid_tree(path, right, kept, compare_of, decided, {**prefix, q: False}),
    )


@dataclass(frozen=True, eq=False)
class _Group:
    """The leaves under ``node`` of one grid tree, behind the conditions ``prefix``."""

    tree: int
    prefix: Mapping[int, bool]
    node: _QNode

    @cached_property
    def compares(self) -> list[int]:
        return sorted(self.node.compares)

    def index_max(self) -> int:
        """Largest table index: ``len(prefix) * 2**k + 2**k - 1``."""
        return (len(self.prefix) + 1) * 2 ** len(self.compares) - 1

    def leaves(self) -> list[int]:
        """The leaf of every assignment of the group's compares (bit j: compare j)."""
        compares = self.compares
        return [
            self.node.walk({c: (code >> j) & 1 for j, c in enumerate(compares)})
            for code in range(2 ** len(compares))
        ]


#: Relative cost of one lookup by table input width (Concrete's complexity estimate of
#: tree circuits, concrete-python 2.11: about 0.95, 1.1, 1.6 and 2.2-3.2 x 1e8 at 2 to 5
#: bits; wider ones scaled like the measured latencies, 45 ms at 6 bits vs ~10 at 5).
_LOOKUP_COST = {1: 0.95, 2: 0.95, 3: 1.1, 4: 1.6, 5: 2.5, 6: 11.0, 7: 27.0, 8: 83.0}


def _groups(
    tree: int, node: _QNode, prefix: Mapping[int, bool], max_index: int, whole: bool
) -> list[_Group]:
    """Split a grid tree into groups of leaves, one lookup each (per output): the
    largest subtrees whose table index fits in ``max_index`` (``whole``), or else
    (several outputs) single leaves."""
    group = _Group(tree, prefix, node)
    if node.left is None or node.right is None or (whole and group.index_max() <= max_index):
        return [group]
    return _groups(tree, node.left, {**prefix, node.compare: True}, max_index, whole) + _groups(
        tree, node.right, {**prefix, node.compare: False}, max_index, whole
    )


def _all_groups(trees: list[tuple[int, _QNode, bool]], widest: int) -> list[_Group]:
    """The groups of every tree at the table width of least total cost.

    ``trees`` holds ``(tree, root, whole)``: a tree adding to one output only can be
    grouped (``whole``); the others get one match table per leaf. Concrete gives all
    the elements of one lookup tensor the same width, so every group table costs the
    widest one's price: each width from the deepest leaf's up to ``widest`` is tried,
    with the largest groups that fit it, and the cheapest count times price wins.
    """
    leaves_only = [g for t, root, _ in trees for g in _groups(t, root, {}, 0, False)]
    narrowest = bits_for(max(g.index_max() for g in leaves_only))
    best, best_cost = leaves_only, len(leaves_only) * _LOOKUP_COST[narrowest]
    for width in range(narrowest, max(widest, narrowest) + 1):
        groups = [g for t, root, whole in trees for g in _groups(t, root, {}, 2**width - 1, whole)]
        cost = len(groups) * _LOOKUP_COST[width]
        if cost < best_cost:
            best, best_cost = groups, cost
    return best


def _quantize_leaves(
    ensemble: TreeEnsemble, per_tree: list[list[int]], bits: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Integer leaf values ``(L, O)``, each tree's shifted to a minimum of 0, their
    per-output scale, and the proven range ``[lo, hi]`` of their unshifted sum.

    Each tree reaches exactly one of its leaves (``per_tree``: the reachable ones of
    the trees that are not constant), so the sum lies between the sums over trees of
    their smallest and largest values; the scale is the smallest that keeps that range
    within ``bits`` bits: the width of the output sum, which Concrete's parameters
    depend on even though no table reads it. Shifting each tree by its minimum (the sum
    of the minima, ``lo``, is a constant of the dequantization) makes every encrypted
    value non-negative, so Concrete types it unsigned.
    """
    values = ensemble.values
    low = np.sum([values[g].min(axis=0) for g in per_tree], axis=0)
    high = np.sum([values[g].max(axis=0) for g in per_tree], axis=0)
    limit = 2**bits - 1
    scale = np.where(high > low, (high - low) / limit, 1.0)
    while True:
        codes = np.rint(values / scale)
        lo = np.sum([codes[g].min(axis=0) for g in per_tree], axis=0).astype(np.int64)
        hi = np.sum([codes[g].max(axis=0) for g in per_tree], axis=0).astype(np.int64)
        too_wide = hi - lo > limit
        if not too_wide.any():
            break
        # NOTE: rounding each tree's values can widen the range by up to one step per
        # tree; a slightly coarser scale brings it back.
        scale = np.where(too_wide, scale * (1 + 1 / limit), scale)
    shifted = np.zeros(values.shape, dtype=np.int64)
    for g in per_tree:
        shifted[g] = codes[g] - codes[g].min(axis=0)
    return shifted, scale, lo, hi


def _build_program(
    ensemble: TreeEnsemble, low: np.ndarray, high: np.ndarray, config: TreeQuantConfig
) -> tuple[IntegerProgram, TreeQuantized]:
    qmax = 2**config.input_bits - 1
    origin, scale = _aligned_grid(ensemble, low, high, qmax)
    n_features = ensemble.n_features
    quantizer = UniformQuantizer(
        config.input_bits, tuple(scale), (0,) * n_features, signed=False, axis=1
    )
    k = _grid_thresholds(ensemble, origin, scale, qmax)
    # Constant compares: K = -1 is always false, K = qmax always true.
    kept = np.where(k >= qmax, 1, 0)
    varying = (k >= 0) & (k < qmax)
    pairs = sorted(
        {(int(f), int(t)) for f, t in zip(ensemble.feature[varying], k[varying], strict=True)}
    )
    index = {pair: i for i, pair in enumerate(pairs)}
    compare_of = np.array(
        [
            index[(int(f), int(t))] if v else -1
            for f, t, v in zip(ensemble.feature, k, varying, strict=True)
        ],
        dtype=np.int64,
    )
    bias = ensemble.init.copy()
    trees: list[tuple[int, _QNode]] = []
    for t in np.unique(ensemble.tree):
        leaves = np.nonzero(ensemble.tree == t)[0]
        # NOTE: each tree's compares are contiguous; working on its own columns keeps
        # the conversion linear in the number of trees.
        used = np.nonzero(np.any(ensemble.path[leaves] != 0, axis=0))[0]
        cols = slice(int(used.min()), int(used.max()) + 1) if used.size else slice(0, 0)
        root = _grid_tree(ensemble.path[:, cols], list(leaves), kept[cols], compare_of[cols])
        if root.left is None:
            bias = bias + ensemble.values[root.leaf]  # a tree constant on the grid
        else:
            trees.append((int(t), root))
    quantized = TreeQuantized(
        (_shift_node(origin),), (), config, low.astype(np.float64), high.astype(np.float64)
    )
    if not trees:
        # Every tree is constant on the grid: the output does not depend on the input.
        quantized = replace(quantized, leaf_codes=np.zeros(ensemble.values.shape, np.int64))
        return IntegerProgram(quantizer, (n_features,), (_constant_step(bias, n_features),)), (
            quantized
        )
    per_tree = [_leaf_set(root) for _, root in trees]
    codes, leaf_scale, lo, hi = _quantize_leaves(ensemble, per_tree, config.leaf_bits)
    # A tree adding to one output (regression, binary classes, a boosting tree of one
    # class): a table per group of its leaves gives the group's leaf value directly.
    # Otherwise (a forest's class probabilities): one match table per leaf, values
    # summed in clear.
    whole = {
        t for (t, _), leaves in zip(trees, per_tree, strict=True) if codes[leaves].any(0).sum() <= 1
    }
    groups = _all_groups(
        [(t, root, t in whole) for t, root in trees],
        min(config.input_bits - 1, GROUP_TABLE_BITS),
    )
    used = sorted({c for g in groups for c in [*g.prefix, *g.compares]})
    steps = _steps(
        [pairs[c] for c in used],
        {c: i for i, c in enumerate(used)},
        groups,
        codes,
        whole,
        n_features,
        config,
    )
    leaves_step = LinearStep(
        "leaves",
        "linear",
        steps[-1],
        np.zeros((1, len(lo)), dtype=np.int64),
        (hi - lo).reshape(1, -1),
        leaf_scale.reshape(1, -1),
        (-lo).reshape(1, -1).astype(np.float64),
        bias.reshape(1, -1),
    )
    quantized = replace(quantized, leaf_codes=codes)
    return IntegerProgram(quantizer, (n_features,), (*steps[:-1], leaves_step)), quantized


def _leaf_set(node: _QNode) -> list[int]:
    if node.left is None or node.right is None:
        return [node.leaf]
    return _leaf_set(node.left) + _leaf_set(node.right)


def _constant_step(bias: np.ndarray, n_features: int) -> LinearStep:
    """The program of a model that is constant on the grid: ``acc = q @ 0 = 0``."""
    n_outputs = len(bias)
    ones, zeros = np.ones((1, n_outputs)), np.zeros((1, n_outputs))
    return LinearStep(
        "leaves",
        "linear",
        np.zeros((n_outputs, n_features), dtype=np.int64),
        np.zeros((1, n_outputs), dtype=np.int64),
        np.zeros((1, n_outputs), dtype=np.int64),
        ones,
        zeros,
        bias.reshape(1, -1).astype(np.float64),
    )


def _steps(
    pairs: list[tuple[int, int]],
    position: Mapping[int, int],
    groups: list[_Group],
    codes: np.ndarray,
    whole: set[int],
    n_features: int,
    config: TreeQuantConfig,
) -> tuple[Any, ...]:
    """Gather, compare tables, group indices, group tables; and the weights of the
    final sum (the caller builds that step)."""
    qmax = 2**config.input_bits - 1
    n_compares = len(pairs)
    gather = np.zeros((n_compares, n_features), dtype=np.int64)
    thresholds = np.zeros(n_compares, dtype=np.int64)
    for i, (f, t) in enumerate(pairs):
        gather[i, f] = 1
        thresholds[i] = t
    gather_step = LinearStep(
        "gather",
        "linear",
        gather,
        np.zeros((1, n_compares), dtype=np.int64),
        np.full((1, n_compares), qmax, dtype=np.int64),
        np.ones((1, n_compares)),
        np.zeros((1, n_compares)),
        np.zeros((1, n_compares)),
    )
    compare_table = (np.arange(qmax + 1)[None, :] <= thresholds[:, None]).astype(np.int64)
    compare_step = _table_step("compare", compare_table, np.full((1, n_compares), qmax))

    # A group's table index: 2**k * (satisfied prefix conditions) + the bits of its k
    # compares, i.e. b @ row + 2**k * (number of prefix conditions needing false).
    n_outputs = codes.shape[1]
    rows, offsets, index_max, tables, sum_weights = [], [], [], [], []
    for group in groups:
        compares = group.compares
        size = 2 ** len(compares)
        row = np.zeros(n_compares, dtype=np.int64)
        for c, want in group.prefix.items():
            row[position[c]] += size if want else -size
        for j, c in enumerate(compares):
            row[position[c]] += 2**j
        depth = len(group.prefix)
        leaf_of = group.leaves()
        outputs = range(n_outputs) if group.tree in whole else [None]
        for o in outputs:
            table = np.zeros(group.index_max() + 1, dtype=np.int64)
            for code, leaf in enumerate(leaf_of):
                table[depth * size + code] = codes[leaf, o] if o is not None else 1
            weight = np.zeros(n_outputs, dtype=np.int64)
            if o is None:
                weight[:] = codes[leaf_of[0]]
            else:
                weight[o] = 1
            if not table.any() or not weight.any():
                continue  # always adds 0
            rows.append(row)
            offsets.append(size * sum(not want for want in group.prefix.values()))
            index_max.append(group.index_max())
            tables.append(table)
            sum_weights.append(weight)
    n = len(rows)
    if n == 0:
        return gather_step, compare_step, np.zeros((n_outputs, n_compares), np.int64)
    path = np.stack(rows)
    offset = np.asarray(offsets, dtype=np.int64).reshape(1, -1)
    acc_max = np.asarray(index_max, dtype=np.int64).reshape(1, -1)
    lo, hi = linear_bounds(
        "linear", path, np.zeros((1, n_compares), np.int64), np.ones((1, n_compares), np.int64)
    )
    # Proof: the index is never negative and never above the group's table.
    assert np.all(lo + offset >= 0) and np.all(hi + offset == acc_max)
    path_step = LinearStep(
        "paths",
        "linear",
        path,
        offset,
        acc_max,
        np.ones((1, n)),
        np.zeros((1, n)),
        np.zeros((1, n)),
    )
    width = int(acc_max.max()) + 1
    table = np.stack([np.pad(t, (0, width - len(t))) for t in tables])
    leaf_step = _table_step("leaf_tables", table, acc_max)
    return gather_step, compare_step, path_step, leaf_step, np.stack(sum_weights, axis=1)


def _table_step(name: str, table: np.ndarray, index_max: np.ndarray) -> TableStep:
    n = table.shape[0]
    reachable = np.arange(table.shape[1])[None, :] <= index_max.reshape(-1, 1)
    out_max = np.where(reachable, table, 0).max(axis=1)
    out_min = np.where(reachable, table, np.iinfo(np.int64).max).min(axis=1)
    step: TableStep

    def exact(acc: np.ndarray) -> np.ndarray:
        return step.lookup(acc)

    step = TableStep(
        name,
        0,
        bits_for(int(index_max.max())),
        True,
        np.asarray(index_max, dtype=np.int64),
        table,
        bits_for(int(out_max.max())),
        (n,),
        out_min.reshape(1, n),
        out_max.reshape(1, n),
        exact,
    )
    return step


# --------------------------------------------------------------------------- the module


class TreeModule(QuantizedModule):
    """A quantized tree model with the surface of
    :class:`~fhe_quant.model.QuantizedModule` (forward in the three ``fhe`` modes,
    compile, statistics, report, deployment); its float reference is the
    :class:`TreeEnsemble` instead of a graph."""

    def __init__(
        self,
        ensemble: TreeEnsemble,
        quantized: TreeQuantized,
        program: IntegerProgram,
        circuit: FHECircuit | None = None,
    ) -> None:
        super().__init__(None, quantized, program, circuit)  # type: ignore[arg-type]
        self.ensemble = ensemble

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.ensemble.n_features,)

    def float_forward(self, x: Any) -> np.ndarray:
        """The float tree model's raw outputs on ``x``."""
        return self.ensemble.evaluate(self.check_input(x))


def build_tree_module(
    model: Any,
    config: TreeQuantConfig,
    x: np.ndarray | None = None,
    *,
    low: np.ndarray | None = None,
    high: np.ndarray | None = None,
) -> TreeModule:
    """Convert, check and quantize a fitted scikit-learn tree model.

    Args:
        model: a fitted instance of one of :data:`TREE_CLASSES`.
        config: the grid and leaf value bits.
        x: calibration data; the grid spans each feature's range over it, and the
            tensor form is checked against the model on it.
        low, high: the per-feature range instead of ``x`` (rebuilding a pickled model).

    Raises:
        UnsupportedOpError: an option that cannot be converted.
        TraceError: the tensor form does not reproduce the model.
    """
    ensemble = ensemble_from_sklearn(model)
    if x is not None:
        check_ensemble(model, ensemble, x)
        program, quantized = quantize_ensemble(ensemble, x, config)
    else:
        assert low is not None and high is not None
        program, quantized = _build_program(ensemble, low, high, config)
    return TreeModule(ensemble, quantized, program)

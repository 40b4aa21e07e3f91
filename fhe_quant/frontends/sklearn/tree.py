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

1. The client shifts every feature by its calibrated minimum (a ``pre`` node) and
   quantizes it on a uniform grid of ``2**input_bits`` points per feature, clipping
   values outside the calibrated range (never wrapping).
2. A split ``x[f] <= t`` becomes ``code[f] <= K`` where ``K + 1`` is the number of grid
   points of feature ``f`` that scikit-learn itself sends left (it compares
   ``float32(x) <= t``): the quantized tree decides exactly like the float tree on
   every grid point, by construction rather than by float arithmetic. A compare whose
   ``K`` is outside ``[0, qmax)`` is a constant: it folds into the paths (a leaf behind
   an always-false compare is dropped), without a lookup. Compares with the same
   ``(f, K)`` are computed once for the whole ensemble (a 5-bit grid has 32 thresholds
   per feature, so forests share most of theirs).
3. The program::

       acc = q @ G.T                 # gather: G is 0/1, one row per distinct compare
       b   = table_cmp[acc]          # 1 iff code <= K, input_bits-wide tables
       acc = b @ P.T + n_negated     # satisfied conditions per leaf, 0 <= acc <= depth
       m   = table_leaf[acc]         # 1 iff acc == depth, bits(depth)-wide tables
       acc = m @ V.T + offset        # integer leaf values summed over every tree

   Leaves with identical condition rows (the same path in several trees) are merged,
   and leaves without any condition left are constants of the dequantization. So the
   PBS count is ``distinct compares + distinct reachable leaves``. No table reads the
   leaf-value sum, so leaf values can take many bits at no FHE cost: they use
   ``leaf_bits`` (8 by default) whatever the input grid.
4. The client dequantizes the sum (``scale * (acc - zero) + bias``) into the raw
   output and applies the output function (normalization of probabilities, sigmoid or
   softmax of a boosted model's scores).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
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
    "check_ensemble",
    "quantize_ensemble",
    "TreeModule",
    "build_tree_module",
]

#: Default bits of the quantized leaf values (signed, per output): they are only summed
#: (no table reads them), so their width costs nothing in FHE.
LEAF_BITS = 8
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
        leaf_bits: bits of the signed integer leaf values, 2 to 16.

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
        x32 = np.asarray(x, dtype=np.float32).astype(np.float64)
        bits = (x32[:, self.feature] <= self.threshold).astype(np.int64)
        satisfied = bits @ self.path.T + self.n_negated
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
    path = np.zeros((len(leaf_rows), len(features)), dtype=np.int64)
    for i, row in enumerate(leaf_rows):
        for c, sign in row.items():
            path[i, c] = sign
    return TreeEnsemble(
        n_features,
        np.asarray(features, dtype=np.int64),
        np.asarray(thresholds, dtype=np.float64),
        path,
        np.asarray(leaf_values, dtype=np.float64).reshape(len(leaf_rows), len(init)),
        np.asarray(init, dtype=np.float64),
        np.asarray(leaf_tree, dtype=np.int64),
        np.asarray(leaf_node, dtype=np.int64),
        output,
        ravel,
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
        >>> tree = DecisionTreeClassifier().fit(x, [0, 0, 1, 1])
        >>> ensemble = ensemble_from_sklearn(tree)
        >>> ensemble.threshold.tolist(), ensemble.path.tolist(), ensemble.output
        ([1.5], [[1], [-1]], 'normalize')
        >>> ensemble.evaluate(x).tolist()
        [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]
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
    estimator), the config and calibrated range, and ``rows``: the ensemble's leaves
    behind each leaf-match lookup (one leaf per tree it merges). Same surface as a
    :class:`~fhe_quant.quant.ptq.QuantizedGraph` for the deployment code."""

    pre: tuple[Node, ...]
    post: tuple[Node, ...]
    config: TreeQuantConfig
    low: np.ndarray
    high: np.ndarray
    rows: tuple[tuple[int, ...], ...] = ()


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
    grid = (low[:, None] + codes[None, :] * scale[:, None]).astype(np.float32)
    left = grid[ensemble.feature].astype(np.float64) <= ensemble.threshold[:, None]
    return left.sum(axis=1) - 1  # float32 of a monotone grid is monotone: a prefix


def _leaf_rows(
    ensemble: TreeEnsemble, kept: np.ndarray, compare_of: np.ndarray, n_compares: int
) -> tuple[np.ndarray, list[list[int]], np.ndarray]:
    """The quantized conditions of every leaf that can be reached on the grid and still
    has conditions, merged when equal (the same path in several trees), with the leaves
    of each row; plus the summed values of the leaves that are always reached.

    Conditions are ``(2, n_compares)`` counts: how many of the leaf's conditions need
    each quantized compare true (row 0) and false (row 1).
    """
    merged: dict[bytes, int] = {}
    rows: list[np.ndarray] = []
    members: list[list[int]] = []
    constant = np.zeros(ensemble.values.shape[1])
    for leaf, path_row in enumerate(ensemble.path):
        counts = np.zeros((2, n_compares), dtype=np.int64)
        reachable = True
        for c in np.nonzero(path_row)[0]:
            needs_true = path_row[c] > 0
            if compare_of[c] >= 0:
                counts[0 if needs_true else 1, compare_of[c]] += 1
            elif bool(kept[c]) != needs_true:  # a constant compare the leaf fails
                reachable = False
        # NOTE: two float splits can land on one grid compare; a leaf needing it both
        # true and false is unreachable on the grid.
        if not reachable or np.any((counts[0] > 0) & (counts[1] > 0)):
            continue
        if not counts.any():
            constant += ensemble.values[leaf]
            continue
        key = counts.tobytes()
        if key in merged:
            members[merged[key]].append(leaf)
            continue
        merged[key] = len(rows)
        rows.append(counts)
        members.append([leaf])
    if not rows:
        return np.zeros((0, 2, n_compares), np.int64), [], constant
    return np.stack(rows), members, constant


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
        >>> program.lookups_by_width()  # 3 compares on 3 bits, 4 leaves on 2 bits
        {3: 3, 2: 4}
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != ensemble.n_features or len(x) == 0:
        raise InputError(
            f"The calibration data must have shape (n_samples, {ensemble.n_features}). "
            f"Got {x.shape} instead."
        )
    low, high = x.min(axis=0), x.max(axis=0)
    return _build_program(ensemble, low, high, config)


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
    conditions, members, constant = _leaf_rows(ensemble, kept, compare_of, len(pairs))
    quantized = TreeQuantized(
        (_shift_node(origin),),
        (),
        config,
        low.astype(np.float64),
        high.astype(np.float64),
        tuple(tuple(row) for row in members),
    )
    steps = _steps(pairs, conditions, members, ensemble, constant + ensemble.init, config)
    return IntegerProgram(quantizer, (n_features,), steps), quantized


def _quantize_leaves(
    ensemble: TreeEnsemble, members: list[list[int]], bits: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Integer leaf values ``(O, rows)`` and their per-output scale, with the proven
    range of their sum.

    Each tree reaches exactly one leaf for any compare bits (a merged row stands for one
    leaf of each of its trees), so the sum over the reached rows lies between the sums
    over trees of their smallest and largest integer leaf values. The scale is the
    smallest that keeps that range within ``bits`` bits: the width of the output sum,
    which Concrete's parameters depend on even though no table reads it.
    """
    leaves = np.array([leaf for row in members for leaf in row], dtype=np.int64)
    groups = [leaves[ensemble.tree[leaves] == t] for t in np.unique(ensemble.tree[leaves])]
    values = ensemble.values
    n_outputs = values.shape[1]
    # Float range of the sum, per output: the first guess of the scale.
    low = np.sum([values[g].min(axis=0) for g in groups], axis=0)
    high = np.sum([values[g].max(axis=0) for g in groups], axis=0)
    limit = 2**bits - 1
    scale = np.where(high > low, (high - low) / limit, 1.0)
    while True:
        codes = np.rint(values / scale)
        lo = np.sum([codes[g].min(axis=0) for g in groups], axis=0).astype(np.int64)
        hi = np.sum([codes[g].max(axis=0) for g in groups], axis=0).astype(np.int64)
        too_wide = hi - lo > limit
        if not too_wide.any():
            break
        # NOTE: rounding each tree's values can widen the range by up to one step per
        # tree; a slightly coarser scale brings it back.
        scale = np.where(too_wide, scale * (1 + 1 / limit), scale)
    # NOTE: each tree's codes are shifted by that tree's minimum (the sum of the minima
    # is ``lo``, a constant of the dequantization), so every weight is non-negative and
    # the sum never goes below 0, not even before an offset: Concrete types it unsigned.
    shift = np.zeros_like(codes)
    for g in groups:
        shift[g] = codes[g].min(axis=0)
    weight = np.stack([(codes[row] - shift[row]).sum(axis=0) for row in members], axis=1)
    return weight.reshape(n_outputs, len(members)).astype(np.int64), scale, lo, hi


def _leaf_value_step(
    ensemble: TreeEnsemble, members: list[list[int]], bias: np.ndarray, bits: int
) -> LinearStep:
    """``acc = m @ V.T``: integer leaf values (each tree's shifted by its minimum)
    summed over every tree, in ``[0, hi - lo]``; dequantizes to the raw outputs
    ``scale * (acc - zero) + bias`` with ``zero = -lo``."""
    weight, scale, lo, hi = _quantize_leaves(ensemble, members, bits)
    return LinearStep(
        "leaves",
        "linear",
        weight,
        np.zeros((1, len(lo)), dtype=np.int64),
        (hi - lo).reshape(1, -1),
        scale.reshape(1, -1),
        (-lo).reshape(1, -1).astype(np.float64),
        bias.reshape(1, -1).astype(np.float64),
    )


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
    conditions: np.ndarray,
    members: list[list[int]],
    ensemble: TreeEnsemble,
    bias: np.ndarray,
    config: TreeQuantConfig,
) -> tuple[LinearStep | TableStep, ...]:
    n_features = ensemble.n_features
    if len(conditions) == 0:
        # Every leaf is constant on the grid: the output does not depend on the input.
        return (_constant_step(bias, n_features),)
    qmax = 2**config.input_bits - 1
    n_compares = len(pairs)
    gather = np.zeros((n_compares, n_features), dtype=np.int64)
    thresholds = np.zeros(n_compares, dtype=np.int64)
    for i, (f, t) in enumerate(pairs):
        gather[i, f] = 1
        thresholds[i] = t
    ones = np.ones((1, n_compares))
    zeros = np.zeros((1, n_compares))
    gather_step = LinearStep(
        "gather",
        "linear",
        gather,
        np.zeros((1, n_compares), dtype=np.int64),
        np.full((1, n_compares), qmax, dtype=np.int64),
        ones,
        zeros,
        zeros,
    )
    compare_table = (np.arange(qmax + 1)[None, :] <= thresholds[:, None]).astype(np.int64)
    compare_step = _table_step("compare", compare_table, np.full((1, n_compares), qmax))

    # Satisfied conditions of leaf l: sum of b over its "true" compares and of (1 - b)
    # over its "false" ones, i.e. b @ (T - F).T + (number of "false" conditions).
    path = conditions[:, 0] - conditions[:, 1]
    n_negated = conditions[:, 1].sum(axis=1)
    depth = conditions.sum(axis=(1, 2))
    n_leaves = len(path)
    lo, hi = linear_bounds(
        "linear", path, np.zeros((1, n_compares), np.int64), np.ones((1, n_compares), np.int64)
    )
    assert np.all(lo + n_negated >= 0) and np.all(hi + n_negated == depth)
    ones_l, zeros_l = np.ones((1, n_leaves)), np.zeros((1, n_leaves))
    path_step = LinearStep(
        "paths",
        "linear",
        path,
        n_negated.reshape(1, -1),
        depth.reshape(1, -1),
        ones_l,
        zeros_l,
        zeros_l,
    )
    width = int(depth.max()) + 1
    match_table = (np.arange(width)[None, :] == depth[:, None]).astype(np.int64)
    match_step = _table_step("leaf_match", match_table, depth.reshape(1, -1))
    value_step = _leaf_value_step(ensemble, members, bias, config.leaf_bits)
    return (gather_step, compare_step, path_step, match_step, value_step)


def _table_step(name: str, table: np.ndarray, index_max: np.ndarray) -> TableStep:
    n = table.shape[0]
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
        1,
        (n,),
        np.zeros((1, n), dtype=np.int64),
        np.ones((1, n), dtype=np.int64),
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

"""Tree models (decision trees, random forests, extra trees, gradient boosting): reads a
fitted scikit-learn model into its float *tensor form*, a
:class:`~fhe_quant.specs.TreeEnsemble`, converted here without any other library:

* one **compare** per internal node of every tree: ``x[feature] <= threshold``;
* one **path row** per leaf: ``+1`` on each compare the leaf needs true (left branch),
  ``-1`` on each it needs false, so that ``bits @ path.T + n_negated`` counts the
  satisfied conditions, and the leaf is reached iff that count equals its depth;
* the **leaf values**, already scaled so that the model's raw output is their sum over
  the reached leaves plus a constant (``init``): class probabilities divided by the
  number of trees for decision trees, forests and extra trees, ``learning_rate`` times
  the tree outputs plus the initial prediction for gradient boosting.

:meth:`TreeEnsemble.evaluate <fhe_quant.specs.TreeEnsemble.evaluate>` runs that form in
float; :func:`check_ensemble` compares it with scikit-learn's own
``predict_proba``/``decision_function``/``predict`` so that a mistranslation cannot pass
silently. The integer program is built from the tensor form at the lowering stage
(:mod:`fhe_quant.lower_tree`, where the threshold grid, the groups of leaves and their
measured costs are documented) and wrapped in a
:class:`~fhe_quant.program_modules.TreeModule` at the model stage.

The quantization names (``TreeQuantConfig``, ``TreeQuantized``, ``quantize_ensemble``,
``threshold_grid``, ``LEAF_BITS``, ...) and ``TreeModule`` moved there (issue 13 part 3);
reading them from this module still works, with a ``DeprecationWarning``.
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import replace
from typing import Any

import numpy as np
from sklearn import ensemble as _ensemble
from sklearn import tree as _tree
from sklearn.base import is_classifier

from fhe_quant.errors import TraceError, UnsupportedOpError
from fhe_quant.frontends.sklearn.base import moved_names
from fhe_quant.ir import describe_mismatch
from fhe_quant.specs import TreeEnsemble

__all__ = [
    "TREE_CLASSES",
    "TreeEnsemble",
    "ensemble_from_sklearn",
    "ensemble_from_leaves",
    "check_ensemble",
]

#: Where each name that moved out of this module lives now (issue 13 part 3).
MOVED: dict[str, str] = {
    **{
        name: "fhe_quant.lower_tree"
        for name in (
            "LEAF_BITS",
            "MAX_LEAF_BITS",
            "NARROWING_BUDGET",
            "GROUP_TABLE_BITS",
            "TreeQuantConfig",
            "default_leaf_bits",
            "TreeQuantized",
            "quantize_ensemble",
            "threshold_grid",
        )
    },
    "TreeModule": "fhe_quant.program_modules",
}


__getattr__ = moved_names(__name__, MOVED)


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


# --------------------------------------------------------------------------- tensor form


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
    from fhe_quant.frontends.sklearn.base import OUTPUT_FUNCTIONS

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


def build_tree_module(
    model: Any,
    config: Any,
    x: np.ndarray | None = None,
    *,
    low: np.ndarray | None = None,
    high: np.ndarray | None = None,
) -> Any:
    """Deprecated: :func:`ensemble_from_sklearn`, :func:`check_ensemble` on ``x``, then
    :func:`fhe_quant.program_modules.build_tree_ensemble_module` (the same
    :class:`~fhe_quant.program_modules.TreeModule`)."""
    warnings.warn(
        "fhe_quant.frontends.sklearn.tree.build_tree_module is deprecated: use "
        "fhe_quant.program_modules.build_tree_ensemble_module(ensemble_from_sklearn(model), "
        "config, x) after check_ensemble.",
        DeprecationWarning,
        stacklevel=2,
    )
    ensemble = ensemble_from_sklearn(model)
    if x is not None:
        check_ensemble(model, ensemble, x)
    build = importlib.import_module("fhe_quant.program_modules").build_tree_ensemble_module
    return build(ensemble, config, x, low=low, high=high)

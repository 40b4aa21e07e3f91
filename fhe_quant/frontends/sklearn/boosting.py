"""XGBoost and LightGBM models as tree ensembles, lowered like scikit-learn's trees.

A fitted ``xgboost.XGBClassifier``/``XGBRegressor`` or ``lightgbm.LGBMClassifier``/
``LGBMRegressor`` is read from its own dump (XGBoost's JSON model,
``Booster.save_raw("json")``, whose float32 arrays are exact, rather than the rounded
text of ``get_dump``; LightGBM's ``Booster.dump_model()``, whose thresholds print with
17 digits) into :class:`~fhe_quant.specs.TreeEnsemble`, then quantized
by :func:`~fhe_quant.lower_tree.quantize_ensemble`, unchanged. What is
read, and how each library's meaning is kept:

* **Splits.** XGBoost sends ``x < t`` left, comparing float32 values; as ``float32(x) <=
  prev32(t)`` (``prev32``: the float32 just below ``t``) it is the same comparison on
  every input. LightGBM sends ``x <= t`` left, in float64; its ensemble says so
  (``float32_inputs=False``), so the grid thresholds are found with float64 grid values.
  So, as for scikit-learn, the quantized trees decide exactly like the float ones on
  every grid point.
* **Missing values.** fhe_quant refuses NaN inputs (``InputError``), so default
  directions never apply, except LightGBM's ``missing_type="Zero"``, which sends every
  ``|x| <= 1e-35`` the default way: accepted when that is the way ``x <= t`` sends 0,
  refused (naming the tree and node) otherwise. An XGBoost ``missing`` other than NaN
  (a number that means "missing") is refused.
* **Base score.** XGBoost's ``base_score`` is stored in the objective's output space;
  its margin (logit for logistic objectives, log for Poisson/Gamma/Tweedie) is the
  ensemble's ``init``. LightGBM folds its initial score into the first tree's leaves.
* **Learning rate.** Both libraries store leaf values already multiplied by it.
* **Classes.** One tree per class per round (XGBoost's ``tree_info``, LightGBM's tree
  index modulo the trees per iteration), each adding to its class's raw output; two
  classes have one output (the margin), whose sign is the label.
* **Link functions.** Logistic objectives: ``sigmoid``; softmax objectives:
  ``softmax``; log-link regression (Poisson, Gamma, Tweedie): ``exp``; the others:
  ``identity``. The client applies them after decryption, as for scikit-learn's models.

:func:`check_booster` compares the tensor form's raw outputs with the library's own
margins (``output_margin=True`` / ``raw_score=True``) so that a mistranslation cannot
pass silently.

Categorical splits, trees deeper than :data:`MAX_DEPTH`, more than :data:`MAX_TREES`
trees, DART and linear boosters, multi-output trees and objectives without a supported
link are refused with an :class:`~fhe_quant.errors.UnsupportedOpError` that names the
tree and node (or the option).
"""

from __future__ import annotations

import importlib
import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fhe_quant.errors import TraceError, UnsupportedOpError
from fhe_quant.frontends.sklearn.tree import (
    TreeEnsemble,
    ensemble_from_leaves,
)
from fhe_quant.ir import describe_mismatch

__all__ = [
    "MAX_TREES",
    "MAX_DEPTH",
    "BOOSTING_LIBRARIES",
    "is_booster",
    "ensemble_from_booster",
    "check_booster",
    "build_boosting_module",
]

#: Most trees (rounds times classes) accepted: every tree costs at least one table lookup
#: per sample (about 10 ms each on 2 cores), so a thousand trees is already seconds.
MAX_TREES = 1000
#: Deepest leaf accepted: a leaf's table index counts its path conditions, so depth 31
#: keeps the narrowest leaf tables at 5 bits (LightGBM's default 31 leaves can grow a
#: path of 30 splits).
MAX_DEPTH = 31
#: The libraries whose models this module reads (top-level package names).
BOOSTING_LIBRARIES = ("xgboost", "lightgbm")
#: LightGBM's ``kZeroThreshold``: ``|x| <= 1e-35`` is zero for ``missing_type="Zero"``.
_LGBM_ZERO = float(np.float32(1e-35))


@dataclass(frozen=True, eq=False)
class _Node:
    """A split ``x[feature] <= threshold`` (left when true), or a leaf (``value``)."""

    where: str
    feature: int = -1
    threshold: float = 0.0
    left: _Node | None = None
    right: _Node | None = None
    value: float = 0.0
    node_id: int = -1


def is_booster(model: Any) -> bool:
    """Whether ``model`` is an XGBoost or LightGBM scikit-learn estimator.

    Examples:
        >>> from sklearn.tree import DecisionTreeClassifier
        >>> is_booster(DecisionTreeClassifier())
        False
    """
    return type(model).__module__.split(".")[0] in BOOSTING_LIBRARIES


# --------------------------------------------------------------------------- XGBoost

#: XGBoost objectives: (margin of ``base_score``, the client's output function).
_XGB_OBJECTIVES: dict[str, tuple[Callable[[float], float], str]] = {
    "binary:logistic": (lambda p: math.log(p / (1 - p)), "sigmoid"),
    "multi:softprob": (lambda b: b, "softmax"),
    "multi:softmax": (lambda b: b, "softmax"),
    "reg:squarederror": (lambda b: b, "identity"),
    "reg:pseudohubererror": (lambda b: b, "identity"),
    "reg:absoluteerror": (lambda b: b, "identity"),
    "reg:quantileerror": (lambda b: b, "identity"),
    "count:poisson": (math.log, "exp"),
    "reg:gamma": (math.log, "exp"),
    "reg:tweedie": (math.log, "exp"),
}


def _xgb_tree(tree: dict[str, Any], t: int) -> _Node:
    left, right = tree["left_children"], tree["right_children"]
    split_type = tree.get("split_type", [0] * len(left))
    values = np.asarray(tree["split_conditions"], dtype=np.float32)
    if int(tree["tree_param"].get("size_leaf_vector", "1")) > 1:
        raise UnsupportedOpError(
            "multi_strategy='multi_output_tree'",
            f"tree {t}",
            "Use the default multi_strategy='one_output_per_tree'.",
        )

    def build(i: int) -> _Node:
        where = f"tree {t}, node {i}"
        if left[i] == -1:
            return _Node(where, value=float(values[i]), node_id=i)
        if split_type[i] != 0:
            raise UnsupportedOpError(
                "categorical split",
                where,
                "Categorical features cannot be compared on the input grid: one-hot "
                "encode them (enable_categorical=False).",
            )
        # NOTE: XGBoost goes left on float32(x) < t, that is float32(x) <= prev32(t).
        below = np.nextafter(values[i], np.float32(-np.inf), dtype=np.float32)
        return _Node(
            where, int(tree["split_indices"][i]), float(below), build(left[i]), build(right[i])
        )

    return build(0)


def _xgb_trees(model: Any) -> tuple[list[tuple[_Node, int]], np.ndarray, str, int]:
    """``(root, output)`` per tree, the raw outputs' constant, output function, outputs."""
    name = type(model).__name__
    missing = getattr(model, "missing", np.nan)
    if missing is not None and not (isinstance(missing, float) and math.isnan(missing)):
        raise UnsupportedOpError(
            f"{name}(missing={missing!r})",
            name,
            "Only missing=nan is supported: fhe_quant refuses NaN inputs, so default "
            "directions never apply, but a number meaning 'missing' would change splits.",
        )
    learner = json.loads(bytes(model.get_booster().save_raw(raw_format="json")))["learner"]
    booster = learner["gradient_booster"]
    if booster["name"] != "gbtree":
        raise UnsupportedOpError(
            f"{name}(booster={booster['name']!r})", name, "Only booster='gbtree' is supported."
        )
    objective = learner["objective"]["name"]
    if objective not in _XGB_OBJECTIVES:
        raise UnsupportedOpError(
            f"{name}(objective={objective!r})",
            name,
            f"Supported objectives: {', '.join(sorted(_XGB_OBJECTIVES))}.",
        )
    margin, output = _XGB_OBJECTIVES[objective]
    trees_json = booster["model"]["trees"]
    info = booster["model"]["tree_info"]
    indptr = booster["model"].get("iteration_indptr")
    best = getattr(model, "best_iteration", None) if _has_early_stopping(model) else None
    if best is not None and indptr is not None:
        trees_json, info = trees_json[: indptr[best + 1]], info[: indptr[best + 1]]
    base = np.atleast_1d(np.asarray(json.loads(learner["learner_model_param"]["base_score"])))
    n_outputs = max(int(learner["learner_model_param"].get("num_class", "0")), 1)
    init = np.array([margin(float(b)) for b in base], dtype=np.float64)
    init = np.broadcast_to(init, (n_outputs,)).copy()
    _check_count(len(trees_json), name)
    return (
        [(_xgb_tree(tree, t), int(info[t])) for t, tree in enumerate(trees_json)],
        init,
        output,
        n_outputs,
    )


def _has_early_stopping(model: Any) -> bool:
    try:
        return model.get_booster().attr("best_iteration") is not None
    except Exception:  # NOTE: an unfitted or foreign booster: no early stopping
        return False


# --------------------------------------------------------------------------- LightGBM

_LGBM_IDENTITY = (
    "regression",
    "regression_l1",
    "huber",
    "fair",
    "quantile",
    "mape",
)
_LGBM_LOG = ("poisson", "gamma", "tweedie")


def _lgbm_objective(objective: str, name: str) -> tuple[str, float]:
    """The output function of a dumped objective string, and the margin's scale."""
    words = objective.split()
    kind = words[0] if words else ""
    options = dict(w.split(":", 1) for w in words[1:] if ":" in w)
    if kind == "binary":
        return "sigmoid", float(options.get("sigmoid", 1.0))
    if kind == "multiclass":
        return "softmax", 1.0
    if kind in _LGBM_IDENTITY:
        return "identity", 1.0
    if kind in _LGBM_LOG:
        return "exp", 1.0
    raise UnsupportedOpError(
        f"{name}(objective={kind!r})",
        name,
        f"Supported objectives: binary, multiclass, {', '.join(_LGBM_IDENTITY + _LGBM_LOG)}.",
    )


def _lgbm_tree(node: dict[str, Any], t: int) -> _Node:
    if "leaf_value" in node:
        return _Node(
            f"tree {t}, leaf {node.get('leaf_index', 0)}",
            value=float(node["leaf_value"]),
            node_id=int(node.get("leaf_index", 0)),
        )
    where = f"tree {t}, node {node['split_index']}"
    if node["decision_type"] != "<=":
        raise UnsupportedOpError(
            f"categorical split ({node['decision_type']!r})",
            where,
            "Categorical features cannot be compared on the input grid: one-hot encode "
            "them (categorical_feature=[]).",
        )
    threshold = float(node["threshold"])
    if node["missing_type"] == "Zero":
        zero_left = threshold >= _LGBM_ZERO
        if (zero_left and not node["default_left"]) or (
            not zero_left and (node["default_left"] or threshold >= -_LGBM_ZERO)
        ):
            raise UnsupportedOpError(
                "missing_type='Zero' sending 0 against its threshold",
                where,
                "Values near 0 would need a second compare; train with zero_as_missing=False.",
            )
    return _Node(
        where,
        int(node["split_feature"]),
        threshold,
        _lgbm_tree(node["left_child"], t),
        _lgbm_tree(node["right_child"], t),
    )


def _lgbm_trees(model: Any) -> tuple[list[tuple[_Node, int]], np.ndarray, str, int]:
    name = type(model).__name__
    dump = model.booster_.dump_model()
    if model.booster_.params.get("linear_tree"):
        raise UnsupportedOpError(f"{name}(linear_tree=True)", name, "Use constant leaves.")
    output, scale = _lgbm_objective(dump.get("objective", ""), name)
    per_round = int(dump["num_tree_per_iteration"])
    trees = dump["tree_info"]
    _check_count(len(trees), name)
    if dump.get("average_output"):
        # NOTE: boosting_type='rf' averages its trees instead of summing them.
        scale /= max(len(trees) // per_round, 1)
    roots = []
    for t, tree in enumerate(trees):
        root = _lgbm_tree(tree["tree_structure"], t)
        roots.append((_scaled(root, scale), t % per_round))
    return roots, np.zeros(per_round), output, per_round


def _scaled(node: _Node, scale: float) -> _Node:
    if scale == 1.0:
        return node
    if node.left is None or node.right is None:
        return _Node(node.where, value=node.value * scale, node_id=node.node_id)
    return _Node(
        node.where,
        node.feature,
        node.threshold,
        _scaled(node.left, scale),
        _scaled(node.right, scale),
    )


# --------------------------------------------------------------------------- tensor form


def _check_count(n_trees: int, name: str) -> None:
    if n_trees > MAX_TREES:
        raise UnsupportedOpError(
            f"{n_trees} trees",
            f"{name}, tree {MAX_TREES}",
            f"At most {MAX_TREES} trees (rounds x classes) are supported: each costs at "
            "least one table lookup per sample. Use fewer estimators (n_estimators).",
        )


def _assemble(
    roots: list[tuple[_Node, int]],
    n_features: int,
    init: np.ndarray,
    output: str,
    float32_inputs: bool,
) -> TreeEnsemble:
    """The tensor form of ``(root, output index)`` trees, compares numbered in preorder
    and contiguous per tree (as :mod:`~fhe_quant.frontends.sklearn.tree` numbers them)."""
    features: list[int] = []
    thresholds: list[float] = []
    rows: list[dict[int, int]] = []
    values: list[np.ndarray] = []
    leaf_tree: list[int] = []
    leaf_node: list[int] = []
    for t, (root, out) in enumerate(roots):
        stack: list[tuple[_Node, dict[int, int]]] = [(root, {})]
        while stack:
            node, conditions = stack.pop()
            if node.left is None or node.right is None:
                if len(conditions) > MAX_DEPTH:
                    raise UnsupportedOpError(
                        f"a leaf at depth {len(conditions)}",
                        node.where,
                        f"At most depth {MAX_DEPTH} is supported: train with a smaller "
                        "max_depth (or num_leaves).",
                    )
                value = np.zeros(len(init))
                value[out] = node.value
                rows.append(conditions)
                values.append(value)
                leaf_tree.append(t)
                leaf_node.append(node.node_id)
                continue
            c = len(features)
            features.append(node.feature)
            thresholds.append(node.threshold)
            stack.append((node.right, {**conditions, c: -1}))
            stack.append((node.left, {**conditions, c: +1}))
    return ensemble_from_leaves(
        n_features,
        features,
        thresholds,
        rows,
        values,
        init,
        (leaf_tree, leaf_node),
        output,
        len(init) == 1,
        float32_inputs,
    )


def ensemble_from_booster(model: Any) -> TreeEnsemble:
    """The :class:`~fhe_quant.frontends.sklearn.tree.TreeEnsemble` of a fitted XGBoost or
    LightGBM scikit-learn estimator (see the module docstring for what is read).

    Raises:
        UnsupportedOpError: a class, option, split or size that cannot be converted,
            naming the tree and node where there is one.
    """
    library = type(model).__module__.split(".")[0]
    name = type(model).__name__
    n_features = int(model.n_features_in_)
    if library == "xgboost":
        roots, init, output, n_outputs = _xgb_trees(model)
        float32_inputs = True
    elif library == "lightgbm":
        roots, init, output, n_outputs = _lgbm_trees(model)
        float32_inputs = False
    else:
        raise UnsupportedOpError(name, name, "Only XGBoost and LightGBM models are read here.")
    if n_outputs > 1 and output != "softmax":
        raise UnsupportedOpError(
            f"{name} with {n_outputs} outputs", name, "Multi-output regression is not supported."
        )
    if hasattr(model, "classes_") and output not in ("sigmoid", "softmax"):
        raise UnsupportedOpError(
            f"{name} with output {output!r}",
            name,
            "A classifier needs a logistic or softmax objective.",
        )
    return _assemble(roots, n_features, init, output, float32_inputs)


def _margins(model: Any, x: np.ndarray) -> np.ndarray:
    if type(model).__module__.split(".")[0] == "xgboost":
        raw = model.predict(x, output_margin=True)
    else:
        raw = model.predict(x, raw_score=True)
    return np.asarray(raw, dtype=np.float64).reshape(len(x), -1)


def check_booster(model: Any, ensemble: TreeEnsemble, x: np.ndarray) -> None:
    """Check that the tensor form gives the library's own margins on up to 64 samples.

    XGBoost sums its leaves in float32, so the tolerance is float32's, relative to the
    largest possible sum of leaf values.

    Raises:
        TraceError: the raw outputs differ.
    """
    x = np.asarray(x, dtype=np.float64)[:64]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="X does not have valid feature names")
        expected = _margins(model, x)
    ours = ensemble.evaluate(x)
    size = float(np.abs(ensemble.values).sum() + np.abs(ensemble.init).sum()) + 1.0
    difference = describe_mismatch(ours, expected, rtol=0.0, atol=1e-5 * size)
    if difference is not None:
        raise TraceError(
            f"The tensor form of {type(model).__name__} does not reproduce its raw scores "
            f"({difference}); the model was translated wrongly. Please report this with "
            "your model."
        )


def build_boosting_module(
    model: Any,
    config: Any,
    x: np.ndarray | None = None,
    *,
    low: np.ndarray | None = None,
    high: np.ndarray | None = None,
) -> Any:
    """Deprecated: :func:`ensemble_from_booster`, :func:`check_booster` on ``x``, then
    :func:`fhe_quant.program_modules.build_tree_ensemble_module` (the same
    :class:`~fhe_quant.program_modules.TreeModule`; issue 13 part 3 moved the module to
    the model stage)."""
    warnings.warn(
        "fhe_quant.frontends.sklearn.boosting.build_boosting_module is deprecated: use "
        "fhe_quant.program_modules.build_tree_ensemble_module(ensemble_from_booster(model), "
        "config, x) after check_booster.",
        DeprecationWarning,
        stacklevel=2,
    )
    ensemble = ensemble_from_booster(model)
    if x is not None:
        check_booster(model, ensemble, x)
    build = importlib.import_module("fhe_quant.program_modules").build_tree_ensemble_module
    return build(ensemble, config, x, low=low, high=high)

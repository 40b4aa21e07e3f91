"""Linear models: ``coef_`` and ``intercept_`` become one ``linear`` node.

Every supported linear model computes ``raw = X @ coef_.T + intercept_`` and differs
only in what follows, which runs on the client after decryption: a threshold or argmax
(classifiers), probabilities (see :func:`classifier_output`), or an inverse link
(see :func:`regressor_output`). With a single linear layer the encrypted program is one
integer dot product per output, with no programmable bootstrap at all.

Examples:
    >>> import numpy as np
    >>> from sklearn.linear_model import Ridge
    >>> model = Ridge().fit(np.eye(3), [1.0, 2.0, 3.0])
    >>> imported = linear_graph(model)
    >>> imported.graph.node("linear").params["weight"].shape, imported.ravel
    ((1, 3), True)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import sparse
from sklearn.linear_model import (
    ElasticNet,
    GammaRegressor,
    Lasso,
    LinearRegression,
    LogisticRegression,
    PoissonRegressor,
    Ridge,
    SGDClassifier,
    SGDRegressor,
    TweedieRegressor,
)
from sklearn.svm import LinearSVC, LinearSVR

from fhe_quant.errors import UnsupportedOpError
from fhe_quant.frontends.sklearn.base import Converter, SklearnGraph
from fhe_quant.ir import Graph, Node

__all__ = ["classifier_output", "regressor_output", "linear_graph", "CONVERTERS"]


def _dense(array: Any) -> np.ndarray:
    # NOTE: ``sparsify()`` stores coef_ as a scipy sparse matrix.
    return np.asarray(array.toarray() if sparse.issparse(array) else array, dtype=np.float64)


def _n_classes(estimator: Any) -> int:
    return len(estimator.classes_)


def _logistic_output(estimator: Any) -> str:
    # NOTE: scikit-learn >= 1.5 uses the multinomial softmax for every multiclass
    # problem; older versions fitted with multi_class="ovr" normalize one-vs-rest
    # sigmoids. check_translation compares with predict_proba either way.
    if _n_classes(estimator) == 2:
        return "sigmoid"
    return "ovr_sigmoid" if getattr(estimator, "multi_class", None) == "ovr" else "softmax"


def _sgd_output(estimator: Any) -> str | None:
    if estimator.loss == "log_loss":
        return "sigmoid" if _n_classes(estimator) == 2 else "ovr_sigmoid"
    if estimator.loss == "modified_huber":
        return "modified_huber"
    return None  # scikit-learn has no predict_proba for the other losses


def _tweedie_link(estimator: Any) -> str:
    link = estimator.link
    if link == "auto":
        link = "identity" if estimator.power <= 0 else "log"
    if link not in ("identity", "log"):
        raise UnsupportedOpError(
            f"link={link!r}", type(estimator).__name__, "Supported links: 'identity', 'log'."
        )
    return "exp" if link == "log" else "identity"


OutputRule = Callable[[Any], str | None]

#: Linear classifiers and the client-side probability function of each.
CLASSIFIERS: dict[type, OutputRule] = {
    LogisticRegression: _logistic_output,
    SGDClassifier: _sgd_output,
    LinearSVC: lambda estimator: None,
}

#: Linear regressors and the inverse link of each (applied by the client).
REGRESSORS: dict[type, OutputRule] = {
    LinearRegression: lambda estimator: "identity",
    Ridge: lambda estimator: "identity",
    Lasso: lambda estimator: "identity",
    ElasticNet: lambda estimator: "identity",
    SGDRegressor: lambda estimator: "identity",
    LinearSVR: lambda estimator: "identity",
    PoissonRegressor: lambda estimator: "exp",
    GammaRegressor: lambda estimator: "exp",
    TweedieRegressor: _tweedie_link,
}


def classifier_output(estimator: Any) -> str | None:
    """The probability function of a fitted linear classifier (``None``: it has none).

    Examples:
        >>> from sklearn.linear_model import SGDClassifier
        >>> model = SGDClassifier(loss="modified_huber").fit([[0.0], [1.0]], [0, 1])
        >>> classifier_output(model)
        'modified_huber'
    """
    for cls in type(estimator).__mro__:
        if cls in CLASSIFIERS:
            return CLASSIFIERS[cls](estimator)
    raise UnsupportedOpError(type(estimator).__name__, "classifier_output")


def regressor_output(estimator: Any) -> str:
    """The inverse link of a fitted linear regressor, applied by the client.

    Examples:
        >>> from sklearn.linear_model import TweedieRegressor
        >>> regressor_output(TweedieRegressor(power=1.5).fit([[0.0], [1.0]], [1.0, 2.0]))
        'exp'
    """
    for cls in type(estimator).__mro__:
        if cls in REGRESSORS:
            output = REGRESSORS[cls](estimator)
            assert output is not None
            return output
    raise UnsupportedOpError(type(estimator).__name__, "regressor_output")


def linear_graph(estimator: Any, output: str | None = None) -> SklearnGraph:
    """The one-node graph ``X @ coef_.T + intercept_`` of a fitted linear model.

    Args:
        estimator: a fitted linear model of a class in :data:`CLASSIFIERS` or
            :data:`REGRESSORS`.
        output: the client-side output function; by default looked up in those tables.

    Returns:
        The graph, with weights in torch layout ``(n_outputs, n_features)``.
    """
    name = type(estimator).__name__
    is_classifier = any(cls in CLASSIFIERS for cls in type(estimator).__mro__)
    if output is None:
        output = classifier_output(estimator) if is_classifier else regressor_output(estimator)
    coef = _dense(estimator.coef_)
    weight = np.atleast_2d(coef)
    n_outputs, n_features = weight.shape
    bias = np.broadcast_to(np.ravel(_dense(estimator.intercept_)), (n_outputs,))
    nodes = (
        Node("input", "input", source=f"{name} input"),
        Node(
            "linear",
            "linear",
            ("input",),
            params={"weight": weight, "bias": np.array(bias)},
            source=f"{name}.coef_ / intercept_",
        ),
    )
    graph = Graph(nodes, "input", "linear", (n_features,))
    # NOTE: a classifier's single decision column is 1-D; a regressor's output is 1-D
    # only when it was fitted on a 1-D target (its coef_ is then 1-D too).
    ravel = n_outputs == 1 if is_classifier else coef.ndim == 1
    return SklearnGraph(graph, output, ravel=ravel)


#: The converters of this family, by scikit-learn class.
CONVERTERS: dict[type, Converter] = dict.fromkeys((*CLASSIFIERS, *REGRESSORS), linear_graph)

"""scikit-learn frontend: a fitted estimator becomes a float :class:`~fhe_quant.ir.Graph`
plus the name of what the client does with the decrypted outputs.

The graph computes the model's *raw* outputs: the decision values of a linear
classifier, the linear predictor of a generalized linear model, the logits of a
multi-layer perceptron. Everything after that (inverse link, sigmoid, softmax,
threshold, argmax) is a float function of the decrypted outputs, applied by the client:
:data:`OUTPUT_FUNCTIONS` holds them by name and :attr:`SklearnGraph.output` names the
one a model uses.

Each family of estimators lives in its own module and contributes a ``CONVERTERS``
table (estimator class -> converter); :func:`sklearn_to_graph` dispatches on it.
Trees and nearest neighbours slot in as further modules with their own table.

Examples:
    >>> import numpy as np
    >>> from sklearn.linear_model import LogisticRegression
    >>> x = np.array([[0.0, 1.0], [1.0, 0.0], [0.2, 0.9], [0.9, 0.1]])
    >>> model = LogisticRegression().fit(x, [0, 1, 0, 1])
    >>> imported = sklearn_to_graph(model)
    >>> [node.op for node in imported.graph.nodes], imported.output
    (['input', 'linear'], 'sigmoid')
    >>> check_translation(model, imported, x)  # raises TraceError on a mismatch
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import numpy as np
from sklearn.base import is_classifier

from fhe_quant.errors import TraceError, UnsupportedOpError
from fhe_quant.frontends.sklearn.base import OUTPUT_FUNCTIONS, Converter, SklearnGraph
from fhe_quant.ir import describe_mismatch

__all__ = [
    "SklearnGraph",
    "OUTPUT_FUNCTIONS",
    "Converter",
    "converters",
    "converter_for",
    "sklearn_to_graph",
    "check_translation",
]


# ------------------------------------------------------------------ dispatch


@functools.cache
def converters() -> dict[type, Converter]:
    """Every supported scikit-learn class and its converter.

    Examples:
        >>> from sklearn.neural_network import MLPRegressor
        >>> MLPRegressor in converters()
        True
    """
    # NOTE: assembled on first use, so that importing the package (for its base types,
    # re-exported from frontends/sklearn/base.py) does not import every family.
    from fhe_quant.frontends.sklearn import linear, neural

    return {**linear.CONVERTERS, **neural.CONVERTERS}


def _unsupported(estimator: Any) -> UnsupportedOpError:
    from fhe_quant.frontends.sklearn.tree import TREE_CLASSES  # converted without a graph

    name = type(estimator).__name__
    supported = ", ".join(sorted(cls.__name__ for cls in (*converters(), *TREE_CLASSES)))
    kernel = getattr(estimator, "kernel", None)
    if isinstance(kernel, str):
        return UnsupportedOpError(
            f"{name}(kernel={kernel!r})",
            name,
            "Kernel methods compare every input with every support vector, which "
            f"fhe_quant does not compile; use LinearSVC or LinearSVR. Supported: {supported}.",
        )
    return UnsupportedOpError(
        f"{type(estimator).__module__}.{name}",
        name,
        f"Supported scikit-learn estimators: {supported}. For a Pipeline, compile its "
        "final estimator and apply the preprocessing steps in clear on the client.",
    )


def converter_for(estimator: Any) -> Converter:
    """The converter of ``estimator``'s class (or of its nearest supported base class).

    Raises:
        UnsupportedOpError: the class is not supported (named, with the supported ones).

    Examples:
        >>> from sklearn.svm import SVC
        >>> converter_for(SVC(kernel="rbf"))
        Traceback (most recent call last):
        ...
        fhe_quant.errors.UnsupportedOpError: Unsupported operation "SVC(kernel='rbf')" ...
    """
    table = converters()
    for cls in type(estimator).__mro__:
        if cls in table:
            return table[cls]
    raise _unsupported(estimator)


def sklearn_to_graph(estimator: Any) -> SklearnGraph:
    """Read a fitted scikit-learn estimator into a :class:`SklearnGraph`.

    Args:
        estimator: a fitted estimator of a class in :func:`converters` (or a subclass).

    Returns:
        The float graph of its raw outputs and the client-side output function.

    Raises:
        UnsupportedOpError: the class, or one of its options, cannot be compiled.

    Examples:
        >>> from sklearn.linear_model import PoissonRegressor
        >>> model = PoissonRegressor().fit([[0.0], [1.0], [2.0]], [1, 2, 4])
        >>> sklearn_to_graph(model).output
        'exp'
    """
    return converter_for(estimator)(estimator)


def _expected_outputs(
    estimator: Any, imported: SklearnGraph, x: np.ndarray
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    raw = imported.graph(x)
    pairs: list[tuple[str, np.ndarray, np.ndarray]] = []
    if is_classifier(estimator):
        if hasattr(estimator, "decision_function"):
            ours = raw.reshape(-1) if raw.shape[1] == 1 else raw
            pairs.append(("decision_function", ours, estimator.decision_function(x)))
        if imported.output is not None:
            ours = OUTPUT_FUNCTIONS[imported.output](raw)
            pairs.append(("predict_proba", ours, estimator.predict_proba(x)))
    else:
        ours = OUTPUT_FUNCTIONS[imported.output or "identity"](raw)
        ours = ours.reshape(-1) if imported.ravel else ours
        pairs.append(("predict", ours, estimator.predict(x)))
    return pairs


def check_translation(estimator: Any, imported: SklearnGraph, x: np.ndarray) -> None:
    """Check that the graph and output function reproduce the estimator on ``x``.

    Compares, on up to 64 samples, ``decision_function`` and ``predict_proba`` of a
    classifier (where it has them) or ``predict`` of a regressor, so that a
    mistranslation can never pass silently.

    Raises:
        TraceError: a method's output differs (names the method and the difference).
    """
    x = np.asarray(x, dtype=np.float64)[:64]
    with warnings.catch_warnings():
        # NOTE: a model fitted on a DataFrame warns when it sees a plain array here.
        warnings.filterwarnings("ignore", message="X does not have valid feature names")
        pairs = _expected_outputs(estimator, imported, x)
    for method, ours, expected in pairs:
        expected = np.asarray(expected, dtype=np.float64)
        difference = describe_mismatch(ours, expected, rtol=1e-5, atol=1e-7)
        if difference is None:
            continue
        raise TraceError(
            f"The graph built from {type(estimator).__name__} does not reproduce its "
            f"{method} ({difference}); the model was translated wrongly. Please report "
            "this with your model."
        )

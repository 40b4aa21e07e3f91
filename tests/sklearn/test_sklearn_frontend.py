"""The scikit-learn frontend: fitted estimator -> float graph + client output function."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from sklearn import linear_model as sk_linear
from sklearn import neural_network as sk_neural
from sklearn import svm as sk_svm
from sklearn.base import is_classifier

from fhe_quant.errors import TraceError, UnsupportedOpError
from fhe_quant.frontends.sklearn import (
    OUTPUT_FUNCTIONS,
    SklearnGraph,
    check_translation,
    converters,
    sklearn_to_graph,
)
from fhe_quant.ir import Graph, Node


def test_every_supported_class_has_a_converter() -> None:
    names = {cls.__name__ for cls in converters()}
    assert names == {
        "LinearRegression",
        "Ridge",
        "Lasso",
        "ElasticNet",
        "LogisticRegression",
        "LinearSVC",
        "LinearSVR",
        "SGDClassifier",
        "SGDRegressor",
        "PoissonRegressor",
        "GammaRegressor",
        "TweedieRegressor",
        "MLPClassifier",
        "MLPRegressor",
    }


@pytest.mark.parametrize(
    ("model", "output"),
    [
        (sk_linear.LogisticRegression(), "softmax"),
        (sk_linear.SGDClassifier(loss="log_loss", random_state=0), "ovr_sigmoid"),
        (sk_linear.SGDClassifier(loss="modified_huber", random_state=0), "modified_huber"),
        (sk_linear.SGDClassifier(random_state=0), None),
        (sk_svm.LinearSVC(), None),
        (sk_linear.Ridge(), "identity"),
        (sk_svm.LinearSVR(random_state=0, max_iter=10000), "identity"),
        (sk_linear.GammaRegressor(), "exp"),
        (sk_linear.TweedieRegressor(power=0.0), "identity"),
        (sk_linear.TweedieRegressor(power=0.0, link="log"), "exp"),
        (sk_linear.TweedieRegressor(power=2.0), "exp"),
        (
            sk_neural.MLPClassifier(hidden_layer_sizes=(3,), max_iter=3000, random_state=0),
            "softmax",
        ),
        (
            sk_neural.MLPRegressor(hidden_layer_sizes=(3,), max_iter=3000, random_state=0),
            "identity",
        ),
        (
            sk_neural.MLPRegressor(
                loss="poisson", hidden_layer_sizes=(3,), max_iter=3000, random_state=0
            ),
            "exp",
        ),
    ],
    ids=lambda v: type(v).__name__ if not isinstance(v, str | None) else str(v),
)
def test_graph_reproduces_the_model(model: Any, output: str | None, iris: Any) -> None:
    x_train, _, y_train, _ = iris
    # NOTE: positive targets, for the Gamma and Tweedie regressors.
    model.fit(x_train, y_train if is_classifier(model) else y_train + 1.0)
    imported = sklearn_to_graph(model)
    assert imported.output == output
    assert imported.graph.input_shape == (4,)
    check_translation(model, imported, x_train)  # raises on any mismatch


def test_sparse_coefficients(iris: Any) -> None:
    x_train, _, y_train, _ = iris
    model = sk_linear.SGDClassifier(penalty="l1", random_state=0).fit(x_train, y_train)
    model.sparsify()
    imported = sklearn_to_graph(model)
    assert isinstance(imported.graph.node("linear").params["weight"], np.ndarray)
    check_translation(model, imported, x_train)


def test_a_mistranslation_is_caught(iris: Any) -> None:
    x_train, _, y_train, _ = iris
    model = sk_linear.LogisticRegression().fit(x_train, y_train)
    good = sklearn_to_graph(model)
    linear = good.graph.node("linear")
    wrong = Node("linear", "linear", ("input",), params={"weight": linear.params["weight"] * 1.01})
    graph = Graph((good.graph.nodes[0], wrong), "input", "linear", (4,))
    with pytest.raises(TraceError, match="decision_function"):
        check_translation(model, SklearnGraph(graph, good.output, good.ravel), x_train)
    with pytest.raises(TraceError, match="predict_proba"):
        check_translation(model, SklearnGraph(good.graph, "ovr_sigmoid", good.ravel), x_train)


def test_output_functions() -> None:
    raw = np.array([[0.0], [2.0]])
    np.testing.assert_allclose(OUTPUT_FUNCTIONS["sigmoid"](raw)[0], [0.5, 0.5])
    np.testing.assert_allclose(OUTPUT_FUNCTIONS["modified_huber"](raw)[1], [0.0, 1.0])
    many = np.array([[-5.0, -3.0, -2.0], [1.0, 2.0, 3.0]])
    np.testing.assert_allclose(OUTPUT_FUNCTIONS["softmax"](many).sum(axis=1), 1.0)
    # One-vs-rest rows of zeros (every class rejected) become uniform, as in sklearn.
    np.testing.assert_allclose(OUTPUT_FUNCTIONS["modified_huber"](many)[0], [1 / 3] * 3)
    assert np.array_equal(OUTPUT_FUNCTIONS["exp"](raw), np.exp(raw))


def test_unknown_output_name_is_refused(iris: Any) -> None:
    model = sk_linear.LinearRegression().fit(iris[0], iris[2])
    with pytest.raises(ValueError, match="'output'"):
        SklearnGraph(sklearn_to_graph(model).graph, "softplus", True)


def test_unsupported_tweedie_link(iris: Any) -> None:
    model = sk_linear.TweedieRegressor().fit(iris[0], iris[2] + 1.0)
    model.link = "logit"  # not a scikit-learn GLM link: only a patched model has it
    with pytest.raises(UnsupportedOpError, match="link='logit'"):
        sklearn_to_graph(model)
